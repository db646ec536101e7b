"""The HTTP side of expertflow-serve: an ASGI app (Starlette) over one ``Engine``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events in OpenAI's chunk format ending ``data: [DONE]``, or one JSON body), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). A request's tokens come from the
engine thread through ``loop.call_soon_threadsafe`` into its own queue; a client that goes
away (its stream closed, or its connection while it waits for a whole body) cancels its
request, whose row leaves the batch at the next step. A full queue is 429 with
``Retry-After``; a server shutting down answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ...runtime.generate import engine as eng
from . import protocol
from .protocol import ApiError

POLL_S = 0.25  # how often a request waiting for a whole body checks that its client is still there
#: A request body may hold this much per token of the context (a token is ~4 characters of text;
#: JSON escapes and message wrapping take more), and never less than MIN_BODY: a larger body is a
#: 413 before it is all read, so no client makes the server hold gigabytes.
BODY_PER_TOKEN = 64
MIN_BODY = 1 << 20
DRAIN = 4


@dataclass
class Served:
    """What the routes share: the model, its tokenizer, the engine and the counters."""

    name: str
    model: Any
    tokenizer: Any
    engine: eng.Engine
    context: int
    created: int = field(default_factory=lambda: int(time.time()))
    responses: Counter = field(default_factory=Counter)  # (route, status) -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0


def make_app(served: Served) -> Starlette:
    async def chat(request: Request) -> Response:
        return await _complete(served, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(served, request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model",
                                                         "created": served.created, "owned_by": "expertflow"}]})

    async def health(request: Request) -> Response:
        running, waiting = served.engine.load()
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(_metrics(served), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     code=code).body(), exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        served.engine.stop()  # the server is stopping: every request still running ends "cancelled"

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


async def _complete(served: Served, request: Request, chat: bool) -> Response:
    route = "chat" if chat else "completions"
    try:
        raw = await _bounded_body(request, max(MIN_BODY, served.context * BODY_PER_TOKEN))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        except RecursionError:  # json recurses per bracket
            raise ApiError(400, "the request body is nested too deeply") from None
        parsed = protocol.parse(body, chat, served.name, served.tokenizer, served.context,
                                served.model.config.vocab_size, served.model.generation_config)
        try:
            served.engine.check(parsed.sampling)
        except ValueError as exc:
            raise ApiError(400, f"these sampling parameters are refused: {exc}") from None
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # A stream, or a stop string to watch for, needs each token as it comes; a whole body
        # without stops takes them all at the end: no wake-up of this loop per token, which on a
        # small host costs the engine thread the time the loop runs (one client: 0.71x -> see docs).
        backlog: list[int] = []
        emit = (lambda token: loop.call_soon_threadsafe(events.put_nowait, ("token", token))) \
            if parsed.stream or parsed.stop else backlog.append
        job = eng.Request(parsed.ids, parsed.sampling, emit=emit,
                          finish=lambda reason: loop.call_soon_threadsafe(events.put_nowait, ("end", reason)))
        try:
            served.engine.submit(job)
        except eng.QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry shortly", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except RuntimeError as exc:
            raise ApiError(503, f"the server is not taking requests ({exc})", kind="server_error",
                           headers={"Retry-After": "5"}) from None
    except ApiError as exc:
        served.responses[(route, exc.status)] += 1
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)
    served.responses[(route, 200)] += 1
    served.prompt_tokens += len(parsed.ids)
    reply = _Reply(served, parsed, job, events, backlog)
    if parsed.stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await reply.whole(request)


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives; ApiError 413 once it passes ``limit`` bytes. What follows is
    read and dropped up to ``DRAIN`` times the limit, so a client still sending hears the 413
    rather than a reset connection; past that the connection is dropped."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
        elif size > DRAIN * limit:
            break
    if size > limit:
        raise ApiError(413, f"the request body is over this server's {limit} bytes; shorten it")
    return b"".join(parts)


class _Reply:
    def __init__(self, served: Served, parsed: protocol.Parsed, job: eng.Request, events: asyncio.Queue,
                 backlog: list[int]):
        self.served, self.parsed, self.job, self.events = served, parsed, job, events
        self.backlog = backlog  # the tokens of a request not sent one by one, complete at its end
        self.ident = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = protocol.TextStream(served.tokenizer, parsed.stop)
        self.tokens = 0

    async def _pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text, None) as it comes, then ("", finish reason); the request is cancelled on a
        stop string and whenever the consumer stops early."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "token":
                    self.tokens += 1
                    piece, stopped = self.text.push(value)
                    if piece:
                        yield piece, None
                    if stopped:
                        yield "", "stop"
                        return
                    continue
                if value.startswith("error"):
                    raise RuntimeError(value)
                for token in self.backlog:  # no stop strings here: they come one by one
                    self.tokens += 1
                    piece, _ = self.text.push(token)
                    if piece:
                        yield piece, None
                tail = self.text.flush()
                if tail:
                    yield tail, None
                yield "", protocol.finish_reason(value)
                return
        finally:
            self.job.cancel()  # done, stopped, or the client went away: its row leaves at the next step
            self.served.completion_tokens += self.tokens

    async def stream(self) -> AsyncIterator[str]:
        p, ident, created, name = self.parsed, self.ident, self.created, self.served.name
        pieces = self._pieces()
        try:
            if p.chat:
                yield _sse(protocol.chunk_of(p, ident, created, name, None, None, first=True))
            try:
                async for piece, reason in pieces:
                    if reason is None:
                        yield _sse(protocol.chunk_of(p, ident, created, name, piece, None))
                    else:
                        yield _sse(protocol.chunk_of(p, ident, created, name, None, reason))
            except RuntimeError as exc:  # the engine's step failed: said in the stream, then ended
                yield _sse(ApiError(500, str(exc), kind="server_error").body())
            if p.include_usage:
                yield _sse(protocol.usage_chunk(p, ident, created, name, self.tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream: its row leaves the batch at the next step
            self.job.cancel()
            await pieces.aclose()

    async def whole(self, request: Request) -> Response:
        pieces = self._pieces()
        text, reason = [], "stop"
        try:
            while True:
                step = asyncio.ensure_future(pieces.__anext__())
                while not step.done():
                    await asyncio.wait([step], timeout=POLL_S)
                    if not step.done() and await request.is_disconnected():
                        step.cancel()
                        self.job.cancel()
                        return Response(status_code=499)
                try:
                    piece, end = step.result()
                except StopAsyncIteration:
                    break
                text.append(piece)
                if end is not None:
                    reason = end
        except RuntimeError as exc:
            return JSONResponse(ApiError(500, str(exc), kind="server_error").body(), 500)
        finally:
            await pieces.aclose()
        return JSONResponse(protocol.body_of(self.parsed, self.ident, self.created, self.served.name, "".join(text),
                                             reason, self.tokens))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _metrics(served: Served) -> str:
    """Prometheus text: requests by route and status, tokens, the engine's load and rate, and
    the expert cache's hits and bytes per tier."""
    stats, (running, waiting) = served.engine.stats, served.engine.load()
    lines = ["# TYPE expertflow_requests_total counter"]
    lines += [f'expertflow_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in
              sorted(served.responses.items())]
    cache = served.model.stats()
    total = cache["total"]
    values = {"expertflow_prompt_tokens_total": served.prompt_tokens,
              "expertflow_generated_tokens_total": stats.tokens, "expertflow_steps_total": stats.steps,
              "expertflow_engine_busy_seconds_total": round(stats.busy_s, 6),
              "expertflow_tokens_per_second": round(stats.tokens / stats.busy_s, 3) if stats.busy_s else 0.0,
              "expertflow_requests_running": running, "expertflow_requests_waiting": waiting,
              "expertflow_requests_cancelled_total": stats.cancelled, "expertflow_requests_failed_total": stats.failed,
              "expertflow_expert_hits_total": total["hits"], "expertflow_expert_misses_total": total["misses"],
              "expertflow_expert_hit_rate": total["hit_rate"] if total["hit_rate"] is not None else 0.0,
              "expertflow_expert_bytes_moved_total": total["bytes_moved"],
              "expertflow_expert_bytes_wasted_total": total["bytes_wasted"]}
    disk = cache.get("disk")
    if disk:
        values.update({f"expertflow_disk_{k}": v for k, v in disk.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool)})
    lines += [f"{k} {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
