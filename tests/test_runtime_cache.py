"""The expert cache: real bytes moved into slots, hit/miss accounting, copies on the copy thread
overlapping compute, pinned slots never reused, waves, budgets, and HF-identical logits at the
smallest and the largest budget."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from expertflow.runtime import Budget, LoadError, load
from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.store.host import ExpertLayout, Part
from expertflow.runtime.cache.streams import CopyEngine

from conftest import PROMPT_MASK, PROMPTS

BLOB = 64  # bytes per expert in the synthetic cache: one float32 4x4 matrix


def layouts_for(layers: int, experts: int, blob: int = BLOB, dtype: str = "float32") -> dict[int, ExpertLayout]:
    side = int(math.isqrt(blob // 4))
    part = Part("down_proj", dtype, (side, blob // 4 // side), 0)
    return {layer: ExpertLayout(layer, f"lm.model.layers.{layer}.mlp.experts", experts, (part,), blob)
            for layer in range(layers)}


class Recording(torch.Tensor):
    """A host blob that notes which thread copies it (and can make that copy slow)."""

    copies: list[tuple[str, float]] = []
    delay = 0.0

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.copy_:
            Recording.copies.append((threading.current_thread().name, time.perf_counter()))
            time.sleep(Recording.delay)
        return super().__torch_function__(func, types, args, kwargs or {})


class Store:
    """Distinct bytes per (layer, expert), so a slot's content says which blob landed in it."""

    def __init__(self, layers: int, experts: int, blob: int = BLOB):
        self.blobs = {(l, e): torch.full((blob,), 16 * l + e, dtype=torch.uint8).as_subclass(Recording)
                      for l in range(layers) for e in range(experts)}

    def blob(self, layer: int, expert: int) -> torch.Tensor:
        return self.blobs[(layer, expert)]


@pytest.fixture
def make_cache() -> Iterator:
    engines: list[CopyEngine] = []
    Recording.copies, Recording.delay = [], 0.0

    def make(slots: int, layers: int = 2, experts: int = 8) -> ExpertCache:
        engines.append(CopyEngine(torch.device("cpu")))
        return ExpertCache(layouts_for(layers, experts), Store(layers, experts), slots, torch.device("cpu"),
                           engines[-1])

    yield make
    Recording.delay = 0.0  # other files' caches copy these blobs too
    for engine in engines:
        engine.close()


def resident(cache: ExpertCache, layer: int) -> dict[int, int]:
    """expert -> slot for ``layer``, checking every slot holds exactly its owner's bytes."""
    pool = cache.pool(layer)
    for ticket in pool.tickets.values():  # prefetches still in flight land first
        ticket.wait()
    for (l, e), slot in pool.where.items():
        assert torch.equal(pool.tensor[slot], cache.store.blob(l, e).as_subclass(torch.Tensor)), (l, e, slot)
    return {e: s for (l, e), s in pool.where.items() if l == layer}


def test_bytes_moved_hits_and_misses(make_cache) -> None:
    cache = make_cache(slots=2)
    slots = cache.acquire(0, [1, 2])
    cache.release(0, slots)
    assert resident(cache, 0) == {1: slots[0], 2: slots[1]}
    assert (cache.stats[0].misses, cache.stats[0].hits, cache.stats[0].bytes_moved) == (2, 0, 2 * BLOB)
    cache.release(0, cache.acquire(0, [2, 1]))  # both resident: no copy
    assert (cache.stats[0].misses, cache.stats[0].hits, cache.stats[0].bytes_moved) == (2, 2, 2 * BLOB)
    cache.release(0, cache.acquire(0, [3]))  # evicts the least recently used: expert 2 (used before 1)
    assert set(resident(cache, 0)) == {1, 3}
    assert cache.stats[0].bytes_moved == 3 * BLOB == cache.engine.bytes_moved == cache.engine.copies * BLOB


