"""expertflow-bench: decode speed and cache behaviour of a compiled model against HF eager.

Measures, in one run on one machine, one table (tools/cli/bench_rows.py): HF eager all resident,
ExpertFlow all resident (the ratio is the cost of the graph and cache machinery), transformers
+ accelerate CPU offload (CUDA), on-demand LRU, ExpertFlow with each predictor, and last the
directory as compiled, at a smaller budget (default 25% of the experts): prefill and decode
tokens/s, peak memory, hit rate, stall, and the ratio to the physical bound (bytes moved over the
host-to-device bandwidth measured in the same run). --markdown writes it. The header above the
table repeats figures from its rows (never a second timing), and adds the last row's hits,
misses, bytes moved and prefetch precision/recall; and the peak memory of
``expertflow-compile`` (a child process) against the model's size on disk.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...ir.hf_compat import cache_keyword_of
from ...runtime.store.budget import Budget, auto_budget
from ...runtime.store.manifest import read_manifest
from ...runtime.assemble.memory import host_tier
from . import bench_disk, bench_rows
from ..shell import UserError, run_command
from ..make.source import resolve_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertflow-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, cached hub id, or preset name (e.g. tiny-mixtral)")
    p.add_argument("--compiled", type=Path, help="compiled directory of MODEL (default: compile into a temporary "
                   "directory, removed when the run ends)")
    p.add_argument("--budget", default="25%", help="expert cache for the offloaded run: 'auto' (the most that "
                   "fits free device memory after dense weights, KV cache and a margin), slots, a size "
                   "like '4GiB', or a percentage of all experts (default 25%%)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence (default 16)")
    p.add_argument("--tokens", "--gen-len", type=int, default=64, dest="tokens",
                   help="decode steps timed (default 64)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="device memory to allow, e.g. '24GiB': the offloaded "
                   "runs take the most expert slots that fit it after the dense weights, the KV cache and a "
                   "margin (overrides --budget), and accelerate's offload gets as much")
    p.add_argument("--host-memory", metavar="BUDGET", help="bench the disk tier instead (cpu): the experts stay on "
                   "disk and the slots hold this much (slots, a size or a fraction of all experts); every row runs "
                   "in its own process after the model's files are dropped from the page cache: all in memory, "
                   "transformers + accelerate disk offload (if installed), on-demand LRU and each predictor, with "
                   "load time, peak RSS, bytes read, the disk bound and the simulator's replay")
    p.add_argument("--memory", metavar="SIZE", help="as --host-memory, one total for the host (e.g. 12GiB) split as "
                   "runtime.load(memory=) splits it; the forecast of expertflow-simulate --predict is checked")
    p.add_argument("--markdown", type=Path, help="also write the comparison table as Markdown here")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is kept (default 3)")
    p.add_argument("--skip-compile-memory", action="store_true", help="do not measure compile peak memory")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--timeline", type=Path, metavar="PATH", help="write a Chrome/Perfetto trace of the offloaded "
                   "run's copy and compute streams to PATH (ui.perfetto.dev or chrome://tracing)")
    return p.parse_args(argv)


def hf_stepper(model: Any, device: torch.device):
    from transformers import DynamicCache

    state: dict[str, Any] = {}

    @torch.inference_mode()
    def step(ids: torch.Tensor, prefill: bool) -> torch.Tensor:
        if prefill:
            state["cache"] = DynamicCache(config=model.config)
        cache = {cache_keyword_of(type(model).forward) or "past_key_values": state["cache"]}
        return model(input_ids=ids.to(device), use_cache=True, **cache).logits

    return step


def ef_stepper(model: Any):
    state: dict[str, Any] = {}

    def step(ids: torch.Tensor, prefill: bool) -> torch.Tensor:
        if prefill:
            state["cache"] = model.new_cache()
        return model(ids, cache=state["cache"]).logits

    return step


_PEAK_CHILD = """
import sys
from expertflow.tools.cli.compile import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), file=sys.stderr)
sys.exit(rc)
"""


def compile_peak_rss(model: str, out: Path) -> int:
    """Peak resident memory, in bytes, of expertflow-compile in a fresh process.

    Read from the child's own /proc/self/status (VmHWM, reset by exec): the children's rusage
    would count the pages this process held when it forked.
    """
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, model, "-o", str(out), "--quiet", "--force",
                           "--no-dumps"], check=True, capture_output=True, text=True)
    return int(proc.stderr.strip().splitlines()[-1]) * 1024  # VmHWM is in kB


def gpu_memory_bytes(text: str) -> int:
    """``--gpu-memory``'s size in bytes; UserError for anything but a size."""
    try:
        nbytes = Budget.read(text).nbytes
    except ValueError:
        nbytes = None
    if nbytes is None:
        raise UserError(f"--gpu-memory {text!r} is not a size; give one such as '24GiB'")
    return int(nbytes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.gpu_memory is not None:
        gpu_memory_bytes(args.gpu_memory)  # refused before anything is compiled or loaded
    tier = args.host_memory is not None or args.memory is not None
    if tier and (args.device != "cpu" or (args.host_memory is not None and args.memory is not None)):
        raise UserError("--host-memory or --memory (one of them) bench the disk tier of a cpu device")
    if args.memory is not None:
        host_tier(None, args.memory, None, torch.device("cpu"))  # refused before anything is compiled
    source = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="expertflow-bench-"))
    try:  # a compile of our own goes to a temporary directory, removed when done
        compiled = args.compiled or work / "compiled"
        if not tier:
            return _measure(args, source, compiled)
        if args.compiled is None:
            subprocess.run([sys.executable, "-m", "expertflow.tools.cli.compile", args.model, "-o", str(compiled),
                            "--quiet", "--no-dumps"], check=True)
        return {"disk_tier": bench_disk.measure(args, source, compiled, _offloaded_runs(compiled),
                                                read_manifest(compiled))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, source: Path, compiled: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from ... import runtime
    from ..presets import catalog as presets

    device = torch.device(args.device)
    result: dict[str, Any] = {"model": args.model, "random_weights": presets.is_random(args.model),
                              "device": args.device, "batch": args.batch,
                              "prompt_len": args.prompt_len, "tokens": args.tokens,
                              "torch_threads": torch.get_num_threads()}
    if not args.skip_compile_memory or args.compiled is None:
        peak = compile_peak_rss(args.model, compiled)
        disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        result.update(compile_peak_rss=peak, model_bytes_on_disk=disk)
    # The budget first, on a device nothing else is on yet ('auto' reads its free memory).
    probe = runtime.load(compiled, device=args.device, expert_cache=runtime.budget_argument(args.budget),
                         batch_size=args.batch, max_context=args.prompt_len + args.tokens + 1)
    slots = probe.stats()["slots"] if args.gpu_memory is None else _slots_for(args, probe, compiled)
    result["offload_slots"] = slots
    if probe.budget is not None and args.gpu_memory is None:
        result["auto_budget"] = probe.budget.describe()
    vocab = probe.config.vocab_size
    del probe
    bench_rows.free(device)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    bandwidth = bench_rows.h2d_bandwidth(device)
    result["h2d_bytes_per_s"] = bandwidth
    row = functools.partial(bench_rows.one_model_row, ids=ids, tokens=args.tokens, repeats=args.repeats,
                            device=device)
    # Every figure below, header and table alike, is one row's measurement: one timing per run.
    rows = [row("HF eager, all resident", lambda: AutoModelForCausalLM.from_pretrained(source).eval().to(device),
                lambda hf: hf_stepper(hf, device)),
            row(RESIDENT, lambda: runtime.load(compiled, device=args.device), ef_stepper,
                keep=lambda full: result.__setitem__("all_slots", full.stats()["slots"])),
            _accelerate_row(source, device, compiled, slots, ids, args)]
    runs = _offloaded_runs(compiled)
    for i, (name, load_kwargs) in enumerate(runs):
        timeline = args.timeline is not None and i == len(runs) - 1

        def load(kw=load_kwargs, timeline=timeline):
            return runtime.load(compiled, device=args.device, expert_cache=slots, timeline=timeline, **kw)

        def keep(model, timeline=timeline):
            if timeline:
                result["timeline"] = str(model.timeline.write(args.timeline))

        rows.append(row(name, load, ef_stepper, counters=True, bandwidth=bandwidth, keep=keep))
    _headline(result, rows)
    result["rows"] = bench_rows.as_json(rows)
    result["markdown"] = bench_rows.markdown(rows)
    return result


RESIDENT = "ExpertFlow, all resident"


def _headline(result: dict[str, Any], rows: list["bench_rows.Row"]) -> None:
    """The header's figures, taken from the table's rows (seconds per decode step = batch over
    decode tok/s), so the two can never disagree."""
    by_name = {row.name: row for row in rows}
    step_s = {name: result["batch"] / row.decode_tok_s for name, row in by_name.items() if row.decode_tok_s}
    hf, resident = step_s.get("HF eager, all resident"), step_s.get(RESIDENT)  # None: it did not fit
    result["hf_eager_s_per_token"], result["resident_s_per_token"] = hf, resident
    result["resident_over_hf"] = resident / hf if hf and resident else None
    compiled = rows[-1]  # the compiled directory's own predictor, policy and prefetch: the last run
    result["offload_run"] = compiled.name
    result["offload_s_per_token"] = step_s.get(compiled.name)
    result["offload_stats"] = compiled.cache


def _offloaded_runs(compiled: Path) -> list[tuple[str, dict[str, Any]]]:
    """(row name, runtime.load overrides): on-demand LRU, then ExpertFlow with each predictor it
    has (with the routing-path predictor also the predictive policy and its reuse predictor in
    both prefetch modes), then, last, the directory as compiled if no row above is exactly that."""
    manifest = read_manifest(compiled)
    options = manifest["options"]
    policy, prefetch = options.get("policy", "layer_cycle"), options.get("prefetch", "copy")
    runs = [("on-demand LRU (no prefetch)", dict(predictor="none", policy="lru")),
            (f"ExpertFlow cross_layer_gate, {policy}", dict(predictor="cross_layer_gate"))]
    if "predictor.safetensors" in manifest["files"]:
        runs.append((f"ExpertFlow routing_path, {policy}", dict(predictor="routing_path")))
        if "reuse.safetensors" in manifest["files"]:
            runs += [(f"ExpertFlow routing_path, predictive + reuse, {mode}",
                      dict(predictor="routing_path", policy="predictive", prefetch=mode)) for mode in ("copy", "hint")]
    own = dict(predictor=options["predictor"], policy=policy, prefetch=prefetch)
    same = [i for i, (_, kw) in enumerate(runs) if {**own, **kw} == own]
    if same:
        runs.append(runs.pop(same[-1]))
    else:
        runs.append((f"ExpertFlow as compiled: {own['predictor']}, {policy}, {prefetch}", {}))
    return runs


def _accelerate_row(source: Path, device: torch.device, compiled: Path, slots: int, ids: torch.Tensor,
                    args: argparse.Namespace) -> "bench_rows.Row":
    """transformers + accelerate CPU offload with as much device memory as the offloaded runs use."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    name = "transformers + accelerate CPU offload"
    if device.type != "cuda":
        return bench_rows.Row(name, skipped="accelerate offloads to a GPU; this run is on the CPU")
    if importlib.util.find_spec("accelerate") is None:
        return bench_rows.Row(name, skipped="the accelerate package is not installed (pip install accelerate)")
    manifest = read_manifest(compiled)
    budget = manifest["memory_plan"]["dense_bytes"] + slots * max(lay["blob_bytes"] for lay in manifest["layouts"])
    return bench_rows.one_model_row(
        name, lambda: AutoModelForCausalLM.from_pretrained(source, device_map="auto", max_memory={
            device.index or 0: budget, "cpu": 2**40}).eval(), lambda hf: hf_stepper(hf, device), ids, args.tokens,
        args.repeats, device)


def _slots_for(args: argparse.Namespace, full: Any, compiled: Path) -> int:
    """The slots ``expert_cache='auto'`` would take on a device with ``--gpu-memory`` free."""
    dense = read_manifest(compiled)["memory_plan"]["dense_bytes"]
    return auto_budget(full.context.cache.layouts, gpu_memory_bytes(args.gpu_memory), dense, full.config,
                       args.batch, args.prompt_len + args.tokens + 1, full.dtype).slots


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(r: dict[str, Any]) -> str:
    s = r["offload_stats"]

    def tok_s(key: str) -> str:
        return "did not fit" if r[key] is None else f"{r['batch'] / r[key]:,.1f}"

    lines = [f"model {r['model']} on {r['device']}, batch {r['batch']}, prompt {r['prompt_len']}, "
             f"{r['tokens']} decode steps, {r['torch_threads']} torch threads; each figure is the median of "
             "the table row's timed runs",
             f"decode tok/s: HF eager {tok_s('hf_eager_s_per_token')}, ExpertFlow all resident "
             f"{tok_s('resident_s_per_token')}" + ("" if r["resident_over_hf"] is None else
                                                   f" (ExpertFlow takes {r['resident_over_hf']:.2f}x HF's time per token)"),
             f"budget {r['offload_slots']}/{r.get('all_slots', '?')} slots, {r['offload_run']}: "
             f"{tok_s('offload_s_per_token')} decode tok/s"]
    if s is not None:
        lines[-1] += (f", hits {s['hits']}, misses {s['misses']}, hit rate {_num(s['hit_rate'])}, bytes moved "
                      f"{s['bytes_moved']} ({s['bytes_wasted']} wasted), stall {s['stall_s']:.4f} s, prefetch "
                      f"precision {_num(s['prefetch_precision'])}, recall {_num(s['prefetch_recall'])} (last timed run)")
    if "auto_budget" in r:
        lines.append(r["auto_budget"])
    if r.get("random_weights"):
        lines.append("(a preset: seeded random weights, so routing is not a trained model's; hit rates and "
                     "prefetch accuracy say little about real models)")
    lines.append(f"host-to-device bandwidth measured: {r['h2d_bytes_per_s'] / 1e9:.1f} GB/s")
    lines.append(r["markdown"].rstrip())
    if "compile_peak_rss" in r:
        lines.append(f"compile peak RSS {r['compile_peak_rss'] / 2**20:.1f} MiB for "
                     f"{r['model_bytes_on_disk'] / 2**20:.1f} MiB of weights on disk")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command("expertflow-bench", lambda: _main(args), (ValueError, OSError, subprocess.CalledProcessError))


def _main(args: argparse.Namespace) -> int:
    result = run(args)
    if "disk_tier" in result:
        result["markdown"] = bench_disk.render(result["disk_tier"])
        print(result["markdown"])
    else:
        print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
