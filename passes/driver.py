"""The module traced in place of a causal LM: its own forward, called the way generation calls it.

:class:`Driver` owns nothing of the model's computation. Its forward calls the causal LM's own
forward (embeddings, masks, rotary and per-layer inputs, every decoder layer with whatever state it
threads, norms, head, logit transforms: transformers' code), with the KV and recurrent state in
the cache object transformers' generation passes, and returns the logits. The front end
(``passes/trace.py``) traces through it; only the experts calls are ExpertFlow's afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ir.hf_compat import cache_keyword_of, mask_cache_keyword, parameters

EXPERT_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")


class TraceFailure(RuntimeError):
    """A module could not be traced; the message names it (``module``: its path, once known)."""

    def __init__(self, message: str, module: str | None = None):
        super().__init__(message)
        self.module = module


def is_experts_module(module: nn.Module) -> bool:
    """True for modules built with transformers' ``use_experts_implementation`` interface."""
    if not all(hasattr(module, flag) for flag in EXPERT_FLAGS):
        return False
    down = module._parameters.get("down_proj")  # not getattr: fx patches Module.__getattr__ while tracing
    return isinstance(down, torch.Tensor) and down.dim() == 3


def not_moe_reason(lm: nn.Module) -> str | None:
    """Why ExpertFlow cannot run ``lm`` as a mixture of experts, or None when it can: no module uses
    transformers' experts interface (``ir/input_scaled.py`` has rewritten Llama 4's to it by now).
    A model whose stacked experts are built otherwise is named as such, not called dense."""
    if any(is_experts_module(m) for m in lm.modules()):
        return None
    stacked = next(((path, m) for path, m in lm.named_modules() if "Expert" in type(m).__name__
                    and any(p.dim() == 3 for p in m.parameters(recurse=False))), None)
    if stacked is not None:
        path, m = stacked
        return (f"{type(lm).__name__} has no MoE layer ExpertFlow can run: its experts ('{path}', "
                f"{type(m).__name__}) do not use transformers' experts interface (use_experts_implementation), "
                "which is how ExpertFlow finds and calls experts")
    return (f"{type(lm).__name__} has no MoE layer: no module uses transformers' experts interface "
            "(use_experts_implementation); ExpertFlow only compiles MoE models")


def logits_selector(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    """What the graph's ``logits_to_keep`` input receives: the index transformers' causal LMs build
    from it (``slice(-N, None)``; 0 keeps every position; a tensor lists positions). The graph is
    traced with a symbolic value, so the model's own ``isinstance(logits_to_keep, int)`` takes
    the index branch and this index is applied as given."""
    if isinstance(logits_to_keep, torch.Tensor):
        return logits_to_keep
    return slice(-logits_to_keep, None) if logits_to_keep else slice(None)


class Driver(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, cache, logits_to_keep) -> logits`` by the
    causal LM's own forward. ``attention_mask`` is the 2-D padding mask (the model builds its
    attention masks from it, as in generation); ``cache`` is transformers' cache object (its
    layers hold keys and values, recurrent and convolution states alike); ``logits_to_keep`` is
    :func:`logits_selector`'s index."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        inner = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
        if inner is lm and not hasattr(lm, "layers"):  # get_decoder's guess missed (Llama 4's prefix names no module)
            inner = getattr(lm, "model", lm)
        self.inner_path = _path_in(lm, inner)
        # transformers 5.24 renamed past_key_values to cache: ask the causal LM's own forward
        self.cache_keyword = cache_keyword_of(type(lm).forward) or mask_cache_keyword()
        self.logits_keyword = "logits_to_keep" if "logits_to_keep" in parameters(type(lm).forward) else None

    @property
    def layers_path(self) -> str:
        """Where the decoder layers are (``lm.model.layers``): an experts module's layer index."""
        return f"lm.{self.inner_path}.layers" if self.inner_path else "lm.layers"

    def forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep):
        kwargs: dict[str, Any] = {self.cache_keyword: cache}
        if self.logits_keyword:
            kwargs[self.logits_keyword] = logits_to_keep
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, return_dict=True, **kwargs)
        logits = out.logits
        return logits if self.logits_keyword else logits[:, logits_to_keep]


def _path_in(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise TraceFailure(f"{type(target).__name__} is not a submodule of {type(root).__name__}")