def test_prefetch_copies_on_the_copy_thread_while_the_caller_computes(make_cache) -> None:
    cache = make_cache(slots=4)
    handle = cache.prefetch(1, torch.tensor([[3, 5]]))
    assert handle.predicted == [] and cache.host_syncs == 0, "a prefetch reads nothing back by itself"
    Recording.delay = 0.1
    start = time.perf_counter()
    waves = cache.plan(0, None, torch.tensor([[0]]))  # layer 0's wait reads layer 1's prediction too
    assert handle.predicted == [3, 5] and cache.host_syncs == 1
    slots0 = cache.acquire(0, waves[0])  # its demand copy first, then the prefetches
    cache.release(0, slots0)
    assert time.perf_counter() - start < 0.25, "the wait blocked on the prefetches' copies"
    time.sleep(0.4)  # the compute of layer 0: the copies land meanwhile
    waves = cache.plan(1, handle, torch.tensor([[5, 3]]))
    slots = cache.acquire(1, waves[0])
    assert [name for name, _ in Recording.copies] == ["expertflow-copy-0"] * 3
    assert Recording.copies[1][1] - start < 0.25  # the prefetch copies started before the "compute" ended
    assert cache.stats[1].stall_s < 0.1 and cache.stats[1].hits == 2 and cache.stats[1].misses == 0
    assert cache.stats[1].predicted_used == 2 and cache.host_syncs == 2
    assert set(resident(cache, 1)) == {3, 5}
    cache.release(1, slots)


def test_a_prefetch_for_the_running_layer_loads_nothing_itself(make_cache) -> None:
    # Read back at its own layer's wait, a prediction is too late to copy early: the wait loads
    # what the router chose, and the prediction counts for accuracy only.
    cache = make_cache(slots=4)
    handle = cache.prefetch(1, torch.tensor([[3, 5]]))
    waves = cache.plan(1, handle, torch.tensor([[5, 6]]))
    cache.release(1, cache.acquire(1, waves[0]))
    s = cache.stats[1]
    assert (s.predicted, s.predicted_used, s.misses, s.bytes_moved) == (2, 1, 2, 2 * BLOB)
    assert set(resident(cache, 1)) == {5, 6}


def test_no_slot_is_reused_while_pinned(make_cache) -> None:
    cache = make_cache(slots=2, layers=3)
    cache.prefetch(1, torch.tensor([4, 6]))
    waves = cache.plan(0, None, torch.tensor([[1, 2]]))
    pinned = cache.acquire(0, waves[0])  # the compute reading these slots is not done
    assert cache.stats[1].prefetch_dropped == 2  # nowhere to go: both slots pinned
    before = cache.pool(0).tensor.clone()
    assert cache.engine.copies == 2
    cache.release(0, pinned)
    cache.prefetch(1, torch.tensor([4, 6]))
    cache.release(2, cache.acquire(2, cache.plan(2, None, torch.tensor([[]], dtype=torch.long))[0]))
    assert set(resident(cache, 1)) == {4, 6} and cache.engine.copies == 4
    assert not torch.equal(cache.pool(0).tensor, before)


def test_prefetch_does_not_evict_another_layers_reservation(make_cache) -> None:
    cache = make_cache(slots=2, layers=3)
    cache.prefetch(1, torch.tensor([4, 6]))
    cache.release(2, cache.acquire(2, cache.plan(2, None, torch.tensor([[]], dtype=torch.long))[0]))
    cache.prefetch(0, torch.tensor([1]))  # layer 1 computes first; its prefetched experts stay
    cache.release(2, cache.acquire(2, cache.plan(2, None, torch.tensor([[]], dtype=torch.long))[0]))
    assert cache.stats[0].prefetch_dropped == 1 and set(resident(cache, 1)) == {4, 6}


