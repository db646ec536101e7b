"""The trace-only predictors (frequency, transition) on an external routing trace.

A JSONL trace (``trace_file``) carries routes and nothing else, so the predictors that need only
routes can replay it: the trace's tokens are split in order, the first ``fit`` share fits the
routing tables (``runtime/predict/route_tables``, as compile does on calibration text) and the routing
prior the predictive policy reads (``runtime/predict/prior``), and the rest is replayed, as
``simulate_compiled`` replays held-out calibration tokens. Tokens are (seq, token) pairs in the
trace's order; a token that lacks a layer's record needs no expert there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...runtime.predict.estimates import RoutingPrior
from ...runtime.predict.prior import as_prior, prior_tensors
from . import replay_predictors as P
from .prefetch_sim import Issue
from .trace_file import Access

PREDICTORS = ("frequency", "transition")
#: tokens x layers x experts a fit may hold in memory (its one-hot routes: a byte each, and
#: floats for the tables): a trace above it is refused before anything is allocated.
FIT_LIMIT = 2**28


def routes(trace: Sequence[Access]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The trace as routes [tokens, layers, k] (-1: none), each token's sequence, and the layers."""
    layers = sorted({a.layer for a in trace})
    at = {layer: j for j, layer in enumerate(layers)}
    k = max((len(a.experts) for a in trace), default=1) or 1
    tokens: dict[tuple[int, int], int] = {}
    for a in trace:
        tokens.setdefault((a.seq, a.token), len(tokens))
    out = torch.full((len(tokens), len(layers), k), -1, dtype=torch.long)
    for a in trace:
        row = out[tokens[(a.seq, a.token)], at[a.layer]]
        row[:len(a.experts)] = torch.tensor(a.experts, dtype=torch.long)
    seq = torch.tensor([s for s, _ in tokens], dtype=torch.long)
    return out, seq, layers


def split_and_predict(trace: Sequence[Access], predictor: str, experts: int, fit: float
                      ) -> tuple[list[Access], list[list[Issue]], RoutingPrior]:
    """The held-out steps, ``predictor``'s issues for them, and the prior fitted with its tables.
    ValueError (one line) for a trace too short to split or too large to fit."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown trace predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    tokens = len({(a.seq, a.token) for a in trace})
    layers = len({a.layer for a in trace})
    if tokens * layers * experts > FIT_LIMIT:
        raise ValueError(f"the trace is too large to fit {predictor} tables in memory ({tokens} tokens x "
                         f"{layers} layers x {experts} experts); replay a shorter trace")
    route, seq, layer_ids = routes(trace)
    cut = int(len(route) * fit)
    if cut < 1 or cut >= len(route):
        raise ValueError(f"--fit {fit} leaves no tokens to fit on or none to replay ({len(route)} tokens)")
    k = route.shape[2]
    tables = P.fit_trace_predictors(route[:cut], experts, k)
    held = route[cut:]
    prediction = P.trace_predictions(held, tables, k)[predictor]
    grouped = P.groups(seq[cut:], torch.arange(len(held)), "token")
    steps, issues = P.build(held, layer_ids, grouped, {predictor: prediction})
    prior = as_prior(prior_tensors(route[:cut], seq[:cut]), layer_ids)
    return steps, issues[predictor], prior
