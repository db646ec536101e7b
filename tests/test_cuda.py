"""The CUDA path: exactness against HF eager on the GPU, copy stream ordering. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertflow import runtime

from conftest import PROMPT_MASK, PROMPTS

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-gpt-oss"])
@pytest.mark.parametrize("budget", [1, 3, None])
def test_cuda_matches_hf(preset, budget, model_dir, compiled_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir(preset)).eval().to("cuda")
    ids, mask = PROMPTS.cuda(), PROMPT_MASK.cuda()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    ref_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    model = runtime.load(compiled_dir(preset), device="cuda", expert_cache=budget)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=32), ref_tokens)
    stats = model.stats()["total"]
    assert stats["bytes_moved"] > 0 and stats["hits"] + stats["misses"] == stats["needed"]


def test_cuda_pool_lives_on_gpu_and_store_is_pinned(compiled_dir):
    model = runtime.load(compiled_dir("tiny-mixtral"), device="cuda", expert_cache=2)
    cache = model.context.cache
    assert all(pool.tensor.is_cuda for pool in cache.pools.values())
    assert all(blob.is_pinned() for blob in cache.store.blobs.values())
