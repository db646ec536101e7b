"""The runtime survives interrupts part way through a step, and threads sharing one model."""

from __future__ import annotations

import random
import signal
import threading

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS

from expertflow import runtime


def _sane(model) -> None:
    for pool in model.context.cache.pools.values():
        assert not pool.pinned and not pool.reserved
        for slot, owner in enumerate(pool.owner):  # every named owner is where the table says
            if owner is not None:
                assert pool.where[owner] == slot and int(model.context.cache.tables[owner[0]].on_device()[owner[1]]) == slot


@pytest.mark.parametrize("budget", [1, 4, 8])
def test_interrupts_at_random_points_then_an_exact_call(budget, compiled_dir, hf_reference):
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=budget)
    reference = hf_reference("tiny-mixtral")[1]
    rng = random.Random(budget)
    armed, interrupted = [False], 0

    def interrupt(signum, frame):
        if armed[0]:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for _ in range(25):
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0002, 0.01))
                model(PROMPTS, attention_mask=PROMPT_MASK)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            logits = model(PROMPTS, attention_mask=PROMPT_MASK).logits
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
            _sane(model)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 5, f"only {interrupted} of 25 calls were interrupted: the timer is too slow"


def test_an_error_inside_the_experts_releases_its_slots(compiled_dir, hf_reference, monkeypatch):
    """An exception between wait and expert_compute used to leave slots pinned for good."""
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3)
    calls = {"n": 0}
    original = type(model.context)._run

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.context), "_run", failing)
    with pytest.raises(RuntimeError, match="injected"):
        model(PROMPTS, attention_mask=PROMPT_MASK)
    _sane(model)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, hf_reference("tiny-mixtral")[1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_sharing_a_model_get_exact_logits(threads, compiled_dir):
    path = compiled_dir("tiny-mixtral")
    resident = runtime.load(path)
    gen = torch.Generator().manual_seed(threads)
    batches = [torch.randint(3, 384, (2, 5 + i), generator=gen) for i in range(threads)]
    refs = [resident(b).logits for b in batches]
    shared = runtime.load(path, expert_cache=4)  # evictions every step: the cache state is shared
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for k in range(12):
                j = (i + k) % threads
                torch.testing.assert_close(shared(batches[j]).logits, refs[j], atol=1e-5, rtol=0)
        except BaseException as exc:  # reported by the main thread
            failures.append(f"thread {i}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not failures, failures[0]
    _sane(shared)


def _trace(path) -> dict:
    import json

    trace = json.loads(path.read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e.get("tid")}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    return {"names": names, "spans": spans}


def test_timeline_is_a_chrome_trace_with_copy_and_compute_tracks(compiled_dir, tmp_path):
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3, timeline=True)
    model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=4, do_sample=False)
    trace = _trace(model.timeline.write(tmp_path / "trace.json"))
    by_track: dict[str, list] = {}
    for span in trace["spans"]:
        by_track.setdefault(trace["names"][span["tid"]], []).append(span)
    assert set(by_track) == {"model stream", "compute stream", "copy stream"}
    assert len(by_track["copy stream"]) == model.context.cache.engine.copies  # every copy, one span each
    assert sum(s["args"]["bytes"] for s in by_track["copy stream"]) == model.stats()["total"]["bytes_moved"]
    assert [s["name"] for s in by_track["model stream"]] == ["prefill 2x8", "decode 2x1", "decode 2x1", "decode 2x1"]
    computes = [s["name"] for s in by_track["compute stream"] if s["name"].startswith("experts")]
    assert computes == [f"experts L{layer}" for _ in range(4) for layer in range(4)]


def test_generate_cli_writes_a_timeline(compiled_dir, tmp_path, capsys):
    from expertflow.tools.generate import main

    out = tmp_path / "t.json"
    assert main([str(compiled_dir("tiny-mixtral")), "Hello", "--max-new-tokens", "3", "--quiet", "--budget", "2",
                 "--timeline", str(out)]) == 0
    assert {"copy stream", "compute stream"} <= set(_trace(out)["names"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # written atomically, nothing else left


class _Stream:
    """Stands in for a CUDA stream: records what it was told to wait for."""

    def __init__(self, name: str):
        self.name, self.waits = name, []

    def wait_stream(self, other: "_Stream") -> None:
        self.waits.append(("stream", other.name))

    def wait_event(self, event: str) -> None:
        self.waits.append(("event", event))


def test_a_cuda_copy_left_unrecorded_by_an_interrupt_orders_the_next_one_after_its_stream():
    """On CUDA an interrupted ``submit`` may have queued its copy without recording its event;
    the next copy into that slot, on the other stream, then waits for the orphan's whole stream,
    and still for the slot's last write and last reader, which stay known until a copy records."""
    from expertflow.runtime.streams import CopyEngine

    engine = CopyEngine(torch.device("cpu"))
    try:
        prefetch, demand = _Stream("prefetch"), _Stream("demand")
        engine._slot_write[(0, 0)], engine._slot_read[(0, 0)] = "last write", "last read"
        engine._order((0, 0), prefetch)  # ... and the interrupt lands before the copy is recorded
        assert prefetch.waits == [("event", "last write"), ("event", "last read")]
        engine._order((0, 0), demand)
        assert demand.waits == [("stream", "prefetch"), ("event", "last write"), ("event", "last read")]
        engine._order((0, 1), demand)  # another slot: nothing to wait for
        assert demand.waits[3:] == []
    finally:
        engine.close()


def test_a_copy_orphaned_by_an_interrupt_never_lands_over_a_later_one():
    """A Ctrl-C between queueing a prefetch and recording its ticket leaves a copy the cache does
    not know of. A later demand copy into the same slot goes first, and the orphan must not land
    over it afterwards. A copy whose wake-up the interrupt lost must still run."""
    import time

    from expertflow.runtime.streams import CopyEngine, Ticket

    engine = CopyEngine(torch.device("cpu"))
    engine.close()  # no worker yet: both copies are queued before either runs
    slot = torch.zeros(1 << 16, dtype=torch.uint8)
    demand_src = torch.full_like(slot, 2)
    orphan = engine.submit((0, 0), slot, torch.full_like(slot, 1))  # the cache never records it
    latest = engine.submit((0, 0), slot, demand_src, demand=True)
    worker = threading.Thread(target=engine._run, daemon=True)
    worker.start()
    try:
        latest.wait()
        orphan.wait()
        assert orphan.cancelled and torch.equal(slot, demand_src)
        lost = Ticket(nbytes=4)
        dst = torch.zeros(4)
        engine._speculative.append((dst, torch.ones(4), lost, "no wake-up"))  # appended, never woken
        deadline = time.monotonic() + 5
        while not lost.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lost.ready() and torch.equal(dst, torch.ones(4))
    finally:
        engine._queue.put(None)
        worker.join(timeout=5)
