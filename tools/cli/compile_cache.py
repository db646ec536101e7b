"""expertflow-generate's compile cache: a model given by name or directory, compiled once.

An entry is ``CACHE_DIR/compiled/<name>-<hash>``: ``name`` is readable (a preset or hub id with
``/`` written ``--``, a directory's own base name), ``hash`` covers the source's files (names,
sizes, times), ExpertFlow's release and the manifest schema. Not transformers' release: a
directory compiled under another one loads (``runtime/assemble/loader.py`` derives its graph again from
the config), so one entry serves every supported transformers. ``--list-cache`` and
``--clean-cache`` show and remove entries; a compile killed part way leaves a partial directory
that the next compile of any entry removes (``artefact.remove_stale``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ..make.artefact import remove_stale
from ..shell import UserError
from ..make.source import check_source, resolve_model


def entries_dir(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / "compiled"


def compiled_path(model: str, cache_dir: Path, quiet: bool, needs_tokenizer: bool) -> Path:
    """``model`` itself when it is a compiled directory; else its entry under ``cache_dir``,
    compiled now if there is none for this source and ExpertFlow. A source ExpertFlow cannot
    compile (dense, no tokenizer when text is given) is refused from its config, before any work."""
    from ...passes.options import CompileOptions
    from .compile import compile_model

    path = Path(model).expanduser()
    if (path / "manifest.json").is_file():
        return path
    source = resolve_model(model)
    check_source(model, source, needs_tokenizer)
    out = entries_dir(cache_dir) / f"{entry_name(model, source)}-{fingerprint(model, source)}"
    for stale in _remove_stale(entries_dir(cache_dir)):
        if not quiet:
            print(f"removed {stale}, left by a compile that was killed", file=sys.stderr)
    refused = (out / "manifest.json").is_file() and _refused(out)
    if (out / "manifest.json").is_file() and not refused:
        return out
    if not quiet:
        print(f"recompiling {model} into {out}: the entry does not load with this installation ({refused})"
              if refused else f"compiling {model} once into {out}", file=sys.stderr)
    return compile_model(model, out, CompileOptions(), force=bool(refused), dumps=False, quiet=quiet)


def _refused(entry: Path) -> str:
    """Why the loader refuses a cached entry ('' if it does not): one compiled under another
    transformers may not load here (a renamed weight), and the cache is ours to rebuild. The
    checksums are skipped (our own files); what it derives is cached, so the load after is no slower."""
    from ...runtime.assemble.loader import check
    from ...runtime.store.manifest import LoadError

    try:
        check(entry, verify=False)
    except LoadError as exc:
        return str(exc).splitlines()[0]
    return ""


def entry_name(model: str, source: Path) -> str:
    """A readable, visible name: a directory's base name, else the id with ``/`` as ``--``."""
    path = Path(model).expanduser()
    name = source.resolve().name if path.exists() else model.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")[-64:] or "model"


def fingerprint(model: str, source: Path) -> str:
    """What the entry depends on: the source's files (names, sizes, times), ExpertFlow, the schema."""
    from ... import __version__
    from ...runtime.store.manifest import SCHEMA_VERSION

    digest = hashlib.sha256(json.dumps([model, str(source.resolve()), __version__, SCHEMA_VERSION]).encode())
    for file in sorted(source.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _remove_stale(root: Path) -> list[Path]:
    """What killed compiles left next to any entry (``.NAME.partial-PID-*``, ``.NAME.old-PID-*``)."""
    if not root.is_dir():
        return []
    names = {m.group(1) for p in root.iterdir() if (m := re.fullmatch(r"\.(.+)\.(?:partial|old)-\d+-.+", p.name))}
    return [stale for name in sorted(names) for stale in remove_stale(root / name)]


def list_entries(cache_dir: Path) -> list[dict[str, Any]]:
    """Each entry's path, size in bytes, source and creation time (from its manifest)."""
    from ...runtime.store.manifest import LoadError, read_manifest

    root = entries_dir(cache_dir)
    rows = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        try:
            manifest = read_manifest(path)
            source, created = manifest.get("source", "?"), manifest.get("created", "?")
        except LoadError:
            source, created = "(not a readable compiled directory)", "?"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        rows.append({"path": str(path), "bytes": size, "source": source, "created": created})
    return rows


def render_entries(rows: list[dict[str, Any]], cache_dir: Path) -> str:
    if not rows:
        return f"no compiled models in {entries_dir(cache_dir)}"
    lines = [f"{'size':>10}  {'created':20}  {'source':30}  path"]
    lines += [f"{r['bytes'] / 2**20:>6.1f} MiB  {r['created']:20}  {r['source']:30}  {r['path']}" for r in rows]
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{total / 2**20:>6.1f} MiB in {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}; "
                 "expertflow-generate --clean-cache removes them")
    return "\n".join(lines)


def clean(cache_dir: Path) -> list[Path]:
    """Removes every entry, and what killed compiles left; the paths removed."""
    root = entries_dir(cache_dir)
    if root.is_symlink():
        raise UserError(f"{root} is a symbolic link; remove what it points to yourself")
    removed = _remove_stale(root)
    for row in list_entries(cache_dir):
        shutil.rmtree(row["path"])
        removed.append(Path(row["path"]))
    return removed

