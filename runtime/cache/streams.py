"""The copy stream: moves expert blobs into slots while the compute stream works.

On CUDA it is a real side stream, with events ordering each copy after the last compute that
read its slot and each compute after the copies it needs; prefetches are fed to it a few chunks
at a time (``chunks.py``), demand copies go at once on a second stream. On CPU it is a worker
thread, so prefetch really overlaps compute there too and CI exercises the same ordering logic.
"""

from __future__ import annotations

import queue
from collections import deque
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..observe.timeline import Timeline
from .chunks import ChunkQueue


class Source(Protocol):
    """A blob read into a slot by the worker (``runtime/store/disk.DiskBlob``), not copied."""

    nbytes: int

    def read_into(self, dst: torch.Tensor, pause: "Callable[[], None] | None" = None) -> None: ...


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class Ticket:
    """One copy in flight; ``wait`` orders the caller after it.

    On CPU, ``done`` is a lock the worker releases when the copy is over. A bare lock, not an
    Event or a Queue: those are Python code, and a Ctrl-C landing inside one of their methods
    on the main thread can lose a wake-up for good; acquiring a lock is one C call.
    """

    nbytes: int
    done: threading.Lock = field(default_factory=_held_lock)
    event: "torch.cuda.Event | None" = None
    device: torch.device | None = None  # the model's GPU: its current stream waits on the event
    error: BaseException | None = None
    #: Whoever acquires it first decides: the CPU worker (the copy runs) or ``cancel`` (it never does).
    claim: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    #: a CUDA prefetch not yet wholly on the copy stream (``chunks.Pending``): None once it is
    pending: Any = None

    def ready(self) -> bool:
        """True once the bytes have landed (a query: never blocks, never syncs the host)."""
        if self.pending is not None:
            self.pending.queue.pump()
            if self.pending is not None:
                return False
        if self.event is not None:
            return bool(self.event.query())
        return not self.done.locked()

    def cancel(self) -> bool:
        """Drops a copy not started yet (on CUDA: a prefetch none of whose chunks is queued);
        True if it will never run."""
        if self.pending is not None:
            return self.pending.queue.drop(self.pending)
        if self.event is None and self.claim.acquire(blocking=False):
            self.cancelled = True
            return True
        return False

    def wait(self) -> None:
        if self.pending is not None:  # a compute needs it: the rest of it is queued now
            self.pending.queue.flush(self.pending)
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)  # GPU-side: the host does not block
            return
        with self.done:  # free once the worker has released it
            pass
        if self.error is not None:
            raise self.error


