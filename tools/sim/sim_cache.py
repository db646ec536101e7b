"""The runtime's cache model with a clock instead of a device: what the simulators replay.

``SimCache`` is ``runtime/cache/cache_model.CacheModel`` (every rule: victims, reservations, waves,
cancellation, counters) whose copies are modelled by ``Clock``. Without a time model every copy
lands when it is made. With one, there is one copy engine and copies run one at a time, queued
as the runtime's copy engine queues them on the device simulated:

- ``cpu`` (the copy engine's worker threads, and the disk tier): demand copies go before every
  queued prefetch, a prefetch waited for before it started becomes a demand copy, and one
  cancelled before it started moves nothing;
- ``cuda``: prefetches wait on the host and reach the copy stream in chunks, a window of
  ``runtime/cache/chunks.WINDOW`` at a time (one DMA engine runs every stream's copies in the
  order queued); a demand copy, or a prefetch waited for, goes on at once behind the chunks
  already on the stream, and the rest of the prefetch it cut into follows it; a prefetch not
  begun can be cancelled. The victims prefer slots whose copy has landed, as the CUDA runtime's.

A step computes for ``layer_ms`` once its experts are in.

``Belady`` is Belady's MIN on the runtime's policy interface (``runtime/cache/policy.Policy``): it
evicts the expert needed again farthest in the future, which only a replay of a whole trace
knows. It is the yardstick, never a runtime policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ...runtime.cache.cache_model import CacheModel
from ...runtime.cache.chunks import CHUNK, WINDOW
from ...runtime.cache.policy import POLICIES, Key, Policy
from ...runtime.predict.estimates import RoutingPrior
from ...runtime.cache.pool import Pool
from .trace_file import Access


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


class Belady(Policy):
    """Belady's MIN: the victim is the key needed again farthest ahead (never: after the trace's
    end), least recently used among ties (candidates come least recent first; the sort is stable)."""

    name = "belady"

    def __init__(self, layers: Sequence[int], trace: Sequence[Access],
                 future: Sequence[tuple[int, ...]] | None = None):
        super().__init__(layers)
        self.trace, self.future = trace, future if future is not None else next_uses(trace)
        self.step = -1
        self.upcoming: dict[int, int] = {}   # the running step's experts -> their next use
        self.next_use: dict[Key, int] = {}   # key -> the step that needs it next, as of its last use

    def begin(self, layer: int) -> None:
        super().begin(layer)
        self.step += 1
        self.upcoming = dict(zip(self.trace[self.step].experts, self.future[self.step]))

    def use(self, key: Key) -> None:
        self.next_use[key] = self.upcoming.get(key[1], len(self.trace))

    def ranking(self, candidates: Sequence[Key], limit: int | None = None) -> list[Key]:
        never = len(self.trace)
        return sorted(candidates, key=lambda k: -self.next_use.get(k, never))[:limit]

    def victim(self, candidates: Sequence[Key]) -> Key | None:
        first = self.ranking(candidates, 1)
        return first[0] if first else None


#: Every policy a replay knows: the runtime's registry, and Belady's MIN.
SIM_POLICIES = (*POLICIES, Belady.name)


def make_sim_policy(name: str, layers: Sequence[int], trace: Sequence[Access], prior: RoutingPrior | None = None,
                    future: Sequence[tuple[int, ...]] | None = None) -> Policy:
    if name == Belady.name:
        return Belady(layers, trace, future)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(SIM_POLICIES)}")
    return POLICIES[name](layers, prior)


class _Copy:
    """A modelled copy (``runtime/cache/cache_model.Copy``): queued, then started with an arrival time."""

    def __init__(self, clock: Clock, nbytes: int, issued: float):
        self.clock, self.nbytes, self.issued = clock, nbytes, issued
        self.arrival: float | None = None  # set when it starts
        self.cancelled = False  # then it never lands: nothing to wait for

    def ready(self) -> bool:
        return self.cancelled or (self.arrival is not None and self.arrival <= self.clock.now)

    def cancel(self) -> bool:
        if self.arrival is not None or self.cancelled:
            return False
        self.clock.queue.remove(self)
        self.cancelled = True
        return True

    def wait(self) -> None:
        if self.arrival is None and not self.cancelled:  # waited for before it started: it goes now, ahead of the queue
            self.clock.queue.remove(self)
            self.clock.start(self, prefetch=True, at=self.clock.now, urgent=True)


class Clock:
    """One copy engine (module docstring); ``copy_ms`` None: no time model, copies land at once.
    ``window_ms`` None: a CPU device's queue; else CUDA's, the time the prefetch chunks on the
    copy stream at once take (``runtime/cache/chunks.WINDOW`` chunks of ``CHUNK`` bytes)."""

    def __init__(self, copy_ms: float | None, window_ms: float | None = None):
        self.copy_ms, self.window_ms, self.now, self.free_at = copy_ms, window_ms, 0.0, 0.0
        self.queue: deque[_Copy] = deque()
        self.loads = self.prefetch_loads = 0
        self.running: _Copy | None = None  # the prefetch the engine copies last (CUDA)
        self.urgent_free = 0.0  # when the last demand (or waited-for) copy lands (CUDA)

    @property
    def cuda(self) -> bool:
        return self.window_ms is not None

    def submit(self, nbytes: int, demand: bool) -> _Copy:
        copy = _Copy(self, nbytes, self.now)
        if self.copy_ms is None or demand:
            self.start(copy, prefetch=not demand, at=self.now, urgent=True)
        else:
            self.queue.append(copy)
        return copy

    def start(self, copy: _Copy, prefetch: bool, at: float, urgent: bool = False) -> None:
        self.loads += 1
        self.prefetch_loads += prefetch
        if self.copy_ms is None:
            copy.arrival = at
            return
        if urgent and self.cuda:
            self._cut_in(copy, at)
            return
        self.free_at = max(self.free_at, at) + self.copy_ms
        copy.arrival = self.free_at
        if not urgent:
            self.running = copy

    def _cut_in(self, copy: _Copy, at: float) -> None:
        """CUDA: an urgent copy goes on its stream at once, behind the prefetch chunks already on
        the copy stream (those the window reaches by ``at + window_ms``, queued prefetches
        included), not behind whole prefetches; the rest of the prefetch it cuts into follows it."""
        horizon = at + self.window_ms
        while self.queue and max(self.free_at, self.queue[0].issued) < horizon:  # already on the stream
            queued = self.queue.popleft()
            self.start(queued, prefetch=True, at=max(self.free_at, queued.issued))
        running = self.running
        if running is not None and running.arrival > at:
            begin = max(min(running.arrival, horizon), self.urgent_free)
            copy.arrival = begin + self.copy_ms
            if running.arrival > begin:  # its remaining chunks come after this copy
                running.arrival += self.copy_ms
            self.free_at = max(self.free_at + self.copy_ms, copy.arrival)
        else:
            copy.arrival = max(self.free_at, at, self.urgent_free) + self.copy_ms
            self.free_at = max(self.free_at, copy.arrival)
        self.urgent_free = copy.arrival

    def advance(self, now: float) -> None:
        """Starts, in order, the queued prefetches the engine reaches before ``now``."""
        self.now = now
        while self.queue and max(self.free_at, self.queue[0].issued) < now:
            copy = self.queue.popleft()
            self.start(copy, prefetch=True, at=max(self.free_at, copy.issued))


class SimCache(CacheModel):
    """The cache model over one pool shared by every layer of ``layers`` (experts ids below
    ``experts``), its copies on ``clock``; ``ready_at`` is when the last wave's experts are in."""

    def __init__(self, layers: Sequence[int], experts: int, slots: int, policy: Policy, clock: Clock,
                 expert_bytes: int = 1):
        super().__init__({layer: experts for layer in layers}, {layer: 0 for layer in layers}, slots, policy,
                         settled_first=clock.cuda)
        self.clock, self.expert_bytes, self.ready_at = clock, expert_bytes, 0.0

    def _submit(self, pool: Pool, slot: int, layer: int, expert: int, demand: bool) -> _Copy:
        return self.clock.submit(self.expert_bytes, demand)

    def _await(self, layer: int, pool: Pool, slots: list[int]) -> None:
        copies = [pool.tickets[slot] for slot in slots if slot in pool.tickets]
        for copy in copies:
            copy.wait()
        for copy in copies:  # after every wait: one that cut in may have delayed another (CUDA)
            if copy.arrival is not None:
                self.ready_at = max(self.ready_at, copy.arrival)
        super()._await(layer, pool, slots)


