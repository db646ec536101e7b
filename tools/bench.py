"""expertflow-bench: decode speed and cache behaviour of a compiled model against HF eager.

Measures, in one run on one machine:
- decode time per token of ``runtime.load`` with all experts resident vs transformers eager
  (the ratio is the cost of the graph and cache machinery);
- at a smaller budget (default 25% of the experts): decode time, hits, misses, bytes moved,
  stall time and prefetch precision/recall;
- peak memory of ``expertflow-compile`` (a child process) against the model's size on disk;
- the comparison table (tools/bench_rows.py): HF eager all resident, transformers + accelerate
  CPU offload (CUDA), on-demand LRU, ExpertFlow with each predictor, at the same budget: prefill
  and decode tokens/s, peak memory, hit rate, stall, and the ratio to the physical bound (bytes
  moved over the host-to-device bandwidth measured in the same run). --markdown writes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..ir.hf_compat import cache_keyword_of
from . import bench_rows
from .source import UserError, resolve_model


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
    p.add_argument("--markdown", type=Path, help="also write the comparison table as Markdown here")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is kept (default 3)")
    p.add_argument("--skip-compile-memory", action="store_true", help="do not measure compile peak memory")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--timeline", type=Path, metavar="PATH", help="write a Chrome/Perfetto trace of the offloaded "
                   "run's copy and compute streams to PATH (ui.perfetto.dev or chrome://tracing)")
    return p.parse_args(argv)


def _decode_times(step, first_ids: torch.Tensor, tokens: int) -> list[float]:
    """Per-token wall times of ``tokens`` greedy decode steps after a prefill."""
    logits = step(first_ids, prefill=True)
    times = []
    for _ in range(tokens):
        nxt = logits[:, -1, :].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = step(nxt, prefill=False)
        if first_ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


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


def timed_pair(steps: list, ids: torch.Tensor, tokens: int, repeats: int,
               after_warmup=lambda: None) -> list[float]:
    """Median per-token time of each stepper; repeats alternate between them so background load
    on a shared machine hits both alike (the ratio is what is comparable)."""
    for step in steps:  # warm-up: first calls allocate and fill caches
        _decode_times(step, ids, min(tokens, 4))
    after_warmup()
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            samples[i].append(statistics.median(_decode_times(step, ids, tokens)))
    return [statistics.median(s) for s in samples]


_PEAK_CHILD = """
import sys
from expertflow.tools.compile import main
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
    from ..runtime.budget import check_budget

    try:
        nbytes = check_budget(text).nbytes
    except ValueError:
        nbytes = None
    if nbytes is None:
        raise UserError(f"--gpu-memory {text!r} is not a size; give one such as '24GiB'")
    return int(nbytes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.gpu_memory is not None:
        gpu_memory_bytes(args.gpu_memory)  # refused before anything is compiled or loaded
    source = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="expertflow-bench-"))
    try:  # a compile of our own goes to a temporary directory, removed when done
        return _measure(args, source, args.compiled or work / "compiled")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, source: Path, compiled: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from .. import runtime
    from . import presets

    device = torch.device(args.device)
    result: dict[str, Any] = {"model": args.model, "random_weights": presets.is_random(args.model),
                              "device": args.device, "batch": args.batch,
                              "prompt_len": args.prompt_len, "tokens": args.tokens,
                              "torch_threads": torch.get_num_threads()}
    if not args.skip_compile_memory or args.compiled is None:
        peak = compile_peak_rss(args.model, compiled)
        disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        result.update(compile_peak_rss=peak, model_bytes_on_disk=disk)
    gen = torch.Generator().manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(source).eval().to(device)
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.prompt_len), generator=gen)
    full = runtime.load(compiled, device=args.device)
    result["hf_eager_s_per_token"], result["resident_s_per_token"] = timed_pair(
        [hf_stepper(hf, device), ef_stepper(full)], ids, args.tokens, args.repeats)
    result["resident_over_hf"] = result["resident_s_per_token"] / result["hf_eager_s_per_token"]
    total = full.stats()["slots"]
    budget = runtime.budget_argument(args.budget) if args.gpu_memory is None else _slots_for(args, full, compiled)
    small = runtime.load(compiled, device=args.device, expert_cache=budget,
                         timeline=args.timeline is not None, batch_size=args.batch,
                         max_context=args.prompt_len + args.tokens + 1)
    def after_warmup() -> None:
        small.reset_stats()
        if small.timeline is not None:
            small.timeline.clear()

    (result["offload_s_per_token"],) = timed_pair([ef_stepper(small)], ids, args.tokens, 1, after_warmup)
    if args.timeline is not None:
        result["timeline"] = str(small.timeline.write(args.timeline))
    result["offload_slots"], result["all_slots"] = small.stats()["slots"], total
    if small.budget is not None:
        result["auto_budget"] = small.budget.describe()
    result["offload_stats"] = small.stats()["total"]
    bandwidth = bench_rows.h2d_bandwidth(device)
    result["h2d_bytes_per_s"] = bandwidth
    rows = [bench_rows.timed_row("HF eager, all resident", hf_stepper(hf, device), ids, args.tokens, args.repeats,
                                 device)]
    del hf, full
    rows.append(_accelerate_row(source, device, compiled, small.stats()["slots"], ids, args))
    for name, predictor, policy, prefetch in _offloaded_runs(compiled):
        model = runtime.load(compiled, device=args.device, expert_cache=small.stats()["slots"], predictor=predictor,
                             policy=policy, prefetch=prefetch)
        rows.append(bench_rows.timed_row(name, ef_stepper(model), ids, args.tokens, args.repeats, device, model,
                                         bandwidth))
        del model
    result["rows"] = bench_rows.as_json(rows)
    result["markdown"] = bench_rows.markdown(rows)
    return result


