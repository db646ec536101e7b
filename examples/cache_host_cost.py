"""Host time the expert cache spends per decoded token at a large model's shape.

The runtime decides on the host which slots to fill and which to evict, at every MoE layer of
every token; with hundreds of slots that bookkeeping can rival the copies it schedules. This
drives the runtime's own ExpertCache (its policies, its copy engine, one-byte-scale blobs so that
only the bookkeeping costs) with synthetic decode routing at a chosen shape and prints, per
policy, the median host milliseconds per token of prefetch + wait + acquire + release.

    python3 examples/cache_host_cost.py                       # Qwen3-30B-A3B's shape, 768 slots
    python3 examples/cache_host_cost.py --layers 32 --experts 8 --top-k 2 --slots 128   # Mixtral

Routing: each layer keeps each of its previous token's experts with probability --keep and
draws the rest from a Zipf-like popularity; the next layer's prefetch names its true experts
with probability --accuracy (else a fresh draw). Times are host times on this machine: compare
policies and shapes within one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.cache.policy import POLICIES, make_policy
from expertflow.runtime.store.host import ExpertLayout, Part
from expertflow.runtime.cache.streams import CopyEngine

BLOB = 16  # bytes per expert: the copies are real but cost nothing next to the bookkeeping


class _Store:
    def __init__(self) -> None:
        self.bytes = torch.zeros(BLOB, dtype=torch.uint8)

    def blob(self, layer: int, expert: int) -> torch.Tensor:
        return self.bytes


def _router(args: argparse.Namespace, rng: random.Random):
    weights = []
    for _ in range(args.layers):
        w = [1.0 / (i + 1) ** 0.8 for i in range(args.experts)]
        rng.shuffle(w)
        weights.append(w)
    previous: dict[int, list[int]] = {}

    def route(layer: int, remember: bool = True) -> list[int]:
        chosen = [e for e in previous.get(layer, []) if rng.random() < args.keep]
        while len(chosen) < args.top_k:
            e = rng.choices(range(args.experts), weights[layer])[0]
            if e not in chosen:
                chosen.append(e)
        if remember:
            previous[layer] = chosen
        return chosen

    return route


def measure(policy: str, args: argparse.Namespace) -> tuple[float, float]:
    """Median host ms per token and misses per token, after --warmup tokens."""
    rng = random.Random(args.seed)
    part = Part("w", "uint8", (BLOB,), 0)
    layouts = {l: ExpertLayout(l, f"layers.{l}.experts", args.experts, (part,), BLOB) for l in range(args.layers)}
    engine = CopyEngine(torch.device("cpu"))
    cache = ExpertCache(layouts, _Store(), args.slots, torch.device("cpu"), engine,
                        make_policy(policy, list(layouts)))
    route, times = _router(args, rng), []
    try:
        for token in range(args.warmup + args.tokens):
            routes = [route(l) for l in range(args.layers)]
            guesses = [r if rng.random() < args.accuracy else route(l, remember=False) for l, r in enumerate(routes)]
            ids = [torch.tensor(r) for r in routes]
            guess_ids = [torch.tensor(g) for g in guesses]
            start = time.perf_counter()
            for layer in range(args.layers):
                if layer + 1 < args.layers:
                    cache.prefetch(layer + 1, guess_ids[layer + 1])
                for wave in cache.plan(layer, None, ids[layer]):
                    cache.release(layer, cache.acquire(layer, wave))
            if token >= args.warmup:
                times.append(time.perf_counter() - start)
    finally:
        engine.close()
    misses = sum(s.misses for s in cache.stats.values()) / (args.warmup + args.tokens)
    return statistics.median(times) * 1e3, misses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48, help="MoE layers (default 48, Qwen3-30B-A3B)")
    p.add_argument("--experts", type=int, default=128, help="routed experts per layer (default 128)")
    p.add_argument("--top-k", type=int, default=8, help="experts each token chooses per layer (default 8)")
    p.add_argument("--slots", type=int, default=768, help="expert slots on the device (default 768: twice "
                   "the active experts)")
    p.add_argument("--tokens", type=int, default=40, help="tokens timed (default 40)")
    p.add_argument("--warmup", type=int, default=10, help="tokens run first, not timed (default 10)")
    p.add_argument("--keep", type=float, default=0.4, help="P(a layer keeps one of its previous token's "
                   "experts) (default 0.4)")
    p.add_argument("--accuracy", type=float, default=0.8, help="P(a prefetch names the true experts) (default 0.8)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated cache policies (default: all)")
    p.add_argument("--seed", type=int, default=0, help="routing seed (default 0)")
    args = p.parse_args()
    names = [n for n in args.policies.split(",") if n]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or args.top_k > args.experts or min(args.layers, args.experts, args.top_k, args.slots, args.tokens) < 1:
        p.error(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}" if unknown else
                "--layers, --experts, --top-k, --slots and --tokens must be positive, --top-k at most --experts")
    print(f"{args.layers} layers x {args.experts} experts, top-{args.top_k}, {args.slots} slots")
    for name in names:
        ms, misses = measure(name, args)
        print(f"  {name:<12} {ms:7.1f} ms/token host   {misses:5.1f} misses/token")


if __name__ == "__main__":
    main()
