"""Predictions of every predictor for a routing trace, as the prefetches a replay issues.

A prediction is, per token and MoE layer position j, the expert ids a predictor names and the
layer position before whose wait it can be issued (what the predictor must have seen by then):

- ``oracle``: the true route, all issued before the token's first layer (the causal bound's
  perfect routing-path predictor; evaluation only);
- ``routing_path``: the trained network on the token embedding, all before the first layer;
- ``cross_layer_gate@d``: layer j's router on layer j-d's input, before layer j-d's wait (the
  embedding, before the first layer, for j < d);
- ``frequency``: each layer's k most popular experts, before the first layer (static baseline);
- ``transition``: layer j's k likeliest experts given layer j-1's true route, before layer j-1's
  wait (the route is known then; layer 0: the frequency prior). Both trace predictors predict
  with the runtime's own functions (``runtime/predict/route_tables.py``), so replay and run agree.

``oracle+next`` adds, after each layer's step, a hint (no copy) of the next step's true route
through that layer: what a perfect next-token predictor could tell the predictive policy, the
most any next-step predictor can buy (evaluation only).

Steps group tokens as the runtime runs them: ``token`` (decode, one sequence), ``batch:N`` (N
sequences decoding together: one step per layer covers their tokens at one position) or
``prefill`` (a whole sequence per step); a grouped step needs, and is predicted, the union.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache_sim import Access
from .prefetch_sim import Issue
from ...runtime.predict.route_tables import fit_tables, frequency_ids, topk_ids, transition_ids

Prediction = tuple[torch.Tensor, list[int]]  # ids [tokens, layers, k] (< 0: none), issue position per layer


from ..make.train_predictor import multi_hot

__all__ = ["topk_ids", "fit_trace_predictors", "trace_predictions", "xgate_prediction", "groups", "build",
           "next_step_hints", "multi_hot"]


def fit_trace_predictors(train: torch.Tensor, n_experts: int, k: int) -> dict[str, torch.Tensor]:
    """The tables ``frequency`` [layers, n] and ``transition`` [layers, n, n] from training routes."""
    return fit_tables(train, n_experts)


def trace_predictions(experts: torch.Tensor, tables: dict[str, torch.Tensor], k: int) -> dict[str, Prediction]:
    """``oracle``, ``frequency`` and ``transition`` for routes ``experts`` [tokens, layers, k]."""
    tokens, layers, _ = experts.shape
    popular = frequency_ids(tables["frequency"], k)  # [layers, k]
    freq = popular.unsqueeze(0).expand(tokens, layers, k)
    trans = [freq[:, 0]] + [transition_ids(tables["transition"][j], tables["frequency"][j], experts[:, j - 1], k)
                            for j in range(1, layers)]
    return {"oracle": (experts, [0] * layers), "frequency": (freq, [0] * layers),
            "transition": (torch.stack(trans, 1), [max(j - 1, 0) for j in range(layers)])}


def xgate_prediction(pred: torch.Tensor, d: int) -> Prediction:
    layers = pred.shape[1]
    return pred, [max(j - d, 0) for j in range(layers)]


def groups(seq: torch.Tensor, token: torch.Tensor, mode: str) -> list[list[int]]:
    """Token row indices per step group, in execution order (module docstring)."""
    rows: dict[tuple[int, int], list[int]] = {}
    seqs, toks = seq.tolist(), token.tolist()
    if mode == "token":
        keys = [(s, t) for s, t in zip(seqs, toks)]
    elif mode == "prefill":
        keys = [(s, 0) for s in seqs]
    elif mode.startswith("batch:"):
        size = int(mode.split(":", 1)[1])
        first = sorted(set(seqs))
        rank = {s: i // size for i, s in enumerate(first)}
        keys = [(rank[s], t) for s, t in zip(seqs, toks)]
    else:
        raise ValueError(f"unknown grouping {mode!r}; use token, batch:N or prefill")
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return [rows[k] for k in sorted(rows)]


def build(experts: torch.Tensor, layers: Sequence[int], grouped: list[list[int]],
          predictions: dict[str, Prediction]) -> tuple[list[Access], dict[str, list[list[Issue]]]]:
    """The replay's steps and, per predictor, the issues before each step."""
    trace: list[Access] = []
    issues: dict[str, list[list[Issue]]] = {name: [] for name in predictions}
    ids = experts.tolist()
    preds = {name: (p.tolist(), pos) for name, (p, pos) in predictions.items()}
    for g, rows in enumerate(grouped):
        base = len(trace)
        for j, layer in enumerate(layers):
            need = sorted({e for r in rows for e in ids[r][j] if e >= 0})
            trace.append(Access(g, 0, layer, tuple(need)))
        for name, (p, pos) in preds.items():
            per_step: list[list[Issue]] = [[] for _ in layers]
            for j in range(len(layers)):
                named = tuple(sorted({e for r in rows for e in p[r][j] if e >= 0}))
                if named:
                    per_step[pos[j]].append(Issue(base + j, named))
            issues[name].extend(per_step)
    return trace, issues


def next_step_hints(trace: Sequence[Access], issues: list[list[Issue]], layers: int) -> list[list[Issue]]:
    """``issues`` plus, after each step, a hint naming the next group's true route through the
    same layer (groups are ``layers`` consecutive steps)."""
    out = [list(step) for step in issues]
    for s in range(len(trace) - layers):
        if s + 1 < len(out):
            out[s + 1].append(Issue(s + layers, trace[s + layers].experts, load=False))
    return out
