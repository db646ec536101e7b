"""Replays a routing trace through a model of the runtime's expert cache, under several policies.

The model follows ``runtime/cache.py``: one pool of C slots shared by every MoE layer (all layers
are assumed to share one expert layout, hence one pool), each slot holding one (layer, expert).
The layer cycle is the MoE layers the trace names, ascending (the runtime's sorted layouts).
A *step* is one trace record, one MoE layer of one token. Its distinct experts must be resident
together while the layer computes, so eviction never picks one of them. Rule for a step:

- experts are taken in ascending id, those already resident first (as ``ExpertCache.plan``);
  each resident one is a hit, each other one a miss, i.e. one load (a copy of expert_bytes);
- a load fills an empty slot if there is one, else evicts the policy's victim among slots not
  holding an expert of the step;
- a step needing more than C experts runs in waves of C, as the runtime does: the first wave
  fills every slot, and each later wave evicts experts of earlier waves, already computed.
  Each needed expert is still loaded at most once per step, so the loads of a step are exactly
  the experts not resident when it starts, whatever the policy.

Only demand loading is modelled (no prefetch): ``predictor`` is always "none".
"""

from __future__ import annotations

import heapq
from bisect import bisect_right, insort
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .trace_file import Access

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu", "layer_cycle", "belady")
def next_uses(trace: Sequence[Access]) -> list[tuple[int, ...]]:
    """For each step, aligned with its experts: the next step needing the same (layer, expert),
    or len(trace) if none does (never used again sorts after every real step)."""
    upcoming: dict[Key, int] = {}
    out: list[tuple[int, ...]] = [()] * len(trace)
    for step in range(len(trace) - 1, -1, -1):
        a = trace[step]
        out[step] = tuple(upcoming.get((a.layer, e), len(trace)) for e in a.experts)
        for e in a.experts:
            upcoming[(a.layer, e)] = step
    return out


class _LazyHeap:
    """Resident keys by priority, lowest first. An update pushes a fresh entry and stale ones are
    dropped when they surface: O(log C) per access where a scan of the slots would be O(C)."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Key]] = []
        self._prio: dict[Key, tuple] = {}

    def set(self, key: Key, prio: tuple) -> None:
        self._prio[key] = prio
        heapq.heappush(self._heap, (prio, key))
        if len(self._heap) > 4 * len(self._prio) + 64:  # bound the stale entries
            self._heap = [(p, k) for k, p in self._prio.items()]
            heapq.heapify(self._heap)

    def pop(self, protect: set[Key]) -> Key:
        held = []
        while True:
            prio, key = heapq.heappop(self._heap)
            if self._prio.get(key) != prio:
                continue
            if key in protect:
                held.append((prio, key))
                continue
            del self._prio[key]
            for entry in held:
                heapq.heappush(self._heap, entry)
            return key


class _Policy:
    """Tracks exactly the resident keys. ``use`` is called on a hit and after a load."""

    def __init__(self, trace: Sequence[Access], future: Sequence[tuple[int, ...]] | None) -> None:
        self.tick = 0  # global recency clock, for LRU order and tie-breaks

    def begin(self, step: int, access: Access) -> None:
        pass

    def use(self, key: Key) -> None:
        raise NotImplementedError

    def evict(self, protect: set[Key]) -> Key:
        """Removes and returns the victim: a resident key outside ``protect``."""
        raise NotImplementedError


class _LRU(_Policy):
    def __init__(self, trace: Sequence[Access], future: Sequence[tuple[int, ...]] | None) -> None:
        super().__init__(trace, future)
        self.order: OrderedDict[Key, None] = OrderedDict()

    def use(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def evict(self, protect: set[Key]) -> Key:
        key = next(k for k in self.order if k not in protect)
        del self.order[key]
        return key


class _LFU(_Policy):
    """Fewest accesses so far in the whole trace, least recently used among ties. Counts outlive
    eviction: an expert's popularity belongs to the router, not to its stay in the cache."""

    def __init__(self, trace: Sequence[Access], future: Sequence[tuple[int, ...]] | None) -> None:
        super().__init__(trace, future)
        self.count: Counter[Key] = Counter()
        self.heap = _LazyHeap()

    def use(self, key: Key) -> None:
        self.tick += 1
        self.count[key] += 1
        self.heap.set(key, (self.count[key], self.tick))

    def evict(self, protect: set[Key]) -> Key:
        return self.heap.pop(protect)


