"""Route-aware against FIFO request scheduling on prompts of mixed kinds (code, prose, numbers).

    python examples/schedule_mixed.py [--prompts 256] [--batch 8,32] [--budget 50%] [--new 16] [--mixed-lengths]

Compiles the trained preset ``tiny-trained-moe`` or ``--model`` (into a temporary directory), builds prompts
from the Python standard library (source code, docstrings, and lists of numbers; seeded), and
runs ``model.generate_many`` with each schedule at the same expert budget, in fixed micro-batches
and with continuous batching. Prints, per schedule, batching and batch size: distinct experts per
micro-batch (prefill estimate; continuous: the running batch after each admission), distinct
experts per decode step (recorded routes, all MoE layers), bytes moved, decode steps run, and
throughput on this machine.
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
from expertflow.tools.cli.compile import Calibration, compile_model

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
    p.add_argument("--model", default="tiny-trained-moe",
                   help="preset name or model directory to compile (default tiny-trained-moe; "
                        "examples/train_tiny_moe.py --experts 32 makes one with more, smaller experts)")
    p.add_argument("--predictor", choices=("none", "routing_path"), default="none",
                   help="none (default): each prompt's route is estimated from its prefill; routing_path: "
                        "calibrate on 8,192 builtin tokens and estimate from the routing-path predictor, "
                        "before any layer runs")
    p.add_argument("--prompts", type=int, default=256, help="number of prompts (default 256)")
    p.add_argument("--batch", default="8,32", help="micro-batch sizes, comma-separated (default 8,32)")
    p.add_argument("--budget", default="50%", help="expert slots: a count or a share of all experts (default 50%%)")
    p.add_argument("--new", type=int, default=16, help="new tokens per prompt (default 16); with --mixed-lengths "
                   "the mean of a seeded uniform draw from 1 to 2*NEW-1, one limit per prompt")
    p.add_argument("--mixed-lengths", action="store_true",
                   help="give each prompt its own new-token limit (as requests in a server have), where "
                        "continuous batching refills the places that finished rows leave")
    args = p.parse_args()
    prompts = mixed_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Calibration("builtin", 8192, seed=0) if args.predictor == "routing_path" else None
        compiled = compile_model(args.model, Path(tmp) / "c", CompileOptions(predictor=args.predictor),
                                 dumps=False, quiet=True, calibration=calibration)
        tokenizer = runtime.load_tokenizer(compiled)
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        budget = int(args.budget) if args.budget.isdigit() else args.budget
        rng = random.Random(1)
        limits = [rng.randint(1, 2 * args.new - 1) for _ in ids] if args.mixed_lengths else args.new
        print(f"{len(prompts)} prompts (code, prose, numbers), {args.model}, budget {args.budget} of "
              f"{sum(lay.num_experts for lay in runtime.load(compiled).context.cache.layouts.values())} experts, "
              f"{'1 to ' + str(2 * args.new - 1) if args.mixed_lengths else args.new} new tokens")
        print("schedule     batching    batch  experts/micro-batch  experts/decode-step  bytes moved  steps  "
              "new tokens/s")
        for size in (int(b) for b in args.batch.split(",")):
            for schedule in ("fifo", "route-aware"):
                for continuous in (False, True):
                    model = runtime.load(compiled, expert_cache=budget, record_routing=True)
                    start = time.perf_counter()
                    outs = model.generate_many(ids, batch_size=size, schedule=schedule, max_new_tokens=limits,
                                               do_sample=False, continuous=continuous)
                    seconds = time.perf_counter() - start
                    sched = model.last_schedule
                    per_batch = sum(sched.distinct_experts) / len(sched.distinct_experts)
                    moved = model.stats()["total"]["bytes_moved"]
                    steps = sum(1 for s in model.routing.steps if s.past > 0)
                    made = sum(len(o) - len(p) for o, p in zip(outs, ids))
                    print(f"{schedule:<12} {'continuous' if continuous else 'fixed':<10} {size:>5}  {per_batch:>19.2f}  "
                          f"{step_experts(model):>19.2f}  {moved:>11}  {steps:>5}  {made / seconds:>12.1f}")


if __name__ == "__main__":
    main()
