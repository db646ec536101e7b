"""generate(): HF-identical greedy and seeded sampling, argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS
from transformers import AutoModelForCausalLM

from expertflow import runtime


@pytest.fixture(scope="module")
def pair(model_dir, compiled_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen3-moe")).eval()
    return hf, runtime.load(compiled_dir("tiny-qwen3-moe"), expert_cache=3)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.8)])
def test_seeded_sampling_matches_hf(pair, temperature, top_k, top_p):
    hf, model = pair
    torch.manual_seed(1234)
    ref = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=24, do_sample=True,
                      temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(1234)
    out = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=24, do_sample=True,
                         temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(out, ref)
    greedy = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=24)
    assert not torch.equal(out, greedy)  # sampling really sampled


def test_generator_makes_sampling_reproducible(pair):
    _, model = pair
    runs = [model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=12, do_sample=True,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=0.0), "top_p must be in (0, 1]"),
])
def test_bad_generation_arguments(pair, kwargs, message):
    _, model = pair
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        model.generate(PROMPTS, attention_mask=PROMPT_MASK, **({"max_new_tokens": 4} | kwargs))