def _offloaded_runs(compiled: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(row name, predictor, policy, prefetch): on-demand LRU, then ExpertFlow with each predictor
    it has; with the routing-path predictor also the predictive policy (and its reuse predictor)
    in both prefetch modes."""
    from ..runtime.manifest import read_manifest

    manifest = read_manifest(compiled)
    policy = manifest["options"].get("policy", "layer_cycle")
    runs = [("on-demand LRU (no prefetch)", "none", "lru", None),
            (f"ExpertFlow cross_layer_gate, {policy}", "cross_layer_gate", None, None)]
    if "predictor.safetensors" in manifest["files"]:
        runs.append((f"ExpertFlow routing_path, {policy}", "routing_path", None, None))
        if "reuse.safetensors" in manifest["files"]:
            runs += [(f"ExpertFlow routing_path, predictive + reuse, {mode}", "routing_path", "predictive", mode)
                     for mode in ("copy", "hint")]
    return runs


def _accelerate_row(source: Path, device: torch.device, compiled: Path, slots: int, ids: torch.Tensor,
                    args: argparse.Namespace) -> "bench_rows.Row":
    """transformers + accelerate CPU offload with as much device memory as the offloaded runs use."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from ..runtime.manifest import read_manifest

    name = "transformers + accelerate CPU offload"
    if device.type != "cuda":
        return bench_rows.Row(name, skipped="accelerate offloads to a GPU; this run is on the CPU")
    if importlib.util.find_spec("accelerate") is None:
        return bench_rows.Row(name, skipped="the accelerate package is not installed (pip install accelerate)")
    manifest = read_manifest(compiled)
    budget = manifest["memory_plan"]["dense_bytes"] + slots * max(lay["blob_bytes"] for lay in manifest["layouts"])
    hf = AutoModelForCausalLM.from_pretrained(source, device_map="auto",
                                              max_memory={device.index or 0: budget, "cpu": 2**40}).eval()
    return bench_rows.timed_row(name, hf_stepper(hf, device), ids, args.tokens, args.repeats, device)


def _slots_for(args: argparse.Namespace, full: Any, compiled: Path) -> int:
    """The slots ``expert_cache='auto'`` would take on a device with ``--gpu-memory`` free."""
    from ..runtime.budget import auto_budget, kv_cache_bytes
    from ..runtime.manifest import read_manifest

    kv = kv_cache_bytes(full.config, args.batch, args.prompt_len + args.tokens + 1, full.dtype.itemsize)
    dense = read_manifest(compiled)["memory_plan"]["dense_bytes"]
    return auto_budget(full.context.cache.layouts, gpu_memory_bytes(args.gpu_memory), dense, kv).slots


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(r: dict[str, Any]) -> str:
    s = r["offload_stats"]
    lines = [f"model {r['model']} on {r['device']}, batch {r['batch']}, prompt {r['prompt_len']}, "
             f"{r['tokens']} decode steps, {r['torch_threads']} torch threads",
             f"decode s/token: HF eager {r['hf_eager_s_per_token']:.5f}, ExpertFlow all resident "
             f"{r['resident_s_per_token']:.5f} (ratio {r['resident_over_hf']:.2f}x)",
             f"budget {r['offload_slots']}/{r['all_slots']} slots: {r['offload_s_per_token']:.5f} s/token, "
             f"hits {s['hits']}, misses {s['misses']}, hit rate {_num(s['hit_rate'])}, bytes moved "
             f"{s['bytes_moved']}, stall {s['stall_s']:.4f} s, prefetch precision "
             f"{_num(s['prefetch_precision'])}, recall {_num(s['prefetch_recall'])}"]
    if "auto_budget" in r:
        lines.append(r["auto_budget"])
    if r.get("random_weights"):
        lines.append("(a preset: seeded random weights, so routing is not a trained model's; hit rates and "
                     "prefetch accuracy say little about real models)")
    if "rows" in r:
        lines.append(f"host-to-device bandwidth measured: {r['h2d_bytes_per_s'] / 1e9:.1f} GB/s")
        lines.append(r["markdown"].rstrip())
    if "compile_peak_rss" in r:
        lines.append(f"compile peak RSS {r['compile_peak_rss'] / 2**20:.1f} MiB for "
                     f"{r['model_bytes_on_disk'] / 2**20:.1f} MiB of weights on disk")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (UserError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"expertflow-bench: error: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
