"""The runtime survives interrupts part way through a step, and threads sharing one model."""

from __future__ import annotations

import gc
import random
import signal
import sys
import threading

import pytest
import torch
from conftest import EVICT, PROMPT_MASK, PROMPTS

from expertflow import runtime
from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.cache.device_state import SlotTable
from expertflow.runtime.cache.policy import make_policy
from expertflow.runtime.cache.streams import CopyEngine, Ticket


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




#: The cache's load and evict code: an interrupt is injected at each of its statements and at the
#: entry of each function it calls (CPython checks for signals at function entry too).
_LOAD_AND_EVICT = {f.__code__ for f in (ExpertCache._load, ExpertCache._forget, ExpertCache._name,
                                        ExpertCache._drop_unneeded, ExpertCache._placed, ExpertCache._submit,
                                        SlotTable.set, Ticket.cancel, CopyEngine.submit)}


class _Injector:
    """A ``sys.settrace`` hook: counts those events, noting each one's site (code and line, or
    caller, line and callee), and raises KeyboardInterrupt at event number ``at``."""

    def __init__(self, at: int | None = None):
        self.at, self.sites = at, []

    def _event(self, site: tuple) -> None:
        self.sites.append(site)
        if len(self.sites) == self.at:
            raise KeyboardInterrupt  # raised in the traced frame, and tracing stops

    def __call__(self, frame, event, arg):  # the global hook sees 'call' events: every new frame
        inside, caller = frame.f_code in _LOAD_AND_EVICT, frame.f_back
        if inside or (caller is not None and caller.f_code in _LOAD_AND_EVICT):
            self._event((caller.f_code, caller.f_lineno, frame.f_code) if caller is not None else frame.f_code)
        return self._line if inside else None

    def _line(self, frame, event, arg):
        if event == "line":
            self._event((frame.f_code, frame.f_lineno))
        return self._line

    def run(self, fn, *args) -> bool:
        """``fn(*args)`` traced; True if the interrupt landed. The cyclic collector is off meanwhile:
        a finalizer of earlier tests' garbage, run inside the cache's code, would be an event."""
        collecting = gc.isenabled()
        gc.disable()
        sys.settrace(self)
        try:
            fn(*args)
        except KeyboardInterrupt:
            return True
        finally:
            sys.settrace(None)
            if collecting:
                gc.enable()
        return False


class _SteppedEngine(CopyEngine):
    """The CPU copy engine with no worker thread, so that every run takes the same branches: a
    wait runs the queued copies (demand first, as the worker would) until its own has run, then
    starts the next one without finishing it (a worker part way through a copy: it can be
    neither cancelled nor waited for without blocking), finished at the next wait."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.close()
        self._started: tuple | None = None

    def submit(self, *args, **kwargs) -> Ticket:
        ticket = super().submit(*args, **kwargs)
        ticket.wait = lambda: self._until(ticket)  # shadows Ticket.wait for this ticket only
        return ticket

    def _finish(self) -> None:
        if self._started is not None:
            started, self._started = self._started, None
            started[3].claim.release()
            self._copy(*started)  # claims it again, copies, marks it done

    def _until(self, ticket: Ticket) -> None:
        self._finish()
        while not ticket.ready() and self.run_next():
            pass
        queued = self._demand or self._speculative
        if queued and queued[0][3].claim.acquire(blocking=False):  # not cancelled: start it
            self._started = queued.popleft()
        Ticket.wait(ticket)

    def drain(self) -> None:
        self._finish()
        while self.run_next():
            pass


def _consistent(cache: ExpertCache) -> None:
    """Host and device agree: each expert the host calls resident is where its table says, in a
    slot that holds its exact bytes once the queued copies ran; every other entry is -1."""
    cache.engine.drain()
    for pool in cache.pools.values():
        assert not pool.pinned and not pool.reserved and not pool.unsettled
        for slot, key in enumerate(pool.owner):
            assert key is None or (pool.where[key] == slot and slot in pool.lru), (slot, key)
        for key, slot in pool.where.items():
            assert pool.owner[slot] == key and torch.equal(pool.tensor[slot], cache.store.blob(*key)), key
    for layer, table in cache.tables.items():
        where = cache.pool(layer).where
        expected = [where.get((layer, e), -1) for e in range(cache.layouts[layer].num_experts)] + [-1]
        assert table.on_device().tolist() == expected, layer


def _steps(cache: ExpertCache, script: list) -> None:
    """Drives the cache as a compiled graph does: per token and layer, the prefetch of the next
    layer's prediction, the wait's plan, then acquire, read and release each wave. The read
    checks what a compute would: each id's table entry names a slot holding its blob. A token
    with fewer routes than layers stops after them, as a step that raised does (``abort``), its
    last prefetch's copies still queued."""
    layers = len(cache.layouts)
    for routes in script:
        handle = None
        for layer, (routed, predicted) in enumerate(routes):
            following = cache.prefetch(layer + 1, torch.tensor(predicted)) if layer + 1 < layers else None
            for wave in cache.plan(layer, handle, torch.tensor(routed)):
                slots = cache.acquire(layer, wave)
                table = cache.tables[layer].on_device()
                for e, slot in zip(wave, slots):
                    assert int(table[e]) == slot and torch.equal(cache.pool(layer).tensor[slot],
                                                                 cache.store.blob(layer, e)), (layer, e)
                cache.release(layer, slots)
            handle = following
        if len(routes) < layers:
            cache.abort()


