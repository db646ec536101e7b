"""The server's engine (runtime/generate/engine.py): a continuous batch that requests join and
leave while it runs, each request getting exactly the tokens it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from expertflow import runtime
from expertflow.runtime.generate import continuous as cb
from expertflow.runtime.generate import engine as eng

PROMPTS = [[5, 6, 7, 8], [11, 12, 13], [20, 21, 22, 23, 24, 25], [30, 31], [40, 41, 42, 43, 44]]


class Collect:
    def __init__(self):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def request(self, ids: list[int], sampling: eng.Sampling) -> eng.Request:
        def finish(reason: str) -> None:
            self.reason = reason
            self.done.set()
        return eng.Request(list(ids), sampling, self.tokens.append, finish)


def solo(model, ids: list[int], n: int, **kwargs) -> list[int]:
    t = torch.tensor([ids])
    return model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, **kwargs)[0, len(ids):].tolist()


@pytest.fixture
def model(compiled_dir):
    return runtime.load(compiled_dir("tiny-trained-moe"), expert_cache=3, batch_size=4)  # every step evicts


def test_requests_joining_while_others_run_get_their_solo_tokens(model):
    expected = [solo(model, p, 10, do_sample=False) for p in PROMPTS]
    engine = eng.Engine(model, max_batch=3, max_queue=8)
    got = [Collect() for _ in PROMPTS]
    try:
        for i, p in enumerate(PROMPTS):
            engine.submit(got[i].request(p, eng.Sampling(10)))
            if i == 1:  # the rest arrive while the first two generate
                while engine.stats.tokens < 4:
                    threading.Event().wait(0.001)
        assert all(c.done.wait(60) for c in got)
    finally:
        engine.stop()
    assert [c.tokens for c in got] == expected and [c.reason for c in got] == ["length"] * len(PROMPTS)
    assert engine.stats.steps < sum(len(t) for t in expected)  # rows shared steps


def test_a_cancelled_request_leaves_at_the_next_step_and_a_waiting_one_never_runs(model):
    engine = eng.Engine(model, max_batch=1, max_queue=4)
    long, waiting, after = Collect(), Collect(), Collect()
    try:
        running = engine.submit(long.request(PROMPTS[0], eng.Sampling(400)))
        queued = engine.submit(waiting.request(PROMPTS[1], eng.Sampling(5)))
        queued.cancel()
        while len(long.tokens) < 3:
            threading.Event().wait(0.001)
        running.cancel()
        assert long.done.wait(30) and long.reason == "cancelled" and len(long.tokens) < 400
        assert waiting.done.wait(30) and waiting.reason == "cancelled" and waiting.tokens == []
        engine.submit(after.request(PROMPTS[2], eng.Sampling(4)))
        assert after.done.wait(30) and after.tokens == solo(model, PROMPTS[2], 4, do_sample=False)
    finally:
        engine.stop()


def test_a_full_queue_refuses_and_stop_cancels_everything(model):
    engine = eng.Engine(model, max_batch=1, max_queue=1)
    first, second = Collect(), Collect()
    engine.submit(first.request(PROMPTS[0], eng.Sampling(400)))
    while not first.tokens:
        threading.Event().wait(0.001)
    engine.submit(second.request(PROMPTS[1], eng.Sampling(400)))
    with pytest.raises(eng.QueueFull, match="1 requests are waiting"):
        engine.submit(Collect().request(PROMPTS[2], eng.Sampling(4)))
    engine.stop()
    assert first.reason == second.reason == "cancelled" and not engine._thread.is_alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Collect().request(PROMPTS[2], eng.Sampling(4)))


def test_a_failing_step_ends_its_requests_with_the_error_and_the_engine_serves_on(model, monkeypatch):
    engine = eng.Engine(model, max_batch=2, max_queue=4)
    real, calls = cb.decode, []

    def flaky(m, run):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(m, run)

    monkeypatch.setattr(cb, "decode", flaky)
    hit, later = Collect(), Collect()
    try:
        engine.submit(hit.request(PROMPTS[0], eng.Sampling(8)))
        assert hit.done.wait(30)
        assert hit.reason == "error: RuntimeError: CUDA error: an illegal memory access was encountered"
        engine.submit(later.request(PROMPTS[1], eng.Sampling(5)))
        assert later.done.wait(30) and later.tokens == solo(model, PROMPTS[1], 5, do_sample=False)
    finally:
        engine.stop()
    assert engine.stats.failed == 1


def test_seeded_sampling_is_its_own_per_request(model):
    """Two requests with one seed draw the same tokens, alone or with another sampling beside them."""
    engine = eng.Engine(model, max_batch=3, max_queue=4)
    alone, again, beside, other = Collect(), Collect(), Collect(), Collect()
    try:
        engine.submit(alone.request(PROMPTS[0], eng.Sampling(12, temperature=1.0, seed=3)))
        assert alone.done.wait(30)
        engine.submit(again.request(PROMPTS[0], eng.Sampling(12, temperature=1.0, seed=3)))
        engine.submit(beside.request(PROMPTS[1], eng.Sampling(12, temperature=0.7, top_p=0.9, seed=4)))
        engine.submit(other.request(PROMPTS[0], eng.Sampling(12, temperature=1.0, seed=5)))
        assert again.done.wait(30) and beside.done.wait(30) and other.done.wait(30)
    finally:
        engine.stop()
    assert alone.tokens == again.tokens and alone.tokens != other.tokens


def test_openai_penalties_by_hand():
    scores = torch.zeros(1, 6)
    out = eng._penalised(scores, [2, 2, 5], eng.Sampling(4, presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [[0.0, 0.0, -1.0, 0.0, 0.0, -0.75]]  # 2: 0.5 + 2 x 0.25; 5: 0.5 + 0.25
    assert eng._penalised(scores, [1], eng.Sampling(4)) is scores


def test_a_model_whose_rows_cannot_be_realigned_runs_one_request_at_a_time(compiled_dir):
    model = runtime.load(compiled_dir("tiny-qwen3-next"))
    engine = eng.Engine(model, max_batch=4, max_queue=4)
    got = [Collect() for _ in PROMPTS[:3]]
    try:
        assert engine.batch_limit == 1 and "recurrent-state layers" in engine.why_single
        for c, p in zip(got, PROMPTS):
            engine.submit(c.request(p, eng.Sampling(5)))
        assert all(c.done.wait(60) for c in got)
    finally:
        engine.stop()
    assert [c.tokens for c in got] == [solo(model, p, 5, do_sample=False) for p in PROMPTS[:3]]
