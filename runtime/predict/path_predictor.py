"""ExpertFlow's routing-path predictor: every MoE layer's experts for a token, from its embedding.

One forward pass of a small network (standardise, linear, GELU, linear) maps a token's embedding,
optionally with a context vector, to a score per (MoE layer, expert); each layer's top-k scores
are its predicted experts. The context is the previous position's input to the last MoE block
(what the sequence has said so far, as the model itself summarises it): in decode it is known
before the new token's first layer runs, because the previous step computed it
(``ops.path_context`` keeps it). Where it is not known (prefill, a new batch) the context is the
calibration mean, which the predictor was trained to expect (context dropout). The graph calls the
predictor once per step right after the embedding (``ops.predict_path``), so the copies for every
layer can start before the first layer computes. It is trained at compile time on calibration
traces (``tools/make/train_predictor.py``) and shipped as ``predictor.safetensors``: tensors only.
A second stage of the same form (``refiner.safetensors``, ``ops.refine_path``) runs once the
first MoE layer has: from [embedding, that layer's output] and the same context it scores the
later layers again, and their copies follow it (the first layer's follow the first stage). It
trades one layer of lead time for accuracy where the embedding says least: the deep layers. A
forged predictor can only make the cache load the wrong experts (slower), never change the
output: the router's true choice is what is computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..store.manifest import LoadError
from ..store.host import read_tensors

FILE = "predictor.safetensors"
#: The second stage (``ops.refine_path``): the same network on [embedding, first MoE layer's
#: output] with the same context, scoring the MoE layers after the first.
REFINER_FILE = "refiner.safetensors"
MAX_WIDTH = 1 << 14
_SHAPES = ("mean", "std", "w1", "b1", "w2", "b2", "top_k")


class PathPredictor(nn.Module):
    def __init__(self, hidden: int, width: int, layers: int, experts: int, top_k: int, context: int = 0):
        super().__init__()
        self.layers, self.experts, self.top_k, self.hidden = layers, experts, top_k, hidden
        self.context = context  # > 0: the input is [hidden, previous position's context of this size]
        inputs = hidden + context
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("std", torch.ones(inputs))
        self.inner = nn.Linear(inputs, width)
        self.outer = nn.Linear(width, layers * experts)

    def scores(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
               known: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [tokens, layers, experts] (logits of "the router picks this expert") for
        ``hidden`` [tokens, hidden]; ``context`` [tokens, hidden] counts where ``known`` [tokens]
        (bool; None: everywhere) is true; an unknown or absent context reads as its mean."""
        h = self.hidden
        x = (hidden.float() - self.mean[:h]) / self.std[:h]
        if self.context:
            if context is None:
                c = x.new_zeros(x.shape[0], self.context)
            else:
                c = (context.float() - self.mean[h:]) / self.std[h:]
                if known is not None:
                    c = c * known[:, None].to(c.dtype)
            x = torch.cat([x, c], -1)
        out = self.outer(nn.functional.gelu(self.inner(x)))
        return out.reshape(hidden.shape[0], self.layers, self.experts)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted expert ids [tokens, layers, top_k] for hidden [..., hidden] and, with a
        context predictor, the previous position's context for each token (None: unknown)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if context is not None:
            context = context.reshape(-1, context.shape[-1])
        return self.scores(flat, context).topk(self.top_k, dim=-1).indices

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "w1": self.inner.weight, "b1": self.inner.bias,
                "w2": self.outer.weight, "b2": self.outer.bias, "top_k": torch.tensor([self.top_k])}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], hidden: int, layers: int, experts: int, where: str,
                     context: int | None = None) -> "PathPredictor":
        """The predictor in ``t``, every shape and value checked against the model's (LoadError):
        ``hidden`` inputs, then no context or one of ``context`` values (default: ``hidden``)."""
        if sorted(t) != sorted(_SHAPES):
            raise LoadError(f"{where} holds {sorted(t)[:8]}, expected the tensors {', '.join(_SHAPES)}; "
                            "recompile the model")
        w1, k = t["w1"], t["top_k"]
        width = w1.shape[0] if w1.dim() == 2 else -1
        size = hidden if context is None else context
        context = size if w1.dim() == 2 and w1.shape[1] == hidden + size else 0  # [inputs, context]
        inputs = hidden + context
        expect = {"mean": (inputs,), "std": (inputs,), "w1": (width, inputs), "b1": (width,),
                  "w2": (layers * experts, width), "b2": (layers * experts,), "top_k": (1,)}
        for name, shape in expect.items():
            if tuple(t[name].shape) != shape or (name != "top_k" and t[name].dtype != torch.float32):
                raise LoadError(f"{where}: {name} is {t[name].dtype} {tuple(t[name].shape)}, expected float32 "
                                f"{shape} for {layers} MoE layers of {experts} experts; recompile the model")
        if not 0 < width <= MAX_WIDTH or k.dtype != torch.int64 or not 0 < int(k) <= experts:
            raise LoadError(f"{where}: width {width} or top_k {k.tolist()} out of range; recompile the model")
        if not all(torch.isfinite(v).all() for v in t.values()) or not (t["std"] > 0).all():
            raise LoadError(f"{where} holds non-finite values or a non-positive std; recompile the model")
        out = PathPredictor(hidden, width, layers, experts, int(k), context)
        with torch.no_grad():
            for name, value in out.tensors().items():
                if name != "top_k":
                    value.copy_(t[name])
        return out.eval()


def load_predictor(path: Path, hidden: int, layers: int, experts: int, device: torch.device,
                   digest: str | None = None) -> PathPredictor:
    tensors, file = read_tensors(path, FILE, digest)
    return PathPredictor.from_tensors(tensors, hidden, layers, experts, str(file)).to(device)


def load_refiner(path: Path, hidden: int, layers: int, experts: int, device: torch.device,
                 digest: str | None = None) -> PathPredictor:
    """The second stage: inputs [embedding, first MoE layer's output] (2 x ``hidden``), context of
    ``hidden``, scores for the ``layers`` - 1 MoE layers after the first."""
    tensors, file = read_tensors(path, REFINER_FILE, digest)
    return PathPredictor.from_tensors(tensors, 2 * hidden, layers - 1, experts, str(file), context=hidden).to(device)
