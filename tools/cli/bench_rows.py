"""expertflow-bench's comparison: every way of running the model, on the same prompts, one table.

Rows: Hugging Face eager with everything resident (when it fits), transformers + accelerate CPU
offload (CUDA only), on-demand LRU (ExpertFlow's cache with no predictor: the mixtral-offloading
method), and ExpertFlow with each predictor the compiled directory has. Each row gets prefill and
decode tokens/s, peak device and host memory (each row's own: the rows run one model at a time),
hit rate, stall, bytes moved per decode step and the part of them a compute read, and the
physical bound: that part over the host-to-device bandwidth measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

Stepper = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass
class Row:
    name: str
    skipped: str | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_device_bytes: int | None = None
    peak_host_bytes: int | None = None
    slots: int | None = None
    hit_rate: float | None = None
    stall_s_per_token: float | None = None
    bytes_per_token: float | None = None    # every byte copied, wasted prefetches included
    needed_per_token: float | None = None   # of those, the copies of experts a compute read
    bound_s_per_token: float | None = None  # needed_per_token / measured bandwidth
    over_bound: float | None = None         # decode s/token over the bound
    cache: dict[str, Any] | None = None     # model.stats()["total"] of the last timed decode run


def h2d_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of host-to-slot copies as the cache makes them: pinned host to GPU on CUDA, one
    memcpy on CPU. The best of ``repeats``, as a bound should be."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    return nbytes / best


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the peak resident set (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def read_peaks(device: torch.device) -> tuple[int | None, int | None]:
    dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    try:
        status = Path("/proc/self/status").read_text()
        host = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
    except (OSError, StopIteration, ValueError):
        host = None
    return dev, host


def free(device: torch.device) -> None:
    """Returns what dropped models held: the next row's peak, and ``expert_cache='auto'``, see a
    device with only that row's model on it (CUDA's allocator keeps freed blocks until asked)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def one_model_row(name: str, load: Callable[[], Any], stepper: Callable[[Any], Stepper], ids: torch.Tensor,
                  tokens: int, repeats: int, device: torch.device, counters: bool = False,
                  bandwidth: float | None = None, keep: Callable[[Any], None] = lambda model: None) -> Row:
    """Loads one model, times it, frees it: rows run one model at a time, so each row's peak memory
    is its own, and a model that fits only offloaded still gets its offloaded rows (a reference
    that does not fit is a row skipped, saying so). ``counters``: an ExpertFlow model's cache
    counters join the row; ``keep`` sees the model before it goes."""
    model = None
    try:
        model = load()
        row = timed_row(name, stepper(model), ids, tokens, repeats, device, model if counters else None, bandwidth)
        keep(model)
        return row
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        return Row(name, skipped=f"does not fit in this device's memory ({str(exc).splitlines()[0][:160]})")
    finally:
        del model
        free(device)


def measure(step: Stepper, ids: torch.Tensor, tokens: int, repeats: int,
            before_last_decode: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median prefill seconds and median decode seconds per step over ``repeats`` runs (after one
    warm-up); ``before_last_decode`` runs after the last prefill (to count decode alone)."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    prefills, decodes = [], []
    for r in range(repeats + 1):
        sync()
        start = time.perf_counter()
        logits = step(ids, True)
        sync()
        prefill = time.perf_counter() - start
        if r == repeats:
            before_last_decode()
        times = []
        for _ in range(tokens):
            nxt = logits[:, -1, :].argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = step(nxt, False)
            sync()
            times.append(time.perf_counter() - start)
        if r:  # the first run warms caches and allocators
            prefills.append(prefill)
            decodes.append(statistics.median(times))
    return statistics.median(prefills), statistics.median(decodes)


def timed_row(name: str, step: Stepper, ids: torch.Tensor, tokens: int, repeats: int, device: torch.device,
              model: Any = None, bandwidth: float | None = None) -> Row:
    """One row; ``model`` (an ExpertFlow model) adds its cache counters for the last decode run."""
    reset_peaks(device)
    def before() -> None:  # the counters and the timeline then cover the last decode run alone
        if model is not None:
            model.reset_stats()
            if model.timeline is not None:
                model.timeline.clear()
    prefill_s, decode_s = measure(step, ids, tokens, repeats, before)
    row = Row(name, prefill_tok_s=ids.numel() / prefill_s, decode_tok_s=ids.shape[0] / decode_s)
    row.peak_device_bytes, row.peak_host_bytes = read_peaks(device)
    if model is not None:
        stats = model.stats()
        total = stats["total"]
        row.slots, row.hit_rate, row.cache = stats["slots"], total["hit_rate"], total
        row.stall_s_per_token = total["stall_s"] / tokens
        row.bytes_per_token = total["bytes_moved"] / tokens
        # The bound is what the row's own demand had to move (its misses and the prefetches it
        # used), not what it moved: a row that wastes more must not look closer to its bound.
        row.needed_per_token = (total["bytes_moved"] - total["bytes_wasted"]) / tokens
        if bandwidth:
            row.bound_s_per_token = row.needed_per_token / bandwidth
            row.over_bound = decode_s / row.bound_s_per_token if row.bound_s_per_token else None
    return row


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 2**20:,.0f} MiB" if value >= 10 * 2**20 else f"{value / 2**20:.2f} MiB"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "s":
        return f"{value * 1e3:.2f} ms"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


COLUMNS = (("name", "run", ""), ("prefill_tok_s", "prefill tok/s", ""), ("decode_tok_s", "decode tok/s", ""),
           ("slots", "slots", ""), ("hit_rate", "hit rate", ""), ("stall_s_per_token", "stall/token", "s"),
           ("bytes_per_token", "moved/token", "bytes"), ("needed_per_token", "needed/token", "bytes"),
           ("bound_s_per_token", "bound/token", "s"),
           ("over_bound", "decode/bound", "ratio"), ("peak_device_bytes", "peak device", "bytes"),
           ("peak_host_bytes", "peak host", "bytes"))


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table; skipped runs say why below it."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row.skipped is None:
            cells = [_cell(getattr(row, key), kind) if key != "hit_rate" or row.hit_rate is None
                     else f"{row.hit_rate:.3f}" for key, _, kind in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {row.name}: not run ({row.skipped})" for row in rows if row.skipped is not None]
    return "\n".join(lines) + "\n"


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