class _LayerCycle(_Policy):
    """The runtime's rule (``runtime/policy.LayerCycle``): evict from the layer that runs again
    last, least recently used within it. Layers run in a cycle per token, so plain LRU would
    evict exactly the experts of the layers about to run."""

    def __init__(self, trace: Sequence[Access], future: Sequence[tuple[int, ...]] | None) -> None:
        super().__init__(trace, future)
        layers = sorted({a.layer for a in trace})
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.by_position: list[OrderedDict[Key, None]] = [OrderedDict() for _ in layers]
        # the positions holding a resident key, ascending: a trace naming thousands of layers
        # would otherwise make each eviction scan every empty one (quadratic in the trace)
        self.held: list[int] = []
        self.now = 0

    def begin(self, step: int, access: Access) -> None:
        self.now = self.position[access.layer]

    def use(self, key: Key) -> None:
        p = self.position[key[0]]
        lru = self.by_position[p]
        if not lru:
            insort(self.held, p)
        lru[key] = None
        lru.move_to_end(key)

    def evict(self, protect: set[Key]) -> Key:
        # Layer at position p runs again in (p - now - 1) % n + 1 layers (runtime/policy.py), the
        # most for p = now, then now - 1, ... 0, n - 1, ... now + 1: the held positions from the
        # last at or before ``now`` downwards, wrapping round; the oldest key of each first.
        held = self.held
        at = bisect_right(held, self.now)
        for i in range(at - 1, at - 1 - len(held), -1):
            p = held[i]  # i runs negative past 0: the positions after ``now``, from the last
            lru = self.by_position[p]
            key = next((k for k in lru if k not in protect), None)  # only the running layer's are held
            if key is not None:
                del lru[key]
                if not lru:
                    del held[i]
                return key
        raise AssertionError("no evictable slot")  # the replay only evicts with one free to take


class _Belady(_Policy):
    """Belady's MIN: evict the key needed again farthest in the future (never = infinity), least
    recently used among ties. Optimal for demand loading; the yardstick for the others."""

    def __init__(self, trace: Sequence[Access], future: Sequence[tuple[int, ...]] | None) -> None:
        super().__init__(trace, future)
        self.future = future if future is not None else next_uses(trace)
        self.next: dict[int, int] = {}
        self.heap = _LazyHeap()

    def begin(self, step: int, access: Access) -> None:
        self.next = dict(zip(access.experts, self.future[step]))

    def use(self, key: Key) -> None:
        self.tick += 1
        self.heap.set(key, (-self.next[key[1]], self.tick))

    def evict(self, protect: set[Key]) -> Key:
        return self.heap.pop(protect)


_MAKERS: dict[str, type[_Policy]] = {"lru": _LRU, "lfu": _LFU, "layer_cycle": _LayerCycle, "belady": _Belady}


@dataclass(frozen=True)
class LayerCounts:
    hits: int
    loads: int


@dataclass(frozen=True)
class SimResult:
    policy: str
    capacity: int
    expert_bytes: int
    steps: int
    tokens: int      # distinct (seq, token)
    accesses: int    # (layer, expert) needs summed over steps: hits + loads
    hits: int
    loads: int       # misses; each is one copy of expert_bytes
    per_layer: dict[int, LayerCounts]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def bytes(self) -> int:
        return self.loads * self.expert_bytes


