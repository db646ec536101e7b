"""What a manifest's config and options compile to, derived again at load time.

A forger can recompute every checksum, so the loader trusts nothing it can derive: the graph,
the expert layouts and the mask kinds are compiled again from the config (on a meta skeleton:
no weights, a fraction of a second for small models) and the artefact must agree with them.
Derivations are cached per process, keyed by everything they depend on.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..ir.serialize import graph_to_json
from ..ir.skeleton import build_skeleton
from ..passes.driver import Driver
from ..passes.options import CompileOptions
from ..passes.pipeline import compile_graph
from .manifest import LoadError
from .store import ExpertLayout

MAX_LAYERS = 4096  # a config asking for more builds no model ExpertFlow wrote


@dataclass(frozen=True)
class Derived:
    graph: dict[str, Any]  # graph.json as this ExpertFlow, torch and transformers write it
    layouts: dict[int, ExpertLayout]
    mask_kinds: tuple[str, ...]
    driver: Driver  # over a meta skeleton: what a stored graph is validated against


def make_config(manifest: dict[str, Any], where: str) -> Any:
    """The transformers config the manifest describes, with its attention and experts functions."""
    from transformers import AutoConfig

    fields = {k: v for k, v in manifest["config"].items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(manifest["model_type"], **fields)
        config._attn_implementation = manifest["attn_implementation"]
        config._experts_implementation = manifest["experts_implementation"]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{where}: config does not make a {manifest['model_type']!r} config "
                        f"({str(exc).splitlines()[0][:200]}); recompile the model") from None
    layers = getattr(config, "num_hidden_layers", None)
    if type(layers) is not int or not 0 < layers <= MAX_LAYERS:
        raise LoadError(f"{where}: config.num_hidden_layers is {layers!r}, expected 1 to {MAX_LAYERS}")
    return config


def derive(manifest: dict[str, Any], config: Any, dtype: torch.dtype, where: str) -> Derived:
    """The graph, layouts and mask kinds the manifest's config and options compile to."""
    key = json.dumps([manifest["model_type"], manifest["config"], manifest.get("attn_implementation"),
                      manifest.get("experts_implementation"), manifest["dtype"], manifest["options"]], sort_keys=True)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        options = CompileOptions(**manifest["options"])
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{where}: options {manifest['options']!r} are not compile options ({exc})") from None
    from ..passes.trace import TraceFailure

    try:
        skeleton = build_skeleton(config, dtype)
        gm, info = compile_graph(skeleton, options)
    except (TraceFailure, RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise LoadError(f"{where}: its config does not compile ({str(exc).splitlines()[0][:300]}); "
                        "recompile the model") from None
    layouts = {layer: ExpertLayout.for_module(layer, path, skeleton.get_submodule(path.removeprefix("lm.")))
               for layer, path in sorted(info.experts.items())}
    _CACHE[key] = derived = Derived(graph_to_json(gm.graph), layouts, tuple(info.mask_kinds),
                                    Driver(build_skeleton(config, dtype)))
    while len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return derived


_CACHE: OrderedDict[str, Derived] = OrderedDict()
