"""A bounded load test of expertflow-serve on loopback, against sequential generate in the same run.

Starts ``expertflow-serve MODEL`` on a free loopback port, then for each concurrency in
--clients sends --requests completions (each --tokens greedy tokens, prompts drawn from a fixed
list) from that many client threads with the official ``openai`` client, and reports requests/s
and generated tokens/s. The baseline is the same requests one after another through
``model.generate`` in this process, same budget. Last, --soak requests at the highest
concurrency while the server's resident memory (VmRSS) is sampled every 100 requests: it should
stay flat. Everything is bounded: a fixed count of requests, each with a token limit.

    python examples/serve_load.py tiny-trained-moe --requests 64 --tokens 16 --clients 1,4,16 --soak 1000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["def __init__(self", "import os\nimport sys\n", "class Parser(object):", "for line in open(",
           "    return self.", "if __name__ ==", "with open(path) as f:", "try:\n    import",
           "Beautiful is better than", "Errors should never", "Simple is better than", "Now is better than"]


def start_server(model: str, budget: str, batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "expertflow.tools.cli.serve", model, "--port", "0", "--budget",
                             budget, "--max-batch", str(batch), "--max-queue", "1024", "--served-model-name", "m",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " at http" in line:
            return proc, line.split(" at ")[1].split()[0]
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def run_clients(url: str, requests: int, clients: int, tokens: int, on_done=None) -> tuple[float, int]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> int:
        reply = client.completions.create(model="m", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
                                          temperature=0)
        if on_done is not None:
            on_done(i)
        return reply.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(one, range(requests)))
    return time.perf_counter() - start, generated


def sequential(model_dir: Path, budget: str, requests: int, tokens: int) -> tuple[float, int]:
    from expertflow import runtime

    model = runtime.load(model_dir, expert_cache=runtime.budget_argument(budget))
    tokenizer = runtime.load_tokenizer(model_dir)
    start, generated = time.perf_counter(), 0
    for i in range(requests):
        ids = torch.tensor([tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
        generated += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, generated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a compiled directory, or anything expertflow-generate takes (compiled once)")
    p.add_argument("--budget", default="25%", help="expert cache of the server and of the baseline (default 25%%)")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per request (default 16)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--soak", type=int, default=1000, help="requests of the memory soak (default 1000; 0: none)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    from expertflow.tools.cli.compile_cache import compiled_path

    model_dir = compiled_path(args.model, Path.home() / ".cache" / "expertflow", True, needs_tokenizer=True)
    seconds, generated = sequential(model_dir, args.budget, args.requests, args.tokens)
    rows = [{"run": "sequential generate (in process)", "clients": 1, "seconds": seconds,
             "requests_per_s": args.requests / seconds, "tokens_per_s": generated / seconds}]
    proc, url = start_server(str(model_dir), args.budget, max(levels))
    try:
        run_clients(url, 4, 4, args.tokens)  # warm-up
        for clients in levels:
            seconds, generated = run_clients(url, args.requests, clients, args.tokens)
            rows.append({"run": "expertflow-serve", "clients": clients, "seconds": seconds,
                         "requests_per_s": args.requests / seconds, "tokens_per_s": generated / seconds})
        rss = [rss_kib(proc.pid)]
        if args.soak:
            def sample(i: int) -> None:
                if (i + 1) % 100 == 0:
                    rss.append(rss_kib(proc.pid))
            run_clients(url, args.soak, max(levels), args.tokens, sample)
            rss.append(rss_kib(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"{args.requests} requests of {args.tokens} tokens per level, budget {args.budget}, model {args.model}")
    print("| run | clients | requests/s | tokens/s | vs sequential |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x |")
    if args.soak:
        print(f"server RSS over {args.soak} requests at {max(levels)} clients (MiB, every 100): "
              + ", ".join(f"{k / 1024:.0f}" for k in rss))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rss_kib": rss}, indent=2))


if __name__ == "__main__":
    main()
