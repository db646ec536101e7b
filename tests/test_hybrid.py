"""A hybrid-attention MoE end to end: gated-DeltaNet layers whose recurrent and convolution states
live in transformers' cache, carried across steps by the compiled model as generation carries them.

``tiny-qwen3-next``: three linear-attention layers and one full-attention layer, every layer MoE.
Compiled with the routing-path predictor fitted on calibration traces (so the trace recorder,
calibration and predictors run on a hybrid), then: 64 greedy tokens at one and at two expert
slots equal transformers' token for token (a state recomputed or dropped along the way would
diverge), every predictor keeps them, and the batching features that cannot carry a recurrent
state say so in one line instead of giving other tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.cli.compile import Calibration, compile_model
from expertflow.tools.make.source import resolve_model

NAME = "tiny-qwen3-next"
LONG = 64


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    out = compile_model(NAME, tmp_path_factory.mktemp("hybrid") / "c", CompileOptions(predictor="routing_path"),
                        dumps=False, calibration=Calibration("builtin", 512, seed=0))
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(NAME), dtype=torch.float32).eval()
    return out, hf


def _prompts(hf) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: the linear-attention layers must ignore its padding too
    return ids, mask


@pytest.mark.slow
def test_the_cache_holds_recurrent_and_convolution_states(hybrid):
    out, _ = hybrid
    model = runtime.load(out, expert_cache=1)
    kinds = {type(layer).__name__ for layer in model.new_cache().layers}
    assert any("Linear" in k for k in kinds) and len(kinds) >= 2, kinds


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 2])
def test_long_greedy_generation_equals_transformers(hybrid, slots):
    out, hf = hybrid
    ids, mask = _prompts(hf)
    kwargs = dict(attention_mask=mask, max_new_tokens=LONG, min_new_tokens=LONG, do_sample=False)
    want = hf.generate(ids, **kwargs)
    model = runtime.load(out, expert_cache=slots)
    got = model.generate(ids, **kwargs)
    assert got.shape[1] == ids.shape[1] + LONG
    assert torch.equal(got, want)
    stats = model.stats()["total"]
    assert stats["misses"] > 0 and stats["predicted"] > 0  # experts really moved, predictions were made


@pytest.mark.slow
def test_every_predictor_and_beam_search_keep_the_tokens(hybrid):
    out, hf = hybrid
    ids, mask = _prompts(hf)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
    for predictor in ("routing_path", "transition", "frequency", "cross_layer_gate"):
        model = runtime.load(out, expert_cache=2, predictor=predictor)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
        assert torch.equal(got, want), predictor


@pytest.mark.slow
def test_batching_that_cannot_carry_a_state_says_so(hybrid):
    out, hf = hybrid
    model = runtime.load(out, expert_cache=2)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    with pytest.raises(ValueError, match="state layers") as err:
        model.generate_many(prompts, batch_size=2, continuous=True, max_new_tokens=4, do_sample=False)
    assert "\n" not in str(err.value)
    # Where it applies (the default), fixed micro-batches run: each prompt's tokens as alone.
    alone = [hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0].tolist() for p in prompts]
    assert model.generate_many(prompts, batch_size=2, max_new_tokens=4, do_sample=False) == alone


#: Layer patterns the sweep's defaults do not build: a recurrent or convolution layer first (the
#: cache's layer 0 then holds no keys: MiniMax's cache says it has seen 0 tokens), dense layers
#: mixed in, attention last.
PATTERNS = {
    "minimax": dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"]),
    "lfm2_moe": dict(num_hidden_layers=4, num_dense_layers=0, layer_types=["conv", "conv", "full_attention", "conv"]),
    # (an MoE layer first is a pattern transformers 5.25 itself cannot run: its cache's layer 0 is a placeholder)
    # KV-shared layers: transformers 5.25's stack asks seq_len == 1 before a slice it then skips anyway
    "gemma4_text": dict(num_hidden_layers=4, num_kv_shared_layers=2,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "nemotron_h": dict(num_hidden_layers=5, layers_block_type=["linear_attention", "moe", "moe", "full_attention", "moe"]),
}


@pytest.mark.parametrize("model_type", sorted(PATTERNS))
def test_layer_patterns_beyond_the_defaults(model_type: str, tmp_path) -> None:
    from conftest import assert_matches_hf

    from expertflow.tools.presets.tiny_config import build_tiny

    hf = build_tiny(model_type, seed=1, **PATTERNS[model_type])
    hf.save_pretrained(tmp_path / "hf")
    out = compile_model(str(tmp_path / "hf"), tmp_path / "c", CompileOptions(), dumps=False, quiet=True)
    model = runtime.load(out, expert_cache=1)
    assert_matches_hf(model, hf, new_tokens=24)
