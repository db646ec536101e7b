"""The CUDA path: exactness against HF eager on the GPU, copy stream ordering. Skipped without a GPU."""

from __future__ import annotations

import time

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


def test_cuda_bf16_matches_hf(model_dir, tmp_path):
    """bf16 weights (the dtype real checkpoints ship in): the same tokens as HF eager in bf16."""
    from expertflow.passes.options import CompileOptions
    from expertflow.tools.cli.compile import compile_model

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model_dir("tiny-mixtral"), dtype=torch.bfloat16).save_pretrained(source)
    compiled = compile_model(str(source), tmp_path / "c", CompileOptions(), dumps=False)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval().to("cuda")
    ids, mask = PROMPTS.cuda(), PROMPT_MASK.cuda()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    ref_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    model = runtime.load(compiled, device="cuda", expert_cache=3)
    out = model(ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24), ref_tokens)


class _PinnedStore:
    """Distinct bytes per (layer, expert) in pinned host memory: a slot's content names its blob."""

    def __init__(self, layers: int, experts: int, blob: int):
        self.blobs = {(l, e): torch.full((blob,), 16 * l + e, dtype=torch.uint8).pin_memory()
                      for l in range(layers) for e in range(experts)}

    def blob(self, layer: int, expert: int) -> torch.Tensor:
        return self.blobs[(layer, expert)]


def test_cuda_two_layouts_a_slow_reader_is_never_overwritten():
    """Two expert layouts make two pools with the same slot numbers. A compute slowed with
    torch.cuda._sleep still reads pool 0's slot 0 when a copy into that slot is queued: the copy
    must wait for that reader (its event is keyed by (pool, slot)), and a copy into pool 1's
    slot 0 must not be mistaken for it."""
    from expertflow.runtime.cache.expert_cache import ExpertCache
    from expertflow.runtime.store.host import ExpertLayout, Part
    from expertflow.runtime.cache.streams import CopyEngine

    blob = 1 << 20
    part32 = Part("down_proj", "float32", (512, 512), 0)
    part_i = Part("down_proj", "int32", (512, 512), 0)
    layouts = {0: ExpertLayout(0, "lm.model.layers.0.mlp.experts", 4, (part32,), blob),
               1: ExpertLayout(1, "lm.model.layers.1.mlp.experts", 4, (part_i,), blob)}
    dev = torch.device("cuda")
    store = _PinnedStore(2, 4, blob)
    cache = ExpertCache(layouts, store, 1, dev, CopyEngine(dev))  # one slot per pool: the third acquire evicts
    try:
        assert len(cache.pools) == 2
        first = cache.acquire(0, [1])
        torch.cuda._sleep(100_000_000)  # the compute stream is busy for a while before it reads
        seen = cache.pool(0).tensor[first[0]].clone()
        cache.release(0, first)
        other = cache.acquire(1, [3])  # pool 1, the same slot number
        cache.release(1, other)
        second = cache.acquire(0, [2])  # evicts (0, 1): its copy must wait for the slow read
        cache.release(0, second)
        torch.cuda.synchronize()
        assert torch.equal(seen.cpu().view(torch.uint8).flatten(), store.blob(0, 1))
        assert torch.equal(cache.pool(0).tensor[second[0]].cpu().view(torch.uint8).flatten(), store.blob(0, 2))
        assert torch.equal(cache.pool(1).tensor[other[0]].cpu().view(torch.uint8).flatten(), store.blob(1, 3))
    finally:
        cache.engine.close()


def test_cuda_slowed_compute_keeps_hf_tokens(compiled_dir, hf_reference, monkeypatch):
    """Every expert compute slowed with torch.cuda._sleep, at one slot: each copy into a slot
    races the compute still reading it, so a missing event changes the tokens."""
    from expertflow.runtime.generate.context import RuntimeContext

    hf, ids, mask = hf_reference("tiny-mixtral")
    hf = hf.to("cuda")
    ids, mask = ids.cuda(), mask.cuda()
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    run = RuntimeContext._run

    def slow(self, *args, **kwargs):
        torch.cuda._sleep(2_000_000)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(RuntimeContext, "_run", slow)
    model = runtime.load(compiled_dir("tiny-mixtral"), device="cuda", expert_cache=1)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16), ref)


