"""manifest.json: what a compiled directory claims about itself, read as untrusted input.

A compiled directory may come from a stranger, so every byte is read defensively: files must be
regular files inside the directory (no symlinks, FIFOs or absolute paths), JSON files have a
size cap, the manifest carries a digest of its own (accidental edits are caught; a forger can
recompute it, which is why everything the digest covers is also checked for type and range, and
what can be derived from the config is compared with the derivation in ``runtime/assemble/loader.py``).
Every violation is a one-line :class:`LoadError` that names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .digest import FORM, bytes_digest, file_digest
from .errors import LoadError

SCHEMA_VERSION = 5  # 5: expert blobs a whole number of 4 KiB blocks, block-aligned in the file; 4: the graph is the model's own forward (no mask_kinds); 3: own digest, versions
#: The files every compiled directory has; each must carry a checksum in the manifest.
REQUIRED_FILES = ("graph.json", "dense.safetensors", "experts.safetensors")
#: What a model directory holds besides weights that turns text into ids and back, and says how to
#: generate: copied verbatim, so the compiled directory tokenizes and stops as the source does.
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
              "chat_template.jinja", "chat_template.json")
#: A tokenizer needs one of these (the others only configure it).
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
JSON_LIMIT = 256 * 2**20  # bytes: a JSON file above this is not one ExpertFlow wrote
#: A 256-expert, 61-layer model's manifest (DeepSeek-V3's layout list and config) is about 20 KiB;
#: json.loads costs some 25 times a file's size, so the cap bounds the parse before the digest check.
MANIFEST_LIMIT = 2**20
#: Files the loader reads whole and hashes as it reads them (``read_bytes``), so ``check_files``
#: leaves them out: a second read by path could see other bytes than the ones checked.
VERIFIED_AS_READ = ("dense.safetensors", "graph.json", "generation_config.json", "experts.safetensors")
_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def digest_of(manifest: dict[str, Any]) -> str:
    """The manifest's own digest: sha256 of its canonical JSON, the digest field left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def regular_file(directory: Path, name: str, what: str = "") -> Path:
    """``directory/name`` if ``name`` is a plain relative path to a regular file inside it."""
    label = what or name
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise LoadError(f"{directory}/manifest.json: {label}: file name {name!r} is not a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise LoadError(f"{directory}/manifest.json: {label}: {name!r} leaves the directory; recompile the model")
    path = directory.joinpath(*pure.parts)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise LoadError(f"{path} is missing; recompile the model") from None
    except OSError as exc:
        raise LoadError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
    if not stat.S_ISREG(mode):  # a symlink may point anywhere; a FIFO would hang the read
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise LoadError(f"{path} is {kind}; a compiled directory holds regular files only")
    parent = path.parent
    while parent != directory:  # a symlinked folder on the way leads out as well
        if parent.is_symlink():
            raise LoadError(f"{parent} is a symlink; a compiled directory holds regular files only")
        parent = parent.parent
    return path


def read_bytes(directory: Path, name: str, limit: int, digest: str | None = None, what: str = "") -> bytearray:
    """The bytes of ``directory/name``, read once: a regular file of at most ``limit`` bytes and, when
    ``digest`` is given, exactly the bytes whose digest it is (``digest.py``). The caller parses these bytes, never
    the path again, so a file changed after the check cannot be loaded unverified."""
    path = regular_file(directory, name, what)
    try:  # O_NOFOLLOW and fstat: a symlink or FIFO swapped in after regular_file's lstat is refused
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise LoadError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError(f"{path} is not a regular file; a compiled directory holds regular files only")
        if info.st_size > limit:
            raise LoadError(f"{path} is {info.st_size} bytes, more than the {limit} a real model needs; "
                            "it is not a file ExpertFlow wrote")
        data = bytearray(info.st_size)  # one buffer: dense weights become views of it, not copies
        try:
            done = f.readinto(data)
            changed = done != len(data) or f.read(1)
        except OSError as exc:
            raise LoadError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
    if changed:
        raise LoadError(f"{path} changed size while it was read; recompile the model")
    if digest is not None and bytes_digest(data, digest) != digest:
        raise LoadError(f"{path} does not match its checksum (edited or truncated); recompile the model")
    return data


def parse_json(data: bytes, path: Path | str) -> Any:
    """JSON bytes as a Python value; a one-line LoadError naming ``path`` if they are not JSON."""
    try:
        return json.loads(data, parse_float=_finite, parse_constant=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoadError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); recompile the model") from None
    except OverflowError as exc:
        raise LoadError(f"{path} holds {exc}; ExpertFlow writes finite numbers only") from None


def _finite(text: str) -> float:
    """A JSON number as a float; 1e400, NaN and Infinity (which json.loads accepts) are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise OverflowError(f"the non-finite number {text[:40]}")
    return value


def read_json(directory: Path, name: str, limit: int = JSON_LIMIT, digest: str | None = None) -> Any:
    """A JSON file inside ``directory``, size-capped and read once (checked against ``digest`` when
    given), as a Python value."""
    return parse_json(read_bytes(directory, name, limit, digest), directory / name)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory``: schema version, own digest, then every field's type."""
    if not directory.exists():
        raise LoadError(f"{directory} does not exist; pass the directory expertflow-compile wrote")
    if not directory.is_dir():
        raise LoadError(f"{directory} is not a directory; pass the directory expertflow-compile wrote")
    if not os.path.lexists(directory / "manifest.json"):
        raise LoadError(f"{directory} has no manifest.json; it is not a compiled ExpertFlow directory")
    manifest = read_json(directory, "manifest.json", MANIFEST_LIMIT)
    where = f"{directory}/manifest.json"
    if not isinstance(manifest, dict):
        raise LoadError(f"{where} is not an ExpertFlow manifest (not a JSON object); recompile the model")
    version = manifest.get("schema_version")
    if type(version) is not int:
        raise LoadError(f"{where}: schema_version {version!r} is not an integer; this ExpertFlow reads "
                        f"{SCHEMA_VERSION}: recompile the model")
    if version != SCHEMA_VERSION:
        raise LoadError(f"{directory} has schema version {version}, this ExpertFlow reads {SCHEMA_VERSION}; "
                        "recompile the model with this version")
    if manifest.get("digest") != digest_of(manifest):
        raise LoadError(f"{where} does not match its own digest (edited by hand?); recompile the model")
    check_fields(manifest, where)
    return manifest


def _need(manifest: dict[str, Any], field: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = manifest.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LoadError(f"{where}: {field} is {type(value).__name__} {str(value)[:40]!r}, expected {name}; "
                        "recompile the model")
    return value


def check_fields(m: dict[str, Any], where: str) -> None:
    """Types and ranges of every field the loader reads; the layouts are checked by ExpertLayout."""
    for field in ("model_type", "architecture", "dtype", "transformers", "torch", "expertflow"):
        _need(m, field, str, where)
    if m["dtype"] not in _DTYPES:
        raise LoadError(f"{where}: dtype {m['dtype']!r} is not one of {', '.join(_DTYPES)}")
    # None is transformers' default. A hub kernel's name would make transformers fetch and run code.
    attention, experts = m.get("attn_implementation"), m.get("experts_implementation")
    if attention is not None and attention not in _ATTENTION:
        raise LoadError(f"{where}: attn_implementation {attention!r} is not one of {', '.join(_ATTENTION)}")
    if experts is not None and not (isinstance(experts, str) and experts.isidentifier()):
        raise LoadError(f"{where}: experts_implementation {experts!r} is not a built-in name")
    config = _need(m, "config", dict, where)
    if "auto_map" in config:
        raise LoadError(f"{where}: config.auto_map names remote code, which ExpertFlow never loads")
    files = _need(m, "files", dict, where)
    for name, digest in files.items():
        if not isinstance(digest, str) or not FORM.fullmatch(digest):
            raise LoadError(f"{where}: files[{name!r}] is not a file digest (64 hex digits, or 'blake3:' and 64); "
                            "recompile the model")
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:  # a file without a checksum would be trusted unchecked
        raise LoadError(f"{where} has no checksum for {', '.join(missing)}; recompile the model")
    options = _need(m, "options", dict, where)
    for field, kind in (("lookahead", int), ("predictor", str)):
        _need(options, field, kind, f"{where}: options")
    layouts = _need(m, "layouts", list, where)
    if not layouts or not all(isinstance(d, dict) for d in layouts):
        raise LoadError(f"{where}: layouts must be a non-empty list of MoE layer layouts; recompile the model")


def check_files(directory: Path, manifest: dict[str, Any], only: tuple[str, ...] | None = None,
                skip: tuple[str, ...] = ()) -> None:
    """Every listed file (or those in ``only``, less ``skip``) is a regular file inside the
    directory with its digest. (The loader checks the experts while it reads them: ``skip``.)"""
    for name, expected in manifest["files"].items():
        if (only is not None and name not in only) or name in skip:
            continue
        path = regular_file(directory, name, f"files[{name!r}]")
        try:
            actual = file_digest(path, like=expected)
        except OSError as exc:
            raise LoadError(f"{path} is unreadable ({exc.strerror or exc}); check its permissions") from None
        if actual != expected:
            raise LoadError(f"{path} does not match its checksum (edited or truncated); recompile the model")


def memory_plan(layouts: dict[int, Any], dense_bytes: int) -> dict[str, Any]:
    """What the slots cost: written by compile, shown by inspect, checked against the layouts on load."""
    blob = max(lay.blob_bytes for lay in layouts.values())
    total = sum(lay.blob_bytes * lay.num_experts for lay in layouts.values())
    return {"dense_bytes": dense_bytes, "expert_blob_bytes": blob, "expert_bytes_total": total,
            "moe_layers": len(layouts), "experts_per_layer": max(lay.num_experts for lay in layouts.values()),
            "min_slots": 1, "all_resident_slots": sum(lay.num_experts for lay in layouts.values()),
            "pools": len({lay.signature for lay in layouts.values()})}


def is_compiled_directory(directory: Path) -> str | None:
    """None when ``directory`` holds an ExpertFlow manifest (schema and digest); else why not."""
    try:
        read_manifest(directory)
    except LoadError as exc:
        return str(exc)
    return None
