"""``expertflow-simulate COMPILED``: every predictor and policy on the calibration's held-out text.

The compiled directory's ``calibration.safetensors`` (``expertflow-compile --calibration``) holds
routes, the cross-layer gate's predictions at every lookahead and the routing-path predictor's,
for training and held-out tokens. Trace-only predictors (frequency, transition) and the routing
prior are fitted on the training tokens; every row replays the held-out tokens only.
The causal bound is the fewest loads over policies with the oracle (a perfect routing-path
predictor: the current step's true route through every layer, known before its first layer),
prefetched (``oracle``) or only told to the policy (``oracle:hint``: it evicts among the experts
that route does not need, and loads on demand). ``oracle+next:hint`` also tells the policy the
next step's route: the most that a next-token route predictor could add. ``routing_path:hint``
is ``--prefetch hint``: the routing-path predictions only steer eviction, nothing is copied early;
``routing_path+next:hint`` is that, told the next step's true route as well (evaluation only): the
most a perfect next-token route predictor could add to ours.
The predictive policy's rows with the routing-path predictor also read the reuse predictor's
estimates (``reuse_logits``), as the runtime does with that predictor and policy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...runtime.store.manifest import read_manifest
from ...runtime.store.tensor_file import read_tensor_file
from ...runtime.cache.policy import POLICIES as RUNTIME_POLICIES, Policy
from ...runtime.predict.prior import as_prior, prior_tensors
from . import replay_predictors as P
from .cache_sim import TimeModel, simulate
from .prefetch_sim import Issue, Replay, replay

FILE = "calibration.safetensors"
#: 32,768 calibration tokens of a bf16 Mixtral-8x7B record about 1 GB; a larger file is refused before
#: it is read (it is read whole into memory).
CALIBRATION_LIMIT = 8 * 2**30


def load_calibration(compiled: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The calibration tensors (checksum checked) and the manifest; ValueError if there are none."""
    manifest = read_manifest(compiled)
    if FILE not in manifest["files"]:
        raise ValueError(f"{compiled} has no calibration traces: compile with --calibration builtin, or pass --trace FILE")
    rec = read_tensor_file(compiled, FILE, CALIBRATION_LIMIT, manifest["files"][FILE])  # checked as read
    need = {"experts", "seq", "token", "split", "layers"}
    if not need <= set(rec) or rec["experts"].dim() != 3:
        raise ValueError(f"{compiled}/{FILE} lacks {sorted(need - set(rec))}; recompile with --calibration")
    return rec, manifest


def predictions(rec: dict[str, torch.Tensor], n: int, group: str = "token") -> dict[str, P.Prediction]:
    """Every predictor's held-out predictions; in ``prefill`` steps the routing-path predictor has
    no previous step's context (``path_cold``), in decode steps it has (``path``)."""
    train, held = rec["split"] == 0, rec["split"] == 1
    k = rec["experts"].shape[2]
    tables = P.fit_trace_predictors(rec["experts"][train], n, k)
    out = P.trace_predictions(rec["experts"][held], tables, k)
    path = rec.get("path_cold") if group == "prefill" and "path_cold" in rec else rec.get("path")
    if path is not None:
        out["routing_path"] = (path[held], _path_positions(rec))
    for d in range(1, 9):
        if f"xgate{d}" in rec:
            out[f"cross_layer_gate@{d}"] = P.xgate_prediction(rec[f"xgate{d}"][held], d)
    out["none"] = (torch.full_like(rec["experts"][held], -1), [0] * rec["experts"].shape[1])
    return out


def reuse_steps(rec: dict[str, torch.Tensor], grouped: list[list[int]], layers: int) -> dict[int, list[int]]:
    """The reuse estimates the runtime would hand the policy at each group's first wait: from each
    sequence's last row in the group (held-out rows), combined as ``runtime/predict/reuse`` combines rows."""
    from ...runtime.predict.reuse import HORIZONS, encode, expected_next_use

    logits = rec["reuse_logits"][rec["split"] == 1].float()
    seqs = rec["seq"][rec["split"] == 1].tolist()
    out = {}
    for g, rows in enumerate(grouped):
        last = {seqs[r]: r for r in rows}  # rows are in token order: the last one per sequence stays
        chosen = logits[sorted(last.values())]
        per = chosen.reshape(len(chosen), layers, len(HORIZONS), -1)
        out[g * layers] = encode(expected_next_use(per)).reshape(-1).tolist()
    return out


