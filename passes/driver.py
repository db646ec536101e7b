"""The generic decoder-stack forward traced in place of a model's own, and what it needs.

:class:`Driver` reproduces what transformers' causal LMs do around their decoder layers;
``passes/support.py`` refuses models whose own forward does anything else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ir.hf_compat import module_cache_keyword, parameters

#: The attention-mask kinds ExpertFlow builds (runtime/model.py makes each with transformers'
#: masking_utils). ``indexed_attention`` (DeepSeek sparse attention) is a causal mask that is
#: always materialised: its indexer reads it.
MASK_KINDS = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention",
              "deepseek_sparse_attention")  # the name transformers < 5.23 gives indexed_attention
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


def layer_mask_kinds(config: Any, layers_path: str | None = None, layers: Any = None) -> list[str]:
    """The attention-mask kind of each decoder layer, as transformers' models choose it.

    A layer type that is no attention mask kind (``linear_attention``, ``mamba``, ``conv``...)
    makes a hybrid model, which ExpertFlow does not compile: the failure names the first such
    layer when ``layers_path`` (and the ``layers`` themselves) are given.
    """
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted(set(types[:n]) - set(MASK_KINDS))
        if unknown:
            first = next(i for i, t in enumerate(types[:n]) if t in unknown)
            where, module = "", None
            if layers_path is not None:
                module = f"{layers_path}.{first}"
                kind = type(layers[first]).__name__ if layers is not None and first < len(layers) else "layer"
                where = f"decoder layer '{module}' ({kind}) is a {types[first]!r} layer: "
            raise TraceFailure(
                f"{where}config.layer_types has kinds {unknown}, which are not attention with a mask ExpertFlow "
                f"builds ({', '.join(MASK_KINDS)}). Hybrid models (Mamba, linear-attention, convolution and other "
                "layers that keep a recurrent state) and attention variants with masks of their own are out of "
                "scope", module)
        return list(types[:n])
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n



class Driver(nn.Module):
    """The generic decoder-stack forward that is traced in place of the model's own.

    It reproduces what transformers' causal LMs do around their decoder layers: embeddings (and
    ``embedding_multiplier``), rotary embeddings (one per layer type when the rotary module takes
    the layer type), one attention mask per layer type, the final norm, the output embeddings
    and the logit transforms kept outside the layers (``logits_scaling``, ``logit_scale``,
    ``final_logit_softcapping``). :func:`check_supported` refuses models whose own forward does
    anything else, so this forward never silently differs from theirs.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        inner = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        config = getattr(inner, "config", None) or lm.config  # a multimodal model's text config
        self.inner_path = _path_in(lm, inner)
        layers_path = f"lm.{self.inner_path}.layers" if self.inner_path else "lm.layers"
        self.num_layers = config.num_hidden_layers
        self.mask_kinds = layer_mask_kinds(config, layers_path, getattr(inner, "layers", None))
        self.embedding_multiplier = getattr(inner, "embedding_multiplier", None) or getattr(
            config, "embedding_multiplier", None)
        self.logits_scaling = getattr(config, "logits_scaling", None)
        scale = getattr(lm, "logit_scale", None)
        self.logit_scale = scale if isinstance(scale, (int, float)) else getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        layers = getattr(inner, "layers", None)
        # transformers 5.24 renamed the decoder layers' past_key_values to cache: ask the layer
        self.cache_keyword = module_cache_keyword(layers[0]) if layers else "past_key_values"
        rotary = getattr(inner, "rotary_emb", None)
        self.rotary_per_kind = rotary is not None and "layer_type" in parameters(type(rotary).forward)
        # A rotary embedding per layer type knows the types that have one (rope_type, keyed by type):
        # the others are NoPE layers (Ergo's full attention) and get None, as the model's forward gives.
        known = getattr(rotary, "rope_type", None)
        self.rope_kinds = [k for k in dict.fromkeys(self.mask_kinds) if not isinstance(known, dict) or k in known]

    def forward(self, input_ids, position_ids, cache, masks, logits_to_keep):
        """``logits_to_keep``: logits for the last N positions only (0: all), as transformers' causal
        LMs take it, so generation runs the head on the last position alone, as they do."""
        inner = self.lm.get_submodule(self.inner_path) if self.inner_path else self.lm
        hidden = inner.embed_tokens(input_ids)
        if self.embedding_multiplier not in (None, 1, 1.0):
            hidden = hidden * self.embedding_multiplier
        pos: Any = None
        if self.rotary_per_kind:
            pos = {kind: inner.rotary_emb(hidden, position_ids, kind) for kind in self.rope_kinds}
        elif hasattr(inner, "rotary_emb"):
            pos = inner.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(inner.layers[: self.num_layers]):
            kind = self.mask_kinds[i]
            out = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, use_cache=True,
                        position_embeddings=pos.get(kind) if self.rotary_per_kind else pos,
                        **{self.cache_keyword: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = inner.norm(hidden)
        logits = self.lm.get_output_embeddings()(hidden[:, -logits_to_keep:, :])
        if self.logits_scaling not in (None, 1, 1.0):
            logits = logits / self.logits_scaling
        if self.logit_scale not in (None, 1, 1.0):
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _path_in(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise TraceFailure(f"{type(target).__name__} is not a submodule of {type(root).__name__}")
