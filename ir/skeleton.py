"""The model skeleton: a transformers model whose parameters live on the meta device.

Buffers stay real (rotary ``inv_freq`` and friends are computed from the config in ``__init__``
and are not in checkpoints); parameters cost nothing until weights are assigned to them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .input_scaled import adapt_experts


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to the meta device as soon as it is made."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def text_model(config: Any) -> tuple[Any, dict[str, str] | None]:
    """The config to build the causal LM from, and how checkpoint keys rename into it.

    A multimodal checkpoint (Gemma 4's ``gemma4``: image and audio towers around an MoE language
    model) is what people download, and transformers' causal LM for it is the multimodal class.
    ExpertFlow compiles text: when the config has a vision or audio part and its text config has
    a causal LM of its own, that one is built, its weights read from where the multimodal model
    keeps its language model (``model.language_model.*`` -> ``model.*``, found by building both on
    meta rather than assumed). Otherwise ``config`` as given, no renaming.
    """
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config or not {"vision_config", "audio_config"} & set(getattr(config, "sub_configs", None) or {}):
        return config, None
    try:
        text_cls = AutoModelForCausalLM._model_mapping[type(text)]
        whole_cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:  # no text-only causal LM: the multimodal class, which the front end refuses
        return config, None
    if getattr(whole_cls, "config_class", None) is not type(config):
        return config, None  # transformers itself builds the text model (qwen3_5_moe): its own renamings
    with params_on_meta():
        whole, alone = whole_cls(config), text_cls(text)
    base = type(getattr(alone, alone.base_model_prefix))
    inside = [name for name, module in whole.named_modules() if type(module) is base]
    if len(inside) != 1:
        return config, None
    return text, {rf"^{re.escape(inside[0])}\.": f"{alone.base_model_prefix}."}


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """A causal-LM for ``config`` (its text model, for a multimodal config: :func:`text_model`)
    with meta parameters and real buffers, in eval mode; experts built outside transformers'
    experts interface are rewritten to it (``ir/input_scaled.py``: Llama 4)."""
    from transformers import AutoModelForCausalLM

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(text_model(config)[0], dtype=dtype)
    adapt_experts(model)
    return model.eval()


def assign_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Puts ``tensors`` (state-dict names) into ``model`` in place of its meta parameters."""
    for name, value in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, leaf)
        if isinstance(current, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a config asks for (``dtype`` or the older ``torch_dtype``), float32 by default."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(value, str):
        value = getattr(torch, value)
    return value
