"""Writing a compiled directory: weights, experts, graph, manifest; atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import fx, nn

from ..ir.serialize import graph_to_json
from ..passes.trace import TraceInfo
from ..runtime.store import ExpertLayout, blob_key

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layouts_of(lm: nn.Module, info: TraceInfo) -> dict[int, ExpertLayout]:
    return {layer: ExpertLayout.for_module(layer, path, lm.get_submodule(path.removeprefix("lm.")))
            for layer, path in sorted(info.experts.items())}


def write_weights(lm: nn.Module, layouts: dict[int, ExpertLayout], out: Path,
                  progress: Callable[[Any], Any]) -> None:
    """dense.safetensors (everything but experts) and experts.safetensors (one blob per expert)."""
    expert_names = {f"{lay.module.removeprefix('lm.')}.{p.name}" for lay in layouts.values() for p in lay.parts}
    dense, seen = {}, {}
    for name, tensor in lm.state_dict().items():
        if name in expert_names:
            continue
        ptr = tensor.data_ptr()
        dense[name] = tensor.clone() if ptr in seen else tensor.contiguous()  # tied weights: own copy
        seen[ptr] = name
    save_file(dense, str(out / "dense.safetensors"))
    blobs = {}
    for layout in progress(layouts.values()):
        module = lm.get_submodule(layout.module.removeprefix("lm."))
        tensors = {p.name: module._parameters[p.name].detach() for p in layout.parts}
        for e in range(layout.num_experts):
            blobs[blob_key(layout.layer, e)] = layout.pack(tensors, e)
    save_file(blobs, str(out / "experts.safetensors"))


def memory_plan(layouts: dict[int, ExpertLayout], dense_bytes: int) -> dict[str, Any]:
    blob = max(lay.blob_bytes for lay in layouts.values())
    total = sum(lay.blob_bytes * lay.num_experts for lay in layouts.values())
    return {"dense_bytes": dense_bytes, "expert_blob_bytes": blob, "expert_bytes_total": total,
            "moe_layers": len(layouts), "experts_per_layer": max(lay.num_experts for lay in layouts.values()),
            "min_slots": 1, "all_resident_slots": sum(lay.num_experts for lay in layouts.values()),
            "pools": len({lay.signature for lay in layouts.values()})}


def write_compiled(out_dir: Path, force: bool, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Runs ``build(tmp)`` in a temporary sibling of ``out_dir`` and renames it into place."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        manifest = build(tmp)
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256(p)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            if not force:
                raise FileExistsError(out_dir)
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def graph_file(gm: fx.GraphModule, out: Path) -> None:
    (out / "graph.json").write_text(json.dumps(graph_to_json(gm.graph)))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
