"""Direct reads: bytes from the storage device itself, past the page cache (``O_DIRECT``).

A buffered read of a file read before comes from the page cache at memory speed and leaves a
second copy of the bytes there; a direct read costs what the disk costs and keeps nothing. It
needs the file offset, the length and the buffer's address aligned to the device's block
(``BLOCK``, 4 KiB covers every common one). Filesystems that refuse it (tmpfs, some network
and FUSE ones) answer EINVAL at open: the caller then reads buffered, dropping the pages after.
"""

from __future__ import annotations

import mmap
import os

import torch

BLOCK = 4096
_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_IO = bool(_DIRECT)  # Linux; elsewhere every read is buffered
DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def open_read(path: str | os.PathLike[str], direct: bool = True) -> tuple[int, bool]:
    """A read-only descriptor of ``path``, direct where asked and the filesystem allows it;
    (fd, whether it is direct)."""
    if direct and _DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _DIRECT), True
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: no direct I/O here; anything else is a real error
                raise
    return os.open(path, os.O_RDONLY), False


def aligned(nbytes: int) -> mmap.mmap:
    """An anonymous, page-aligned buffer of ``nbytes`` rounded up to ``BLOCK`` (a direct read's target)."""
    return mmap.mmap(-1, max(BLOCK, -(-nbytes // BLOCK) * BLOCK))


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Asks the kernel to drop the file's cached pages (all of it for length 0): the next read
    of them comes from the disk."""
    if DONTNEED is not None:
        os.posix_fadvise(fd, offset, length, DONTNEED)


def aligned_rows(rows: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor [rows, nbytes] whose first byte is ``BLOCK``-aligned (torch aligns to 64):
    with ``nbytes`` a whole number of blocks, every row can be a direct read's target."""
    spare = torch.empty(rows * nbytes + BLOCK, dtype=torch.uint8)
    skip = -spare.data_ptr() % BLOCK
    return spare[skip:skip + rows * nbytes].view(rows, nbytes)