def test_cuda_no_memory_growth_over_1000_decode_steps(compiled_dir):
    """The runtime's per-step state (tickets, events, slot tables, views) does not accumulate:
    device memory after 1,000 steps equals that after 10."""
    model = runtime.load(compiled_dir("tiny-mixtral"), device="cuda", expert_cache=3)
    ids = PROMPTS[:, -4:].cuda()
    mask = torch.ones_like(ids)
    for step in range(1000):
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)
        if step == 9:
            torch.cuda.synchronize()
            early = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= early
    assert len(model.context.cache.engine._slot_read) <= sum(p.tensor.shape[0] for p in model.context.cache.pools.values())


def test_cuda_peak_memory_within_dense_slots_and_kv(model_dir, compiled_dir):
    """Peak device memory stays within dense weights + slot pool + KV cache + 10% (+64 MiB for
    cuBLAS workspaces and activations) on the 240M-parameter bf16 preset at 25% of the experts."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = runtime.load(compiled_dir("bench-mixtral-240m"), device="cuda", expert_cache="25%")
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    dense = sum(t.numel() * t.element_size() for t in
                list(model.parameters()) + list(model.buffers()) if t.is_cuda)
    slots = sum(p.tensor.numel() * p.tensor.element_size() for p in model.context.cache.pools.values())
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * out.shape[0] * out.shape[1] * cfg.num_key_value_heads * head * 2
    assert peak <= 1.1 * (dense + slots + kv) + (64 << 20), (peak, dense, slots, kv)


def test_cuda_a_copy_orphaned_by_an_interrupt_never_lands_over_a_later_one(monkeypatch):
    """A Ctrl-C after a prefetch's copy is queued and before its event is recorded leaves a copy
    nothing knows of, on a busy prefetch stream. A later demand copy into the same slot runs on
    the other stream; it must wait for the orphan, or the orphan lands over it."""
    from expertflow.runtime.cache.streams import CopyEngine

    dev = torch.device("cuda")
    engine = CopyEngine(dev)
    slot = torch.zeros(1 << 22, dtype=torch.uint8, device=dev)
    stale, fresh = (torch.full((1 << 22,), v, dtype=torch.uint8).pin_memory() for v in (1, 2))
    with torch.cuda.stream(engine._stream):
        torch.cuda._sleep(200_000_000)  # the prefetch stream is busy: the orphan lands late

    class Interrupted(torch.cuda.Event):
        def record(self, stream=None):
            raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "Event", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.submit((0, 0), slot, stale)
    monkeypatch.undo()
    engine.submit((0, 0), slot, fresh, demand=True).wait()
    torch.cuda.synchronize()
    assert torch.equal(slot.cpu(), fresh)


def test_cuda_close_lands_every_queued_copy():
    """A dropped model's engine closes before its slots and pinned pages go: a copy still queued
    (a wasted prefetch behind a busy copy stream) has landed when ``close`` returns, and the slots
    are recorded on the copy streams so the allocator would wait for it anyway."""
    from expertflow.runtime.cache.streams import CopyEngine

    dev = torch.device("cuda")
    engine = CopyEngine(dev)
    dst = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
    engine.adopt(dst)
    src = torch.full((1 << 20,), 7, dtype=torch.uint8).pin_memory()
    with torch.cuda.stream(engine._stream):
        torch.cuda._sleep(200_000_000)  # the copy stream is busy: the copy below stays queued
    ticket = engine.submit((0, 0), dst, src)
    assert not ticket.ready()
    engine.close()
    assert ticket.ready() and bool((dst == 7).all())


def test_cuda_a_copy_overlaps_a_running_compute():
    """The copy stream works while the compute stream is busy: a 64 MiB copy queued after a
    long kernel has landed while that kernel still runs (copies overlap compute, the point of
    the second stream)."""
    from expertflow.runtime.cache.streams import CopyEngine

    dev = torch.device("cuda")
    engine = CopyEngine(dev)
    dst = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    src = torch.ones(64 << 20, dtype=torch.uint8).pin_memory()
    try:
        busy = torch.cuda.Event()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of compute stream
        busy.record()
        ticket = engine.submit((0, 0), dst, src, demand=True)
        deadline = time.monotonic() + 0.5
        while not ticket.ready() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ticket.ready() and not busy.query(), "the copy waited for the compute stream"
    finally:
        engine.close()