def _path_positions(rec: dict[str, torch.Tensor]) -> list[int]:
    """Where each layer's routing-path prediction is issued: 0 (before the first layer) or, for a
    layer its second stage predicts, 1 (after the first MoE layer)."""
    layers = rec["experts"].shape[1]
    if "path_positions" not in rec:
        return [0] * layers
    pos = rec["path_positions"].tolist()
    if len(pos) != layers or any(not 0 <= p <= j for j, p in enumerate(pos)):
        raise ValueError(f"{FILE}: path_positions {pos[:8]} must give each of the {layers} MoE layers a layer "
                         "at or before it; recompile with --calibration")
    return pos


def recall_table(rec: dict[str, torch.Tensor], preds: dict[str, P.Prediction], n: int) -> dict[str, dict[str, Any]]:
    """Per predictor: recall@k (share of true experts named) and precision, per layer and overall."""
    true = P.multi_hot(rec["experts"][rec["split"] == 1], n)
    out = {}
    for name, (ids, _) in preds.items():
        if name in ("none", "oracle"):
            continue
        hit = P.multi_hot(ids, n) * true
        named = P.multi_hot(ids, n).sum((0, 2)).clamp(min=1)
        per = hit.sum((0, 2)) / true.sum((0, 2)).clamp(min=1)
        out[name] = {"recall": float(hit.sum() / true.sum().clamp(min=1)), "per_layer_recall": per.tolist(),
                     "precision": float(hit.sum() / named.sum()), "per_layer_precision": (hit.sum((0, 2)) / named).tolist()}
    return out


def reads(policy: str, method: str) -> bool:
    """Whether ``policy`` reads what ``Policy.<method>`` (hint, expect) hands it: a policy class
    that keeps the base class's do-nothing method ignores it."""
    return getattr(RUNTIME_POLICIES[policy], method) is not getattr(Policy, method)


def same_as_none(policy: str, issues: list[list[Issue]], reuse: dict[int, list[int]] | None) -> bool:
    """True when replaying ``issues`` under ``policy`` must give the ``none`` row: they copy
    nothing (hints only) and the policy reads neither hints nor, where given, reuse estimates."""
    return (all(not i.load for step in issues for i in step) and not reads(policy, "hint")
            and (reuse is None or not reads(policy, "expect")))


