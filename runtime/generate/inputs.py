"""Checks on what callers hand a compiled model: one line naming the argument and what it expects.

transformers' own errors for a string, a list or a 1-D tensor of ids come from deep inside the
forward (``'str' object has no attribute 'to'``, ``not enough values to unpack``); an id outside
the vocabulary is an index error in the embedding, or silent garbage on a GPU. These checks run
first, at the API boundary.
"""

from __future__ import annotations

from typing import Any

import torch

_TOKENIZE = "tokenize text first: tokenizer(text, return_tensors='pt').input_ids"


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs the host nothing (no wait for a device)."""
    return t.device.type == "cpu"


def check_input_ids(ids: Any, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """``ids`` if it is a 2-D integer tensor of token ids inside the vocabulary; else ValueError."""
    if isinstance(ids, str):
        raise ValueError(f"{name} is a string; it must be a 2-D tensor of token ids (batch, sequence): {_TOKENIZE}")
    if isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} is a {type(ids).__name__}; it must be a 2-D torch tensor of token ids "
                         f"(batch, sequence): torch.tensor([[...]]) or {_TOKENIZE}")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} is a {type(ids).__name__}; it must be a 2-D torch tensor of token ids "
                         "(batch, sequence)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {ids.dtype}; token ids are integers (torch.long)")
    if ids.dim() != 2:
        hint = "; add the batch dimension: ids[None]" if ids.dim() == 1 else ""
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; it must be 2-D (batch, sequence){hint}")
    if ids.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; it needs at least one token per sequence")
    low, high = torch.aminmax(ids)
    if not on_host(ids):
        # On a device, reading the range back would stall the host at every step; a device-side
        # assertion checks it where the ids are (a wrong id would fail in the embedding anyway).
        torch._assert_async((low >= 0) & (high < vocab_size),
                            f"{name} holds a token id outside this model's vocabulary [0, {vocab_size})")
        return ids
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside this model's vocabulary [0, {vocab_size}); "
                         "was it made by another model's tokenizer?")
    return ids


def check_attention_mask(mask: Any, batch: int, length: int) -> torch.Tensor | None:
    """``mask`` if it is None or a (batch, length) tensor of 0/1; else ValueError. ``length``
    counts the cached tokens and the new ones, as transformers' 2-D masks do."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask is a {type(mask).__name__}; it must be a torch tensor of 0 and 1 "
                         f"shaped ({batch}, {length}) like the tokenizer's attention_mask")
    if mask.dim() == 4:  # an already expanded mask, as some callers pass: transformers checks it
        return mask
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; it must be ({batch}, {length}): one entry "
                         "per sequence and per token, cached tokens included")
    return mask


def check_position_ids(position_ids: Any, batch: int, seq: int) -> torch.Tensor | None:
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 \
            or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids is {shape}; it must be a tensor shaped ({batch}, {seq}) or (1, {seq})")
    return position_ids