def simulate(trace: Sequence[Access], policy: str, capacity: int, expert_bytes: int = 1,
             future: Sequence[tuple[int, ...]] | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Replays ``trace`` through a cache of ``capacity`` slots (rules in the module docstring).

    ``future`` is ``next_uses(trace)``, to share between Belady runs; ``progress(n)`` is told of
    steps done, every few thousand.
    """
    if policy not in _MAKERS:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if capacity < 1 or expert_bytes < 1:
        raise ValueError(f"capacity and expert_bytes must be at least 1, got {capacity} and {expert_bytes}")
    chooser = _MAKERS[policy](trace, future)
    resident: set[Key] = set()
    hits: Counter[int] = Counter()
    loads: Counter[int] = Counter()
    tokens, last_token, reported = 0, None, 0
    for step, access in enumerate(trace):
        if (access.seq, access.token) != last_token:
            tokens, last_token = tokens + 1, (access.seq, access.token)
        chooser.begin(step, access)
        keys = sorted(((access.layer, e) for e in access.experts), key=lambda k: k not in resident)
        for start in range(0, len(keys), capacity):
            wave = keys[start:start + capacity]
            protect = {k for k in wave if k in resident}
            for key in wave:
                if key in resident:
                    hits[access.layer] += 1
                else:
                    loads[access.layer] += 1
                    if len(resident) >= capacity:
                        resident.remove(chooser.evict(protect))
                    resident.add(key)
                    protect.add(key)
                chooser.use(key)
        if progress is not None and step + 1 - reported >= 4096:
            progress(step + 1 - reported)
            reported = step + 1
    if progress is not None and len(trace) > reported:
        progress(len(trace) - reported)
    layers = sorted({a.layer for a in trace})
    per_layer = {layer: LayerCounts(hits[layer], loads[layer]) for layer in layers}
    total_hits, total_loads = sum(hits.values()), sum(loads.values())
    return SimResult(policy, capacity, expert_bytes, len(trace), tokens, total_hits + total_loads,
                     total_hits, total_loads, per_layer)


@dataclass(frozen=True)
class TimeModel:
    """Decode time predicted for a replay: one GPU, one copy engine, demand loading.

    A layer's experts are known only once its router has run, so each step's copies start when
    the step does, run one after another on the single copy engine (``expert_bytes`` at
    ``bandwidth_gbps``, 1 GB = 1e9 bytes), and the layer computes (``layer_ms``, everything the
    layer does) only once its last expert has arrived:

        step ms = loads in the step * expert_bytes / bandwidth + layer_ms

    With demand loading copies never overlap compute, so the sum over steps is the whole time.
    The bound is the copy engine's busy time alone, loads * expert_bytes / bandwidth per token:
    no schedule moving those bytes is faster, and the ratio to it shows how much of the time
    is compute left un-overlapped (what a prefetcher could hide at best).
    """

    bandwidth_gbps: float
    layer_ms: float
    expert_bytes: int = 1

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0 or not self.layer_ms >= 0 or self.expert_bytes < 1:
            raise ValueError("the time model needs bandwidth > 0, layer ms >= 0 and expert bytes >= 1, got "
                             f"{self.bandwidth_gbps}, {self.layer_ms}, {self.expert_bytes}")


@dataclass(frozen=True)
class TimeReport:
    ms_per_token: float
    bound_ms_per_token: float
    over_bound: float | None  # None when nothing is copied (the bound is 0)


def predict_time(result: SimResult, model: TimeModel) -> TimeReport:
    if model.expert_bytes != result.expert_bytes:
        raise ValueError(f"the replay counted {result.expert_bytes} bytes per expert, the time model "
                         f"{model.expert_bytes}")
    tokens = max(result.tokens, 1)
    copy_ms = result.bytes / (model.bandwidth_gbps * 1e9) * 1e3
    total_ms = copy_ms + result.steps * model.layer_ms
    bound = copy_ms / tokens
    return TimeReport(total_ms / tokens, bound, total_ms / copy_ms if copy_ms > 0 else None)
