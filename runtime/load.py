"""runtime.load: a compiled directory in, a runnable CompiledModel out.

Checks before it trusts anything: the manifest's schema version, every file's sha256, the
device, the budget. Loads no code and unpickles nothing: weights are safetensors, the graph
is JSON whose targets resolve against an allowlist.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
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
from .model import CompiledModel, model_class
from .store import ExpertLayout, HostStore
from .streams import CopyEngine

SCHEMA_VERSION = 2  # 2: logits_to_keep graph input, tokenizer and generation config files
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
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


def _check_files(path: Path, manifest: dict[str, Any], only: tuple[str, ...] | None = None) -> None:
    files = manifest.get("files")
    unlisted = [n for n in REQUIRED_FILES if not isinstance(files, dict) or n not in files]
    if unlisted:  # a file without a checksum would be trusted unchecked
        raise LoadError(f"{path}/manifest.json has no checksum for {', '.join(unlisted)}; recompile the model")
    for name, expected in files.items():
        if only is not None and name not in only:
            continue
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise LoadError(f"{path}/manifest.json lists {name!r}, which is outside the directory; recompile the model")
        file = path / name
        if not file.is_file():
            raise LoadError(f"{file} is missing; recompile the model")
        try:
            actual = sha256(file)
        except OSError as exc:
            raise LoadError(f"{file} is unreadable ({exc.strerror or exc}); check its permissions") from None
        if actual != expected:
            raise LoadError(f"{file} does not match its checksum (edited or truncated); recompile the model")


def check_device(device: str | torch.device) -> torch.device:
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


@dataclass(frozen=True)
class Budget:
    """An expert-cache request before it meets a model: so many slots, bytes, or percent of the
    experts; ``None`` everywhere is every expert resident."""

    slots: int | None = None
    nbytes: float | None = None
    percent: float | None = None


def check_budget(budget: int | str | None) -> Budget:
    """Reads ``expert_cache`` (an int of slots, a size like '4GiB', a fraction like '25%', None or
    'all'); LoadError for what no model could take, so a CLI can refuse it before compiling."""
    if budget is None or budget == "all":
        return Budget()
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise LoadError(f"expert_cache={budget!r}: give a slot count (int), a size like '4GiB', a fraction "
                        "like '25%', or 'all'")
    if isinstance(budget, int):
        if budget < 1:
            raise LoadError(f"expert_cache={budget!r} holds no expert: the minimum is 1 slot")
        return Budget(slots=budget)
    text = budget.strip()
    if re.fullmatch(r"[0-9]+", text):  # a size without a unit is too easily a slot count
        raise LoadError(f"expert_cache={budget!r} is a string of digits: pass the int {int(text)} for "
                        f"{int(text)} slots, or a size with its unit ('{text}MiB')")
    number = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    if percent := re.fullmatch(number + r"\s*%", text):
        share = float(percent.group(1))
        if not 0 < share <= 100:
            raise LoadError(f"expert_cache={budget!r}: a fraction must be above 0% and at most 100%")
        return Budget(percent=share)
    match = re.fullmatch(number + r"\s*([A-Za-z]*)", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise LoadError(f"expert_cache={budget!r} is not a size or a fraction; write e.g. '512MiB', '4GiB' or '25%'")
    return Budget(nbytes=float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_budget(budget: int | str | None, layouts: dict[int, ExpertLayout]) -> int:
    """Slots per pool for ``expert_cache`` (see :func:`check_budget`) on a model with ``layouts``."""
    request = check_budget(budget)
    per_pool: dict[tuple, int] = {}
    for lay in layouts.values():
        per_pool[lay.signature] = per_pool.get(lay.signature, 0) + lay.num_experts
    everything = max(per_pool.values())
    slot_bytes = max(lay.blob_bytes for lay in layouts.values()) * len(per_pool)
    if request.slots is not None:
        slots = request.slots
    elif request.percent is not None:
        slots = max(1, round(everything * request.percent / 100))
    elif request.nbytes is not None:
        slots = int(request.nbytes // slot_bytes)
    else:
        return everything
    if slots < 1:
        raise LoadError(f"expert_cache={budget!r} holds no expert: the minimum is 1 slot "
                        f"({slot_bytes} bytes); all resident is {everything} slots")
    return min(slots, everything)


def budget_argument(text: str) -> int | str:
    """A command line's ``--budget``: digits are a slot count, anything else goes to parse_budget."""
    return int(text) if text.strip().isdigit() else text


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
    dev = check_device(device)
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
    architecture = manifest.get("architecture")
    cls = model_class(architecture) if isinstance(architecture, str) else CompiledModel
    return cls(gm, config, context, manifest["mask_kinds"], _generation_config(path, config))


def _generation_config(path: Path, config: Any) -> Any:
    """The source model's generation config (eos ids, sampling defaults), as from_pretrained reads
    it; read as JSON from inside the directory (checksummed with the rest), never from a hub."""
    from transformers import GenerationConfig

    file = path / "generation_config.json"
    if not file.is_file():
        return GenerationConfig.from_model_config(config)
    try:
        fields = json.loads(file.read_text())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return GenerationConfig.from_dict(fields)
    except (OSError, ValueError, TypeError) as exc:
        raise LoadError(f"{file} is not a valid generation config ({_what(exc)}); recompile the model") from None


def load_tokenizer(path: str | Path) -> Any:
    """The source model's tokenizer (and chat template), from the compiled directory alone.

    Only the tokenizer files are checked against the manifest's checksums, so this is quick on a
    large model. No code from the directory runs (``trust_remote_code`` stays off) and nothing is
    fetched from a hub.
    """
    from transformers import AutoTokenizer

    from ..tools.artefact import TEXT_FILES

    path = Path(path)
    manifest = _read_manifest(path)
    present = tuple(n for n in TEXT_FILES if n in (manifest.get("files") or {}))
    if not any(n in present for n in ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")):
        raise LoadError(f"{path} has no tokenizer: its source model shipped none; tokenize with the source "
                        "model's tokenizer and pass input_ids")
    _check_files(path, manifest, present)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LoadError(f"{path}: the tokenizer files do not load ({_what(exc)}); recompile the model") from None
