"""``expertflow-simulate COMPILED --schedule B1,B2``: FIFO against route-aware micro-batches.

Every calibration sequence (training and held-out alike: the scheduler learns nothing) stands
for a request: its first ``prompt_len`` tokens are the prompt, whose recorded routes give the
route estimate ``generate_many`` would make from the prefill; the tokens after it are the
decode. The scheduler of ``runtime/generate/scheduler.py`` forms micro-batches of B requests; they decode
one after another, one step per position, and a step of one MoE layer needs the union of its
members' experts. Reported per (schedule, B, cache): distinct experts per micro-batch (prefill
estimate) and per decode step (all MoE layers), and loads and bytes of the decode replayed
through one cache of C slots with the layer-cycle rule (demand loads; no predictor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...runtime.generate.scheduler import SCHEDULES, distinct_experts, expert_sets, plan_batches
from .cache_sim import Access, simulate
from .simulate_compiled import load_calibration


def requests(rec: dict[str, torch.Tensor], prompt_len: int) -> list[torch.Tensor]:
    """Per calibration sequence longer than the prompt: its routes [tokens, layers, k] in order."""
    out = []
    for s in sorted(set(rec["seq"].tolist())):
        rows = rec["seq"] == s
        routes = rec["experts"][rows][rec["token"][rows].argsort()]
        if routes.shape[0] > prompt_len:
            out.append(routes)
    return out


def evaluate_schedule(compiled: Path, batch_sizes: list[int], caches: list[int], prompt_len: int,
                      expert_bytes: int | None = None) -> list[dict[str, Any]]:
    rec, manifest = load_calibration(compiled)
    layers = rec["layers"].tolist()
    n = int(rec["experts_per_layer"][0]) if "experts_per_layer" in rec else int(rec["experts"].max()) + 1
    blob = expert_bytes or manifest["memory_plan"]["expert_blob_bytes"]
    reqs = requests(rec, prompt_len)
    if not reqs:
        raise ValueError(f"no calibration sequence is longer than --prompt-len {prompt_len}")
    prompts = [r[:prompt_len].long() for r in reqs]
    estimates = torch.stack([torch.nn.functional.one_hot(p.clamp(min=0), n).sum((0, 2)).flatten().float()
                             for p in prompts])
    touched = expert_sets(estimates, len(layers))
    rows = []
    for size in batch_sizes:
        for schedule in SCHEDULES:
            batches = plan_batches(estimates, [prompt_len] * len(reqs), size, schedule)
            trace: list[Access] = []
            for b, batch in enumerate(batches):
                end = min(reqs[i].shape[0] for i in batch)
                for t in range(prompt_len, end):
                    for j, layer in enumerate(layers):
                        need = sorted({int(e) for i in batch for e in reqs[i][t, j].tolist() if e >= 0})
                        trace.append(Access(b, t, layer, tuple(need)))
            steps = max(len(trace) // len(layers), 1)
            per_batch = distinct_experts(touched, batches)
            for cache in caches:
                r = simulate(trace, "layer_cycle", cache, blob)
                rows.append({"schedule": schedule, "batch": size, "cache": cache, "requests": len(reqs),
                             "micro_batches": len(batches), "prompt_len": prompt_len,
                             "distinct_experts_per_micro_batch": sum(per_batch) / len(per_batch),
                             "distinct_experts_per_step": sum(len(a.experts) for a in trace) / steps,
                             "accesses": r.accesses, "hits": r.hits, "hit_rate": r.hit_rate,
                             "loads": r.loads, "bytes": r.loads * blob, "policy": "layer_cycle", "predictor": "none"})
    return rows


def render_schedule(rows: list[dict[str, Any]], compiled: Path) -> str:
    lines = [f"{compiled}: {rows[0]['requests']} calibration sequences as requests, prompts of "
             f"{rows[0]['prompt_len']} tokens, decode replayed with layer_cycle",
             "schedule     batch  cache  experts/micro-batch  experts/step  loads  bytes"]
    for r in rows:
        lines.append(f"{r['schedule']:<12} {r['batch']:>5}  {r['cache']:>5}  {r['distinct_experts_per_micro_batch']:>19.2f}"
                     f"  {r['distinct_experts_per_step']:>12.2f}  {r['loads']:>5}  {r['bytes']}")
    return "\n".join(lines)