@pytest.mark.parametrize("slots,seed", [(3, 4), (6, 14)])
def test_an_interrupt_at_every_statement_of_load_and_evict_leaves_the_cache_consistent(slots, seed):
    """A Ctrl-C at each statement of the cache's load and evict code and at each call it makes,
    one run per event, through steps that fill empty slots, evict, prefetch, cancel prefetches,
    run in waves and stop part way: after the step's cleanup (``abort``) host and device tables
    agree and the same steps run again read exactly the right bytes. It used to be wrong where a
    Ctrl-C landed as ``SlotTable.set`` began: the host named the new expert, the table said -1."""
    from test_runtime_cache import Store, layouts_for

    rng = random.Random(seed)  # (6, 14): 3 tokens x 3 layers reaching every line of that code; (3, 4): waves
    script = [[(rng.sample(range(6), rng.randint(1, 4)), rng.sample(range(6), rng.randint(0, 4)))
               for _ in range(3)] for _ in range(3)]
    script[1] = script[1][:2]  # the second token stops after layer 1, its layer 2 prefetch queued

    def fresh() -> ExpertCache:
        return ExpertCache(layouts_for(3, 6), Store(3, 6), slots, torch.device("cpu"), _SteppedEngine())

    counted = _Injector()
    assert not counted.run(_steps, fresh(), script)
    sites = set(counted.sites)
    assert len(counted.sites) > 800 and len(sites) >= 72  # loads, evictions, cancellations, waves
    for at in range(1, len(counted.sites) + 1):
        cache = fresh()
        injector = _Injector(at)
        assert injector.run(_steps, cache, script) and injector.sites == counted.sites[:at]  # deterministic
        cache.abort()  # what the model's forward does when a step stops part way
        _consistent(cache)
        _steps(cache, script)


def test_an_interrupt_at_each_site_of_load_and_evict_then_an_exact_call(compiled_dir, hf_reference):
    """The same through the model: a Ctrl-C at the first occurrence of each statement and call
    of the cache's load and evict code in a cold step; the cache is consistent and the next call
    gives HF's logits."""
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=EVICT)
    model.context.cache.engine.close()
    ids = torch.tensor([[5, 9, 200]])
    with torch.no_grad():
        reference = hf_reference("tiny-mixtral")[0](input_ids=ids).logits

    def cold() -> ExpertCache:
        old = model.context.cache
        cache = ExpertCache(old.layouts, old.store, old.slots, torch.device("cpu"), _SteppedEngine(),
                            make_policy(old.policy.name, list(old.layouts)))
        model.context.cache, model.context._views = cache, {}  # the views are of the old pool tensor
        return cache

    cold()
    counted = _Injector()
    assert not counted.run(model, ids)
    first = sorted({site: at for at, site in reversed(list(enumerate(counted.sites, 1)))}.values())
    assert len(first) >= 40  # of the 72 above: a cold step cancels no prefetch that started
    for at in first:
        cache = cold()
        assert _Injector(at).run(model, ids)
        _consistent(cache)
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)


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
    from expertflow.tools.cli.generate import main

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
    from expertflow.runtime.cache.streams import CopyEngine

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

    from expertflow.runtime.cache.streams import CopyEngine, Ticket

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
        engine._speculative.append(((0, 1), dst, torch.ones(4), lost, "no wake-up"))  # appended, never woken
        deadline = time.monotonic() + 5
        while not lost.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lost.ready() and torch.equal(dst, torch.ones(4))
    finally:
        engine._queue.put(None)
        worker.join(timeout=5)