def evaluate(compiled: Path, caches: list[int], policies: list[str], group: str,
             time: TimeModel | None, expert_bytes: int | None = None,
             progress: Callable[[int], Any] = lambda n: None,
             start: Callable[[int], Any] = lambda total: None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per (policy, predictor, cache) and the predictors' recall, on the held-out tokens.
    A row that would repeat the ``none`` row by construction (``same_as_none``) is left out.
    ``start(total)`` is told the number of replays once known, ``progress(1)`` after each."""
    rec, manifest = load_calibration(compiled)
    layers = rec["layers"].tolist()
    n = int(rec["experts_per_layer"][0]) if "experts_per_layer" in rec else int(rec["experts"].max()) + 1
    blob = expert_bytes or manifest["memory_plan"]["expert_blob_bytes"]
    preds = predictions(rec, n, group)
    held = rec["split"] == 1
    grouped = P.groups(rec["seq"][held], rec["token"][held], group)
    trace, issues = P.build(rec["experts"][held], layers, grouped, preds)
    issues["oracle:hint"] = [[Issue(i.target, i.experts, load=False) for i in step] for step in issues["oracle"]]
    if "routing_path" in issues:  # --prefetch hint: the predictions steer eviction, nothing is copied early
        issues["routing_path:hint"] = [[Issue(i.target, i.experts, load=False) for i in step]
                                       for step in issues["routing_path"]]
        # ours, told the next step's true route too: what a perfect next-token route predictor would add
        issues["routing_path+next:hint"] = P.next_step_hints(trace, issues["routing_path:hint"], len(layers))
    issues["oracle+next:hint"] = P.next_step_hints(trace, issues["oracle:hint"], len(layers))
    train = rec["split"] == 0
    prior = as_prior(prior_tensors(rec["experts"][train], rec["seq"][train]), layers)
    reuse = reuse_steps(rec, grouped, len(layers)) if "reuse_logits" in rec else None
    start(len(caches) * len(policies) * len(issues))
    rows = []
    for cache in caches:
        best = simulate(trace, "belady", cache, blob).loads
        causal = None
        results = []
        for policy in policies:
            done: dict[str, Replay] = {}
            for name in sorted(issues, key=lambda name: name != "none"):  # none first: rows equal to it reuse it
                # the runtime has the reuse predictor with the routing-path predictor and this policy
                learned = reuse if policy == "predictive" and name.startswith("routing_path") else None
                if name != "none" and same_as_none(policy, issues[name], learned):
                    r = done["none"]  # not a row of its own: it would repeat none's
                else:
                    r = done[name] = replay(trace, issues[name], policy, cache, name, blob, prior, time, learned)
                if name in ("oracle", "oracle:hint"):
                    causal = r.loads if causal is None else min(causal, r.loads)
                progress(1)
            results += [done[name] for name in issues if name in done]
        for r in results:
            row = {"policy": r.policy, "predictor": r.predictor, "cache": cache, "accesses": r.accesses,
                   "hits": r.hits, "hit_rate": r.hit_rate, "loads": r.loads, "bytes": r.bytes,
                   "resident": r.resident, "in_flight": r.in_flight, "missed": r.missed,
                   "ready_at_wait": r.hit_rate, "wasted_prefetches": r.wasted, "dropped_prefetches": r.dropped,
                   "loads_over_min": r.loads / best if best else 1.0, "min_loads": best, "causal_bound_loads": causal,
                   "tokens": r.tokens, "group": group}
            if time is not None:
                row.update(time.per_token(r.ms, r.bytes, r.tokens))
            rows.append(row)
    return rows, recall_table(rec, preds, n)


LEGEND = """\
ready: share of needed experts resident{flight} when their layer's wait began; missed: loaded on
  demand at the wait; loads: copies made (demand + prefetch); wasted: prefetched, then not used
loads/MIN: loads over Belady's MIN, the fewest a demand-loading cache that knows the whole future makes
causal/MIN: the fewest loads with the oracle (each step's true route, known at the step's start:
  prefetched, or as :hint) under any policy, over MIN; what predicting the current step can give.
  A row below it uses more than the current step: +next tells the next step's true route, and
  predictive with routing_path reads the reuse predictor's estimates of later tokens
:hint rows (predictions only steer eviction, nothing copies early) are shown for the policies
  that read hints ({readers}); under the others they repeat the none row"""


def render(rows: list[dict[str, Any]], recall: dict[str, Any], compiled: Path) -> str:
    timed = "ms_per_token" in rows[0]
    lines = [f"{compiled}: held-out calibration tokens, steps grouped by {rows[0]['group']}; "
             f"{rows[0]['tokens']} steps of tokens"]
    # Without a time model every copy lands before its wait: "in flight" would be 0 by construction.
    header = ["policy", "predictor", "cache", "ready", "resident", *(["in flight"] if timed else []), "missed",
              "loads", "loads/MIN", "wasted", "causal/MIN"]
    header += ["ms/token", "/bound"] if timed else []
    table = [header]
    for r in rows:
        causal = r["causal_bound_loads"] / r["min_loads"] if r["min_loads"] and r["causal_bound_loads"] else 1.0
        cells = [r["policy"], r["predictor"], str(r["cache"]), f"{r['ready_at_wait']:.3f}", str(r["resident"]),
                 *([str(r["in_flight"])] if timed else []), str(r["missed"]), str(r["loads"]),
                 f"{r['loads_over_min']:.2f}", str(r["wasted_prefetches"]), f"{causal:.2f}"]
        if timed:
            cells += [f"{r['ms_per_token']:.4f}", "-" if r["over_bound"] is None else f"{r['over_bound']:.2f}"]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    readers = [name for name in RUNTIME_POLICIES if reads(name, "hint")]
    lines.append(LEGEND.format(flight=" (or its copy in flight)" if timed else "", readers=", ".join(readers)))
    lines.append("predictor recall@k / precision on held-out tokens (per MoE layer):")
    for name, r in recall.items():
        per = " ".join(f"{x:.2f}" for x in r["per_layer_recall"])
        lines.append(f"  {name:22s} recall {r['recall']:.3f}  precision {r['precision']:.3f}  layers [{per}]")
    return "\n".join(lines)
