"""Which resident expert to evict: the cache policies, shared by the runtime and the simulator.

A policy sees keys ``(layer, expert)`` and picks a victim among candidates it is given oldest
first (least recently used first: the caller keeps recency, so ties always fall to LRU order).
Both ``runtime/cache/expert_cache.py`` and ``tools/sim/prefetch_sim.py`` drive the same objects with the same
calls, so the simulator's counts are the runtime's by construction:

- ``begin(layer)``: ``layer``'s wait starts (its route is known); layers run in a cycle per step;
- ``hint(layer, experts)``: a prefetch predicts these experts for ``layer``'s next run;
- ``use(key)``: a compute reads ``key`` (a hit, or after a demand load);
- ``expect(values)``: the reuse predictor's estimates for the step about to start (its first
  ``begin`` follows): per (layer, expert) in layer order, tokens until its next use after this
  one, ``runtime/predict/reuse.SCALE`` per token;
- ``victim(candidates)``: the key to evict, one of ``candidates`` (never a slot in use or in flight:
  the caller leaves those out); ``ranking(candidates)``: all of them, victim first, in the order
  repeated ``victim`` calls would take them while no other call intervenes (the runtime scores a
  wait's candidates once however many copies it makes: a miss on a large model scans hundreds of
  slots).

Policies: ``lru``; ``lfu`` (fewest uses, counts outlive eviction); ``layer_cycle`` (evict from the
layer that runs again last: plain LRU evicts exactly the layers about to run); ``predictive``
(evict the expert whose predicted next use is farthest, ExpertFlow's predictive cache: a use
the predictor announced counts as certain, any other is estimated from how often that expert is
reused by the next step after a use, and how often it is chosen otherwise; with the reuse
predictor, from its estimate for this token; either blended with the expert's own recent use
rate in this run).
"""

from __future__ import annotations

from bisect import insort
from collections import Counter
from collections.abc import Sequence

from ..predict.estimates import RoutingPrior, decode

Key = tuple[int, int]  # (layer, expert)
#: The predictive policy also keeps each expert's own recent use rate (per token, decayed by
#: RECENCY each token: about the last 1 / (1 - RECENCY) tokens) and blends the expected next use
#: it implies into every estimate, geometric weight ONLINE_WEIGHT: a prior or a reuse predictor
#: fitted on other text misses what this text keeps choosing (decode bytes at 16 slots on
#: tiny-trained-moe: 1.62x -> 1.58x Belady's MIN).
RECENCY = 0.97
ONLINE_WEIGHT = 0.3
_NEVER = (0.0, 0)  # the recent use rate of an expert never used
_LEARNED_WEIGHT = 1 - ONLINE_WEIGHT
_MARGIN = 1 + 1e-9  # a bound above any rounding of the score it bounds


class Policy:
    name = ""
    #: its first n victims are the first n candidates (LRU order): the caller lists only those
    prefix = False

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

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        """The first ``limit`` victims of ``candidates`` in order (all when None)."""
        raise NotImplementedError


class LRU(Policy):
    name = "lru"
    prefix = True

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        return candidates[0] if candidates else None

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        return list(candidates[:limit])


class LFU(Policy):
    name = "lfu"

    def __init__(self, layers: Sequence[int], prior: RoutingPrior | None = None):
        super().__init__(layers, prior)
        self.count: Counter[Key] = Counter()

    def use(self, key: Key) -> None:
        self.count[key] += 1

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        return min(candidates, key=self.count.__getitem__, default=None)  # min keeps the first of ties

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        return sorted(candidates, key=self.count.__getitem__)[:limit]  # stable: ties stay in LRU order


