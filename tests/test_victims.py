"""Victim choice at scale: one ranking per cache decision, and a bounded scan in the predictive
policy, must take exactly the slots that one fresh ``victim`` call per slot would."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from expertflow.runtime.cache import cache_model as cache_module
from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.cache.policy import POLICIES, Policy, make_policy
from expertflow.runtime.predict.prior import RoutingPrior
from expertflow.runtime.predict.reuse import SCALE
from expertflow.runtime.cache.streams import CopyEngine, Ticket

from test_runtime_cache import Store, layouts_for


def _driven(name: str, rng: random.Random, layers: list[int], experts: int) -> Iterator[Policy]:
    """A policy taken through random waits, uses, hints and reuse estimates; yields it between calls."""
    prior = None
    if name == "predictive" and rng.random() < 0.5:
        keys = [(l, e) for l in layers for e in range(experts)]
        prior = RoutingPrior({k: rng.random() for k in keys}, {k: rng.random() ** 3 for k in keys})
    policy = make_policy(name, layers, prior)
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.2:
            policy.expect([int(rng.uniform(0, 30) * SCALE) for _ in range(len(layers) * experts)])
        layer = rng.choice(layers)
        policy.begin(layer)
        for e in rng.sample(range(experts), rng.randint(1, 4)):
            policy.use((layer, e))
        if rng.random() < 0.5:
            policy.hint(rng.choice(layers), rng.sample(range(experts), 3))
        yield policy


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(12))
def test_a_limited_ranking_is_the_head_of_the_full_one(name: str, seed: int) -> None:
    rng = random.Random(seed)
    layers, experts = [0, 1, 3, 4, 7], 24
    for policy in _driven(name, rng, layers, experts):
        keys = rng.sample([(l, e) for l in layers for e in range(experts)], rng.randint(0, len(layers) * experts))
        limit = rng.choice([1, 2, 4, 9, 30])
        got, victim = policy.ranking(keys, limit), policy.victim(keys)
        full = policy.ranking(keys)
        assert sorted(full) == sorted(keys)
        assert got == full[:limit] and victim == (full[0] if keys else None)


@pytest.mark.parametrize("seed", range(12))
def test_the_predictive_ranking_sorts_by_a_fresh_next_use_with_lru_ties(seed: int) -> None:
    """Scores come from per-key terms kept until a step ends or the key is used; a stale term would
    show here, against scores recomputed from nothing."""
    rng = random.Random(seed)
    layers, experts = [0, 2, 5, 6], 16
    for policy in _driven("predictive", rng, layers, experts):
        keys = rng.sample([(l, e) for l in layers for e in range(experts)], 40)
        got = policy.ranking(keys, 5)
        policy._cache.clear()
        fresh = {k: policy.next_use(k) for k in keys}
        want = sorted(keys, key=lambda k: (-fresh[k], keys.index(k)))[:5]
        assert got == want


def _old_victim(self: ExpertCache, pool: cache_module.Pool, protect: set[int]) -> int | None:
    """The reference: an empty slot, else one fresh ``victim`` call on freshly gathered candidates."""
    for slot, owner in enumerate(pool.owner):
        if owner is None and slot not in pool.pinned and slot not in pool.reserved:
            return slot
    candidates = [pool.owner[s] for s in pool.lru if s not in pool.pinned and s not in pool.reserved
                  and s not in protect and pool.owner[s] is not None]
    key = self.policy.victim(candidates)
    return pool.where[key] if key is not None else None


class _OneAtATime:
    def __init__(self, pool: cache_module.Pool, policy: Policy, protect: set[int], cache: ExpertCache):
        self.pool, self.protect, self.cache = pool, protect, cache

    def take(self) -> int | None:
        return _old_victim(self.cache, self.pool, self.protect)


class _Immediate(CopyEngine):
    """Copies at submit: whether a copy has started when it is cancelled is then never a race."""

    def submit(self, key, dst, src, label="", demand=False) -> Ticket:
        dst.copy_(src)
        ticket = Ticket(nbytes=src.numel() * src.element_size())
        ticket.claim.acquire()
        ticket.done.release()
        self.bytes_moved += ticket.nbytes
        return ticket


def _workload(cache: ExpertCache, seed: int, layers: int, experts: int, steps: int) -> list[tuple]:
    rng, states = random.Random(seed), []
    popular = [rng.sample(range(experts), experts) for _ in range(layers)]
    for _ in range(steps):
        for layer in range(layers):
            if layer + 1 < layers:
                guess = rng.sample(popular[layer + 1][: experts // 2], 3)
                cache.prefetch(layer + 1, torch.tensor(guess), copy=rng.random() < 0.7)
            routed = rng.sample(popular[layer][: rng.choice([4, experts // 2, experts])], 3)
            for wave in cache.plan(layer, None, torch.tensor(routed)):
                cache.release(layer, cache.acquire(layer, wave))
            states.append(sorted(cache.pool(layer).where.items()))
    return states


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_runtime_takes_the_victims_one_fresh_call_per_slot_would(name: str, monkeypatch) -> None:
    layers, experts, slots = 6, 20, 30
    runs = []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(cache_module, "Victims",
                                lambda pool, policy, protect, need=4, settled_first=False: _OneAtATime(pool, policy, protect, cache))
        engine = _Immediate(torch.device("cpu"))
        cache = ExpertCache(layouts_for(layers, experts), Store(layers, experts), slots, torch.device("cpu"), engine,
                            make_policy(name, list(range(layers))))
        try:
            runs.append((_workload(cache, 7, layers, experts, 25), [vars(s) for s in cache.stats.values()]))
        finally:
            engine.close()
    assert runs[0][0] == runs[1][0], "a different slot was evicted"
    assert [{k: v for k, v in s.items() if k != "stall_s"} for s in runs[0][1]] == \
           [{k: v for k, v in s.items() if k != "stall_s"} for s in runs[1][1]]
    assert sum(s["misses"] for s in runs[0][1]) > 0


def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "cache_host_cost.py"
    spec = importlib.util.spec_from_file_location("cache_host_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_host_cost_example_drives_the_runtime_cache(monkeypatch, capsys) -> None:
    example = _example()
    monkeypatch.setattr("sys.argv", ["cache_host_cost.py", "--layers", "4", "--experts", "8", "--top-k", "2",
                                     "--slots", "6", "--tokens", "6", "--warmup", "2"])
    example.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 layers x 8 experts, top-2, 6 slots"
    rows = {line.split()[0]: float(line.split()[-2]) for line in lines[1:]}
    assert sorted(rows) == sorted(POLICIES)
    assert all(misses > 0 for misses in rows.values()), "6 slots for 4 layers x 2 experts must miss"


def test_the_host_cost_example_refuses_an_unknown_policy(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["cache_host_cost.py", "--policies", "lru,fifo"])
    with pytest.raises(SystemExit) as exit_info:
        _example().main()
    assert exit_info.value.code == 2
    assert "unknown policy 'fifo'; choose from" in capsys.readouterr().err


class _Running:
    """A copy still in flight: not ready, cannot be cancelled."""
    nbytes = 1

    def ready(self) -> bool:
        return False


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_slot_whose_copy_is_running_is_the_last_victim(name: str) -> None:
    """On a GPU a copy into a slot whose last copy still runs queues behind it, and evicting it
    wastes the bytes in flight: the policy's first victim is passed over while its copy runs,
    and taken only once every settled slot is."""
    layers = [0, 1]
    pool = cache_module.Pool(None, [None] * 3)
    for slot, key in enumerate([(0, 0), (1, 1), (0, 2)]):
        pool.owner[slot], pool.where[key] = key, slot
        pool.lru[slot] = None
    policy = make_policy(name, layers)
    policy.begin(1)
    first = pool.where[policy.ranking([pool.owner[s] for s in pool.lru], 1)[0]]
    pool.tickets[first] = _Running()
    room, taken = cache_module.Victims(pool, policy, set(), settled_first=True), []
    for _ in range(3):
        taken.append(room.take())
        room.protect.add(taken[-1])  # as the cache does with a slot it has loaded
    assert taken[-1] == first and sorted(taken) == [0, 1, 2]
    assert room.take() is None
    plain = cache_module.Victims(pool, policy, set())  # a CPU device's rule: the policy's order alone
    assert plain.take() == first
