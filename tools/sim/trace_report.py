"""A bare routing trace's report: the rows of every policy and cache size against Belady's MIN,
with or without a trace-only predictor, and their table (``expertflow-simulate --trace``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cache_sim import SimResult, TimeModel, next_uses, predict_time, simulate
from .prefetch_sim import Replay, replay
from .trace_file import Access
from .trace_predict import split_and_predict


def trace_rows(trace: list[Access], policies: list[str], caches: list[int], expert_bytes: int = 1,
               time_model: TimeModel | None = None, bar: Any = None, predictor: str = "none",
               fit: float = 0.5, experts: int = 0) -> list[dict[str, Any]]:
    """One row per (policy, cache), in policy then cache order (Belady runs for the ratio too);
    with a ``predictor`` (``trace_predict``), per (policy, cache, none | predictor) on the tokens
    after the ``fit`` share (``experts``: routed experts per layer, the tables' size). ``bar`` (a
    tqdm bar) is told the work and its progress."""
    if predictor != "none":
        return _predicted(trace, policies, caches, expert_bytes, time_model, bar, predictor, fit, experts)
    names = list(dict.fromkeys([*policies, "belady"]))
    future = next_uses(trace)
    if bar is not None:
        bar.reset(total=len(trace) * len(names) * len(caches))
    results: dict[tuple[str, int], SimResult] = {}
    for name in names:
        for cache in caches:
            results[name, cache] = simulate(trace, name, cache, expert_bytes, future,
                                            bar.update if bar is not None else None)
    rows = []
    for name in policies:
        for cache in caches:
            r, best = results[name, cache], results["belady", cache]
            row: dict[str, Any] = {
                "policy": name, "predictor": "none", "cache": cache, "accesses": r.accesses, "hits": r.hits,
                "hit_rate": r.hit_rate, "loads": r.loads, "bytes": r.bytes,
                "loads_over_min": r.loads / best.loads if best.loads else 1.0,
                "tokens": r.tokens, "expert_bytes": r.expert_bytes,
                "per_layer": {str(layer): {"hits": c.hits, "loads": c.loads} for layer, c in r.per_layer.items()}}
            if time_model is not None:
                t = predict_time(r, time_model)
                row.update(ms_per_token=t.ms_per_token, bound_ms_per_token=t.bound_ms_per_token,
                           over_bound=t.over_bound)
            rows.append(row)
    return rows


def _predicted(trace: list[Access], policies: list[str], caches: list[int], expert_bytes: int,
               time_model: TimeModel | None, bar: Any, predictor: str, fit: float,
               experts: int) -> list[dict[str, Any]]:
    """Rows per (policy, cache, predictor) on the held-out tokens, none first (ValueError: see
    ``split_and_predict``)."""
    steps, issues, prior = split_and_predict(trace, predictor, experts, fit)
    plans = {"none": [[] for _ in steps], predictor: issues}
    names = [p for p in policies if p != "belady"]
    if bar is not None:
        bar.reset(total=len(caches) * (len(names) * 2 + 1))
    rows = []
    for cache in caches:
        best = simulate(steps, "belady", cache, expert_bytes).loads
        _tick(bar)
        for name in names:
            for which, plan in plans.items():
                rows.append(_row(replay(steps, plan, name, cache, which, expert_bytes, prior, time_model),
                                 best, time_model))
                _tick(bar)
    return rows


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update()


def _row(r: Replay, best: int, time_model: TimeModel | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "policy": r.policy, "predictor": r.predictor, "cache": r.capacity, "accesses": r.accesses,
        "hits": r.hits, "hit_rate": r.hit_rate, "loads": r.loads, "bytes": r.bytes,
        "loads_over_min": r.loads / best if best else 1.0, "tokens": r.tokens, "expert_bytes": r.expert_bytes,
        "wasted_prefetches": r.wasted, "dropped_prefetches": r.dropped,
        "per_layer": {str(layer): {"hits": c["ready"], "loads": c["loads"]} for layer, c in r.per_layer.items()}}
    if time_model is not None:
        row.update(time_model.per_token(r.ms, r.bytes, r.tokens))
    return row


def _size(n: int, expert_bytes: int) -> str:
    if n < 1024 or expert_bytes == 1:  # bytes of 1-byte experts are a count of loads: keep it exact
        return str(n)
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.2f} {unit}"
    return f"{size / 1024:.2f} TiB"


def render(trace: list[Access], rows: list[dict[str, Any]], source: Path, fit: float | None = None) -> str:
    """The table; ``fit``: the share of tokens a --predictor was fitted on (rows replay the rest)."""
    layers = {a.layer for a in trace}
    distinct = len({(a.layer, e) for a in trace for e in a.experts})
    predicted = sorted({r["predictor"] for r in rows} - {"none"})
    said = (f"{predicted[0]}, fitted on the first {fit:.0%} of tokens; rows replay the other "
            f"{rows[0]['tokens']}, without (none) and with its prefetches" if predicted and fit is not None
            else "none (demand loading)")
    tokens = len({(a.seq, a.token) for a in trace})
    lines = [f"trace {source}: {len(trace)} steps, {tokens} tokens, {len(layers)} MoE layers, "
             f"{distinct} distinct experts touched; predictor: {said}"]
    header = ["policy", *(["predictor"] if predicted else []), "cache", "accesses", "hits", "hit rate", "loads",
              "bytes", "loads/MIN"]
    timed = "ms_per_token" in rows[0]
    if timed:
        header += ["ms/token", "/bound"]
    table = [header]
    for r in rows:
        cells = [r["policy"], *([r["predictor"]] if predicted else []), str(r["cache"]), str(r["accesses"]), str(r["hits"]), f"{r['hit_rate']:.3f}",
                 str(r["loads"]), _size(r["bytes"], r["expert_bytes"]), f"{r['loads_over_min']:.3f}"]
        if timed:
            over = r["over_bound"]
            cells += [f"{r['ms_per_token']:.4f}", "-" if over is None else f"{over:.2f}"]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:  # names left-aligned, numbers right-aligned
        lines.append("  ".join(c.ljust(w) if i < 1 + bool(predicted) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
