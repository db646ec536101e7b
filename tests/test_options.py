"""Compile options end to end: lookahead and predictor change prefetching, never the logits."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS
from transformers import AutoModelForCausalLM

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.cli.compile import compile_model


@pytest.mark.parametrize("options", [CompileOptions(lookahead=2), CompileOptions(lookahead=3),
                                     CompileOptions(predictor="none")], ids=["d2", "d3", "none"])
def test_options_keep_logits_exact(tmp_path, model_dir, options):
    source = model_dir("tiny-mixtral")
    out = compile_model(str(source), tmp_path / "c", options, dumps=False)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        ref = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
    model = runtime.load(out, expert_cache=6)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, ref, atol=1e-5, rtol=0)
    tokens = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=8)
    assert torch.equal(tokens, hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=8, do_sample=False))
    stats = model.stats()
    if options.predictor == "none":
        assert stats["total"]["predicted"] == 0 and stats["total"]["misses"] > 0
    else:  # every MoE layer gets a prefetch; the first `lookahead` ones are predicted from the embeddings
        assert all(layer["predicted"] > 0 for layer in stats["layers"].values())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="lookahead must be >= 1"):
        CompileOptions(lookahead=0)
    with pytest.raises(ValueError, match="unknown predictor"):
        CompileOptions(predictor="oracle")


def test_options_go_to_the_manifest_and_back_whole(tmp_path, model_dir):
    """Every field reaches the manifest (a new option cannot be dropped by the writer) and comes
    back equal; a field an older manifest lacks takes its default; an unknown one is refused;
    overrides that are not None apply."""
    import dataclasses
    import json

    options = CompileOptions(lookahead=2, predictor="none", policy="lru", prefetch="hint", permute=False)
    assert set(options.to_json()) == {f.name for f in dataclasses.fields(CompileOptions)}
    assert CompileOptions.from_json(options.to_json()) == options
    assert CompileOptions.from_json({"lookahead": 2}) == CompileOptions(lookahead=2)
    assert CompileOptions.from_json(options.to_json(), policy="lfu", lookahead=None).policy == "lfu"
    with pytest.raises(ValueError, match="unknown compile option speed"):
        CompileOptions.from_json({"speed": 3})
    out = compile_model(str(model_dir("tiny-mixtral")), tmp_path / "c", options, dumps=False)
    assert json.loads((out / "manifest.json").read_text())["options"] == options.to_json()
    from expertflow.runtime.assemble import loader

    assert loader.check(out).options == options.to_json()
