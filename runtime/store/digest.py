"""Digests: what a compiled directory's bytes are checked against, one rule for every reader.

Files (``manifest["files"]``) and expert blobs (``expert_digests.safetensors``) are hashed with
BLAKE3, a cryptographic hash (an edit made to collide is out of reach) at 2.3x sha256's speed on
one core here (3.7 against 1.6 GB/s) and on several cores for one large buffer (7.2 GB/s on two):
load hashes every file it reads, and the disk tier hashes every blob it reads, so the hash is a
large share of both. It releases the GIL. Where the ``blake3`` package is missing (an image
installed with ``--no-deps``) compile writes sha256 instead; a digest says which it is ("blake3:"
and 64 hex digits, or 64 hex digits for sha256) and is checked with its own algorithm.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from .errors import LoadError

try:
    import blake3
except ImportError:  # sha256 then: see the module docstring
    blake3 = None

#: The per-blob digest tables' algorithms, the preferred first (a table's names say which it holds).
ALGORITHMS = ("blake3", "sha256")
#: A file digest as the manifest writes it.
FORM = re.compile(r"(blake3:)?[0-9a-f]{64}")
CHUNK = 1 << 24


def algorithm() -> str:
    """What compile writes here: BLAKE3 where the package is installed, else sha256."""
    return "blake3" if blake3 is not None else "sha256"


def _need_blake3() -> None:
    if blake3 is None:
        raise LoadError("this model's digests are BLAKE3: install the blake3 package (pip install blake3) to load it")


class Hasher:
    """Incremental hashing by ``name`` ("blake3" or "sha256"); ``text()`` is the manifest's form."""

    def __init__(self, name: str):
        if name == "blake3":
            _need_blake3()
            self._h: Any = blake3.blake3(max_threads=blake3.blake3.AUTO)
        else:
            self._h = hashlib.sha256()
        self.name = name

    def update(self, data: Any) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def text(self) -> str:
        return ("blake3:" if self.name == "blake3" else "") + self._h.hexdigest()


def hasher_for(expected: str) -> Hasher:
    """A hasher of the algorithm ``expected`` (a manifest file digest) was made with."""
    return Hasher("blake3" if expected.startswith("blake3:") else "sha256")


def file_digest(path: Path, like: str | None = None) -> str:
    """``path``'s digest in the manifest's form: by the algorithm of ``like`` when given, else by
    the one compile writes here."""
    h = hasher_for(like) if like is not None else Hasher(algorithm())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.text()


def bytes_digest(data: Any, like: str) -> str:
    """The digest of ``data`` by the algorithm of ``like``, in the manifest's form."""
    h = hasher_for(like)
    h.update(data)
    return h.text()


def blob_digest(data: Any, name: str) -> bytes:
    """A blob's 32-byte digest by ``name`` (``ALGORITHMS``)."""
    h = Hasher(name)
    h.update(data)
    return h.digest()
