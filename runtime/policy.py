"""Which resident expert to evict: the cache policies, shared by the runtime and the simulator.

A policy sees keys ``(layer, expert)`` and picks a victim among candidates it is given oldest
first (least recently used first: the caller keeps recency, so ties always fall to LRU order).
Both ``runtime/cache.py`` and ``tools/prefetch_sim.py`` drive the same objects with the same
calls, so the simulator's counts are the runtime's by construction:

- ``begin(layer)``: ``layer``'s wait starts (its route is known); layers run in a cycle per step;
- ``hint(layer, experts)``: a prefetch predicts these experts for ``layer``'s next run;
- ``use(key)``: a compute reads ``key`` (a hit, or after a demand load);
- ``expect(values)``: the reuse predictor's estimates for the step about to start (its first
  ``begin`` follows): per (layer, expert) in layer order, tokens until its next use after this
  one, ``runtime/reuse.SCALE`` per token;
- ``victim(candidates)``: the key to evict, one of ``candidates`` (never a slot in use or in flight:
  the caller leaves those out).

Policies: ``lru``; ``lfu`` (fewest uses, counts outlive eviction); ``layer_cycle`` (evict from the
layer that runs again last: plain LRU evicts exactly the layers about to run); ``predictive``
(evict the expert whose predicted next use is farthest, ExpertFlow's predictive cache: a use
the predictor announced counts as certain, any other is estimated from how often that expert is
reused by the next step after a use, and how often it is chosen otherwise; with the reuse
predictor, from its estimate for this token; either blended with the expert's own recent use
rate in this run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .reuse import decode

Key = tuple[int, int]
#: The predictive policy also keeps each expert's own recent use rate (per token, decayed by
#: RECENCY each token: about the last 1 / (1 - RECENCY) tokens) and blends the expected next use
#: it implies into every estimate, geometric weight ONLINE_WEIGHT: a prior or a reuse predictor
#: fitted on other text misses what this text keeps choosing (decode bytes at 16 slots on
#: tiny-trained-moe: 1.62x -> 1.58x Belady's MIN).
RECENCY = 0.97
ONLINE_WEIGHT = 0.3
_NEVER = (0.0, 0)  # the recent use rate of an expert never used


@dataclass(frozen=True)
class RoutingPrior:
    """Per (layer, expert): P(chosen by the next step | chosen by this one), and P(chosen by the
    next step | not chosen by this one); fitted on calibration traces (``tools/train_predictor``)."""

    reuse: dict[Key, float]
    fresh: dict[Key, float]


class Policy:
    name = ""

    def __init__(self, layers: Sequence[int], prior: RoutingPrior | None = None):
        self.position = {layer: i for i, layer in enumerate(sorted(layers))}
        self.now: int | None = None  # position of the layer whose wait began last

    def begin(self, layer: int) -> None:
        self.now = self.position[layer]

    def hint(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def use(self, key: Key) -> None:
        pass

    def expect(self, values: Sequence[int]) -> None:
        pass

    def distance(self, layer: int) -> int:
        """How many layer runs from now ``layer`` runs again (1 .. layers)."""
        if self.now is None:
            return self.position[layer] + 1
        n = len(self.position)
        return (self.position[layer] - self.now - 1) % n + 1

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        return candidates[0] if candidates else None


class LFU(Policy):
    name = "lfu"

    def __init__(self, layers: Sequence[int], prior: RoutingPrior | None = None):
        super().__init__(layers, prior)
        self.count: Counter[Key] = Counter()

    def use(self, key: Key) -> None:
        self.count[key] += 1

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        return min(candidates, key=self.count.__getitem__, default=None)  # min keeps the first of ties


class LayerCycle(Policy):
    name = "layer_cycle"

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        best, far = None, -1
        for key in candidates:
            d = self.distance(key[0])
            if d > far:
                best, far = key, d
        return best


class Predictive(Policy):
    name = "predictive"

    def __init__(self, layers: Sequence[int], prior: RoutingPrior | None = None):
        super().__init__(layers, prior)
        self.prior = prior
        self.step = 0        # how many times the layer cycle has wrapped (model steps)
        self.last: dict[Key, int] = {}  # key -> step of its last use
        self.predicted: set[Key] = set()  # announced by a prefetch, its layer not run yet
        self.uses: Counter[Key] = Counter()
        self.reuse: list[float] | None = None  # expected tokens to each key's next use, from reuse_step
        self.reuse_step: int | None = None
        self._fresh, self._experts = False, 0
        self.recent: dict[Key, tuple[float, int]] = {}  # key -> (decayed use rate, step it is as of)

    def expect(self, values: Sequence[int]) -> None:
        self.reuse, self._fresh = decode(list(values)), True
        self._experts = len(self.reuse) // max(len(self.position), 1)

    def begin(self, layer: int) -> None:
        if self.now is not None and self.position[layer] <= self.now:
            self.step += 1
        if self._fresh:
            self.reuse_step, self._fresh = self.step, False
        super().begin(layer)
        self.predicted = {k for k in self.predicted if k[0] != layer}

    def hint(self, layer: int, experts: Sequence[int]) -> None:
        self.predicted.update((layer, e) for e in experts)

    def use(self, key: Key) -> None:
        self.last[key] = self.step
        self.uses[key] += 1
        rate, at = self.recent.get(key, (0.0, -1))
        if at != self.step:  # one use per step, however many of its tokens chose the expert
            self.recent[key] = (rate * RECENCY ** (self.step - at) + (1 - RECENCY), self.step)

    def _chance(self, key: Key) -> float:
        """P(``key``'s layer picks it at its next run), without a prediction saying so."""
        # "recent": chosen at its layer's last run (this step's if that layer already ran in it)
        ran = self.now is not None and self.position[key[0]] <= self.now
        recent = self.last.get(key) == (self.step if ran else self.step - 1)
        if self.prior is not None:
            table = self.prior.reuse if recent else self.prior.fresh
            return table.get(key, 0.0)
        return (self.uses[key] + 1) / (self.step + 2)  # online popularity, Laplace-smoothed

    def next_use(self, key: Key) -> float:
        """Expected layer runs until ``key`` is needed: certain at its layer's next run when
        predicted; else the reuse predictor's estimate or, without one, a geometric number of
        model steps at its chance per step; either blended with its recent use rate."""
        return self._score(key, self._frame())

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        # one frame for every candidate: a miss on a large model scans hundreds of slots
        frame, best, far = self._frame(), None, -1.0
        for key in candidates:
            use = self._score(key, frame)
            if use > far:
                best, far = key, use
        return best

    def _frame(self) -> tuple:
        """What every candidate's score reads, looked up once per decision: per layer, its
        distance and how many whole cycles a learned estimate loses if the layer already ran."""
        n, now = len(self.position), self.now
        layer_terms = {}
        for layer, p in self.position.items():
            d = p + 1 if now is None else (p - now - 1) % n + 1  # Policy.distance
            layer_terms[layer] = (d, p, 1 if now is not None and p <= now else 0)
        learned = self.reuse is not None and self.reuse_step is not None
        return (layer_terms, n, self.step, self.predicted, self.reuse if learned else None,
                self.step - self.reuse_step if learned else 0, self._experts, self.recent)

    def _score(self, key: Key, frame: tuple) -> float:
        layer_terms, n, step, predicted, reuse, shift, experts, recent = frame
        d, p, ran = layer_terms[key[0]]
        if key in predicted:
            return d
        expert = key[1]
        i = p * experts + expert
        if reuse is not None and 0 <= expert < experts and i < len(reuse):
            ahead = reuse[i] - shift  # tokens after this one
            learned = d + n * ((ahead if ahead > 1.0 else 1.0) - ran)
        else:
            learned = d + n * (1.0 / max(self._chance(key), 1e-6) - 1.0)
        rate, at = recent.get(key, _NEVER)
        if rate:
            rate *= RECENCY ** (step - at)
        online = d + n * (1.0 / (rate if rate > 1e-3 else 1e-3) - 1.0)
        return learned ** (1 - ONLINE_WEIGHT) * online ** ONLINE_WEIGHT


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LayerCycle, LRU, LFU, Predictive)}


def make_policy(name: str, layers: Sequence[int], prior: RoutingPrior | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](layers, prior)
