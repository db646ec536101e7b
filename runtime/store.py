"""Expert layout and the host store: every (layer, expert) as one contiguous blob of bytes.

The blob holds each expert-indexed tensor of the experts module (``gate_up_proj[e]``,
``down_proj[e]``, biases, ...) at a 64-byte-aligned offset, so one copy moves an expert and
a slot pool of shape (slots, blob_bytes) can be viewed as the module's 3-D parameters.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALIGN = 64
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


@dataclass(frozen=True)
class Part:
    name: str          # attribute of the experts module, e.g. "gate_up_proj"
    dtype: str         # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]  # per expert (the leading expert dim removed)
    offset: int        # bytes into the blob

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class ExpertLayout:
    """How one MoE layer's experts are packed; layers with equal ``signature`` share a slot pool."""

    layer: int
    module: str        # path of the experts module in the graph root
    num_experts: int
    parts: tuple[Part, ...]
    blob_bytes: int

    @property
    def signature(self) -> tuple:
        return tuple((p.name, p.dtype, p.shape, p.offset) for p in self.parts) + (self.blob_bytes,)

    @staticmethod
    def for_module(layer: int, path: str, module: torch.nn.Module) -> "ExpertLayout":
        num = module._parameters["down_proj"].shape[0]
        parts, offset = [], 0
        for name, param in module._parameters.items():
            if param is None or param.dim() == 0 or param.shape[0] != num:
                continue
            part = Part(name, str(param.dtype).removeprefix("torch."), tuple(param.shape[1:]), offset)
            parts.append(part)
            offset += -(-part.nbytes // ALIGN) * ALIGN
        return ExpertLayout(layer, path, num, tuple(parts), offset)

    def pack(self, tensors: dict[str, torch.Tensor], expert: int) -> torch.Tensor:
        blob = torch.zeros(self.blob_bytes, dtype=torch.uint8)
        for p in self.parts:
            src = tensors[p.name][expert].contiguous().view(-1).view(torch.uint8)
            blob[p.offset:p.offset + p.nbytes] = src
        return blob

    def views(self, pool: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part as a (slots, *shape) tensor over the pool's bytes, without a copy."""
        slots = pool.shape[0]
        return {p.name: pool[:, p.offset:p.offset + p.nbytes].view(p.torch_dtype).view(slots, *p.shape)
                for p in self.parts}

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "module": self.module, "num_experts": self.num_experts,
                "blob_bytes": self.blob_bytes,
                "parts": [{"name": p.name, "dtype": p.dtype, "shape": list(p.shape), "offset": p.offset}
                          for p in self.parts]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ExpertLayout":
        parts = tuple(Part(p["name"], p["dtype"], tuple(p["shape"]), p["offset"]) for p in d["parts"])
        return ExpertLayout(d["layer"], d["module"], d["num_experts"], parts, d["blob_bytes"])


def blob_key(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


class HostStore:
    """Expert blobs memory-mapped from a safetensors file; zero-copy uint8 views."""

    def __init__(self, path: Path, pin: bool = False):
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        header = json.loads(self._map[8:8 + header_len])
        base = 8 + header_len
        self.blobs: dict[str, torch.Tensor] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            blob = torch.frombuffer(self._map, dtype=torch.uint8, offset=base + start, count=end - start)
            self.blobs[key] = blob.pin_memory() if pin else blob

    def blob(self, layer: int, expert: int) -> torch.Tensor:
        return self.blobs[blob_key(layer, expert)]

    def close(self) -> None:
        self.blobs.clear()
