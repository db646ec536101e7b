"""The device a model runs on, checked with torch alone: command lines check ``--device`` with
their arguments, before transformers is imported or anything is compiled."""

from __future__ import annotations

import torch

from .manifest import LoadError


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LoadError(f"device {device!r} is not a device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device='cuda' but no CUDA GPU is available to torch; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoadError(f"device {str(dev)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise LoadError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev
