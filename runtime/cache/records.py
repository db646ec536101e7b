"""What the cache model hands out and keeps: a prefetch (``Handle``), a copy as the model sees it
(``Copy``: the driver's ticket) and the per-layer counters (``LayerStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Copy(Protocol):
    """A copy into one slot, as the driver runs it (a real one, or a modelled one)."""

    nbytes: int

    def ready(self) -> bool: ...     # the bytes have landed (never blocks)
    def cancel(self) -> bool: ...    # True: not started, and now it never will
    def wait(self) -> None: ...      # orders the caller after the copy


@dataclass
class LayerStats:
    hits: int = 0               # needed experts ready at the wait: resident + in_flight
    misses: int = 0             # needed experts loaded on demand at the wait
    resident: int = 0           # needed and already in their slot when the wait began
    in_flight: int = 0          # needed, prefetched, copy still running when the wait began
    predicted: int = 0          # experts named by prefetches
    predicted_used: int = 0     # of those, chosen by the router
    needed: int = 0             # distinct experts the router chose, summed over steps
    prefetch_dropped: int = 0   # predictions with no free slot to go to
    prefetch_cancelled: int = 0  # unneeded prefetches whose copy had not started when their layer ran
    prefetch_wasted: int = 0    # prefetched experts (copied) their layer did not need
    waves: int = 0              # expert-compute waves, one per step unless it is split
    split_steps: int = 0        # steps needing more experts than slots: computed in several waves
    bytes_moved: int = 0
    bytes_wasted: int = 0       # of those, copies of prefetched experts their layer did not need
    stall_s: float = 0.0


@dataclass
class Handle:
    """One prefetch. The runtime issues it with its ids still on the device (``ids``) and resolves
    it at the next wait, whose one host synchronisation reads them with that wait's route."""

    layer: int
    predicted: list[int] = field(default_factory=list)
    loaded: list[int] = field(default_factory=list)  # the predicted experts this prefetch copied
    ids: Any = None       # set until resolved
    demand: bool = False  # its copies take the demand stream (the schedule pass said so)
    copy: bool = True     # False: a hint, the policy is told and nothing is copied early
