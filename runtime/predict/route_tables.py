"""The trace-only routing predictors the graph can call: a frequency prior and expert transitions.

``tables.safetensors`` (written at compile time from calibration routes, ``tools/make/calibrate.py``)
holds two float32 count tables over the MoE layers in depth order: ``frequency`` [layers, experts]
(how often each expert was chosen) and ``transition`` [layers, experts, experts] (T[j, a, b]: how
often layer j chose b when layer j-1 chose a; T[0] is unused), and ``top_k`` [1] (int64: how
many experts a prediction names, the router's k). The graph's
``ops.predict_frequency`` names each layer's k most popular experts (the static-cache baseline),
issued before the first layer; ``ops.predict_transition`` names layer j's k likeliest experts
given layer j-1's true route, issued as soon as that route is known, so the copy overlaps layer
j-1's experts and layer j's attention (activation-path predictors, MoE-Infinity's idea in its
simplest form). The simulator (``tools/sim/replay_predictors.py``) predicts with these same functions.
A forged table can only make the cache load the wrong experts, never change what is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..store.manifest import LoadError
from ..store.host import read_tensors

FILE = "tables.safetensors"
#: Ties in a transition row go to the more popular expert: this much of the frequency is added.
TIE_BREAK = 1e-3


def topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring ids along the last dimension; ties go to the lower id, so a
    prediction is the same on every machine and device."""
    return torch.argsort(-scores, dim=-1, stable=True)[..., :k]


def frequency_ids(frequency: torch.Tensor, k: int) -> torch.Tensor:
    """[layers, k]: each layer's ``k`` most often chosen experts."""
    return topk_ids(frequency, k)


def transition_ids(transition: torch.Tensor, frequency: torch.Tensor, previous: torch.Tensor, k: int) -> torch.Tensor:
    """[tokens, k]: one layer's ``k`` likeliest experts per token, given the previous layer's
    chosen ids ``previous`` [tokens, k'] (negative: none). ``transition`` [n, n] and ``frequency``
    [n] are that layer's rows of the tables."""
    n = transition.shape[0]
    hot = torch.zeros(previous.shape[0], n, dtype=transition.dtype, device=transition.device)
    ids = previous.to(device=transition.device, dtype=torch.long)
    hot.scatter_(1, ids.clamp(min=0, max=n - 1), (ids >= 0).to(transition.dtype))
    return topk_ids(hot @ transition + TIE_BREAK * frequency, k)


def fit_tables(experts: torch.Tensor, n_experts: int) -> dict[str, torch.Tensor]:
    """The tables (module docstring) counted on training routes ``experts`` [tokens, layers, k]."""
    hot = torch.zeros(*experts.shape[:2], n_experts)
    hot.scatter_(2, experts.clamp(min=0).long(), (experts >= 0).float())
    transition = torch.zeros(experts.shape[1], n_experts, n_experts)
    for j in range(1, experts.shape[1]):
        transition[j] = hot[:, j - 1].T @ hot[:, j]
    return {"frequency": hot.sum(0).contiguous(), "transition": transition.contiguous(),
            "top_k": torch.tensor([experts.shape[2]], dtype=torch.int64)}


@dataclass(frozen=True)
class RouteTables:
    frequency: torch.Tensor   # [layers, experts] float32, on the model's device
    transition: torch.Tensor  # [layers, experts, experts]
    position: dict[int, int]  # model layer index -> MoE layer position (the tables' first dim)
    top_k: int

    @cached_property
    def popular(self) -> torch.Tensor:
        """[layers, k]: the frequency prior's prediction, the same every step (computed once)."""
        return frequency_ids(self.frequency, self.top_k)

    def predict_frequency(self, layer: int, tokens: int) -> torch.Tensor:
        return self.popular[self.position[layer]].unsqueeze(0).expand(tokens, -1)

    def predict_transition(self, layer: int, previous: torch.Tensor) -> torch.Tensor:
        j = self.position[layer]
        flat = previous.reshape(-1, previous.shape[-1])
        return transition_ids(self.transition[j], self.frequency[j], flat, self.top_k)


def load_tables(path: Path, layouts: dict[int, Any], device: torch.device, digest: str | None = None) -> RouteTables:
    """The tables in ``path``'s tables.safetensors, every shape and value checked (LoadError)."""
    t, file = read_tensors(path, FILE, digest)
    layers = sorted(layouts)
    experts = {lay.num_experts for lay in layouts.values()}
    if len(experts) != 1:
        raise LoadError(f"{file}: the trace predictors need every MoE layer to have as many experts")
    n = experts.pop()
    if sorted(t) != ["frequency", "top_k", "transition"]:
        raise LoadError(f"{file} holds {sorted(t)[:6]}, expected frequency, top_k and transition; "
                        "recompile the model")
    for name, shape in (("frequency", (len(layers), n)), ("transition", (len(layers), n, n))):
        value = t[name]
        if (value.dtype != torch.float32 or tuple(value.shape) != shape or not torch.isfinite(value).all()
                or (value < 0).any()):
            raise LoadError(f"{file}: {name} is {value.dtype} {tuple(value.shape)}, expected non-negative finite "
                            f"float32 counts {shape}; recompile the model")
    k = t["top_k"]
    if k.dtype != torch.int64 or k.shape != (1,) or not 0 < int(k) <= n:
        raise LoadError(f"{file}: top_k is {k.dtype} {k.tolist()[:4]}, expected one int64 in 1..{n}; "
                        "recompile the model")
    return RouteTables(t["frequency"].to(device), t["transition"].to(device),
                       {layer: i for i, layer in enumerate(layers)}, int(k))
