"""CUDA prefetches fed to the copy stream in chunks, a few at a time (issue 24).

A CUDA copy cannot be taken back once it is on a stream, and one DMA engine runs the copies of
every stream in the order they were queued (stream priority orders kernels, not copies). Were
each prefetch queued whole when made, a demand copy would wait behind every prefetch made before
it, and a prefetch its layer turned out not to need would move all its bytes. So the copy engine
holds prefetches on the host and feeds the copy stream ``CHUNK`` bytes at a time, at most
``WINDOW`` chunks in flight:

- a demand copy (queued at once, on its own stream) waits for at most ``WINDOW`` chunks;
- a prefetch none of whose chunks is queued yet can still be cancelled, and moves nothing;
- a prefetch a compute waits for, or one a later copy into its slot must follow, is queued
  whole at once (``flush``).

The window is fed whenever the cache touches the engine: every copy made, every readiness check
and every compute queued (``mark_read``), so at least once per MoE layer. Copies into one slot
keep their order: a slot's earlier copy is flushed before a later one is queued, and the first
chunk of each waits for the slot's last write and last reader (``CopyEngine._order``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

CHUNK = 16 * 2**20  # bytes: a few hundred microseconds of PCIe, small next to a layer's compute
WINDOW = 2          # prefetch chunks on the copy stream at once: the engine never idles between feeds


@dataclass
class Pending:
    """A prefetch not yet wholly on the copy stream: ``done`` of its bytes are."""

    queue: "ChunkQueue"
    key: tuple[int, int]
    dst: torch.Tensor  # flat bytes
    src: torch.Tensor  # flat bytes
    ticket: Any  # streams.Ticket (not imported: streams imports this module)
    label: str
    done: int = 0


class ChunkQueue:
    def __init__(self, engine: Any):  # the streams.CopyEngine whose copy stream this feeds
        self.engine = engine
        self.waiting: deque[Pending] = deque()       # in the order made
        self.of: dict[tuple[int, int], Pending] = {}  # slot -> its copy not wholly queued
        self.in_flight: deque[Any] = deque()          # events of queued chunks not known to be done

    def add(self, key: tuple[int, int], dst: torch.Tensor, src: torch.Tensor, ticket: Any, label: str) -> None:
        pending = Pending(self, key, _bytes(dst), _bytes(src), ticket, label)
        ticket.pending = pending
        self.of[key] = pending
        self.waiting.append(pending)
        self.pump()

    def pump(self) -> None:
        """Forgets the chunks that have landed and queues more, up to ``WINDOW`` in flight."""
        while self.in_flight and self.in_flight[0].query():
            self.in_flight.popleft()
        while self.waiting and len(self.in_flight) < WINDOW:
            pending = self.waiting[0]
            self.in_flight.append(self._chunk(pending))
            if pending.ticket.pending is None:  # wholly queued
                self.waiting.popleft()

    def flush(self, pending: Pending) -> None:
        """Queues the rest of ``pending`` now, past the window: something must follow it."""
        if pending in self.waiting:
            self.waiting.remove(pending)
        while pending.ticket.pending is not None:
            self.in_flight.append(self._chunk(pending))

    def drop(self, pending: Pending) -> bool:
        """Cancels ``pending`` if none of it is queued yet (True: it never moves a byte)."""
        if pending.done or pending.ticket.pending is None:
            return False
        self.waiting.remove(pending)
        self._forget(pending)
        pending.ticket.cancelled = True
        pending.ticket.done.release()  # nothing to wait for: ready, and wait returns
        return True

    def close(self) -> None:
        """Drops every prefetch not begun; those begun are queued whole (their slots' later
        readers and writers are ordered after them)."""
        for pending in list(self.waiting):
            if not self.drop(pending):
                self.flush(pending)

    def _chunk(self, pending: Pending) -> Any:
        """Queues ``pending``'s next chunk on the copy stream; its event."""
        engine, total = self.engine, pending.src.numel()
        n, stream = min(CHUNK, total - pending.done), engine._stream
        with torch.cuda.device(engine.device), torch.cuda.stream(stream):
            if pending.done == 0:
                engine._order(pending.key, stream)
                engine.copies += 1
            timeline = engine.timeline
            start = timeline.mark(stream) if timeline is not None else None
            lo = pending.done
            pending.dst[lo:lo + n].copy_(pending.src[lo:lo + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            pending.done += n
            engine.bytes_moved += n
            if timeline is not None:
                timeline.add("copy", pending.label, start, timeline.mark(stream), bytes=n)
            if pending.done == total:  # the last chunk: the copy is recorded, as a whole copy is
                ticket = pending.ticket
                ticket.event, ticket.device = event, engine.device
                engine._recorded(pending.key, event)
                self._forget(pending)
        return event

    def _forget(self, pending: Pending) -> None:
        pending.ticket.pending = None
        if self.of.get(pending.key) is pending:
            del self.of[pending.key]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
