"""Replays a routing trace with prefetch: a predictor's copies, a cache policy, one copy engine.

The cache is the runtime's: C slots shared by every MoE layer, recency kept per slot, victims
chosen by the same policy objects the runtime uses (``runtime/policy.py``). A *step* is one MoE
layer's run for a group of tokens (one token in decode; a batch of sequences' tokens, or a
whole prompt, when grouped). Before a step's wait the prefetches due there are issued
(``Issue``: the experts a predictor names for a later step); then the step's experts must all be
resident. An issue may also be a hint only (``load=False``): the policy learns what a step will
need, and nothing is copied. Rules, as ``runtime/cache.py`` applies them:

- a prefetch of a resident expert reserves it; of another one loads it into an empty slot or the
  policy's victim among slots neither reserved nor needed by the running step (no victim: the
  prediction is dropped); reservations end when their step runs;
- at the wait each needed expert is *resident* (was there before its prefetch, or hit), *in
  flight* (its prefetch's copy had not landed when the wait began; only with a time model) or
  *missed* (loaded on demand, evicting the policy's victim; reservations yield if they must);
- prefetched experts their step did not need are *wasted* prefetches.

With a time model there is one copy engine: copies run one at a time in issue order, except that
a demand miss goes before every queued prefetch, and a queued prefetch whose step has already
run is dropped without moving a byte. A step computes for ``layer_ms`` once its experts are in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..runtime.policy import Key, RoutingPrior, make_policy
from .cache_sim import Access, TimeModel


@dataclass(frozen=True)
class Issue:
    target: int               # the step the experts are predicted for
    experts: tuple[int, ...]  # predicted ids for that step's layer
    load: bool = True         # False: a hint to the policy only (what to keep), no copy
    #: True: read back at this step's wait (the runtime's one host sync per wait), so its copies
    #: start after the step's demand loads, and a prediction for this very step copies nothing.
    deferred: bool = False


@dataclass
class Replay:
    policy: str
    predictor: str
    capacity: int
    expert_bytes: int = 1
    steps: int = 0
    accesses: int = 0
    resident: int = 0        # needed and resident when the wait began
    in_flight: int = 0       # needed, prefetched, copy not landed when the wait began
    missed: int = 0          # needed and loaded on demand
    loads: int = 0           # copies made: demand + prefetch
    prefetch_loads: int = 0
    wasted: int = 0          # prefetched (loaded) for a step that did not need it
    dropped: int = 0         # predictions with no slot to go to, or whose step ran first
    predicted: int = 0       # (step, expert) predictions
    predicted_used: int = 0  # of those, needed by their step
    ms: float = 0.0          # modelled time, when a time model is given
    tokens: int = 0
    per_layer: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def hits(self) -> int:  # ready at wait: resident or in flight
        return self.resident + self.in_flight

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def bytes(self) -> int:
        return self.loads * self.expert_bytes


class _Engine:
    """One copy engine: FIFO prefetches, demand copies ahead of every queued prefetch."""

    def __init__(self, copy_ms: float, replay: Replay):
        self.copy_ms, self.free_at, self.r = copy_ms, 0.0, replay
        self.queue: deque[tuple[Key, float, int]] = deque()  # (key, issued at, target step)
        self.arrival: dict[Key, float] = {}

    def advance(self, now: float) -> None:
        while self.queue and max(self.free_at, self.queue[0][1]) < now:
            key, issued, _ = self.queue.popleft()
            self.r.loads += 1
            self.r.prefetch_loads += 1
            self.free_at = max(self.free_at, issued) + self.copy_ms
            self.arrival[key] = self.free_at

    def demand(self, key: Key, now: float) -> float:
        self.free_at = max(self.free_at, now) + self.copy_ms
        self.arrival[key] = self.free_at
        return self.free_at


class _Cache:
    def __init__(self, capacity: int, policy, replay: Replay):
        self.capacity, self.policy, self.r = capacity, policy, replay
        self.lru: OrderedDict[Key, None] = OrderedDict()
        self.reserved: dict[Key, int] = {}  # key -> step it was prefetched for
        self.fetched: dict[Key, int] = {}   # loaded by a prefetch for that step, not used yet

    def _touch(self, key: Key) -> None:
        self.lru[key] = None
        self.lru.move_to_end(key)

    def make_room(self, protect: set[Key], force: bool) -> Key | None:
        """Frees a slot (the evicted key, or None if one was empty); raises LookupError if none can be."""
        if len(self.lru) < self.capacity:
            return None
        candidates = [k for k in self.lru if k not in protect and k not in self.reserved]
        if not candidates and force:  # a compute must run: reservations yield, oldest first
            candidates = [k for k in self.lru if k not in protect]
        victim = self.policy.victim(candidates)
        if victim is None:
            raise LookupError
        del self.lru[victim]
        self.reserved.pop(victim, None)
        self.fetched.pop(victim, None)
        return victim


def replay(trace: Sequence[Access], issues: Sequence[Sequence[Issue]], policy: str, capacity: int,
           predictor: str = "none", expert_bytes: int = 1, prior: RoutingPrior | None = None,
           time: TimeModel | None = None, reuse: dict[int, Sequence[int]] | None = None) -> Replay:
    """Replays ``trace`` (one Access per step) with ``issues[s]`` issued before step s's wait;
    ``reuse[s]``, where given, is handed to the policy (``expect``) as step s's wait reads it."""
    r = Replay(policy, predictor, capacity, expert_bytes)
    layers = sorted({a.layer for a in trace})
    cache = _Cache(capacity, make_policy(policy, layers, prior), r)
    engine = _Engine(time.expert_bytes / (time.bandwidth_gbps * 1e9) * 1e3, r) if time is not None else None
    now, last_token = 0.0, None
    for s, access in enumerate(trace):
        if (access.seq, access.token) != last_token:
            r.tokens, last_token = r.tokens + 1, (access.seq, access.token)
        due = issues[s] if s < len(issues) else ()
        if reuse is not None and s in reuse:
            cache.policy.expect(reuse[s])
        for issue in due:
            if issue.deferred:
                _reserve(cache, issue, trace)
            else:
                _prefetch(cache, issue, trace, now, engine)

        def after_demand(protect: set[Key], at: float = now, s: int = s) -> None:
            for issue in due:
                if issue.deferred and issue.load and issue.target != s:
                    _copy(cache, issue, trace, at, engine, protect)

        now = _step(cache, s, access, now, engine, time, after_demand)
        r.steps += 1
    r.ms = now
    return r


