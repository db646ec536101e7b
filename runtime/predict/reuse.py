"""Learned reuse: how many tokens until each (layer, expert) is needed again, for the predictive cache.

In decode most of the bytes Belady's MIN saves lie in the tokens to come, not in the current
one. The reuse predictor (``reuse.safetensors``, trained at compile time on calibration traces)
reads what the routing-path predictor reads (the token embedding and the previous position's
last MoE block input) and, for every MoE layer and expert, scores P(its next use after this
token comes within h tokens) for each horizon h in ``HORIZONS``. ``ops.predict_reuse`` runs it
once per step; the estimates ride along with the next wait's one host read, and the predictive
policy (``runtime/cache/policy.py``) evicts the resident expert whose expected next use is farthest.
A forged file can only make the cache evict the wrong experts (slower), never change the output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .estimates import CAP, SCALE
from .path_predictor import PathPredictor
from ..store.host import read_tensors

FILE = "reuse.safetensors"
#: Horizons (tokens after the current one) the predictor scores; past the last, a use is CAP away.
HORIZONS = (1, 2, 4, 8, 16, 32)


def expected_next_use(logits: torch.Tensor) -> torch.Tensor:
    """[MoE layers, experts]: the expected tokens until any of the rows next uses each expert,
    from ``logits`` [rows, layers, len(HORIZONS), experts] of P(a row's next use <= h). Rows are
    taken as independent, so P(no row within h) is the product of theirs."""
    p = torch.sigmoid(logits.float()).cummax(dim=2).values  # a use within h is one within h' > h
    none = (1 - p).prod(dim=0)  # [layers, horizons, experts]
    edges = (*HORIZONS, CAP)
    out = torch.ones(none.shape[0], none.shape[2], device=logits.device)
    for i in range(len(HORIZONS)):
        out = out + none[:, i] * (edges[i + 1] - edges[i])
    return out


def encode(distances: torch.Tensor) -> torch.Tensor:
    """Distances as the integers the wait's host read carries (``SCALE`` per token)."""
    return (distances * SCALE).round().long()


def load_reuse(path: Path, hidden: int, layers: int, experts: int, device: torch.device,
               digest: str | None = None) -> PathPredictor:
    """The reuse predictor: inputs [embedding, context], one score per (layer, horizon, expert)."""
    tensors, file = read_tensors(path, FILE, digest)
    return PathPredictor.from_tensors(tensors, hidden, layers * len(HORIZONS), experts, str(file)).to(device)
