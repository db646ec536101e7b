"""``expertflow-bench MODEL --host-memory B`` (or ``--memory SIZE``): the disk tier against its peers.

Every row runs in a process of its own, after the compiled directory's and the source model's
files are dropped from the page cache (``posix_fadvise(DONTNEED)``), so each row's load reads
what it reads from the disk and its peak RSS (the child's ``VmHWM``) is its own:
- ExpertFlow with every expert in memory (each blob read once at load): the compute-only time
  per token, the bound's compute part;
- transformers + accelerate with disk offload (``device_map="auto"``, ``max_memory`` for the cpu
  as large as the host tier plus the dense weights, an ``offload_folder``), when accelerate is
  installed;
- ExpertFlow on-demand LRU (no prefetch), then each predictor, at the host tier asked.
The header gives the disk's direct-read bandwidth measured in the same run (the probe of
``expertflow-simulate --predict``), and each row its bound: bytes read per token over that
bandwidth plus the all-in-memory compute per token. The simulator replays each ExpertFlow row's
own recorded requests with that time model: its bytes and decode time beside the measured ones.
The forecast's band for the memory given is computed before the rows; the last row is checked
against it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ...runtime.store.direct import drop_cached
from ..sim import forecast as F

_STATUS = "/proc/self/status"


def drop_files(*directories: Path) -> None:
    """Drops every regular file under ``directories`` from the page cache."""
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    drop_cached(fd)
                finally:
                    os.close(fd)


def _status(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in bytes."""
    with open(_STATUS) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process: load, prefill, decode ``tokens`` greedy steps, measured."""
    import torch

    ids = torch.tensor(spec["ids"])
    from transformers import AutoModelForCausalLM

    from ... import runtime

    base = _status("VmRSS")  # the interpreter and its libraries, before any model
    if spec["kind"] == "accelerate":
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["source"], device_map="auto", offload_folder=spec["offload"],
                                                     max_memory={"cpu": spec["host_bytes"]}).eval()
        load_s = time.perf_counter() - start
        stats = None
    else:
        start = time.perf_counter()
        model = runtime.load(spec["compiled"], record_routing=spec["kind"] == "tier", **spec["load"])
        load_s = time.perf_counter() - start
    def generate(n: int) -> tuple[float, Any]:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        return time.perf_counter() - start, out

    with torch.inference_mode():
        generate(1)  # warm: the first call's imports and cold misses
        first, _ = generate(1)  # prefill and one token: what the run below spends before its decode steps
        warm = 0
        if spec["kind"] != "accelerate":
            model.reset_stats()  # counters only: the slots stay as the warm-up left them
            warm = len(model.routing.log) if model.routing is not None else 0
        whole, out = generate(spec["tokens"])
    # per new token of the timed call (its prefill included: what the counters, the bound and the
    # replay cover), and per decode step alone (the call less prefill and first token)
    row = {"load_s": load_s, "s_per_token": whole / spec["tokens"],
           "decode_s_per_token": max(whole - first, 1e-9) / max(spec["tokens"] - 1, 1), "peak_rss": _status("VmHWM"), "base_rss": base,
           "tokens": out[0, ids.shape[1]:].tolist()}
    if spec["kind"] != "accelerate":
        stats = model.stats()
        row.update(slots=stats["slots"], disk=stats.get("disk"), hits=stats["total"]["hits"],
                   misses=stats["total"]["misses"], bytes_moved=stats["total"]["bytes_moved"],
                   cancelled=stats["total"]["prefetch_cancelled"],
                   stall_s=stats["total"]["stall_s"])
        if spec["kind"] == "tier" and spec.get("time") is not None:
            row["simulated"] = _simulate(model, spec, warm)
    return row


def _simulate(model: Any, spec: dict[str, Any], warm: int) -> dict[str, float]:
    """The simulator's replay of this row's own requests, timed by the run's disk bandwidth and
    compute: its bytes and decode time per token over the timed part (the whole log replayed, less
    the replay of its first ``warm`` records: the warm-up the runtime's slots started from)."""
    from ..sim.prefetch_sim import from_log, replay, reuse_from_log
    from ..sim.sim_cache import TimeModel

    cache = model.context.cache
    blob = max(lay.blob_bytes for lay in cache.layouts.values())
    policy = cache.policy
    gbps, layer_ms = spec["time"]

    def run(log: list, time: TimeModel | None) -> Any:
        trace, issues = from_log(log)
        return replay(trace, issues, policy.name, model.stats()["slots"], "runtime", blob,
                      getattr(policy, "prior", None), time, reuse_from_log(log) or None)

    log, timing = model.routing.log, TimeModel(gbps, layer_ms, blob)
    whole, before = run(log, timing), run(log[:warm], timing)
    # untimed, a queued prefetch is never cancelled: the runtime's bytes plus its cancelled ones
    untimed = run(log, None).bytes - run(log[:warm], None).bytes
    # per new token of the timed call, as the row's s_per_token (its prefill's steps included)
    return {"bytes": whole.bytes - before.bytes, "s_per_token": (whole.ms - before.ms) / 1000 / spec["tokens"],
            "bytes_untimed": untimed}


def run_row(spec: dict[str, Any], drop: list[Path]) -> dict[str, Any]:
    drop_files(*drop)
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, source: Path, compiled: Path, runs: list[tuple[str, dict[str, Any]]],
            manifest: dict[str, Any]) -> dict[str, Any]:
    """Every row (module docstring), with the disk probe and the forecast's band."""
    import importlib.util

    import torch

    from ...runtime.store.arena import available_host_bytes
    from ...runtime.store.budget import Budget, budget_argument

    gen = torch.Generator().manual_seed(0)
    config = F.read_config(str(compiled))
    ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=gen).tolist()
    tier = ({"memory": args.memory} if args.memory is not None
            else {"host_memory": budget_argument(args.host_memory)})
    shape = F.model_shape(config)
    disk = F.probe_disk(compiled, min(2**30, shape.expert_bytes), min(64 * 2**20, max(
        lay.blob_bytes for lay in shape.layouts.values())))
    rates = F.probe_decode(shape.dtype), F.probe_check()
    result: dict[str, Any] = {"model": args.model, "tier": tier, "tokens": args.tokens, "prompt_len": args.prompt_len,
                              "disk_gbps": disk.gbps, "disk_direct": disk.direct,
                              "expert_bytes": manifest["memory_plan"]["expert_bytes_total"],
                              "dense_bytes": manifest["memory_plan"]["dense_bytes"]}
    base = {"ids": ids, "tokens": args.tokens, "compiled": str(compiled), "source": str(source)}
    drop = [compiled, source]
    rows: list[dict[str, Any]] = []
    free = available_host_bytes() or 0
    if shape.expert_bytes + shape.dense_bytes < 0.8 * free:
        resident = run_row({**base, "kind": "resident", "load": {"host_memory": "100%"}}, drop)
    else:  # the forecast's compute probe stands in for it
        resident = {"error": f"skipped: the experts ({shape.expert_bytes / 2**30:.1f} GiB) do not fit this "
                             f"machine's {free / 2**30:.1f} GiB free"}
    rows.append({"name": "ExpertFlow, every expert in memory", **resident})
    compute = resident.get("s_per_token") or F.forecast_slots(shape, 1, "1", disk, rates).per_token()["compute_s"]
    layers = manifest["memory_plan"]["moe_layers"]
    probe_tier = run_row({**base, "kind": "probe", "tokens": 1, "load": tier}, drop)
    slots = probe_tier.get("slots")
    if slots is None:
        raise ValueError(f"the host tier {tier} does not load: {probe_tier.get('error')}")
    blob = manifest["memory_plan"]["expert_blob_bytes"]
    host_bytes = manifest["memory_plan"]["dense_bytes"] + slots * blob
    if importlib.util.find_spec("accelerate") is not None:
        with tempfile.TemporaryDirectory(prefix="expertflow-offload-", dir=compiled.parent) as offload:
            row = run_row({**base, "kind": "accelerate", "offload": offload, "host_bytes": host_bytes}, drop)
        rows.append({"name": "transformers + accelerate disk offload", **row})
    else:
        rows.append({"name": "transformers + accelerate disk offload",
                     "error": "skipped: accelerate is not installed (pip install accelerate)"})
    timing = (disk.gbps, 1000 * compute / layers) if compute else None
    for name, overrides in runs:
        row = run_row({**base, "kind": "tier", "load": {**tier, **overrides}, "time": timing}, drop)
        rows.append({"name": name, **row})
    for row in rows:
        _bound(row, compute, disk.gbps, args.tokens)
    band = (F.forecast(shape, int(Budget.read(args.memory, "memory").nbytes), args.memory, disk, rates,
                       args.prompt_len + args.tokens + 1) if args.memory is not None
            else F.forecast_slots(shape, slots, str(args.host_memory), disk, rates)).to_json()
    last = rows[-1]
    result.update(slots=slots, host_bytes=host_bytes, rows=rows, band=[band["tokens_per_s_low"],
                                                                      band["tokens_per_s_high"]])
    if last.get("decode_s_per_token"):
        tps = 1 / last["decode_s_per_token"]
        result["in_band"] = band["tokens_per_s_low"] * 0.9 <= tps <= band["tokens_per_s_high"] * 1.1
    return result


