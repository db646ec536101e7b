"""The host arena: every expert byte in one page-aligned buffer, read once, pinned once.

Pinning each expert blob separately goes through torch's caching host allocator, which rounds
every allocation up to a power of two: a 352,321,536-byte Mixtral-8x7B expert would take 512 MiB,
1.45x the weights. Instead the data section of ``experts.safetensors`` (the blobs, in file order)
is read into one anonymous page-aligned mapping of exactly its size, and on CUDA that mapping is
registered with the driver (``cudaHostRegister``): pinned bytes = expert bytes. The read is
sequential in large chunks and hashes the file as it goes, so the checksum costs no second read.

Before anything is allocated, the bytes needed are compared with the memory the host has
available; a host that cannot hold the experts gets a one-line LoadError naming both.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .digest import hasher_for
from .manifest import LoadError

CHUNK = 64 * 2**20  # bytes per read: large sequential reads, progress reported per chunk
#: What the host must keep free beside the arena (the process, the dense weights' own copies).
HEADROOM = 1.05


def available_host_bytes() -> int | None:
    """Bytes the host can still give (Linux ``MemAvailable``); None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Arena:
    """``data``: a uint8 tensor over the page-aligned mapping; ``pinned``: registered with CUDA."""

    data: torch.Tensor
    buffer: mmap.mmap
    pinned: bool = False
    head: bytes = b""  # the bytes before ``start``, as read and hashed: the caller checks they are what it parsed
    #: Unregisters the pinned mapping when the arena goes (``close`` or garbage): nothing else would,
    #: and the next load in the process, given the same address back, would fail to register it
    #: (CUDA error 712, already registered) while the old pages stayed pinned.
    unpin: Any = None

    def close(self) -> None:
        if self.unpin is not None:
            self.unpin()
        self.pinned = False


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def read_arena(path: Path, start: int, length: int, digest: str | None, pin: bool,
               progress: Callable[[int], None] | None = None) -> Arena:
    """Bytes ``start .. start + length`` of ``path`` in one arena; the whole file's digest must
    equal ``digest`` (when given; ``digest.py``). LoadError, with nothing left allocated, on any failure."""
    free = available_host_bytes()
    if free is not None and length * HEADROOM > free:
        raise LoadError(f"{path}: the experts need {_gib(length)} of host memory ({_gib(int(length * HEADROOM))} "
                        f"with headroom) and {_gib(free)} is available; free memory or use a larger host")
    buffer = mmap.mmap(-1, max(length, 1))  # anonymous: page-aligned, zero-filled lazily
    data = torch.frombuffer(buffer, dtype=torch.uint8, count=length) if length else torch.empty(0, dtype=torch.uint8)
    try:
        head = _fill(path, start, data, digest, progress)
        arena = Arena(data, buffer, head=head)
        if pin and length:
            err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), length, 0)
            if int(err) != 0:
                raise LoadError(f"{path}: could not pin {_gib(length)} of host memory for the experts (CUDA error "
                                f"{int(err)}); raise the locked-memory limit (ulimit -l) or use a smaller model")
            arena.pinned = True
            # holds the mapping until it is unregistered: a mapping unmapped first would stay registered
            arena.unpin = weakref.finalize(arena, _unregister, data.data_ptr(), buffer)
        return arena
    except BaseException:
        del data
        buffer.close()
        raise


def _unregister(pointer: int, buffer: mmap.mmap) -> None:
    # Copies from these pages may still be queued (a model dropped mid-prefetch, its engine not yet
    # closed): every device finishes its work before the pages stop being pinned.
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(pointer)


def _fill(path: Path, start: int, data: torch.Tensor, digest: str | None,
          progress: Callable[[int], None] | None) -> bytes:
    """Reads the file once in order: bytes before ``start`` are hashed and returned, the rest land in ``data``."""
    h = hasher_for(digest) if digest is not None else None
    view = memoryview(data.numpy()) if data.numel() else memoryview(bytearray())
    with open(path, "rb") as f:
        head = f.read(start)
        if h is not None:
            h.update(head)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:done + CHUNK])
            if not n:
                raise LoadError(f"{path} ended {len(view) - done} bytes early (truncated); recompile the model")
            if h is not None:
                h.update(view[done:done + n])
            done += n
            if progress is not None:
                progress(n)
        if f.read(1):
            raise LoadError(f"{path} has bytes after its last blob; recompile the model")
    if h is not None and h.text() != digest:
        raise LoadError(f"{path} does not match its checksum (edited or truncated); recompile the model")
    return head
