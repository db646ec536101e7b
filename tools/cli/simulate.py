"""expertflow-simulate: replay a routing trace through cache policies, against Belady's MIN.

An offloaded MoE copies one expert per cache miss, so the loads a policy makes are the bytes it
moves. This replays a recorded routing trace through a model of the runtime's expert cache (one
pool of slots shared by all MoE layers) for every policy and cache size asked, and compares each
with Belady's MIN, the fewest loads any demand-loading policy can make on that trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from ...runtime.assemble.loader import read_layouts
from ...runtime.cache.policy import POLICIES as RUNTIME_POLICIES
from ...runtime.store.budget import Budget, budget_argument
from ...runtime.store.manifest import LoadError
from ..make.artefact import current_umask
from . import predict
from ..sim.cache_sim import POLICIES, TRACE_DEFAULT, TimeModel
from ..shell import UserError, cli_terms, run_command
from ..sim.sim_cache import QUEUES
from ..sim.trace_file import parse_trace
from ..sim.trace_predict import PREDICTORS as TRACE_PREDICTORS
from ..sim.trace_report import render, trace_rows

PROG = "expertflow-simulate"

HELP = __doc__ + """
policies:
  lru          least recently used (slot) first
  lfu          fewest accesses so far in the trace, least recently used among ties
  layer_cycle  the runtime's rule: an empty slot, else the layer that runs again last (layers run
               in a cycle per token), least recently used within it
  predictive   ExpertFlow's predictive cache: the expert whose expected next use is farthest (on a
               bare trace, from each expert's online popularity and recent use rate)
  belady       Belady's MIN: the expert needed again farthest in the future (needs the whole trace)

trace format (JSONL): one record per token and MoE layer, in execution order by (seq, token,
layer), each (seq, token, layer) once; seq, token, layer: non-negative integers; experts: the
expert ids the router chose (top-k), each below --experts-per-layer. Other keys are ignored.
  {"seq": 0, "token": 5, "layer": 3, "experts": [6, 2]}

A step (one record) needs all its experts resident at once: slots holding them are never evicted
while it runs; a step needing more experts than slots runs in waves, as the runtime does. Each
expert not resident when a step starts is one load of --expert-bytes. Columns: loads/MIN is the
policy's loads over Belady's at the same cache size; with --bandwidth and --layer-ms, ms/token
is the predicted decode time (copies one at a time on one copy engine, each layer waiting for
its misses, then computing for --layer-ms) and /bound its ratio to the copy time alone.
"""

EXAMPLES = """
examples:
  expertflow-simulate --trace routing.jsonl --experts-per-layer 64 --cache 8,16,32
  expertflow-simulate --trace routing.jsonl --experts-per-layer 8 --cache 4,8 --expert-bytes 176160768 \\
      --bandwidth 25 --layer-ms 0.4 --plot hit_rate.png
  expertflow-simulate compiled/ --host-memory 25%,50% --disk-bandwidth 1.5 --layer-ms 0.4
  expertflow-simulate --predict mistralai/Mixtral-8x7B-v0.1 --memory 32GiB   # before downloading the weights
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block: the house rule for bad input
        raise UserError(message)


def _positive_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} must be integers of at least 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compiled", nargs="?", type=Path, metavar="COMPILED",
                   help="directory written by expertflow-compile --calibration: replays its held-out calibration "
                        "tokens with every predictor (none, oracle, routing_path, cross_layer_gate@d, frequency, "
                        "transition) under every policy, and prints each predictor's recall@k and precision")
    p.add_argument("--group", default="token", metavar="MODE",
                   help="with COMPILED: how tokens form steps: token (decode, one sequence; default), batch:N "
                        "(N sequences decoding together) or prefill (a whole sequence per step)")
    p.add_argument("--schedule", metavar="B1,B2,...",
                   help="with COMPILED: instead of the predictor table, compare request schedules (fifo and "
                        "route-aware, as model.generate_many runs them) with micro-batches of these sizes: "
                        "distinct experts per micro-batch and per decode step, loads and bytes at each --cache")
    p.add_argument("--prompt-len", type=int, default=32, metavar="P",
                   help="with --schedule: tokens of each calibration sequence taken as its prompt (default 32)")
    p.add_argument("--trace", type=Path, metavar="FILE", help="routing trace, JSONL (format above)")
    p.add_argument("--experts-per-layer", type=int, metavar="N",
                   help="routed experts in each MoE layer; expert ids in the trace must be below N")
    p.add_argument("--cache", metavar="C1,C2,...",
                   help="cache sizes to replay, in expert slots shared by all layers, e.g. 8,16,32")
    p.add_argument("--policies", default=None, metavar="P1,P2,...",
                   help=f"policies to replay (default {','.join(TRACE_DEFAULT)}; with COMPILED "
                        f"{','.join(RUNTIME_POLICIES)}); Belady is always replayed for the loads/MIN column")
    p.add_argument("--predictor", default="none", choices=("none", *TRACE_PREDICTORS),
                   help="with --trace: also replay a trace-only predictor's prefetches (frequency: each layer's "
                        "most chosen experts; transition: the likeliest given the previous layer's route), fitted "
                        "with the routing prior on the first --fit share of the trace's tokens; every row then "
                        "replays the rest, with (predictor column) and without (none) its prefetches")
    p.add_argument("--fit", type=float, default=0.5, metavar="SHARE",
                   help="with --predictor: the share of the trace's tokens, from its start, that fits the "
                        "predictor and prior (default 0.5)")
    p.add_argument("--host-memory", metavar="B1,B2,...",
                   help="with COMPILED: host tiers to replay, as runtime.load(host_memory=) takes them (slots, sizes "
                        "such as 2GiB, fractions such as 25%%): the experts stay on disk and the slots are the host "
                        "tier (a cpu device), so each becomes a --cache size and its row's bytes are bytes read from "
                        "disk; with or instead of --cache")
    p.add_argument("--disk-bandwidth", type=float, metavar="GBPS",
                   help="with --host-memory: the disk's read bandwidth in GB/s (1e9 bytes) for the time model, each "
                        "miss or prefetch one read of its blob; needs --layer-ms, instead of --bandwidth")
    p.add_argument("--expert-bytes", type=int, default=1, metavar="B",
                   help="bytes one expert's copy moves (default 1: the bytes column counts loads)")
    p.add_argument("--bandwidth", type=float, metavar="GBPS",
                   help="host-to-device copy bandwidth in GB/s (1e9 bytes), for the time model; needs --layer-ms")
    p.add_argument("--copy-queue", choices=QUEUES, metavar="QUEUE",
                   help="how the time model queues copies: 'cuda' as the CUDA copy engine does (prefetches "
                        "reach the copy stream a few 16 MiB chunks at a time; a demand copy waits for those, "
                        "not for whole prefetches; the default with --bandwidth) or 'cpu' as a CPU device "
                        "does (demand copies go before every queued prefetch; the default with --disk-bandwidth)")
    p.add_argument("--layer-ms", type=float, metavar="MS",
                   help="compute time of one MoE layer for one token, in ms, for the time model; needs --bandwidth")
    predict.add_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per (policy, cache) row instead of the table")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also write a PNG of hit rate against cache size, "
                   "one line per policy (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    _check(args)
    return args