def _prefetch(cache: _Cache, issue: Issue, trace: Sequence[Access], now: float, engine: _Engine | None) -> None:
    _reserve(cache, issue, trace)
    if issue.load:
        _copy(cache, issue, trace, now, engine, set())


def _reserve(cache: _Cache, issue: Issue, trace: Sequence[Access]) -> None:
    """Tells the policy, counts the predictions, and reserves the resident ones (so no load evicts them)."""
    r, layer = cache.r, trace[issue.target].layer
    cache.policy.hint(layer, issue.experts)
    needed = set(trace[issue.target].experts)
    r.predicted += len(issue.experts)
    r.predicted_used += len(needed.intersection(issue.experts))
    if not issue.load:
        return
    for e in issue.experts:
        if (layer, e) in cache.lru:
            cache.reserved.setdefault((layer, e), issue.target)


def _copy(cache: _Cache, issue: Issue, trace: Sequence[Access], now: float, engine: _Engine | None,
          protect: set[Key]) -> None:
    """Loads the predictions that are not resident, never evicting ``protect`` (slots in use)."""
    r, layer = cache.r, trace[issue.target].layer
    for e in issue.experts:
        key = (layer, e)
        if key in cache.lru:
            continue
        try:
            cache.make_room(protect, force=False)
        except LookupError:
            r.dropped += 1
            continue
        cache._touch(key)
        cache.reserved[key] = cache.fetched[key] = issue.target
        if engine is not None:
            engine.queue.append((key, now, issue.target))
        else:
            r.loads += 1
            r.prefetch_loads += 1


