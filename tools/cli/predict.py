"""``expertflow-simulate --predict MODEL --memory SIZE``: the tiers and decode band on this machine
(``tools/sim/forecast.py``), from the model's config and one probe of the disk and of compute."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ...runtime.store.budget import Budget, all_slots
from ...runtime.store.manifest import LoadError
from ..shell import UserError
from ..sim import forecast as F
from ..sim.cache_sim import simulate
from ..sim.trace_file import parse_trace

PROBE_MIB = 512  # large enough that a disk's cache and the first read's latency wash out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predict", metavar="MODEL",
                   help="forecast instead of replaying: the tiers --memory buys for MODEL (a model directory, a "
                        "compiled directory, a cached hub id or a preset; only its config is read) and a decode "
                        "tokens/s band on this machine, from one probe of the disk and of compute")
    p.add_argument("--memory", metavar="SIZE", help="with --predict: the host memory for the model (e.g. 12GiB), "
                   "split as runtime.load(memory=) splits it: dense weights, KV cache and margin first, the "
                   "expert slots the rest")
    p.add_argument("--context", type=int, metavar="T", help="with --predict: tokens of context the KV cache is "
                   "sized for (default: the model's, at most 4096)")
    p.add_argument("--probe-dir", type=Path, metavar="DIR", default=Path.home() / ".cache" / "expertflow",
                   help="with --predict: a directory on the disk the experts will be read from; a scratch file "
                        "of --probe-mib is written there, read back with direct I/O and removed (default "
                        "~/.cache/expertflow, where expertflow-generate compiles models)")
    p.add_argument("--probe-mib", type=int, default=PROBE_MIB, metavar="MIB",
                   help=f"with --predict: size of the disk probe in MiB (default {PROBE_MIB})")


def check(args: argparse.Namespace) -> None:
    """Everything --predict needs, checked before a config is read or a probe written."""
    if args.memory is None:
        raise UserError("--predict needs --memory SIZE (e.g. 12GiB): the memory the model may use")
    given = Budget.read(args.memory, "memory") if not args.memory.strip().isdigit() else None
    if given is None or given.nbytes is None:
        raise UserError(f"--memory {args.memory}: give a size such as 12GiB")
    if args.compiled is not None or args.cache is not None or args.schedule is not None or args.host_memory:
        raise UserError("--predict goes alone: no COMPILED, --cache, --host-memory or --schedule")
    if args.context is not None and args.context < 1:
        raise UserError("--context must be at least 1")
    if args.disk_bandwidth is None:
        if args.probe_mib < 1:
            raise UserError("--probe-mib must be at least 1")
        args.probe_dir.mkdir(parents=True, exist_ok=True)
    elif not (math.isfinite(args.disk_bandwidth) and args.disk_bandwidth > 0):
        raise UserError("--disk-bandwidth must be above 0")
    if args.trace is not None and not args.trace.is_file():
        raise UserError(f"trace {args.trace} is not a readable file")


def run(args: argparse.Namespace) -> int:
    shape = F.model_shape(F.read_config(args.predict))
    limit = int(getattr(shape.config, "max_position_embeddings", 0) or 4096)
    context = args.context or min(limit, 4096)
    blob = max(lay.blob_bytes for lay in shape.layouts.values())
    if args.disk_bandwidth is not None:
        disk = F.DiskProbe(args.disk_bandwidth, True, 0)
    else:
        disk = F.probe_disk(args.probe_dir, args.probe_mib * 2**20, min(blob, 64 * 2**20))
    rates = F.probe_decode(shape.dtype), F.probe_check()
    try:
        nbytes = int(Budget.read(args.memory, "memory").nbytes)
    except LoadError as exc:
        raise UserError(str(exc)) from None
    result = F.forecast(shape, nbytes, args.memory, disk, rates, context)
    if args.trace is not None and not result.everything:
        experts = max(lay.num_experts for lay in shape.layouts.values())
        try:
            trace = parse_trace(args.trace, args.experts_per_layer or experts)
        except ValueError as exc:
            raise UserError(f"{args.trace}: {exc}") from None
        replay = simulate(trace, "layer_cycle", result.tiers.slots) if trace else None
        if replay is None or replay.accesses == 0:
            raise UserError(f"{args.trace}: the trace has no records")
        hit = (replay.hit_rate, f"layer_cycle replay of {args.trace.name}, {replay.accesses} accesses")
        result = F.forecast(shape, nbytes, args.memory, disk, rates, context, hit)
    if args.json:
        print(json.dumps({"model": args.predict, "slots_all": all_slots(shape.layouts), **result.to_json()}))
    else:
        print(result.render(args.predict))
    return 0