def test_waves_when_needed_experts_exceed_slots(make_cache) -> None:
    cache = make_cache(slots=2, layers=1)
    cache.release(0, cache.acquire(0, [4]))
    waves = cache.plan(0, None, torch.tensor([[0, 1], [2, 4], [1, 7]]))
    assert waves[0][0] == 4, "the resident expert goes first, before any slot is refilled"
    assert sorted(e for wave in waves for e in wave) == [0, 1, 2, 4, 7]
    assert [len(w) for w in waves] == [2, 2, 1] and cache.stats[0].waves == 3
    for wave in waves:
        slots = cache.acquire(0, wave)
        assert len(set(slots)) == len(wave) and set(resident(cache, 0)) >= set(wave)
        cache.release(0, slots)
    assert cache.stats[0].hits == 1 and cache.stats[0].misses == 1 + 4  # the warm-up load, then 0, 1, 2, 7


def test_out_of_range_ids_are_ignored(make_cache) -> None:
    # Padding rows and predictors may name experts that do not exist; nothing is loaded for them.
    cache = make_cache(slots=2, layers=2, experts=4)
    cache.prefetch(0, torch.tensor([-1, 9, 2]))
    cache.release(1, cache.acquire(1, cache.plan(1, None, torch.tensor([[-1, 7]]))[0]))
    assert cache.stats[0].predicted == 1 and set(resident(cache, 0)) == {2}
    assert cache.stats[1].needed == 0 and cache.engine.copies == 1


@pytest.mark.parametrize("budget, slots", [
    (None, 32), ("all", 32), (5, 5), (100, 32), ("4MiB", 4), ("4 mib", 4), ("4.5MiB", 4), (".5GiB", 32),
    ("3MB", 2), ("4GiB", 32), ("1048576B", 1), ("1MiB", 1), ("25%", 8), ("12.5 %", 4), ("100%", 32), ("1%", 1),
])
def test_budget_slots(budget: Any, slots: int) -> None:
    assert Budget.read(budget).slots_on(layouts_for(layers=4, experts=8, blob=2**20)) == slots


def test_budget_slots_split_bytes_between_pools() -> None:
    # Layers whose experts differ in layout get a pool each, and a byte budget pays for both.
    layouts = layouts_for(layers=2, experts=8, blob=2**20)
    layouts.update({l + 2: lay for l, lay in layouts_for(2, 8, 2**20, "int32").items()})
    assert Budget.read("4MiB").slots_on(layouts) == 2
    assert Budget.read(None).slots_on(layouts) == 16
    with pytest.raises(LoadError, match="minimum is 1 slot"):
        Budget.read("1.5MiB").slots_on(layouts)


# --- a real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_logits(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir("tiny-mixtral")).eval()
    with torch.no_grad():
        return hf(PROMPTS, attention_mask=PROMPT_MASK).logits


def check_real_bytes(model: Any) -> None:
    cache = model.context.cache
    blob = next(iter(cache.layouts.values())).blob_bytes
    for layer in cache.layouts:
        resident(cache, layer)
    total = model.stats()["total"]
    assert total["bytes_moved"] == cache.engine.copies * blob == cache.engine.bytes_moved
    assert total["hits"] + total["misses"] == total["needed"]  # each needed expert looked up once


def test_minimum_budget_matches_hf(compiled_dir, hf_logits: torch.Tensor) -> None:
    model = load(compiled_dir("tiny-mixtral"), expert_cache=1)
    store = model.context.cache.store
    blob = store.blob
    store.blob = lambda layer, expert: blob(layer, expert).as_subclass(Recording)
    Recording.copies, Recording.delay = [], 0.0
    assert_close(model(PROMPTS, PROMPT_MASK).logits, hf_logits)
    stats = model.stats()
    assert stats["slots"] == 1
    for layer in stats["layers"].values():  # one slot: one wave per needed expert
        assert layer["waves"] == layer["needed"] > 1
    assert {name for name, _ in Recording.copies} == {"expertflow-copy-0"}
    assert len(Recording.copies) == model.context.cache.engine.copies > 0
    check_real_bytes(model)


def test_three_slots_compute_in_waves_and_match_hf(compiled_dir, hf_logits: torch.Tensor) -> None:
    model = load(compiled_dir("tiny-mixtral"), expert_cache=3)
    assert_close(model(PROMPTS, PROMPT_MASK).logits, hf_logits)
    for layer in model.stats()["layers"].values():
        assert layer["waves"] == math.ceil(layer["needed"] / 3)
    check_real_bytes(model)


def test_all_resident_matches_hf_and_stops_moving_bytes(compiled_dir, hf_logits: torch.Tensor) -> None:
    model = load(compiled_dir("tiny-mixtral"), expert_cache=None)
    assert model.stats()["slots"] == 32
    assert_close(model(PROMPTS, PROMPT_MASK).logits, hf_logits)
    check_real_bytes(model)
    moved = model.stats()["total"]["bytes_moved"]
    model.reset_stats()
    assert_close(model(PROMPTS, PROMPT_MASK).logits, hf_logits)  # warm: every expert already has a slot
    total = model.stats()["total"]
    assert (total["misses"], total["bytes_moved"]) == (0, 0) and total["hits"] == total["needed"] > 0
    assert moved > 0


def step(cache: ExpertCache, layer: int, experts: list[int]) -> list[int]:
    """One layer's wait and compute, as the graph runs them: plan, acquire, release."""
    waves = cache.plan(layer, None, torch.tensor([experts]))
    slots = cache.acquire(layer, waves[0])
    cache.release(layer, slots)
    return slots


def test_eviction_follows_the_layer_cycle_not_lru(make_cache) -> None:
    # Three MoE layers, one expert each per token, three slots: every layer's expert fits.
    cache = make_cache(slots=3, layers=3)
    for layer in range(3):
        step(cache, layer, [layer])
    # Layer 0 of the next token needs a new expert: layer 0 itself runs again last, so its old
    # slot is freed (LRU agrees here: it is also the oldest).
    step(cache, 0, [5])
    pool = next(iter(cache.pools.values()))
    assert (0, 0) not in pool.where and {(1, 1), (2, 2), (0, 5)} == set(pool.where)
    # Layer 1 needs a second expert. LRU would evict layer 2's (the oldest), which runs next;
    # the layer cycle evicts layer 0's, which runs again only after layer 2.
    before = cache.stats[1].hits
    step(cache, 1, [1])
    assert cache.stats[1].hits == before + 1
    step(cache, 1, [1, 6])
    assert (1, 1) in pool.where and (1, 6) in pool.where and (2, 2) in pool.where
    assert (0, 5) not in pool.where


