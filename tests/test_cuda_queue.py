"""The CUDA copy engine's queue, driven on CPU against a stand-in with CUDA's semantics.

``FakeGPU`` replaces torch.cuda's streams and events: every event recorded on any stream takes
the next place in one DMA order (one copy engine runs the copies of every stream in the order
they were queued), and an event has completed only once the test lands the DMA up to it. The
copies themselves are CPU tensor copies, so the bytes that land are real.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from expertflow.runtime.cache import chunks
from expertflow.runtime.cache.streams import CopyEngine

BLOB = 12  # three 4-byte chunks


class FakeGPU:
    def __init__(self):
        self.order: list[tuple[str, "FakeEvent"]] = []  # (stream, event) in DMA order
        self.landed = 0                                  # events of ``order`` complete

    def land(self, n: int | None = None) -> None:
        self.landed = len(self.order) if n is None else min(self.landed + n, len(self.order))


class FakeEvent:
    gpu: FakeGPU

    def __init__(self, *args, **kwargs):
        self.at: int | None = None

    def record(self, stream: "FakeStream") -> None:
        self.at = len(self.gpu.order)
        self.gpu.order.append((stream.name, self))

    def query(self) -> bool:
        return self.at is not None and self.at < self.gpu.landed


class FakeStream:
    gpu: FakeGPU

    def __init__(self, device=None, priority: int = 0, name: str | None = None):
        self.name = name or ("demand" if priority < 0 else "copy")
        self.waits: list[FakeEvent] = []

    def wait_event(self, event: FakeEvent) -> None:
        self.waits.append(event)

    def wait_stream(self, other: "FakeStream") -> None:
        pass

    def synchronize(self) -> None:
        self.gpu.land()


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGPU()
    FakeEvent.gpu = FakeStream.gpu = fake
    compute = FakeStream(name="compute")
    fake.compute = compute
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: compute)
    monkeypatch.setattr(chunks, "CHUNK", 4)
    monkeypatch.setattr(chunks, "WINDOW", 2)
    return fake


def _engine_and_slots(n: int):
    engine = CopyEngine(torch.device("cuda"))
    slots = torch.zeros(n, BLOB, dtype=torch.uint8)
    sources = [torch.full((BLOB,), i + 1, dtype=torch.uint8) for i in range(n)]
    return engine, slots, sources


def test_prefetches_go_a_window_of_chunks_at_a_time_and_a_demand_copy_waits_for_that_window_only(gpu):
    engine, slots, src = _engine_and_slots(4)
    prefetches = [engine.submit((0, i), slots[i], src[i], f"P{i}") for i in range(3)]
    assert len(gpu.order) == 2  # 3 prefetches x 3 chunks made; 2 chunks on the copy stream
    demand = engine.submit((0, 3), slots[3], src[3], "D", demand=True)
    assert [s for s, _ in gpu.order] == ["copy", "copy", "demand"]  # behind two chunks, not nine
    assert demand.ready() is False and not any(t.ready() for t in prefetches)
    while len(gpu.order) < 10:  # land what is queued; each touch of the engine feeds the window
        gpu.land()
        engine.mark_read([])
    gpu.land()
    assert all(t.ready() for t in prefetches) and demand.ready()
    assert all(torch.equal(slots[i], src[i]) for i in range(4))
    assert engine.bytes_moved == 4 * BLOB and engine.copies == 4


def test_a_prefetch_not_begun_is_cancelled_and_moves_nothing_one_begun_is_not(gpu):
    engine, slots, src = _engine_and_slots(3)
    first, _, third = [engine.submit((0, i), slots[i], src[i]) for i in range(3)]
    assert first.cancel() is False  # two of its chunks are on the stream: its bytes land
    assert third.cancel() is True and third.ready()
    third.wait()  # nothing to wait for
    for _ in range(10):
        gpu.land()
        engine.mark_read([])
    assert torch.equal(slots[0], src[0]) and torch.equal(slots[1], src[1])
    assert not slots[2].any() and engine.bytes_moved == 2 * BLOB


def test_a_wait_queues_the_rest_of_a_prefetch_at_once_and_the_compute_follows_its_last_chunk(gpu):
    engine, slots, src = _engine_and_slots(3)
    tickets = [engine.submit((0, i), slots[i], src[i]) for i in range(3)]
    tickets[2].wait()  # a compute needs the third now: queued whole, past the window
    assert len(gpu.order) == 2 + 3 and gpu.compute.waits == [gpu.order[-1][1]]
    assert torch.equal(slots[2], src[2])


def test_a_later_copy_into_a_slot_follows_the_whole_earlier_one(gpu):
    engine, slots, src = _engine_and_slots(2)
    engine.submit((0, 1), slots[1], src[1])  # takes the window first
    engine.submit((0, 0), slots[0], src[0])  # not begun
    gpu.land(1)
    engine.mark_read([])  # one chunk of slot 0's prefetch is queued now
    assert len(gpu.order) == 3
    newer = torch.full((BLOB,), 9, dtype=torch.uint8)
    demand = engine.submit((0, 0), slots[0], newer, demand=True)
    streams = [s for s, _ in gpu.order]
    assert streams[-1] == "demand" and streams[-3:-1] == ["copy", "copy"]  # the earlier copy's rest, first
    earlier_last = gpu.order[-2][1]
    assert earlier_last in engine._demand_stream.waits  # and the demand copy waits for it on the GPU
    gpu.land()
    assert demand.ready() and torch.equal(slots[0], newer)


def test_close_drops_what_has_not_begun_and_lands_the_rest(gpu):
    engine, slots, src = _engine_and_slots(3)
    tickets = [engine.submit((0, i), slots[i], src[i]) for i in range(3)]
    engine.close()
    assert tickets[1].cancelled and tickets[2].cancelled and not slots[1:].any()
    assert tickets[0].ready() and torch.equal(slots[0], src[0])  # begun: queued whole, landed
