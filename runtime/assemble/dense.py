"""The dense weights of a compiled directory: read once, checked as read, and exactly the
skeleton's tensors (experts aside), names, shapes and dtypes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..store.host import ExpertLayout
from ..store.manifest import LoadError
from ..store.tensor_file import HEADER_LIMIT, read_tensor_file

DENSE = "dense.safetensors"


def read_dense(path: Path, lm: nn.Module, layouts: dict[int, ExpertLayout], dev: torch.device,
           digest: str | None) -> dict[str, torch.Tensor]:
    """dense.safetensors, whose tensors must be exactly the skeleton's (experts aside), shape and dtype:
    read once (no larger than those tensors and a header), checked against ``digest`` as read."""
    expected = expected_dense(lm, layouts)
    limit = sum(v.numel() * v.element_size() for v in expected.values()) + HEADER_LIMIT
    tensors = {k: v.to(dev) for k, v in read_tensor_file(path, DENSE, limit, digest).items()}
    check_dense(path / DENSE, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, expected)
    return tensors


def expected_dense(lm: nn.Module, layouts: dict[int, ExpertLayout]) -> dict[str, torch.Tensor]:
    experts = {f"{lay.module.removeprefix('lm.')}.{p.name}" for lay in layouts.values() for p in lay.parts}
    return {k: v for k, v in lm.state_dict().items() if k not in experts}


def check_dense(file: Path, found: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 expected: dict[str, torch.Tensor]) -> None:
    """The dense file's tensors (name -> dtype, shape) are exactly the skeleton's."""
    extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    if extra or missing:
        raise LoadError(f"{file} does not hold the model's dense weights (unexpected {extra[:3]}, missing "
                        f"{missing[:3]}); recompile the model")
    for name, (dtype, shape) in found.items():
        want = expected[name]
        if shape != tuple(want.shape) or dtype != want.dtype:
            raise LoadError(f"{file}: {name} is {dtype} {shape}, the model needs {want.dtype} "
                            f"{tuple(want.shape)}; recompile the model")
