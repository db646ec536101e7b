"""expertflow-serve: load a model once and serve it over OpenAI's API until stopped.

POST /v1/chat/completions (with the model's chat template) and POST /v1/completions, streamed
(server-sent events, OpenAI's chunks, then data: [DONE]) or not; GET /v1/models, GET /health,
GET /metrics (Prometheus text: requests, tokens/s, queue, expert hits and bytes per tier).
Concurrent requests share one running batch: a request arriving mid-generation joins at the
next step (route-aware when the model has a routing-path predictor), and a client that goes
away frees its row at the next step. Greedy requests (temperature 0, or no temperature on a
model whose generation config does not sample) give exactly expertflow-generate's tokens.
Sampling fields: temperature, top_p, top_k, seed, max_tokens / max_completion_tokens, stop,
presence_penalty, frequency_penalty, repetition_penalty; n above 1, logprobs, tools and other
fields this server does not implement are refused with a 400. Ctrl-C or SIGTERM stops it:
open streams end within a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from . import model_args
from ..shell import UserError, run_command

EXAMPLES = """
examples:
  expertflow-serve tiny-trained-moe --port 8000
  expertflow-serve compiled/ --device cuda --budget auto --max-batch 16
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny-trained-moe", "messages": [{"role": "user", "content": "Hello"}]}'
  (or any OpenAI client: base_url="http://127.0.0.1:8000/v1", api_key="unused")
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertflow-serve", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="compiled directory, model directory, cached hub id, or preset name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port, "
                   "which the line printed at start names)")
    model_args.add_arguments(p, "--max-batch rows of --max-context tokens")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together in one running batch "
                   "(default 8); models whose cache rows cannot be realigned run one at a time")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a place in the batch; "
                   "more are answered 429 with Retry-After (default 64)")
    p.add_argument("--max-context", type=int, help=f"prompt + completion tokens per request (default: the "
                   f"model's context, at most {model_args.DEFAULT_CONTEXT}); longer requests are answered 400")
    p.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: MODEL "
                   "as given)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes; only the line saying where "
                   "it serves")
    args = p.parse_args(argv)
    for flag, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 0), ("--max-context", args.max_context, 2)):
        if value is not None and (value < low or (flag == "--port" and value > 65535)):
            p.error(f"{flag} must be at least {low}{' and at most 65535' if flag == '--port' else ''}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ...runtime.store.manifest import LoadError

    return run_command("expertflow-serve", lambda: _main(args), (LoadError, ValueError, OSError, ImportError))


def _main(args: argparse.Namespace) -> int:
    from ...runtime.store.device import check_device

    check_device(args.device)
    try:
        import uvicorn
    except ImportError:
        raise UserError("expertflow-serve needs uvicorn and starlette: pip install uvicorn starlette") from None
    from ...runtime.generate.engine import Engine
    from ..serve.app import Served, make_app

    sock = _listen(args.host, args.port)  # before the model loads: a busy port fails at once
    src = model_args.resolve(args)
    limit = src.manifest["config"].get("max_position_embeddings")
    limit = limit if isinstance(limit, int) and limit > 1 else None
    context = args.max_context or min(limit or model_args.DEFAULT_CONTEXT, model_args.DEFAULT_CONTEXT)
    if limit is not None and context > limit:
        print(f"warning: --max-context {context} is past the model's context of {limit} positions; text past it "
              "is unreliable", file=sys.stderr)
    model = model_args.load(src, args, context, args.max_batch)
    engine = Engine(model, args.max_batch, args.max_queue)
    if engine.why_single is not None and not args.quiet:
        print(f"note: requests run one at a time: {engine.why_single}", file=sys.stderr)
    name = args.served_model_name or args.model
    app = make_app(Served(name, model, src.tokenizer, engine, context))
    server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                                    lifespan="on"))
    host, port = sock.getsockname()[:2]
    print(f"expertflow-serve: serving {name} at http://{_url_host(host)}:{port}/v1 (Ctrl-C or SIGTERM stops it)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    print("expertflow-serve: stopped", file=sys.stderr, flush=True)
    return 0


def _server_class(uvicorn: Any) -> type:
    class Server(uvicorn.Server):
        """uvicorn's server with the stop signals this command's: Ctrl-C or SIGTERM shuts it down
        gracefully (a second Ctrl-C at once) and the command exits 0. uvicorn's own handlers raise
        the signal again once stopped, which ends the process as if killed."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(sig: int, frame: Any) -> None:
                self.force_exit = self.should_exit and sig == signal.SIGINT
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every response waited out the client's delayed ACK (40 ms a request, measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