class Totals:
    """What a replay's result reads from its totals (``hits``, ``accesses``, ``loads``,
    ``expert_bytes``): the share of needed experts ready at their wait, and the bytes copied."""

    hits: int
    accesses: int
    loads: int
    expert_bytes: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def bytes(self) -> int:
        return self.loads * self.expert_bytes


#: How copies queue (module docstring): on a GPU, and on a CPU device.
QUEUES = ("cuda", "cpu")


@dataclass(frozen=True)
class TimeModel:
    """Decode time predicted for a replay: one GPU, one copy engine (``Clock``).

    Each copy moves ``expert_bytes`` at ``bandwidth_gbps`` (1 GB = 1e9 bytes); a layer computes
    (``layer_ms``, everything the layer does) once its last expert has arrived. With demand
    loading copies never overlap compute, so per step: loads * expert_bytes / bandwidth +
    layer_ms. The bound is the copy engine's busy time alone per token: no schedule moving
    those bytes is faster, and the ratio to it shows how much of the time is compute left
    un-overlapped (what a prefetcher could hide at best).
    """

    bandwidth_gbps: float
    layer_ms: float
    expert_bytes: int = 1
    #: the copy queue (module docstring): "cuda" as the CUDA copy engine feeds its streams, "cpu"
    #: as the CPU copy engine and the disk tier run copies
    queue: str = "cpu"

    def __post_init__(self) -> None:
        if self.queue not in QUEUES:
            raise ValueError(f"unknown copy queue {self.queue!r}; choose {' or '.join(QUEUES)}")
        if not self.bandwidth_gbps > 0 or not self.layer_ms >= 0 or self.expert_bytes < 1:
            raise ValueError("the time model needs bandwidth > 0, layer ms >= 0 and expert bytes >= 1, got "
                             f"{self.bandwidth_gbps}, {self.layer_ms}, {self.expert_bytes}")

    @property
    def copy_ms(self) -> float:
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3

    @property
    def window_ms(self) -> float | None:
        """CUDA: the time of the prefetch chunks on the copy stream at once; None for a CPU."""
        if self.queue != "cuda":
            return None
        return WINDOW * CHUNK / (self.bandwidth_gbps * 1e9) * 1e3

    def per_token(self, ms: float, nbytes: int, tokens: int) -> dict[str, float | None]:
        """A timed replay's row fields: ``ms`` over ``tokens``, the copy time of ``nbytes`` alone
        per token (the bound), and their ratio (None when nothing was copied)."""
        copy_ms = nbytes / (self.bandwidth_gbps * 1e9) * 1e3
        return {"ms_per_token": ms / max(tokens, 1), "bound_ms_per_token": copy_ms / max(tokens, 1),
                "over_bound": ms / copy_ms if copy_ms else None}