class LayerCycle(Policy):
    name = "layer_cycle"

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        best, far = None, -1
        for key in candidates:
            d = self.distance(key[0])
            if d > far:
                best, far = key, d
        return best

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        # One pass into per-layer lists (LRU order kept within each), then the layers farthest
        # first: a large pool ranks hundreds of candidates per miss, and a sort by a Python key
        # was most of the host time of a wait at Qwen3-30B-A3B's shape.
        by_layer: dict[int, list[Key]] = {}
        for key in candidates:
            bucket = by_layer.get(key[0])
            if bucket is None:
                bucket = by_layer[key[0]] = []
            bucket.append(key)
        out: list[Key] = []
        for layer in sorted(by_layer, key=self.distance, reverse=True):
            out.extend(by_layer[layer])
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out


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
        # key -> its _terms: a large pool scores hundreds of keys per wait, most of them unchanged
        self._cache: dict[Key, tuple[float, float, float, float]] = {}

    def expect(self, values: Sequence[int]) -> None:
        self.reuse, self._fresh = decode(list(values)), True
        self._experts = len(self.reuse) // max(len(self.position), 1)
        self._cache.clear()

    def begin(self, layer: int) -> None:
        if self.now is not None and self.position[layer] <= self.now:
            self.step += 1
            self._cache.clear()
        if self._fresh:
            self.reuse_step, self._fresh = self.step, False
            self._cache.clear()
        super().begin(layer)
        self.predicted = {k for k in self.predicted if k[0] != layer}

    def hint(self, layer: int, experts: Sequence[int]) -> None:
        self.predicted.update((layer, e) for e in experts)

    def use(self, key: Key) -> None:
        self._cache.pop(key, None)
        self.last[key] = self.step
        self.uses[key] += 1
        rate, at = self.recent.get(key, (0.0, -1))
        if at != self.step:  # one use per step, however many of its tokens chose the expert
            self.recent[key] = (rate * RECENCY ** (self.step - at) + (1 - RECENCY), self.step)

    def _chance(self, key: Key, ran: int) -> float:
        """P(``key``'s layer picks it at its next run), without a prediction saying so (``ran``:
        its layer already ran in this step)."""
        # "recent": chosen at its layer's last run (this step's if that layer already ran in it)
        recent = self.last.get(key) == (self.step if ran else self.step - 1)
        if self.prior is not None:
            table = self.prior.reuse if recent else self.prior.fresh
            return table.get(key, 0.0)
        return min((self.uses[key] + 1) / (self.step + 2), 1.0)  # online popularity, Laplace-smoothed

    def _terms(self, key: Key) -> tuple[float, float, float, float]:
        """What ``key``'s score takes from its own state, fixed until the step ends, the reuse
        estimates change or ``key`` is used: whole layer cycles to its next use by the learned
        estimate (its layer not run yet in this step, and run) and by its recent use rate, and
        a bound no less than its score at any layer position in this step."""
        p, expert, reuse = self.position[key[0]], key[1], self.reuse
        i = p * self._experts + expert
        if reuse is not None and self.reuse_step is not None and 0 <= expert < self._experts and i < len(reuse):
            ahead = reuse[i] - (self.step - self.reuse_step)  # tokens after this one
            cycles = ahead if ahead > 1.0 else 1.0
            learned = (cycles, cycles - 1)
        else:
            learned = (1.0 / max(self._chance(key, 0), 1e-6) - 1.0, 1.0 / max(self._chance(key, 1), 1e-6) - 1.0)
        rate, at = self.recent.get(key, _NEVER)
        if rate:
            rate *= RECENCY ** (self.step - at)
        online = 1.0 / (rate if rate > 1e-3 else 1e-3) - 1.0
        n = len(self.position)  # the bound: the score at the largest distance, its layer not run
        bound = (n + n * max(learned)) ** _LEARNED_WEIGHT * (n + n * online) ** ONLINE_WEIGHT * _MARGIN
        return (*learned, online, bound)

    def scores(self, candidates: Sequence[Key]) -> list[float]:
        """Each candidate's expected layer runs until it is needed: certain at its layer's next
        run when predicted; else the reuse predictor's estimate or, without one, a geometric
        number of model steps at its chance per step; either blended with its recent use rate."""
        return self._scored(candidates, self._layer_terms())

    def _layer_terms(self) -> dict[int, tuple[int, int]]:
        """Per layer, read once per decision: its distance (``Policy.distance``), whether it ran."""
        n, now = len(self.position), self.now
        if now is None:
            return {layer: (p + 1, 0) for layer, p in self.position.items()}
        return {layer: ((p - now - 1) % n + 1, 1 if p <= now else 0) for layer, p in self.position.items()}

    def _scored(self, candidates: Sequence[Key], layer_terms: dict[int, tuple[int, int]]) -> list[float]:
        n, predicted, cache = len(self.position), self.predicted, self._cache
        out = []
        for key in candidates:
            d, ran = layer_terms[key[0]]
            if key in predicted:
                out.append(d)
                continue
            terms = cache.get(key)
            if terms is None:
                terms = cache[key] = self._terms(key)
            out.append((d + n * terms[ran]) ** _LEARNED_WEIGHT * (d + n * terms[2]) ** ONLINE_WEIGHT)
        return out

    def next_use(self, key: Key) -> float:
        return self.scores([key])[0]

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        first = self.ranking(candidates, 1)
        return first[0] if first else None

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        if limit is None or limit >= len(candidates):
            scores = self.scores(candidates)
            return [candidates[i] for i in sorted(range(len(scores)), key=scores.__getitem__, reverse=True)]
        # Score exactly only the candidates that can still make the first ``limit``: by their
        # bound (a key's score at the largest distance, its layer not run), highest first, until
        # the limit-th best score beats every remaining bound; a tie could fall to a lower LRU
        # index, so only a strictly smaller bound stops the scan.
        cache, terms = self._cache, self._terms
        bounds = [(cache.get(key) or cache.setdefault(key, terms(key)))[3] for key in candidates]
        order = sorted(range(len(bounds)), key=bounds.__getitem__, reverse=True)
        best: list[tuple[float, int]] = []  # (-score, candidate index), kept sorted
        layer_terms, predicted, n = self._layer_terms(), self.predicted, len(self.position)
        for i in order:
            if len(best) >= limit and bounds[i] < -best[limit - 1][0]:
                break
            key = candidates[i]  # ``_scored`` inlined: this loop runs tens of times per miss
            d, ran = layer_terms[key[0]]
            if key in predicted:
                score = d
            else:
                t = cache[key]
                score = (d + n * t[ran]) ** _LEARNED_WEIGHT * (d + n * t[2]) ** ONLINE_WEIGHT
            insort(best, (-score, i))
        return [candidates[i] for _, i in best[:limit]]


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LayerCycle, LRU, LFU, Predictive)}


def make_policy(name: str, layers: Sequence[int], prior: RoutingPrior | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](layers, prior)