class CopyEngine:
    """Host-to-slot copies on a second stream (CUDA) or thread (CPU).

    On CPU ``readers`` threads run copies (a blob read from disk releases the GIL while it reads
    and while it is checked, so several reads are in flight); with more than one, one of them
    runs demand copies only, so a demand copy never waits for a prefetch to finish, only for the
    disk. Copies into one slot never overlap: the cache waits for or cancels a slot's copy before
    it makes the next, and a worker waits for a slot's running copy before starting another.
    """

    def __init__(self, device: torch.device, readers: int = 1):
        self.device = device
        self.bytes_moved = 0
        self.copies = 0
        self._slot_read: dict[tuple[int, int], torch.cuda.Event] = {}
        self.timeline: Timeline | None = None  # set by runtime.load(timeline=True)
        self._slot_write: dict[tuple[int, int], torch.cuda.Event] = {}
        #: (pool, slot) -> the stream of a copy queued into it whose event is not recorded yet: left
        #: behind only by an interrupt inside ``submit``, and then the next copy into the slot
        #: waits for all of that stream's work, since the orphan has no event of its own.
        self._unrecorded: dict[tuple[int, int], torch.cuda.Stream] = {}
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
            self._demand_stream = torch.cuda.Stream(device=device, priority=-1)
            self._chunks = ChunkQueue(self)  # prefetches, fed to the copy stream a few chunks at a time
        else:
            # deque append/popleft and SimpleQueue put/get are single C calls: no lost wake-ups
            self._demand: deque = deque()
            self._speculative: deque = deque()
            self._queue: queue.SimpleQueue = queue.SimpleQueue()  # wake-ups of the workers taking any copy
            self._demand_wake: queue.SimpleQueue = queue.SimpleQueue()  # of the demand-only worker
            self._last: dict[tuple[int, int], Ticket] = {}  # (pool, slot) -> its latest copy
            self._running: dict[tuple[int, int], Ticket] = {}  # (pool, slot) -> the copy a worker runs into it
            self._lock = threading.Lock()  # the counters and ``_running``, written by every worker
            #: demand reads from disk under way (not those still waiting for their slot's earlier
            #: copy): a prefetch read pauses between its chunks while there is one
            self._demand_reads = 0
            self._demand_done = threading.Condition(self._lock)
            self.readers = max(1, readers)
            self._threads = [threading.Thread(target=self._run, args=(i == 0 and self.readers > 1,),
                                              name=f"expertflow-copy-{i}", daemon=True) for i in range(self.readers)]
            for thread in self._threads:
                thread.start()

    def submit(self, key: tuple[int, int], dst: torch.Tensor, src: torch.Tensor | Source, label: str = "",
               demand: bool = False) -> Ticket:
        """Copies ``src`` into ``dst``, the slot ``key`` = (pool, slot), after its last reader.

        A ``demand`` copy (a compute is waiting for it) goes before every queued prefetch: on CPU
        the worker takes demand copies first; on CUDA it is queued at once on its own stream, where
        at most ``chunks.WINDOW`` prefetch chunks are ahead of it on the DMA engine.
        """
        on_disk = not isinstance(src, torch.Tensor)
        if on_disk and self.device.type == "cuda":
            raise ValueError("blobs on disk are read into CPU slots only")
        ticket = Ticket(nbytes=src.nbytes if on_disk else src.numel() * src.element_size())
        if self.device.type == "cuda":
            earlier = self._chunks.of.get(key)
            if earlier is not None:  # the slot's earlier copy, not wholly queued: it goes first, whole
                self._chunks.flush(earlier)
            if not demand:
                self._chunks.add(key, dst, src, ticket, label)
                return ticket
            self.bytes_moved += ticket.nbytes
            self.copies += 1
            # Every stream and event on the model's GPU: on cuda:1 the current device may be cuda:0.
            stream = self._demand_stream if demand else self._stream
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                self._order(key, stream)
                start = self.timeline.mark(stream) if self.timeline is not None else None
                dst.copy_(src, non_blocking=True)
                ticket.event, ticket.device = torch.cuda.Event(), self.device
                ticket.event.record(stream)
                self._recorded(key, ticket.event)
                if self.timeline is not None:
                    self.timeline.add("copy", label, start, self.timeline.mark(stream), bytes=ticket.nbytes)
        else:
            # A later copy into a slot supersedes one that has not started: a demand copy would
            # otherwise overtake it and be overwritten by it. The cache cancels such a copy itself;
            # only a Ctrl-C between queueing a copy and recording its ticket leaves one unseen.
            previous = self._last.get(key)
            if previous is not None:
                previous.cancel()
            self._last[key] = ticket
            (self._demand if demand else self._speculative).append((key, dst, src, ticket, label))
            self._queue.put(True)  # a wake-up; the workers also poll, so one lost to a Ctrl-C only delays
            if demand and self.readers > 1:
                self._demand_wake.put(True)
        return ticket

    def _order(self, key: tuple[int, int], stream: "torch.cuda.Stream") -> None:
        """Orders ``stream``'s next copy into slot ``key`` after every earlier write to the slot and
        its last reader. Each step is safe to interrupt: what it has to wait for is forgotten
        only after the copy's own event is recorded (``submit``)."""
        orphan = self._unrecorded.get(key)
        if orphan is not None and orphan != stream:  # an interrupted copy into the slot: wait for its stream
            stream.wait_stream(orphan)
        self._unrecorded[key] = stream
        if key in self._slot_write:  # copies into one slot stay in order across the two streams
            stream.wait_event(self._slot_write[key])
        if key in self._slot_read:  # the slot's last reader must finish first
            stream.wait_event(self._slot_read[key])

    def _recorded(self, key: tuple[int, int], event: "torch.cuda.Event") -> None:
        """A copy into ``key`` is on a stream with its event: later copies into the slot follow it."""
        self._slot_write[key] = event
        self._slot_read.pop(key, None)  # waited for by ``_order``; forgotten only once the copy is recorded
        del self._unrecorded[key]

    def mark_read(self, keys: list[tuple[int, int]]) -> None:
        """Records that the compute stream has queued reads of the (pool, slot) ``keys``: a later
        copy into one of them waits for them (CUDA ordering; on CPU compute is synchronous)."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                stream = torch.cuda.current_stream(self.device)
                for key in keys:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    self._slot_read[key] = ev
            self._chunks.pump()  # once per compute queued at least: the copy stream is kept fed

    def _run(self, demand_only: bool = False) -> None:
        wakes = self._demand_wake if demand_only else self._queue
        while True:
            try:
                wake = wakes.get(timeout=0.05)
            except queue.Empty:  # a copy queued by an interrupted submit has no wake-up of its own
                wake = True
            if wake is None:
                return
            while self.run_next(demand_only):
                pass

    def run_next(self, demand_only: bool = False) -> bool:
        """Runs the next queued CPU copy, demand copies first (False: none is queued). The workers'
        loop; a test that closed the engine runs copies with it at points of its choosing."""
        demand = bool(self._demand) or demand_only
        try:
            item = (self._demand if demand else self._speculative).popleft()
        except IndexError:  # none queued, or another worker took the last one
            return False
        if self.readers > 1 and (self._demand or self._speculative):
            self._queue.put(True)  # more queued: another worker starts the next one beside this
        self._copy(*item, demand=demand)
        return True

    def _yield_to_demand(self) -> None:
        """Between a prefetch read's chunks: returns once no demand read is under way."""
        with self._demand_done:
            while self._demand_reads:
                self._demand_done.wait(0.05)

    def _copy(self, key: tuple[int, int], dst: torch.Tensor, src: torch.Tensor | Source, ticket: Ticket,
              label: str, demand: bool = False) -> None:
        if not ticket.claim.acquire(blocking=False):  # cancelled: its layer ran without it
            ticket.done.release()
            return
        prior = None
        with self._lock:  # counted here: a cancelled copy moves nothing
            self.bytes_moved += ticket.nbytes
            self.copies += 1
            if self.readers > 1:  # one worker runs copies in order by itself
                prior, self._running[key] = self._running.get(key), ticket
        timeline, start = self.timeline, time.perf_counter_ns()
        try:
            if prior is not None:  # the slot's earlier copy, still running on another worker, lands first
                with prior.done:
                    pass
            if isinstance(src, torch.Tensor):
                dst.copy_(src)
            elif demand and self.readers > 1:  # a compute waits for it: prefetch reads pause meanwhile
                with self._lock:
                    self._demand_reads += 1
                try:
                    src.read_into(dst)
                finally:
                    with self._lock:
                        self._demand_reads -= 1
                        self._demand_done.notify_all()
            else:  # a blob on disk (store/disk.py): read into the slot, checked before it is done
                src.read_into(dst, None if demand or self.readers == 1 else self._yield_to_demand)
        except BaseException as exc:  # surfaced to the waiter, never lost in the thread
            ticket.error = exc
        finally:
            if self.readers > 1:
                with self._lock:
                    if self._running.get(key) is ticket:
                        del self._running[key]
            if timeline is not None:
                timeline.add("copy" if isinstance(src, torch.Tensor) else "disk", label, start,
                             time.perf_counter_ns(), bytes=ticket.nbytes)
            ticket.done.release()

    def adopt(self, slots: torch.Tensor) -> None:
        """``slots`` (a pool's storage) is written by this engine's streams: on CUDA the allocator is
        told so, and when the pool is freed it hands the memory out again only after every copy
        queued into it has landed (a wasted prefetch may still be running when a model is dropped)."""
        if self.device.type == "cuda":
            slots.record_stream(self._stream)
            slots.record_stream(self._demand_stream)

    def close(self) -> None:
        """Ends the engine: on CUDA every queued copy has landed when it returns (nothing writes
        into the slots, or reads the pinned host memory that is unpinned next, after the model is
        gone); on CPU the workers are stopped and joined."""
        if self.device.type == "cuda":
            self._chunks.close()
            self._stream.synchronize()
            self._demand_stream.synchronize()
        else:
            for thread in self._threads:
                (self._demand_wake if thread is self._threads[0] and self.readers > 1 else self._queue).put(None)
            for thread in self._threads:
                thread.join(timeout=5)