def _check(args: argparse.Namespace) -> None:
    if args.predict is not None:
        return predict.check(args)
    if args.memory is not None or args.context is not None:
        raise UserError("--memory and --context go with --predict MODEL")
    if args.policies is None:
        args.policies = ",".join(RUNTIME_POLICIES if args.trace is None and args.compiled is not None else TRACE_DEFAULT)
    """Everything that can be checked before a replay, so that a bad input costs nothing. The
    missing trace of a compiled directory is said first: it is what such a user needs to hear."""
    if args.compiled is not None and not args.compiled.is_dir():
        raise UserError(f"{args.compiled} is not a directory")
    if args.trace is None and args.compiled is not None:
        if not (args.compiled / "calibration.safetensors").is_file():
            raise UserError(f"{args.compiled} has no calibration traces: compile with --calibration builtin, "
                             "or pass --trace FILE")
        args.cache = _caches(args)
        args.policies = [v.strip() for v in args.policies.split(",") if v.strip() and v.strip() != "belady"]
        unknown = [v for v in args.policies if v not in RUNTIME_POLICIES]
        if unknown or not args.policies:
            raise UserError(f"unknown policy {', '.join(unknown) or '(none given)'}; with COMPILED: "
                             f"{', '.join(RUNTIME_POLICIES)} (Belady's MIN is the loads/MIN column)")
        if args.group not in ("token", "prefill") and not (args.group.startswith("batch:")
                                                          and args.group[6:].isdigit() and int(args.group[6:]) > 0):
            raise UserError(f"--group {args.group!r}: use token, batch:N (N >= 1) or prefill")
        _check_time(args)
        if args.schedule is not None:
            args.schedule = sorted(set(_positive_ints(args.schedule, "--schedule")))
            if args.prompt_len < 1:
                raise UserError("--prompt-len must be at least 1")
        return
    if args.schedule is not None:
        raise UserError("--schedule needs a compiled directory with calibration traces, not --trace")
    if args.host_memory is not None or args.disk_bandwidth is not None:
        raise UserError("--host-memory and --disk-bandwidth resolve against a compiled directory's experts: give "
                        "COMPILED, or --cache in slots and --bandwidth with --trace")
    if not 0 < args.fit < 1:
        raise UserError(f"--fit must be between 0 and 1 (a share of the trace's tokens), got {args.fit}")
    if args.trace is None:
        raise UserError("no routing trace: pass --trace FILE (or a compiled directory with calibration traces)")
    for flag, value in (("--experts-per-layer", args.experts_per_layer), ("--cache", args.cache)):
        if value is None:
            raise UserError(f"{flag} is required")
    args.cache = sorted(set(_positive_ints(args.cache, "--cache")))
    args.policies = list(dict.fromkeys(v.strip() for v in args.policies.split(",") if v.strip()))
    unknown = [v for v in args.policies if v not in POLICIES]
    if unknown or not args.policies:
        raise UserError(f"unknown policy {', '.join(unknown) or '(none given)'}; known: {', '.join(POLICIES)}")
    if args.experts_per_layer < 1 or args.expert_bytes < 1:
        raise UserError("--experts-per-layer and --expert-bytes must be at least 1")
    _check_time(args)
    if not args.trace.is_file():
        raise UserError(f"trace {args.trace} is not a readable file")
    if args.plot is not None:
        if not args.plot.parent.is_dir():
            raise UserError(f"--plot: directory {args.plot.parent} does not exist")
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib: pip install matplotlib")


def _caches(args: argparse.Namespace) -> list[int]:
    """--cache and --host-memory as slot counts on the compiled directory's experts."""
    if args.cache is None and args.host_memory is None:
        raise UserError("--cache or --host-memory is required")
    caches = _positive_ints(args.cache, "--cache") if args.cache is not None else []
    if args.host_memory is not None:
        try:
            _, layouts = read_layouts(args.compiled)
            caches += [Budget.read(budget_argument(v), "host_memory").slots_on(layouts)
                       for v in args.host_memory.split(",") if v.strip()]
        except LoadError as exc:
            raise UserError(cli_terms(str(exc))) from None
    if args.disk_bandwidth is not None:
        if args.host_memory is None or args.bandwidth is not None:
            raise UserError("--disk-bandwidth times reads into a host tier: give it with --host-memory, instead of "
                            "--bandwidth")
        args.bandwidth = args.disk_bandwidth  # on a cpu device the copy engine is the disk read
        args.copy_queue = args.copy_queue or "cpu"
    return sorted(set(caches))


