"""The routing prior the predictive cache policy reads: how often each expert is chosen again.

``prior.safetensors`` (written at compile time from calibration traces, ``tools/make/train_predictor``)
holds two float32 tensors [MoE layers, experts]: ``reuse`` = P(chosen by the next token | chosen by
this one) and ``fresh`` = P(chosen by the next token | not chosen by this one). Without it the
policy estimates popularity online. Values are probabilities: anything else is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..store.host import read_tensors
from ..store.manifest import LoadError
from .estimates import RoutingPrior

FILE = "prior.safetensors"


def prior_tensors(experts: torch.Tensor, seq: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``reuse`` and ``fresh`` fitted on routes ``experts`` [tokens, layers, k] of consecutive
    tokens (``seq`` [tokens]: only pairs within one sequence count; ids < 0 are ignored),
    Laplace-smoothed."""
    tokens, layers, _ = experts.shape
    n = int(experts.max().item()) + 1 if experts.numel() else 1
    chosen = torch.zeros(tokens, layers, n, dtype=torch.bool)
    valid = experts >= 0
    chosen.scatter_(2, experts.clamp(min=0).long(), valid)
    now, nxt = chosen[:-1].float(), chosen[1:].float()
    if seq is not None:
        same = (seq[:-1] == seq[1:]).float()[:, None, None]
        now, nxt = now * same, nxt * same + (1 - same) * -1  # pairs across sequences drop out below
        nxt = nxt.clamp(min=0)
        pairs = same
    else:
        pairs = torch.ones(len(now), 1, 1)
    reuse = ((now * nxt).sum(0) + 1) / (now.sum(0) + 2)
    fresh = (((pairs - now) * nxt).sum(0) + 1) / ((pairs - now).sum(0) + 2)
    return {"reuse": reuse.contiguous(), "fresh": fresh.contiguous()}


def load_prior(path: Path, manifest: dict[str, Any], layouts: dict[int, Any]) -> RoutingPrior | None:
    if FILE not in manifest["files"]:
        return None
    t, file = read_tensors(path, FILE, manifest["files"][FILE])
    layers = sorted(layouts)
    width = max(lay.num_experts for lay in layouts.values())
    for name in ("reuse", "fresh"):
        value = t.get(name)
        if (value is None or value.dtype != torch.float32 or value.dim() != 2 or value.shape[0] != len(layers)
                or value.shape[1] > width or not ((value >= 0) & (value <= 1)).all()):
            raise LoadError(f"{file}: {name} must be float32 probabilities [{len(layers)}, <= {width}]; "
                            "recompile the model")
    if sorted(t) != ["fresh", "reuse"]:
        raise LoadError(f"{file} holds {sorted(t)[:6]}, expected reuse and fresh; recompile the model")
    return as_prior(t, layers)


def as_prior(t: dict[str, torch.Tensor], layers: list[int]) -> RoutingPrior:
    """The policy's lookup tables from ``reuse`` and ``fresh`` [MoE layers, experts] (layer order)."""
    table = {name: {(layer, e): float(p) for i, layer in enumerate(layers) for e, p in enumerate(t[name][i].tolist())}
             for name in ("reuse", "fresh")}
    return RoutingPrior(table["reuse"], table["fresh"])
