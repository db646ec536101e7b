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
from ..passes.driver import Driver
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


#: The files every compiled directory has; each must carry a checksum in the manifest.
REQUIRED_FILES = ("graph.json", "dense.safetensors", "experts.safetensors")


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise LoadError(f"{path} does not exist; pass the directory expertflow-compile wrote")
    if not path.is_dir():
        raise LoadError(f"{path} is not a directory; pass the directory expertflow-compile wrote")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} has no manifest.json; it is not a compiled ExpertFlow directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}/manifest.json is unreadable ({exc}); recompile the model") from None
    if not isinstance(manifest, dict):
        raise LoadError(f"{path}/manifest.json is not an ExpertFlow manifest; recompile the model")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LoadError(f"{path} has schema version {version}, this ExpertFlow reads {SCHEMA_VERSION}; "
                        "recompile the model with this version")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    unlisted = [n for n in REQUIRED_FILES if not isinstance(files, dict) or n not in files]
    if unlisted:  # a file without a checksum would be trusted unchecked
        raise LoadError(f"{path}/manifest.json has no checksum for {', '.join(unlisted)}; recompile the model")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise LoadError(f"{file} is missing; recompile the model")
        try:
            actual = sha256(file)
        except OSError as exc:
            raise LoadError(f"{file} is unreadable ({exc.strerror or exc}); check its permissions") from None
        if actual != expected:
            raise LoadError(f"{file} does not match its checksum (edited or truncated); recompile the model")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LoadError(f"device {device!r} is not a device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device='cuda' but no CUDA GPU is available to torch; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoadError(f"device {str(dev)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
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
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", budget)
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


def _what(exc: Exception) -> str:
    return f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc).split("\n")[0]


def _layouts(path: Path, manifest: dict[str, Any]) -> dict[int, ExpertLayout]:
    try:
        layouts = {d["layer"]: ExpertLayout.from_json(d) for d in manifest["layouts"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}/manifest.json has malformed layouts ({_what(exc)}); recompile the model") from None
    if not layouts:
        raise LoadError(f"{path}/manifest.json lists no MoE layer; recompile the model")
    return layouts


def _drop_prefetch(gm: fx.GraphModule) -> None:
    """With every expert resident nothing needs predicting: waits lose their handles and the
    predictor and prefetch nodes become dead code."""
    from ..ir import ops
    from ..passes.dce import dce

    for node in gm.graph.nodes:
        if node.target is ops.wait:
            node.update_arg(2, None)
    for node in [n for n in gm.graph.nodes if n.target is ops.prefetch]:
        gm.graph.erase_node(node)
    dce(gm)
    gm.recompile()


def load(path: str | Path, device: str | torch.device = "cpu", expert_cache: int | str | None = None,
         verify: bool = True, preload: bool | None = None) -> CompiledModel:
    """Loads a compiled directory; ``expert_cache`` is slots, a size ('4GiB'), or None for all.

    ``preload`` copies experts into the slots now (default: only when all of them fit), so the
    first steps do not pay for cold misses; bytes moved then are counted in ``stats()``.
    """
    from transformers import AutoConfig

    path = Path(path)
    manifest = _read_manifest(path)
    dev = _device(device)
    layouts = _layouts(path, manifest)
    slots = parse_budget(expert_cache, layouts)  # before the checksums: a bad budget fails at once
    if verify:
        _check_files(path, manifest)
    try:  # the manifest has no checksum of its own: a hand edit shows up here
        fields = {k: v for k, v in manifest["config"].items() if k != "model_type"}
        config = AutoConfig.for_model(manifest["model_type"], **fields)
        config._attn_implementation = manifest["attn_implementation"]
        config._experts_implementation = manifest["experts_implementation"]
        dtype = getattr(torch, manifest["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {manifest['dtype']!r}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}/manifest.json is malformed ({_what(exc)}); recompile the model") from None
    lm = build_skeleton(config, dtype)
    assign_weights(lm, load_file(str(path / "dense.safetensors"), device=str(dev)))
    for module in lm.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != dev and buf.device.type != "meta":
                module._buffers[name] = buf.to(dev)
    driver = Driver(lm)
    try:
        graph = graph_from_json(json.loads((path / "graph.json").read_text()), driver)
    except (GraphFormatError, AttributeError, KeyError, OSError, TypeError, ValueError) as exc:
        raise LoadError(f"{path}/graph.json is not a valid ExpertFlow graph ({_what(exc)}); "
                        "recompile the model") from None
    gm = fx.GraphModule(driver, graph)
    everything = slots == parse_budget(None, layouts)
    if everything:
        _drop_prefetch(gm)
    store = HostStore(path / "experts.safetensors", pin=dev.type == "cuda")
    cache = ExpertCache(layouts, store, slots, dev, CopyEngine(dev))
    if preload or (preload is None and everything):
        cache.preload()
    modules = {layer: driver.get_submodule(lay.module) for layer, lay in layouts.items()}
    context = RuntimeContext(cache, modules)
    return CompiledModel(gm, config, context, dev, dtype, manifest["mask_kinds"], manifest["generation"])
