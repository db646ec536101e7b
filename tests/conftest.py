"""Shared fixtures: small models saved to temp dirs, compiled once per session. No network."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import pytest
import torch

from expertflow.passes.options import CompileOptions
from expertflow.tools.presets import catalog as presets
from expertflow.tools.cli.compile import compile_model

# Two prompts, the first left-padded: what the exactness tests feed every model.
PROMPTS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
#: A budget below the experts one layer touches in the prefill of PROMPTS: a step evicts and
#: computes in waves.
EVICT = 3


def assert_matches_hf(model, hf, new_tokens: int) -> None:
    """``model`` (compiled) gives ``hf``'s logits on the padded prompt batch and its greedy tokens."""
    with torch.no_grad():
        ref = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
        tokens = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=new_tokens, do_sample=False)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, ref, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=new_tokens), tokens)


def _granite_has_experts_interface() -> bool:
    """Older transformers 5.x built GraniteMoe on JetMoe's ParallelExperts, not the experts interface."""
    from transformers.models.granitemoe import modeling_granitemoe

    return hasattr(modeling_granitemoe, "GraniteMoeExperts")


#: Greedy tokens the exactness tests generate.
NEW_TOKENS = 32

#: The presets of every architecture the exactness tests cover.
ARCHS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v3", "tiny-gpt-oss",
         pytest.param("tiny-granitemoe", marks=pytest.mark.skipif(
             not _granite_has_experts_interface(),
             reason="this transformers' GraniteMoe predates use_experts_implementation"))]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(preset)``: the preset saved with save_pretrained in a session temp dir."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = presets.materialize(name, root)
        return made[name]

    return make


@pytest.fixture(scope="session")
def compiled_dir(tmp_path_factory, model_dir):
    """``compiled_dir(preset)``: the preset compiled once per session (do not modify it)."""
    root = tmp_path_factory.mktemp("compiled")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = compile_model(str(model_dir(name)), root / name, CompileOptions(), quiet=True)
        return made[name]

    return make


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """``hf_reference(preset)``: (model, logits, generated tokens) from transformers, once per preset."""
    from transformers import AutoModelForCausalLM

    made: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def make(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        if name not in made:
            hf = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32).eval()
            with torch.no_grad():
                logits = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
                tokens = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS,
                                     do_sample=False)
            made[name] = (hf, logits, tokens)
        return made[name]

    return make
