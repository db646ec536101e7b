"""runtime.load: a compiled directory in, a runnable CompiledModel out.

Checks before it trusts anything: the manifest's schema version, every file's sha256, the
device, the budget. Loads no code and unpickles nothing: weights are safetensors, the graph
is JSON whose targets resolve against an allowlist.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import fx

from ..ir.serialize import GraphFormatError, graph_from_json
from ..ir.skeleton import assign_weights, build_skeleton
from ..passes.trace import Driver
from .cache import ExpertCache
from .context import RuntimeContext
from .model import CompiledModel
from .store import ExpertLayout, HostStore
from .streams import CopyEngine

SCHEMA_VERSION = 1
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class LoadError(ValueError):
    """The compiled directory, device or budget is unusable; the message says what to do."""


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise LoadError(f"{path} is not a directory; pass the directory expertflow-compile wrote")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} has no manifest.json; it is not a compiled ExpertFlow directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}/manifest.json is unreadable ({exc}); recompile the model") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LoadError(f"{path} has schema version {version}, this ExpertFlow reads {SCHEMA_VERSION}; "
                        "recompile the model with this version")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise LoadError(f"{file} is missing; recompile the model")
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise LoadError(f"{file} does not match its checksum (edited or truncated); recompile the model")


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device='cuda' but no CUDA GPU is available to torch; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise LoadError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def parse_budget(budget: int | str | None, layouts: dict[int, ExpertLayout]) -> int:
    """Slots per pool: an int, a size like '4GiB', or None / 'all' for every expert resident."""
    per_pool: dict[tuple, int] = {}
    for lay in layouts.values():
        per_pool[lay.signature] = per_pool.get(lay.signature, 0) + lay.num_experts
    everything = max(per_pool.values())
    blob = max(lay.blob_bytes for lay in layouts.values())
    if budget is None or budget == "all":
        return everything
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise LoadError(f"expert_cache={budget!r}: give a slot count, a size like '4GiB', or 'all'")
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", budget)
        if not match or match.group(2).upper() not in _UNITS:
            raise LoadError(f"expert_cache={budget!r} is not a size; write e.g. '512MiB' or '4GiB'")
        nbytes = float(match.group(1)) * _UNITS[match.group(2).upper()]
        slots = int(nbytes // (blob * len(per_pool)))
    else:
        slots = budget
    if slots < 1:
        raise LoadError(f"expert_cache={budget!r} holds no expert: the minimum is 1 slot "
                        f"({blob * len(per_pool)} bytes); all resident is {everything} slots")
    return min(slots, everything)


def load(path: str | Path, device: str | torch.device = "cpu", expert_cache: int | str | None = None,
         verify: bool = True) -> CompiledModel:
    """Loads a compiled directory; ``expert_cache`` is slots, a size ('4GiB'), or None for all."""
    from transformers import AutoConfig

    path = Path(path)
    manifest = _read_manifest(path)
    dev = _device(device)
    if verify:
        _check_files(path, manifest)
    layouts = {d["layer"]: ExpertLayout.from_json(d) for d in manifest["layouts"]}
    slots = parse_budget(expert_cache, layouts)
    fields = {k: v for k, v in manifest["config"].items() if k != "model_type"}
    config = AutoConfig.for_model(manifest["model_type"], **fields)
    config._attn_implementation = manifest["attn_implementation"]
    config._experts_implementation = manifest["experts_implementation"]
    dtype = getattr(torch, manifest["dtype"])
    lm = build_skeleton(config, dtype)
    assign_weights(lm, load_file(str(path / "dense.safetensors"), device=str(dev)))
    for module in lm.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != dev and buf.device.type != "meta":
                module._buffers[name] = buf.to(dev)
    driver = Driver(lm)
    try:
        graph = graph_from_json(json.loads((path / "graph.json").read_text()), driver)
    except (GraphFormatError, KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}/graph.json is not a valid ExpertFlow graph ({exc}); recompile the model") from None
    gm = fx.GraphModule(driver, graph)
    store = HostStore(path / "experts.safetensors", pin=dev.type == "cuda")
    cache = ExpertCache(layouts, store, slots, dev, CopyEngine(dev))
    modules = {layer: driver.get_submodule(lay.module) for layer, lay in layouts.items()}
    context = RuntimeContext(cache, modules)
    return CompiledModel(gm, config, context, dev, dtype, manifest["mask_kinds"], manifest["generation"])
