"""Writing a compiled directory: weights, experts, graph, manifest; atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ...ir.serialize import graph_to_json
from ...passes.trace import TraceInfo
from ...runtime.store.manifest import TEXT_FILES, digest_of
from ...runtime.store.direct import BLOCK
from ...runtime.store.digest import algorithm as digest_algorithm, blob_digest, file_digest
from ...runtime.store.host import DIGESTS, ExpertLayout, blob_key, digests_key

MANIFEST = "manifest.json"


def layouts_of(lm: nn.Module, info: TraceInfo) -> dict[int, ExpertLayout]:
    return {layer: ExpertLayout.for_module(layer, path, lm.get_submodule(path.removeprefix("lm.")))
            for layer, path in sorted(info.experts.items())}


def write_weights(weights: nn.Module | Iterable[tuple[Any, dict[str, torch.Tensor]]],
                  layouts: dict[int, ExpertLayout], out: Path, progress: Callable[[Any], Any]) -> None:
    """dense.safetensors (everything but experts), experts.safetensors (one blob per expert) and
    expert_digests.safetensors (each blob's BLAKE3 digest, per layer [experts, 32] uint8: what a read of
    one blob from disk is checked against, ``runtime/store/disk.py``).

    ``weights`` is a model or a stream of ``(group, state-dict tensors)`` pairs such as
    stream_load.WeightStream: each group is written as it arrives and then dropped, so only one
    decoder layer's tensors are in memory at a time. Tied weights are written under each name.
    """
    groups = [(None, dict(weights.state_dict()))] if isinstance(weights, nn.Module) else weights
    owner = {f"{lay.module.removeprefix('lm.')}.{p.name}": (lay, p.name) for lay in layouts.values() for p in lay.parts}
    sizes = {blob_key(lay.layer, e): lay.blob_bytes for lay in layouts.values() for e in range(lay.num_experts)}
    experts, dense = _BlobFile(out / "experts.safetensors", sizes), _DenseFile(out / "dense.safetensors")
    pending: dict[int, dict[str, torch.Tensor]] = {}  # an experts module's parts until all have come
    try:
        for _, tensors in progress(groups):
            # Emptied as written: a progress bar holding on to the last item holds nothing.
            for name in list(tensors):
                tensor = tensors.pop(name)
                if name not in owner:
                    dense.add(name, tensor)
                    continue
                layout, part = owner[name]
                parts = pending.setdefault(layout.layer, {})
                parts[part] = tensor.detach()
                if len(parts) == len(layout.parts):
                    for e in range(layout.num_experts):
                        experts.write(blob_key(layout.layer, e), layout.pack(parts, e))
                    del pending[layout.layer]
            del tensors
        if pending:
            raise ValueError(f"the experts of layers {sorted(pending)} arrived incomplete")
        dense.finish()
        experts.finish()
        _write_digests(experts.digests, experts.algorithm, layouts, out / DIGESTS)
    finally:
        dense.close()
        experts.close()


def _write_digests(digests: dict[str, bytes], algorithm: str, layouts: dict[int, ExpertLayout], path: Path) -> None:
    table = _DenseFile(path)
    try:
        for layer, lay in layouts.items():
            rows = [list(digests[blob_key(layer, e)]) for e in range(lay.num_experts)]
            table.add(digests_key(layer, algorithm), torch.tensor(rows, dtype=torch.uint8))
        table.finish()
    finally:
        table.close()


# safetensors' dtype names; the getattr ones are missing from some torch builds.
_ST_DTYPES = {getattr(torch, name): code for name, code in [
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2")] if hasattr(torch, name)}


def safetensors_header(entries: Iterable[tuple[str, str, list[int], int]]) -> bytes:
    """A safetensors file's leading bytes for ``(name, dtype, shape, nbytes)`` stored back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # data starts on a disk block (4 KiB), so every blob, a whole number of blocks, is block-aligned
    # in the file: the disk tier reads it with direct I/O (runtime/store/disk.py)
    raw += b" " * (-(8 + len(raw)) % BLOCK)
    return struct.pack("<Q", len(raw)) + raw


class _BlobFile:
    """experts.safetensors, blob by blob: every size is known from the layouts, so the header is
    written first and each blob goes straight to its place."""

    def __init__(self, path: Path, sizes: dict[str, int]):
        header = safetensors_header((key, "U8", [n], n) for key, n in sizes.items())
        self._place, offset = {}, len(header)
        for key, n in sizes.items():
            self._place[key] = (offset, n)
            offset += n
        self._missing = set(sizes)
        self.digests: dict[str, bytes] = {}  # key -> the digest of its blob, as written
        self.algorithm = digest_algorithm()
        self._file = open(path, "wb")
        self._file.write(header)
        self._file.truncate(offset)  # full size now: a blob written out of order leaves no short file

    def write(self, key: str, blob: torch.Tensor) -> None:
        start, n = self._place[key]
        if blob.dtype != torch.uint8 or blob.numel() != n:
            raise ValueError(f"{key}: expected {n} bytes, got {blob.numel()} of {blob.dtype}")
        data = blob.contiguous().numpy()
        self._file.seek(start)
        self._file.write(data)
        self.digests[key] = blob_digest(data, self.algorithm)
        self._missing.discard(key)

    def finish(self) -> None:
        if self._missing:
            raise ValueError(f"{len(self._missing)} expert blobs were never written, e.g. {min(self._missing)}")

    def close(self) -> None:
        self._file.close()


