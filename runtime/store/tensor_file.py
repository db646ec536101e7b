"""A safetensors file of a compiled directory, read once and verified as read.

``safetensors.torch.load_file`` opens the file by path; the loader used to hash the file first
and open it again, so a file changed in between loaded unverified. Here the file's bytes are read
once into one buffer (``manifest.read_bytes``: size cap and sha256 of exactly those bytes), the
header is checked (every tensor inside the data section, no two overlapping, sizes adding up),
and the tensors are views of that buffer: no second read and no copy on the CPU.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .manifest import LoadError, read_bytes, regular_file

#: safetensors' dtype names (the ones a dense checkpoint of a float model holds).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on a header


def read_header(directory: Path, name: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Only the header of ``directory/name``, checked as :func:`read_tensor_file` checks it: what
    a check of the file's names, dtypes and shapes needs without reading its tensors (compile's
    check of what it wrote; ``runtime.loader.check``)."""
    path = regular_file(directory, name)
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            head = bytearray(f.read(8))
            if len(head) == 8:
                head += f.read(min(struct.unpack("<Q", head)[0], max(total - 8, 0), HEADER_LIMIT))
    except OSError as exc:
        raise LoadError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
    return _entries(head, total, path)


def _entries(data: bytes | bytearray, total: int, path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """The header at the start of ``data`` (of a file of ``total`` bytes): name -> (dtype, shape,
    start, end), offsets from the file's start; every tensor inside the file, none overlapping."""
    def bad(why: str) -> LoadError:
        return LoadError(f"{path} is not a valid safetensors file ({why}); recompile the model")

    if len(data) < 8:
        raise bad("too short for a header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(total - 8, HEADER_LIMIT):
        raise bad(f"its header claims {size} bytes, more than the file holds")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(f"its header is not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    base, spans, entries = 8 + size, [], {}
    for key, info in header.items():
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) \
            if isinstance(info, dict) else (None, None, None)
        if dtype not in DTYPES or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) \
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {key[:80]!r} has no valid dtype, shape and data_offsets")
        numel = 1
        for n in shape:
            numel *= n
        start, end = offsets
        if not 0 <= start <= end <= total - base or end - start != numel * DTYPES[dtype].itemsize:
            raise bad(f"tensor {key[:80]!r} does not fit its bytes inside the file")
        spans.append((start, end, key))
        entries[key] = (DTYPES[dtype], shape, base + start, base + end)
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise bad(f"tensors {a[:80]!r} and {b[:80]!r} overlap")
    return entries


def read_tensor_file(directory: Path, name: str, limit: int, digest: str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/name`` (at most ``limit`` bytes), as views of its one read."""
    data = read_bytes(directory, name, limit, digest)
    entries = _entries(data, len(data), directory / name)
    buffer = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for key, (dtype, shape, start, end) in entries.items():
        raw = buffer[start:end]
        if start % dtype.itemsize:
            raw = raw.clone()  # a misaligned tensor cannot be viewed as its dtype in place
        tensors[key] = raw.view(dtype).view(shape)
    return tensors