def _bound(row: dict[str, Any], compute: float | None, gbps: float, tokens: int) -> None:
    disk = row.get("disk")
    if not disk or not compute or not row.get("s_per_token"):
        return
    row["bound_s_per_token"] = disk["bytes_read"] / tokens / (gbps * 1e9) + compute
    row["over_bound"] = row["s_per_token"] / row["bound_s_per_token"]


def render(r: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = [f"model {r['model']}, host tier {r['tier']} = {r['slots']} slots ({gib(r['host_bytes'])} GiB with the "
             f"dense weights) of {gib(r['expert_bytes'])} GiB of experts; prompt {r['prompt_len']}, "
             f"{r['tokens']} decode steps; disk {r['disk_gbps']:.2f} GB/s "
             f"({'direct' if r['disk_direct'] else 'buffered'} reads, probed in this run)",
             "| run | load s | decode tok/s | s/token (call) | peak RSS GiB (above imports) | read GiB/token | read GB/s | "
             "bound s/token | /bound | sim s/token | sim bytes/measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['error']} |" + " |" * 9)
            continue
        disk, sim = row.get("disk") or {}, row.get("simulated") or {}
        read = disk.get("bytes_read")
        cells = [row["name"], f"{row['load_s']:.2f}", f"{1 / row['decode_s_per_token']:.2f}", f"{row['s_per_token']:.3f}",
                 f"{gib(row['peak_rss'])} ({gib(row['peak_rss'] - row['base_rss'])})", f"{read / r['tokens'] / 2**30:.3f}" if read is not None else "-",
                 f"{disk['read_gbps']:.2f}" if disk.get("read_gbps") else "-",
                 f"{row['bound_s_per_token']:.3f}" if "bound_s_per_token" in row else "-",
                 f"{row['over_bound']:.2f}" if "over_bound" in row else "-",
                 f"{sim['s_per_token']:.3f}" if sim else "-",
                 f"{sim['bytes'] / row['bytes_moved']:.3f}" if sim and row.get("bytes_moved") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lo, hi = r["band"]
    verdict = {True: "inside", False: "outside", None: "not measured"}[r.get("in_band")]
    lines.append(f"forecast (expertflow-simulate --predict) for this memory: {lo:.2f} to {hi:.2f} decode tok/s; the "
                 f"last row is {verdict} it (10% slack at each end)")
    lines.append("decode tok/s: the timed call's steps after its first token; s/token (call): the timed call (prefill "
                 "included) per new token, which the bytes read, the bound (bytes read over the probed disk bandwidth "
                 "plus all-in-memory compute) and the simulator's replay of the row's own requests all cover")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
