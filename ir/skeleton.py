"""The model skeleton: a transformers model whose parameters live on the meta device.

Buffers stay real (rotary ``inv_freq`` and friends are computed from the config in ``__init__``
and are not in checkpoints); parameters cost nothing until weights are assigned to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


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


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """A causal-LM for ``config`` with meta parameters and real buffers, in eval mode."""
    from transformers import AutoModelForCausalLM

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
