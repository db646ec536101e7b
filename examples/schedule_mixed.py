"""Route-aware against FIFO request scheduling on prompts of mixed kinds (code, prose, numbers).

    python examples/schedule_mixed.py [--prompts 256] [--batch 8,32] [--budget 16] [--new 16]

Compiles the trained preset ``tiny-trained-moe`` (into a temporary directory), builds prompts
from the Python standard library (source code, docstrings, and lists of numbers; seeded), and
runs ``model.generate_many`` with each schedule at the same expert budget. Prints, per schedule
and batch size: distinct experts per micro-batch (prefill estimate), distinct experts per decode
step (recorded routes, all MoE layers), bytes moved, and throughput on this machine.
"""

from __future__ import annotations

import argparse
import inspect
import random
import tempfile
import time
from pathlib import Path

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.compile import compile_model

MODULES = ("argparse", "collections", "email.message", "json.decoder", "string", "textwrap", "calendar", "shlex")


def mixed_prompts(count: int, seed: int = 0) -> list[str]:
    import importlib

    rng = random.Random(seed)
    mods = [importlib.import_module(m) for m in MODULES]
    code = "\n".join(inspect.getsource(m) for m in mods)
    prose = "\n".join(o.__doc__ for m in mods for o in vars(m).values() if isinstance(getattr(o, "__doc__", None), str))
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 2:
            out.append(" ".join(f"{rng.randrange(10 ** rng.randint(1, 6))}{rng.choice([',', ' +', ' =', ';'])}"
                                for _ in range(rng.randint(6, 14))))
        else:
            text = code if kind == 0 else prose
            start = rng.randrange(len(text) - 400)
            out.append(text[start:start + rng.randint(40, 120)])
    return out


def step_experts(model) -> float:
    """Mean over decode steps of the distinct experts they needed, summed over MoE layers."""
    steps = [s for s in model.routing.steps if s.past > 0]
    if not steps:
        return 0.0
    return sum(sum(len(set(ids.flatten().tolist())) for ids in s.routes.values()) for s in steps) / len(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="number of prompts (default 256)")
    p.add_argument("--batch", default="8,32", help="micro-batch sizes, comma-separated (default 8,32)")
    p.add_argument("--budget", type=int, default=16, help="expert slots (default 16: half the experts)")
    p.add_argument("--new", type=int, default=16, help="new tokens per prompt (default 16)")
    args = p.parse_args()
    prompts = mixed_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_model("tiny-trained-moe", Path(tmp) / "c", CompileOptions(predictor="none"),
                                 dumps=False, quiet=True)
        print(f"{len(prompts)} prompts (code, prose, numbers), budget {args.budget} slots, {args.new} new tokens")
        print("schedule     batch  experts/micro-batch  experts/decode-step  bytes moved  tokens/s")
        for size in (int(b) for b in args.batch.split(",")):
            for schedule in ("fifo", "route-aware"):
                model = runtime.load(compiled, expert_cache=args.budget, record_routing=True)
                start = time.perf_counter()
                outs = model.generate_many(prompts, batch_size=size, schedule=schedule, max_new_tokens=args.new,
                                           do_sample=False)
                seconds = time.perf_counter() - start
                sched = model.last_schedule
                per_batch = sum(sched.distinct_experts) / len(sched.distinct_experts)
                moved = model.stats()["total"]["bytes_moved"]
                print(f"{schedule:<12} {size:>5}  {per_batch:>19.2f}  {step_experts(model):>19.2f}  {moved:>11}  "
                      f"{len(outs) * args.new / seconds:>8.1f}")


if __name__ == "__main__":
    main()