def test_an_interrupted_wait_keeps_the_copy_accounted_for(make_cache, monkeypatch) -> None:
    """Ctrl-C while acquire waits for a copy: the copy is still in flight, so the next acquire of
    that expert must wait for it too, not read a half-written slot."""
    from expertflow.runtime.cache.streams import Ticket

    cache = make_cache(slots=2, layers=1)
    Recording.delay = 0.3
    original, calls = Ticket.wait, {"n": 0}

    def interrupted_once(self) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # lands while the copy thread is still copying
        original(self)

    monkeypatch.setattr(Ticket, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        cache.acquire(0, [3])
    cache.abort()
    slot = cache.pool(0).where[(0, 3)]
    assert slot in cache.pool(0).tickets, "the copy in flight was forgotten"
    Recording.delay = 0.0
    assert cache.acquire(0, [3]) == [slot] and cache.stats[0].hits == 1
    assert torch.equal(cache.pool(0).tensor[slot], cache.store.blob(0, 3).as_subclass(torch.Tensor))


def test_copies_are_ordered_per_pool_and_slot() -> None:
    """Two expert layouts make two pools with the same slot numbers: the copy engine's ordering
    (a copy waits for the last reader of its slot) must not confuse pool 0's slot 1 with pool 1's."""

    class Recorder(CopyEngine):
        def __init__(self):
            super().__init__(torch.device("cpu"))
            self.submitted, self.read = [], []

        def submit(self, key, dst, src, label="", demand=True):
            self.submitted.append(key)
            return super().submit(key, dst, src, label, demand)

        def mark_read(self, keys):
            self.read.extend(keys)

    layouts = layouts_for(layers=1, experts=4)
    layouts.update({l + 1: lay for l, lay in layouts_for(1, 4, BLOB, "int32").items()})
    layouts = {l: ExpertLayout(l, f"lm.model.layers.{l}.mlp.experts", lay.num_experts, lay.parts, lay.blob_bytes)
               for l, lay in layouts.items()}
    engine = Recorder()
    cache = ExpertCache(layouts, Store(2, 4), 2, torch.device("cpu"), engine)
    try:
        assert len(cache.pools) == 2
        cache.release(0, cache.acquire(0, [1]))
        cache.release(1, cache.acquire(1, [3]))
        pools = [cache.pool(0).ident, cache.pool(1).ident]
        assert pools[0] != pools[1]
        assert engine.submitted == [(pools[0], 0), (pools[1], 0)]  # same slot number, two pools
        assert engine.read == engine.submitted
    finally:
        engine.close()


def test_a_step_whose_slots_spread_past_the_group_limit_runs_in_windows(compiled_dir, hf_logits, monkeypatch):
    """Issue 24's 1,024-group defect: torch's grouped GEMM takes at most 1,024 groups and a view
    spans the slots lo..hi a step uses. With the limit at 4 (every expert resident: a layer's
    experts sit in 8 slots), no experts call is given more than 4 groups, and HF's logits come out."""
    from expertflow.runtime.generate import context as context_mod

    monkeypatch.setattr(context_mod, "MAX_GROUPS", 4)
    model = load(compiled_dir("tiny-mixtral"))
    spans = []
    real = context_mod.RuntimeContext._grouped

    def grouped(self, layer, hidden, local, dtype, weights, lo, hi):
        spans.append(hi - lo + 1)
        assert 0 <= int(local.min()) and int(local.max()) <= hi - lo  # ids inside the view
        return real(self, layer, hidden, local, dtype, weights, lo, hi)

    monkeypatch.setattr(context_mod.RuntimeContext, "_grouped", grouped)
    assert_close(model(PROMPTS, PROMPT_MASK).logits, hf_logits)
    assert spans and max(spans) <= 4 and len(spans) > len(model.context.cache.layouts)  # some split
    assert context_mod.slot_windows([9, 0, 3, 4, 7, 12], 4) == [(0, 3), (4, 7), (9, 12)]


def test_a_copy_into_a_slot_whose_last_copy_runs_does_not_wait_for_it(make_cache) -> None:
    """Issue 24: the host waited for a victim slot's running copy (a prefetch nobody will read)
    before queueing the next copy into it; on CUDA that made the compute stream wait. The engine
    orders the two copies itself, so the load returns at once and the later bytes land last."""
    cache = make_cache(slots=1, layers=1)
    pool = cache.pool(0)
    Recording.delay = 0.3
    cache._load(pool, 0, 0, 4, demand=False)  # a prefetch's copy into the only slot
    deadline = time.monotonic() + 2
    while not Recording.copies and time.monotonic() < deadline:  # ... has started
        time.sleep(0.005)
    start = time.perf_counter()
    cache._load(pool, 0, 0, 6)  # the victim is that slot: a demand copy of another expert into it
    assert time.perf_counter() - start < 0.15, "the load waited for the running copy"
    pool.tickets[0].wait()
    assert torch.equal(pool.tensor[0], cache.store.blob(0, 6).as_subclass(torch.Tensor))
    assert len(Recording.copies) == 2 and Recording.copies[1][1] >= Recording.copies[0][1] + 0.29
