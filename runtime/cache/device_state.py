"""Device-side state the cache keeps without blocking the host: the expert-to-slot tables and the
clock of how long the compute stream waited for copies."""

from __future__ import annotations

import time
from array import array
from collections.abc import MutableMapping
from typing import Protocol

import torch


class SlotTable:
    """One layer's expert id -> slot table (-1: not resident; one spare entry for padding ids).

    The cache edits the host copy as it loads and evicts; the compute reads :meth:`on_device`,
    refreshed by at most one asynchronous upload per step of the layer. The upload's source is a
    fresh pinned copy, which torch's caching host allocator does not reuse before the copy has
    run, so later host edits never race it. The host copy is a Python array viewed as a tensor
    (one buffer): an element write to a tensor costs tens of microseconds, to an array well
    under one, and a large model's cache edits hundreds of entries per token.
    """

    def __init__(self, num_experts: int, device: torch.device):
        self._entries = array("q", [-1] * (num_experts + 1))  # never resized: the view shares it
        self.host = torch.frombuffer(self._entries, dtype=torch.long)
        self.device = device
        self._device_copy = self.host if device.type == "cpu" else self.host.to(device)
        self._dirty = False

    def set(self, expert: int, slot: int) -> None:
        self._dirty = True  # first: an interrupt between the two must not leave an edit un-uploaded
        self._entries[expert] = slot

    def get(self, expert: int) -> int:
        return self._entries[expert]

    def on_device(self) -> torch.Tensor:
        if self._dirty and self.device.type != "cpu":
            self._device_copy.copy_(self.host.pin_memory(), non_blocking=True)
        self._dirty = False
        return self._device_copy


class _Stats(Protocol):
    stall_s: float


class StallClock:
    """How long computes waited for their experts' copies.

    On CUDA the wait happens on the GPU (the compute stream waits on copy events; the host runs
    on), so host timers would read about zero: timing events are recorded on the compute stream
    around the waits and read when statistics are asked for, never in the hot path. On CPU the
    wait blocks the host, and host time is the stall.
    """

    #: Open event pairs kept before the ones that have completed are folded in (bounds memory).
    MAX_OPEN = 4096

    def __init__(self, device: torch.device):
        self.device = device
        self._open: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> torch.cuda.Event | float:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self, layer: int, started: torch.cuda.Event | float, stats: MutableMapping[int, _Stats]) -> None:
        if not isinstance(started, torch.cuda.Event):
            stats[layer].stall_s += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._open.append((layer, started, end))
        if len(self._open) > self.MAX_OPEN:
            self.settle(stats, block=False)

    def settle(self, stats: MutableMapping[int, _Stats], block: bool = True) -> None:
        """Adds the measured waits to ``stats``; ``block`` waits for the events still running."""
        keep = []
        for layer, start, end in self._open:
            if not block and not end.query():
                keep.append((layer, start, end))
                continue
            if block:  # a completed event needs no synchronize (which sync-debug mode would flag)
                end.synchronize()
            stats[layer].stall_s += start.elapsed_time(end) / 1e3
        self._open = keep

    def clear(self) -> None:
        self._open = []