def _step(cache: _Cache, s: int, access: Access, now: float, engine: _Engine | None,
          time: TimeModel | None, after_demand=lambda protect: None) -> float:
    r, layer = cache.r, access.layer
    stats = r.per_layer.setdefault(layer, {"accesses": 0, "ready": 0, "loads": 0})
    if engine is not None:
        engine.advance(now)
        _drop_stale(cache, engine, s)
    cache.policy.begin(layer)
    for key, target in list(cache.fetched.items()):
        if key[0] == layer and target <= s and key[1] not in access.experts:
            r.wasted += 1
            del cache.fetched[key]
    for key in [k for k, t in cache.reserved.items() if k[0] == layer]:
        del cache.reserved[key]
    keys = sorted(((layer, e) for e in access.experts), key=lambda k: k not in cache.lru)
    ready = now
    for start in range(0, len(keys), cache.capacity):
        wave = keys[start:start + cache.capacity]
        protect = {k for k in wave if k in cache.lru}
        for key in wave:
            r.accesses += 1
            stats["accesses"] += 1
            if key in cache.lru:
                ready = max(ready, _ready(cache, key, now, engine))
                stats["ready"] += 1
                cache._touch(key)
            else:
                r.missed += 1
                cache.make_room(protect, force=True)
                cache._touch(key)
                r.loads += 1
                stats["loads"] += 1
                if engine is not None:
                    ready = max(ready, engine.demand(key, now))
            protect.add(key)
            cache.fetched.pop(key, None)
            cache.policy.use(key)
        if start == 0:
            after_demand(protect)  # the first wave's slots are in use while the deferred copies start
    if not keys:
        after_demand(set())
    if time is None:
        return now
    return ready + time.layer_ms


def _ready(cache: _Cache, key: Key, now: float, engine: _Engine | None) -> float:
    """When a resident-or-queued ``key`` is usable; counts it as resident or in flight."""
    r = cache.r
    if engine is None or key not in cache.fetched:
        r.resident += 1
        return now
    queued = next((i for i, item in enumerate(engine.queue) if item[0] == key), None)
    if queued is not None:  # not started: it becomes a demand copy, ahead of the other prefetches
        del engine.queue[queued]
        r.in_flight += 1
        r.loads += 1
        r.prefetch_loads += 1
        return engine.demand(key, now)
    arrival = engine.arrival.get(key, 0.0)
    if arrival > now:
        r.in_flight += 1
    else:
        r.resident += 1
    return max(now, arrival)


def _drop_stale(cache: _Cache, engine: _Engine, s: int) -> None:
    """Queued prefetches whose step already ran move nothing; their slots are freed."""
    keep = deque()
    for item in engine.queue:
        key, _, target = item
        if target < s:
            cache.r.dropped += 1
            cache.lru.pop(key, None)
            cache.reserved.pop(key, None)
            cache.fetched.pop(key, None)
        else:
            keep.append(item)
    engine.queue = keep


def from_log(log: Sequence) -> tuple[list[Access], list[list[Issue]]]:
    """The runtime's cache requests (``runtime.routing.Request``: prefetches and waits, in the
    order it made them) as a replay's steps and issues: a prefetch (or a hint, which copies
    nothing) is read back at the next wait (deferred), for the first wait of its layer from there
    on (one it never reached is left out)."""
    trace: list[Access] = []
    issues: list[list[Issue]] = []
    pending: list[tuple[int, tuple[int, ...], bool]] = []  # (layer, experts, copies) awaiting their wait
    placed: list[tuple[int, int, tuple[int, ...], bool]] = []  # (issued before step, layer, experts, copies)
    for req in log:
        if req.kind in ("prefetch", "hint"):
            pending.append((req.layer, req.experts, req.kind == "prefetch"))
        elif req.kind == "reuse":
            continue  # the policy's estimates, not a copy: reuse_from_log
        elif req.kind == "wait":
            placed.extend((len(trace), *item) for item in pending)
            pending = []
            trace.append(Access(0, len(trace), req.layer, tuple(sorted(set(req.experts)))))
            issues.append([])
        else:
            raise ValueError(f"unknown cache request {req.kind!r}")
    for at, layer, experts, copies in placed:
        target = next((s for s in range(at, len(trace)) if trace[s].layer == layer), None)
        if target is not None and experts:
            issues[at].append(Issue(target, experts, load=copies, deferred=True))
    return trace, issues


def reuse_from_log(log: Sequence) -> dict[int, tuple[int, ...]]:
    """The reuse estimates in the runtime's log, keyed by the replay step (``from_log``'s) whose
    wait read them."""
    out: dict[int, tuple[int, ...]] = {}
    waits = 0
    for req in log:
        if req.kind == "reuse":
            out[waits] = req.experts
        elif req.kind == "wait":
            waits += 1
    return out
