"""Replays a routing trace with prefetch: a predictor's copies, a cache policy, one copy engine.

The cache is the runtime's cache model (``runtime/cache/cache_model.py``, with a clock:
``sim_cache.SimCache``): C slots shared by every MoE layer, the runtime's victims,
reservations, waves, cancellations and counters, by the same code. A *step* is one MoE layer's
run for a group of tokens (one token in decode; a batch of sequences' tokens, or a whole
prompt, when grouped). Before a step's wait the prefetches due there are issued (``Issue``: the
experts a predictor names for a later step): a deferred one as the runtime reads it back at
the step's wait (its copies start after the step's first wave of demand loads; one for the step
itself copies nothing), any other at once. An issue may also be a hint only (``load=False``):
the policy learns what a step will need, and nothing is copied. At the step's wait:

- each needed expert is *resident* (was there before its prefetch, or hit), *in flight* (its
  prefetch's copy had not landed when the wait began; only with a time model) or *missed*
  (loaded on demand, evicting the policy's victim; reservations yield if they must);
- prefetched experts the step did not need are *wasted* prefetches, or, with a time model,
  cancelled (*dropped*, no byte moved) if their copy had not started;
- predictions with no slot to go to are *dropped* too.

With a time model, copies run on ``sim_cache.Clock``'s one engine and a step computes for
``layer_ms`` once its experts are in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ...runtime.cache.records import Handle
from ...runtime.predict.estimates import RoutingPrior
from .sim_cache import Clock, SimCache, TimeModel, Totals, make_sim_policy
from .trace_file import Access


@dataclass(frozen=True)
class Issue:
    target: int               # the step the experts are predicted for
    experts: tuple[int, ...]  # predicted ids for that step's layer
    load: bool = True         # False: a hint to the policy only (what to keep), no copy
    #: True: read back at this step's wait (the runtime's one host sync per wait), so its copies
    #: start after the step's demand loads, and a prediction for this very step copies nothing.
    deferred: bool = False


@dataclass
class Replay(Totals):
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


def replay(trace: Sequence[Access], issues: Sequence[Sequence[Issue]], policy: str, capacity: int,
           predictor: str = "none", expert_bytes: int = 1, prior: RoutingPrior | None = None,
           time: TimeModel | None = None, reuse: dict[int, Sequence[int]] | None = None) -> Replay:
    """Replays ``trace`` (one Access per step) with ``issues[s]`` issued before step s's wait;
    ``reuse[s]``, where given, is handed to the policy (``expect``) as step s's wait reads it."""
    r = Replay(policy, predictor, capacity, expert_bytes)
    layers = sorted({a.layer for a in trace})
    experts = 1 + max([e for a in trace for e in a.experts]
                      + [e for due in issues for i in due for e in i.experts], default=0)
    clock = Clock(time.copy_ms if time is not None else None, time.window_ms if time is not None else None)
    cache = SimCache(layers, experts, capacity, make_sim_policy(policy, layers, trace, prior), clock, expert_bytes)
    handles: dict[int, list[Handle]] = {}  # target step -> the prefetches made for it
    last_token = None
    for s, access in enumerate(trace):
        if (access.seq, access.token) != last_token:
            r.tokens, last_token = r.tokens + 1, (access.seq, access.token)
        clock.advance(r.ms)
        if reuse is not None and s in reuse:
            cache.policy.expect(reuse[s])
        for issue in issues[s] if s < len(issues) else ():
            handle = Handle(trace[issue.target].layer, copy=issue.load)
            handles.setdefault(issue.target, []).append(handle)
            if cache.resolve(handle, list(issue.experts), access.layer if issue.deferred else None):
                if issue.deferred:
                    cache.defer(handle)
                else:
                    cache.issue(handle)
        cache.ready_at = r.ms
        for wave in cache.waves(access.layer, handles.pop(s, []), list(access.experts)):
            cache.release(access.layer, cache.acquire(access.layer, wave))
        if time is not None:
            r.ms = cache.ready_at + time.layer_ms
        r.steps += 1
    _count(r, cache, clock)
    return r


def _count(r: Replay, cache: SimCache, clock: Clock) -> None:
    """The replay's totals from the model's per-layer statistics and the clock's copies."""
    for layer, st in cache.stats.items():
        r.accesses += st.hits + st.misses
        r.resident += st.resident
        r.in_flight += st.in_flight
        r.missed += st.misses
        r.wasted += st.prefetch_wasted
        r.dropped += st.prefetch_dropped + st.prefetch_cancelled
        r.predicted += st.predicted
        r.predicted_used += st.predicted_used
        if st.hits + st.misses:
            r.per_layer[layer] = {"accesses": st.hits + st.misses, "ready": st.hits, "loads": st.misses}
    r.loads, r.prefetch_loads = clock.loads, clock.prefetch_loads


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