class _DenseFile:
    """dense.safetensors: shapes are known only as tensors arrive, so their bytes go to a spool
    file and the header goes in front at the end (one extra copy of the small, dense part)."""

    def __init__(self, path: Path):
        self._path, self._spool_path = path, path.with_name(path.name + ".spool")
        self._spool = open(self._spool_path, "w+b")
        self._entries: list[tuple[str, str, list[int], int]] = []
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"{name} arrived twice")
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: safetensors cannot store {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        self._spool.write(data)
        self._entries.append((name, _ST_DTYPES[tensor.dtype], list(tensor.shape), data.nbytes))
        self._names.add(name)

    def finish(self) -> None:
        self._spool.seek(0)
        with open(self._path, "wb") as f:
            f.write(safetensors_header(self._entries))
            shutil.copyfileobj(self._spool, f, 1 << 24)

    def close(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


class OutputExists(FileExistsError):
    """The output directory exists and replacing it was not asked for."""


def write_compiled(out_dir: Path, force: bool, build: Callable[[Path], dict[str, Any]],
                   finish: Callable[[Path], dict[str, Any]] | None = None,
                   check: Callable[[Path], Any] | None = None) -> Path:
    """Runs ``build(tmp)`` in a temporary sibling of ``out_dir`` and renames it into place.

    ``finish(tmp)``, if given, runs once the manifest is written (it may load the directory) and
    returns fields to add to it; the files it wrote are checksummed and the manifest rewritten.
    ``check(tmp)``, if given, runs last, on the finished directory (the loader's checks): what it
    raises fails the write.

    On any failure, Ctrl-C included, the temporary directory and any parent directories made
    for it are removed, and an existing ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir).resolve()
    made = _make_parents(out_dir.parent)
    try:  # the pid in the name lets a later compile tell a dead run's leftovers from a live one's
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary directory
        manifest = build(tmp)
        _seal(tmp, manifest)
        if finish is not None:
            manifest.update(finish(tmp))
            _seal(tmp, manifest)
        if check is not None:
            check(tmp)
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    return out_dir


def current_umask() -> int:
    """The process's umask (read by setting it, then restored): what ordinary files get."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _seal(tmp: Path, manifest: dict[str, Any]) -> None:
    """Checksums every file but the manifest, then writes the manifest with its own digest."""
    manifest.pop("digest", None)
    manifest["files"] = {p.relative_to(tmp).as_posix(): file_digest(p)
                         for p in sorted(tmp.rglob("*")) if p.is_file() and p.relative_to(tmp).as_posix() != MANIFEST}
    manifest["digest"] = digest_of(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def remove_stale(out_dir: Path) -> list[Path]:
    """Removes what compiles into ``out_dir`` left behind when they were killed (SIGKILL, a power
    cut): ``.NAME.partial-PID-*`` and ``.NAME.old-PID-*`` siblings whose process is gone."""
    out_dir = Path(out_dir).resolve()
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(partial|old)-(\d+)-[^/]+")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not entry.is_symlink() and entry.is_dir() and not _alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process: not ours to judge
    return True


def _make_parents(parent: Path) -> list[Path]:
    """Creates ``parent`` and its missing ancestors; returns those it made, deepest first."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for path in reversed(missing):
        path.mkdir()
    return missing


def _remove_empty(made: list[Path]) -> None:
    for path in made:
        try:
            path.rmdir()
        except OSError:
            return


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    if not os.path.lexists(out_dir):
        tmp.rename(out_dir)
        return
    if not force:
        raise OutputExists(out_dir)
    # Set the old directory aside before the new one moves in, so a failure at any point leaves
    # either the old or the new directory in place, never a half-deleted one.
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
    out_dir.rename(aside / out_dir.name)
    try:
        tmp.rename(out_dir)
    except BaseException:
        (aside / out_dir.name).rename(out_dir)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_text_files(source: Path, lm: nn.Module, out: Path) -> None:
    """The source's tokenizer files and chat template, and its generation config."""
    for name in TEXT_FILES:
        file = Path(source) / name
        if file.is_file():
            shutil.copyfile(file, out / name)
    generation = getattr(lm, "generation_config", None)
    if generation is not None:
        generation.to_json_file(out / "generation_config.json")


def graph_file(gm: fx.GraphModule, out: Path) -> None:
    (out / "graph.json").write_text(json.dumps(graph_to_json(gm.graph)))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
