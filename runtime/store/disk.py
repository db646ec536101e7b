"""The disk tier: expert blobs left in ``experts.safetensors``, read into slots when asked.

``runtime.load(dir, host_memory=...)`` on a CPU device keeps no arena of every blob: the expert
slots are the host tier, and each miss or prefetch reads its blob from the file straight into a
slot, on the copy engine's worker (``cache/streams.py``), so reads overlap compute as copies do.
Loading reads the header and the small digest table only: its time does not grow with the model.

Every read is checked against the blob's BLAKE3 digest (``digest.blob_digest``, from
``expert_digests.safetensors``, listed and checked in the manifest) before the slot is handed to a compute; a blob that fails is a one-line
LoadError naming its layer, expert and file, raised where it was needed, and the cache forgets
that slot (``CacheModel._await``), so no later call computes with it. The file stays open for
the model's life: a file replaced by a rename while loaded is still the one read, and one
edited in place fails its check. Reads are direct (``O_DIRECT``, ``runtime/store/direct.py``):
compile makes every blob a whole number of 4 KiB blocks at a block-aligned offset and the slots
are block-aligned rows, so a blob goes from the disk into its slot with no page-cache copy; the
slot holds the bytes, the page cache should neither keep a second copy nor hide the next read's
cost. Where the filesystem refuses direct I/O (a warning says so) reads are buffered and the
file's pages dropped after each (``posix_fadvise``).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .direct import BLOCK, DIRECT_IO, drop_cached, open_read
from .digest import ALGORITHMS, blob_digest
from .host import DIGESTS, ExpertLayout, HostStore, blob_key, digests_key
from .manifest import LoadError
from .tensor_file import read_tensor_file

#: Reads in flight (the copy engine's workers on the disk tier): an NVMe drive reaches its bandwidth
#: only with several requests queued, and the checks (BLAKE3, which releases the GIL) of several
#: blobs run on as many cores. One of them takes demand reads only (``cache/streams.CopyEngine``).
READERS = 4
#: Bytes per positional read (a multiple of the 4 KiB block); a prefetch read of a larger blob
#: yields to demand reads between chunks. Measured on this project's CPU machine (Mixtral-shaped
#: 336 MiB experts, 25% host tier, docs/benchmarks.md): 8, 32 and 128 MiB chunks cost 5-20% of
#: decode speed against one read per blob (one large direct read keeps the drive's queue deep, a
#: chunk at a time does not), so every real expert size is read whole; only blobs past this split.
CHUNK = 512 * 2**20


def _close(file, fds: list[int]) -> None:
    file.close()
    for fd in fds:
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class DiskBlob:
    """One expert blob in the file: what the copy engine reads into a slot (``read_into``)."""

    store: "DiskStore"
    layer: int
    expert: int
    offset: int
    nbytes: int
    digest: bytes

    def read_into(self, dst: torch.Tensor, pause: Callable[[], None] | None = None) -> None:
        self.store.read_into(self, dst, pause)


@dataclass
class DiskStats:
    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # on the reading threads: time in the reads themselves, not the checks
    check_s: float = 0.0  # time in the digest checks
    direct: bool = False  # reads bypass the page cache (O_DIRECT)

    def to_json(self) -> dict[str, float | int | bool | None]:
        return {"reads": self.reads, "bytes_read": self.bytes_read, "read_s": self.read_s, "check_s": self.check_s,
                "direct": self.direct,
                "read_gbps": self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else None}


def load_digests(directory: Path, manifest: dict, layouts: dict[int, ExpertLayout],
                 verify: bool) -> tuple[dict[str, bytes], str]:
    """Each blob's digest from the digest table (checked against the manifest as read), and the
    algorithm its names say."""
    if DIGESTS not in manifest["files"]:
        raise LoadError(f"{directory} has no per-blob digests (compiled by an older ExpertFlow); recompile it "
                        "to stream experts from disk, or load it without host_memory")
    # the table and its header, no more: a layer's header entry is under 128 bytes
    size = sum(lay.num_experts for lay in layouts.values()) * 32 + 128 * len(layouts) + 4096
    tensors = read_tensor_file(directory, DIGESTS, size, manifest["files"][DIGESTS] if verify else None)
    file = directory / DIGESTS
    first = min(layouts)
    algorithm = next((a for a in ALGORITHMS if digests_key(first, a) in tensors), ALGORITHMS[0])
    out = {}
    for layer, lay in layouts.items():
        table = tensors.get(digests_key(layer, algorithm))
        if table is None or table.dtype != torch.uint8 or tuple(table.shape) != (lay.num_experts, 32):
            raise LoadError(f"{file}: {digests_key(layer, algorithm)} is not uint8 [{lay.num_experts}, 32]; "
                            "recompile the model")
        for e, row in enumerate(table.tolist()):
            out[blob_key(layer, e)] = bytes(row)
    return out, algorithm


class DiskStore:
    """The expert blobs of ``path``, read on demand (module docstring). ``digests`` None: reads
    are not checked (``runtime.load(verify=False)``)."""

    def __init__(self, path: Path, layouts: dict[int, ExpertLayout], digests: dict[str, bytes] | None,
                 algorithm: str = ALGORITHMS[0]):
        self.path, self.algorithm = path, algorithm
        self._file = open(path, "rb", buffering=0)
        self._direct = -1  # a second descriptor, O_DIRECT, when the filesystem and the file allow
        self._finalizer = weakref.finalize(self, _close, self._file, [self._direct])  # never leaks with the model
        try:
            spans, _, _ = HostStore.check_open(path, self._file, layouts)
            if DIRECT_IO and all(start % BLOCK == 0 and (end - start) % BLOCK == 0 for start, end in spans.values()):
                fd, direct = open_read(f"/proc/self/fd/{self._file.fileno()}")  # the file held, even if renamed
                if direct:
                    self._direct = fd
                    self._finalizer.detach()
                    self._finalizer = weakref.finalize(self, _close, self._file, [fd])
                else:
                    os.close(fd)
                    warnings.warn(f"{path}: this filesystem refuses direct I/O; experts are read through the page "
                                  "cache (each dropped after its read)", stacklevel=3)
        except BaseException:
            self.close()
            raise
        self.nbytes = sum(end - start for start, end in spans.values())
        self.stats = DiskStats(direct=self._direct >= 0)
        self._lock = threading.Lock()  # the stats: read on the worker, asked for on the caller
        self._blobs = {key: DiskBlob(self, int(key.split(".")[1]), int(key.split(".")[3]), start, end - start,
                                     digests[key] if digests is not None else b"")
                       for key, (start, end) in spans.items()}

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = DiskStats(direct=self.stats.direct)

    def blob(self, layer: int, expert: int) -> DiskBlob:
        return self._blobs[blob_key(layer, expert)]

    def read_into(self, blob: DiskBlob, dst: torch.Tensor, pause: Callable[[], None] | None = None) -> None:
        """Reads ``blob`` into the uint8 CPU tensor ``dst`` and checks it (LoadError if bad).
        ``pause`` (a prefetch's read): called between chunks of ``CHUNK`` bytes, it returns once
        no demand read is running, so a large prefetch gives the disk to a compute's miss."""
        view = memoryview(dst.numpy()).cast("B")[:blob.nbytes]
        direct = self._direct >= 0 and dst.data_ptr() % BLOCK == 0
        fd = self._direct if direct else self._file.fileno()
        elapsed, got = 0.0, 0
        while got < blob.nbytes:  # a positional read may return short: read the rest
            if pause is not None and got:
                pause()
            start = time.perf_counter()
            n = os.preadv(fd, [view[got:got + CHUNK]], blob.offset + got)
            elapsed += time.perf_counter() - start
            if n == 0 or (direct and n % BLOCK and got + n < blob.nbytes):  # a direct read ends short only at the end
                raise LoadError(f"{self.path}: layer {blob.layer} expert {blob.expert} ends after {got} of its "
                                f"{blob.nbytes} bytes (truncated); recompile the model")
            got += n
        if not direct:
            drop_cached(fd, blob.offset, blob.nbytes)
        checked = time.perf_counter()
        if blob.digest and blob_digest(view, self.algorithm) != blob.digest:
            raise LoadError(f"{self.path}: layer {blob.layer} expert {blob.expert} does not match its checksum "
                            "(edited or corrupted); recompile the model")
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += blob.nbytes
            self.stats.read_s += elapsed
            self.stats.check_s += time.perf_counter() - checked

    def close(self) -> None:
        self._blobs = {}
        self._finalizer()
