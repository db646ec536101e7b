"""Expert layout and the host store: every (layer, expert) as one contiguous blob of bytes.

The blob holds each expert-indexed tensor of the experts module (``gate_up_proj[e]``,
``down_proj[e]``, biases, ...) at a 64-byte-aligned offset, so one copy moves an expert and
a slot pool of shape (slots, blob_bytes) can be viewed as the module's 3-D parameters.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Callable

import torch


from .arena import read_arena
from .direct import BLOCK
from .manifest import LoadError
from .tensor_file import read_tensor_file

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
        # a whole number of disk blocks: with the file's data section block-aligned too, every blob
        # can be read with direct I/O straight into a block-aligned slot (``runtime/store/disk.py``)
        return ExpertLayout(layer, path, num, tuple(parts), -(-offset // BLOCK) * BLOCK)

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
    def from_json(d: Any, label: str = "layout") -> "ExpertLayout":
        """A layout from untrusted JSON: ValueError naming the field for a wrong type or range, or
        parts that overlap or leave the blob."""
        if not isinstance(d, dict):
            raise ValueError(f"{label} is not an object")
        layer = _int(d, "layer", label, 0, 2**16)
        module = d.get("module")
        if not isinstance(module, str) or not _PATH.fullmatch(module):
            raise ValueError(f"{label}.module {module!r} is not a module path")
        num, blob_bytes = _int(d, "num_experts", label, 1, 2**20), _int(d, "blob_bytes", label, 1, 2**40)
        raw = d.get("parts")
        if not isinstance(raw, list) or not 0 < len(raw) <= 64:
            raise ValueError(f"{label}.parts must be a list of 1 to 64 parts")
        parts, end = [], 0
        for i, p in enumerate(raw):
            where = f"{label}.parts[{i}]"
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"].isidentifier():
                raise ValueError(f"{where}.name is not an identifier")
            if p.get("dtype") not in _PART_DTYPES:
                raise ValueError(f"{where}.dtype {p.get('dtype')!r} is not one of {', '.join(_PART_DTYPES)}")
            shape = p.get("shape")
            if not isinstance(shape, list) or not 0 < len(shape) <= 4 or \
                    not all(type(n) is int and 0 < n < 2**31 for n in shape):
                raise ValueError(f"{where}.shape {shape!r} is not a list of 1 to 4 positive sizes")
            part = Part(p["name"], p["dtype"], tuple(shape), _int(p, "offset", where, 0, 2**40))
            if part.offset % ALIGN or part.offset < end or part.offset + part.nbytes > blob_bytes:
                raise ValueError(f"{where} (bytes {part.offset}..{part.offset + part.nbytes}) overlaps another "
                                 f"part, is not {ALIGN}-byte aligned, or leaves the {blob_bytes}-byte blob")
            end = part.offset + part.nbytes
            parts.append(part)
        if len({p.name for p in parts}) != len(parts):
            raise ValueError(f"{label}.parts name a part twice")
        return ExpertLayout(layer, module, num, tuple(parts), blob_bytes)


_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_PART_DTYPES = ("float64", "float32", "float16", "bfloat16", "uint8", "int8", "int32", "int64")


def _int(d: dict[str, Any], field: str, label: str, low: int, high: int) -> int:
    value = d.get(field)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{label}.{field} is {value!r}, expected an integer from {low} to {high}")
    return value


def read_tensors(directory: Path, name: str, digest: str | None) -> tuple[dict[str, torch.Tensor], Path]:
    """A small safetensors file of the compiled directory, read once on the CPU and checked against
    ``digest`` as read (LoadError if bad)."""
    return read_tensor_file(directory, name, SMALL_FILE_LIMIT, digest), directory / name


SMALL_FILE_LIMIT = 2**32  # a predictor or table file: megabytes for a 61-layer, 256-expert model


def blob_key(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


#: Each expert blob's digest (``digest.blob_digest``), per MoE layer (``digests_key``): uint8 [experts, 32].
#: Written by compile; what a blob read from disk is checked against (``disk.py``).
DIGESTS = "expert_digests.safetensors"


def digests_key(layer: int, algorithm: str) -> str:
    return f"{algorithm}.layers.{layer}"  # the algorithm in the name: a table is never checked as another


class HostStore:
    """Expert blobs in one host arena (``runtime/store/arena.py``): uint8 views, pinned on CUDA.

    The header is checked against the layouts before anything is allocated: exactly one ``U8``
    blob of the layout's size per (layer, expert), each inside the file, none overlapping another,
    and no more than 5% of the data section outside the blobs. A violation raises LoadError
    naming the blob. ``digest``, when given, is the file's digest, checked during the one read.
    """

    HEADER_LIMIT = 64 * 2**20
    SLACK = 1.05  # data section over blob bytes: more is padding nobody should pay memory for

    def __init__(self, path: Path, layouts: dict[int, ExpertLayout], pin: bool = False,
                 digest: str | None = None, progress: Callable[[int], None] | None = None):
        spans, base, size = self.check(path, layouts)
        need = sum(end - start for start, end in spans.values())
        self.arena = read_arena(path, base, size - base, digest, pin, progress)
        if self._spans(path, io.BytesIO(self.arena.head), size, layouts)[0] != spans:
            self.arena.close()  # the header checked above is not the one hashed with the blobs
            raise LoadError(f"{path} changed while it was read; recompile the model")
        self.nbytes = need
        self.blobs: dict[str, torch.Tensor] = {key: self.arena.data[start - base:end - base]
                                               for key, (start, end) in spans.items()}

    @classmethod
    def check(cls, path: Path, layouts: dict[int, ExpertLayout]) -> tuple[dict[str, tuple[int, int]], int, int]:
        """The header's checks alone, nothing allocated (``runtime.loader.check``): each blob's
        (start, end) in the file, where the data section starts, and the file's size."""
        with open(path, "rb") as f:
            return cls.check_open(path, f, layouts)

    @classmethod
    def check_open(cls, path: Path, f: BinaryIO, layouts: dict[int, ExpertLayout]
                   ) -> tuple[dict[str, tuple[int, int]], int, int]:
        """``check`` on a file already open (the one that will be read: no second open to race)."""
        size = os.fstat(f.fileno()).st_size
        spans, base = cls._spans(path, f, size, layouts)
        need = sum(end - start for start, end in spans.values())
        if size - base > need * cls.SLACK:
            raise LoadError(f"{path}: its data section holds {size - base} bytes for {need} bytes of blobs; "
                            "recompile the model")
        return spans, base, size

    @classmethod
    def _spans(cls, path: Path, f: BinaryIO, size: int,
               layouts: dict[int, ExpertLayout]) -> tuple[dict[str, tuple[int, int]], int]:
        def bad(why: str) -> LoadError:
            return LoadError(f"{path}: {why}; recompile the model")

        if size < 8:
            raise bad("too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, cls.HEADER_LIMIT):
            raise bad(f"its header claims {header_len} bytes, more than the file holds")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise bad(f"its header is not JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        expected = {blob_key(l, e): lay.blob_bytes for l, lay in layouts.items() for e in range(lay.num_experts)}
        unknown = sorted(set(header) - set(expected) - {"__metadata__"})
        missing = sorted(set(expected) - set(header))
        if unknown or missing:
            raise bad(f"its blobs do not match the layouts (unexpected {unknown[:3]}, missing {missing[:3]})")
        base, spans = 8 + header_len, {}
        for key, nbytes in expected.items():
            info = header[key]
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(info, dict) and info.get("dtype") == "U8" and info.get("shape") == [nbytes]
                    and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes and base + offsets[1] <= size):
                raise bad(f"blob {key!r} is not {nbytes} bytes of U8 inside the file")
            spans[key] = (base + offsets[0], base + offsets[1])
        ordered = sorted(spans.items(), key=lambda kv: kv[1])
        for (a, (_, a_end)), (b, (b_start, _)) in zip(ordered, ordered[1:]):
            if b_start < a_end:
                raise bad(f"blobs {a!r} and {b!r} overlap")
        return spans, base

    def blob(self, layer: int, expert: int) -> torch.Tensor:
        return self.blobs[blob_key(layer, expert)]

    def close(self) -> None:
        self.blobs = {}
        self.arena.close()
