"""A continuous batch that lives as long as a server: requests join at the next step, leave at
their end or when cancelled.

``continuous.run`` generates a list of prompts known up front; a server gets requests at any
time. ``Engine`` owns one thread that runs the batch (the model is used by it alone). Before
each step it drops the rows that finished or were cancelled, admits waiting requests up to
``max_batch`` (route-aware: among the first few waiting, the one whose predicted route is most
like the running rows', when the directory has a routing-path predictor; else in arrival
order), prefills the newcomers together and merges their KV into the batch; then one decode
step runs every row. Each row's token comes from its own logits, through its own processors
(transformers' own, built for its temperature, top-p, top-k and repetition penalty; OpenAI's
presence and frequency penalties on top) and its own random generator (its seed), so a request
gets the tokens it gets alone: greedy ones exactly ``generate``'s.

Tokens reach each request's ``emit`` callback on the engine thread as they are chosen; a
request ends once with ``finish(reason)``: "stop" (an end-of-sequence token), "length" (its
token limit), "cancelled", or "error: ..." (the step failed; the batch is dropped and the engine
serves on). Models whose cache rows cannot be realigned (sliding-window or recurrent layers) run
one request at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import continuous as cb
from .batching import pad_and_eos, predicted_estimates
from .scheduler import Picker

LOOKAHEAD = 4  # route-aware admission looks this many times the free places into the queue: no starvation


class QueueFull(Exception):
    """Too many requests wait; the caller should retry later."""


@dataclass(frozen=True)
class Sampling:
    """One request's decoding. ``temperature`` 0 is greedy; the penalties are OpenAI's (on the
    tokens generated so far: presence once per token seen, frequency per occurrence)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def generation_kwargs(self) -> dict[str, Any]:
        """What transformers' generation config takes of it (its processors do the rest)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


@dataclass(eq=False)  # one request is itself only: the queue finds and removes it by identity
class Request:
    ids: list[int]
    sampling: Sampling
    emit: Callable[[int], None]
    finish: Callable[[str], None]
    cancelled: bool = False  # set from any thread; the row leaves before the next step
    ident: int = 0
    estimate: torch.Tensor | None = None  # its predicted route, once route-aware admission made it
    enqueued: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Job:
    request: Request
    row: cb.Row
    generator: torch.Generator | None
    estimate: torch.Tensor | None = None
    reason: str = ""


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0


class Engine:
    def __init__(self, model: Any, max_batch: int, max_queue: int):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.pad, self.eos = pad_and_eos(model, {})
        why_not = cb.unsupported(model, {})
        self.batch_limit = max_batch if why_not is None else 1
        self.why_single = why_not
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._jobs: list[_Job] = []
        self._run = cb.Running()
        self._cv = threading.Condition()
        self._stop = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="expertflow-engine", daemon=True)
        self._thread.start()

    # ----- any thread -----

    def check(self, sampling: Sampling) -> None:
        """ValueError (one line) for decoding transformers' generation config refuses."""
        cb.generation_config(self.model, sampling.generation_kwargs())

    def submit(self, request: Request) -> Request:
        """Queues ``request``; QueueFull when ``max_queue`` already wait, RuntimeError once stopped."""
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            request.ident = next(self._ids)
            self._waiting.append(request)
            self.stats.requests += 1
            self._cv.notify()
        return request

    def load(self) -> tuple[int, int]:
        """(running rows, waiting requests)."""
        with self._cv:
            return len(self._jobs), len(self._waiting)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels every request (each gets ``finish("cancelled")``) and joins the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._jobs:
                    self._cv.wait()
                if self._stop:
                    break
                window, free = self._window()
            # chosen outside the lock: the predictor runs, and submitters must not wait for it
            chosen = window[:free] if len(window) <= free else self._route_aware(window, free)
            with self._cv:
                admit = [r for r in chosen if r in self._waiting]
                for request in admit:
                    self._waiting.remove(request)
            start = time.perf_counter()
            try:
                self._step(admit)
            except Exception as exc:  # the batch is lost; its requests hear why, the engine serves on
                self._fail(admit, f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self.stats.busy_s += time.perf_counter() - start
        for job in self._jobs:
            job.request.finish("cancelled")
        for request in self._waiting:
            request.finish("cancelled")
        self._jobs, self._waiting, self._run = [], deque(), cb.Running()

    def _window(self) -> tuple[list[Request], int]:
        """(under the lock) The waiting requests admission may choose from, and the free places;
        cancelled ones end here."""
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.finish("cancelled")
            self.stats.cancelled += 1
        free = self.batch_limit - len(self._jobs)
        if free <= 0:
            return [], 0
        return list(itertools.islice(self._waiting, free * LOOKAHEAD)), free

    def _route_aware(self, window: list[Request], free: int) -> list[Request]:
        """``free`` of ``window`` by predicted route (continuous batching's own choice: the picker
        sees the waiting and the running rows; arrival order without a routing-path predictor)."""
        estimates = predicted_estimates(self.model, [r.ids for r in window])
        if estimates is None:
            return window[:free]
        running = [job for job in self._jobs if job.estimate is not None]
        table = torch.cat([estimates, *[job.estimate[None] for job in running]])
        picker = Picker(table, [len(r.ids) for r in window] + [len(job.request.ids) for job in running])
        picks = cb.next_group(picker, list(range(len(window))), list(range(len(window), len(table))), free)
        for i in picks:
            window[i].estimate = estimates[i]  # compared with the next admissions
        return [window[i] for i in picks]

    def _step(self, admit: list[Request]) -> None:
        for job in self._jobs:
            if job.request.cancelled and not job.row.done:
                job.row.done, job.reason = True, "cancelled"
        self._drop()
        if admit:
            jobs = [self._job(r) for r in admit]
            self._jobs += jobs  # before the forward: a failure ends them too
            cache, mask, logits = cb.prefill(self.model, [r.ids for r in admit], list(range(len(admit))), self.pad)
            self._choose(jobs, logits)
            cb.merge(self.model, self._run, cache, mask, [job.row for job in jobs])
        elif self._jobs:
            self._choose(self._jobs, cb.decode(self.model, self._run))
        self.stats.steps += 1
        self._drop()

    def _job(self, request: Request) -> _Job:
        config = cb.generation_config(self.model, request.sampling.generation_kwargs())
        row = cb.make_row(self.model, config, request.ident, request.ids, request.sampling.max_new_tokens, {})
        generator = None
        if request.sampling.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(request.sampling.seed if request.sampling.seed is not None
                                  else int(torch.randint(0, 2**62, (1,))))
        return _Job(request, row, generator, request.estimate)

    def _choose(self, jobs: list[_Job], logits: torch.Tensor) -> None:
        """Each job's next token from its own row of ``logits``; one host read for all of them."""
        scores = logits.float()
        picked = []
        for r, job in enumerate(jobs):
            s = scores[r:r + 1]
            if job.row.processors:  # they read the tokens so far (repetition penalty, min length...)
                s = job.row.processors(torch.tensor([job.row.tokens], device=logits.device), s)
            s = _penalised(s, job.row.tokens[len(job.request.ids):], job.request.sampling)
            if job.generator is None:
                picked.append(s.argmax(-1))
            else:
                picked.append(torch.multinomial(torch.softmax(s, dim=-1), 1, generator=job.generator)[:, 0])
        for job, token in zip(jobs, torch.cat(picked).tolist()):
            cb.append_token(job.row, token, self.eos)
            self.stats.tokens += 1
            job.request.emit(token)
            if job.row.done:
                job.reason = "stop" if token in self.eos else "length"

    def _drop(self) -> None:
        for job in self._jobs:
            if job.row.done:
                job.request.finish(job.reason or "length")
                self.stats.finished += job.reason in ("stop", "length")
                self.stats.cancelled += job.reason == "cancelled"
        cb.drop_finished(self.model, self._run)
        self._jobs = [job for job in self._jobs if not job.row.done]

    def _fail(self, admit: list[Request], reason: str) -> None:
        ended = {id(job.request) for job in self._jobs}
        for job in self._jobs:
            job.request.finish(reason)
        for request in admit:
            if id(request) not in ended:
                request.finish(reason)
        self.stats.failed += len(ended | {id(r) for r in admit})
        self._jobs, self._run = [], cb.Running()
        self.model.context.cache.abort()


def _penalised(scores: torch.Tensor, generated: list[int], sampling: Sampling) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on the tokens generated so far."""
    if not generated or (sampling.presence_penalty == 0 and sampling.frequency_penalty == 0):
        return scores
    counts = torch.bincount(torch.tensor(generated), minlength=scores.shape[-1])[:scores.shape[-1]]
    counts = counts.to(scores.device, scores.dtype)
    return scores - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).to(scores.dtype)