def _check_time(args: argparse.Namespace) -> None:
    if args.copy_queue is not None and args.bandwidth is None:
        raise UserError("--copy-queue shapes the time model: give it with --bandwidth (or --disk-bandwidth) and "
                        "--layer-ms")
    if (args.bandwidth is None) != (args.layer_ms is None):
        raise UserError("--bandwidth and --layer-ms go together: the time model needs both")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0
                                           and math.isfinite(args.layer_ms) and args.layer_ms >= 0):
        raise UserError("--bandwidth must be above 0 and --layer-ms at least 0")


def _compiled(args: argparse.Namespace) -> int:
    from ..sim import simulate_compiled as sc

    time_model = None
    if args.schedule is not None:
        from ..sim.simulate_schedule import evaluate_schedule, render_schedule
        try:
            rows = evaluate_schedule(args.compiled, args.schedule, args.cache, args.prompt_len,
                                     args.expert_bytes if args.expert_bytes != 1 else None)
        except (LoadError, ValueError, OSError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(json.dumps(r) for r in rows) if args.json else render_schedule(rows, args.compiled))
        return 0
    try:
        blob = args.expert_bytes if args.expert_bytes != 1 else None
        if args.bandwidth is not None:
            blob = blob or sc.read_manifest(args.compiled)["memory_plan"]["expert_blob_bytes"]
            time_model = TimeModel(args.bandwidth, args.layer_ms, blob, args.copy_queue or "cuda")
        with tqdm(desc="replaying", unit="replay", disable=True if args.quiet else None, file=sys.stderr) as bar:
            rows, recall = sc.evaluate(args.compiled, args.cache, args.policies, args.group, time_model, blob,
                                       progress=bar.update, start=bar.reset)
        if args.plot is not None:
            write_plot([dict(r, policy=f"{r['policy']}+{r['predictor']}") for r in rows], args.plot)
    except (LoadError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
        print(json.dumps({"recall": recall}))
    else:
        print(sc.render(rows, recall, args.compiled))
        if args.host_memory is not None:
            rate = f" at {args.disk_bandwidth} GB/s" if args.disk_bandwidth is not None else ""
            print(f"--host-memory {args.host_memory}: the cache sizes above are host tiers (a cpu device); each load "
                  f"is one read of a {sc.read_manifest(args.compiled)['memory_plan']['expert_blob_bytes']}-byte blob "
                  f"from disk{rate}")
    return 0


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Hit rate against cache size, one line per policy; written to a temporary file in the same
    directory and renamed, so PATH is either the whole PNG or untouched."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for name in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == name]
            ax.plot([r["cache"] for r in mine], [r["hit_rate"] for r in mine], marker="o", label=name)
        ax.set_xlabel("cache (expert slots, shared by all layers)")
        ax.set_ylabel("hit rate")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it private; a plot is an ordinary file
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: _main(argv), (OSError,))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.predict is not None:
        return predict.run(args)
    if args.trace is None:
        return _compiled(args)
    try:
        trace = parse_trace(args.trace, args.experts_per_layer)
    except ValueError as exc:
        raise UserError(f"{args.trace}: {exc}") from None
    if not trace:
        raise UserError(f"{args.trace}: the trace has no records")
    time_model = (TimeModel(args.bandwidth, args.layer_ms, args.expert_bytes, args.copy_queue or "cuda")
                  if args.bandwidth is not None else None)
    try:
        with tqdm(desc="replaying", disable=True if args.quiet else None, file=sys.stderr) as bar:
            rows = trace_rows(trace, args.policies, args.cache, args.expert_bytes, time_model, bar,
                              args.predictor, args.fit, args.experts_per_layer)
    except ValueError as exc:
        raise UserError(f"{args.trace}: {exc}") from None
    if args.plot is not None:
        write_plot(rows, args.plot)
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(render(trace, rows, args.trace, args.fit if args.predictor != "none" else None))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
