"""What a manifest's config and options compile to, derived again at load time.

A forger can recompute every checksum, so the loader trusts nothing it can derive: the graph
and the expert layouts are compiled again from the config (on a meta skeleton:
no weights, a fraction of a second for small models) and the artefact must agree with them.
Derivations are cached per process, keyed by everything they depend on.
"""

from __future__ import annotations

import json
import math
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from ...ir.serialize import graph_to_json
from ...ir.skeleton import build_skeleton
from ...passes.driver import Driver
from ...passes.options import CompileOptions
from ...passes.pipeline import compile_graph
from ...passes.trace import TraceFailure
from ..store.manifest import LoadError
from ..cache.policy import POLICIES
from ..store.host import ExpertLayout

# Bounds on a config from a stranger, checked before transformers builds anything from it (each
# costs time or memory at construction or in the derivation) and taken from what real models need:
MAX_LAYERS = 192  # the deepest MoE models have 94 decoder layers (Qwen3-235B), GLM-4.5 92; deriving
#                   one costs ~0.23 s per layer on a laptop CPU, so this is ~45 s at most
MAX_LABELS = 2**16  # num_labels builds an id2label dict; ImageNet-21k's 21,843 classes fit
MAX_INT = 2**31  # token ids, positions and sizes fit int32 (the longest contexts are ~10M tokens)
#: Sizes transformers divides by or allocates with (the skeleton's parameters are made on the CPU
#: before they move to meta): a positive integer when given, at most 4 to 16 times the largest in a
#: released model (vocabulary 262k: Gemma 3; hidden 16k and intermediate 53k: Llama 3.1 405B;
#: 512 experts: Qwen3-Next; 128 heads: DeepSeek-V3; head_dim 256).
SIZES = {"num_hidden_layers": MAX_LAYERS, "num_attention_heads": 2**10, "num_key_value_heads": 2**10,
         "hidden_size": 2**16, "vocab_size": 2**21, "intermediate_size": 2**18, "moe_intermediate_size": 2**18,
         "head_dim": 2**12, "num_experts_per_tok": 2**12, "num_local_experts": 2**13, "num_experts": 2**13,
         "n_routed_experts": 2**13}
MAX_BEAMS = 64
GENERATION_WIDTHS = ("num_beams", "num_return_sequences", "num_beam_groups", "num_assistant_tokens")
#: What building or deriving a config can raise from a bad number (0 heads, a 1e400 rope theta).
CONFIG_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError, ArithmeticError, RecursionError,
                 StrictDataclassError)  # transformers' configs are huggingface_hub strict dataclasses: a wrong type


@dataclass(frozen=True)
class Derived:
    graph: dict[str, Any]  # graph.json as this ExpertFlow, torch and transformers write it
    layouts: dict[int, ExpertLayout]
    driver: Driver  # over a meta skeleton: what a stored graph is validated against


def check_config(manifest: dict[str, Any], where: str) -> None:
    """The config's numbers before anything is built from them: every number finite and within
    int32, the sizes transformers divides by positive, labels and layers within what real models
    use, and as many decoder layers as the MoE layouts the directory lists can account for
    (every other layer dense, plus a dense prefix, as in Llama 4 and DeepSeek)."""
    from transformers import CONFIG_MAPPING

    config = manifest["config"]
    check_numbers(config, "config", where)
    cls = CONFIG_MAPPING[manifest["model_type"]] if manifest["model_type"] in CONFIG_MAPPING else None
    renamed = dict(getattr(cls, "attribute_map", None) or {})  # DBRX: n_layers is num_hidden_layers
    config = {**config, **{common: config[own] for common, own in renamed.items() if own in config}}
    for field, most in SIZES.items():
        if config.get(field) is not None and (type(config[field]) is not int or not 1 <= config[field] <= most):
            raise LoadError(f"{where}: config.{renamed.get(field, field)} is {config[field]!r}, expected an "
                            f"integer from 1 to {most}")
    id2label = config.get("id2label")
    labels = config.get("num_labels", len(id2label) if isinstance(id2label, (dict, list)) else 0)
    if type(labels) is not int or not 0 <= labels <= MAX_LABELS:
        raise LoadError(f"{where}: config.num_labels is {labels!r}, expected 0 to {MAX_LABELS}")
    layers, moe = config.get("num_hidden_layers"), manifest["layouts"]
    counted = getattr(cls, "num_hidden_layers", None)
    if layers is None and isinstance(counted, property):  # derived, not stored (longcat_flash: 2 * num_layers)
        try:
            layers = counted.fget(types.SimpleNamespace(**config))
        except CONFIG_ERRORS:
            layers = None
    if type(layers) is not int or not 0 < layers <= MAX_LAYERS:
        raise LoadError(f"{where}: config.num_hidden_layers is {layers!r}, expected 1 to {MAX_LAYERS}")
    if not len(moe) <= layers <= 2 * len(moe) + 8:
        raise LoadError(f"{where}: config.num_hidden_layers is {layers} for {len(moe)} MoE layer layouts; "
                        f"a model has 1 to 2 decoder layers per MoE layer (and up to 8 more); recompile the model")


_UNBOUNDED = {"inf": math.inf, "-inf": -math.inf}


def config_to_json(value: Any) -> Any:
    """A config dict for the manifest: an unbounded limit (GraniteMoeHybrid's ``time_step_limit``
    of ``(0.0, inf)``) as ``{"float": "inf"}``, since the manifest's JSON numbers are finite."""
    if isinstance(value, dict):
        return {k: config_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_to_json(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return {"float": "inf" if value > 0 else "-inf"}
    return value


def config_from_json(value: Any) -> Any:
    """:func:`config_to_json` undone (only ``inf`` and ``-inf`` are tagged; NaN never is)."""
    if isinstance(value, dict):
        if len(value) == 1 and value.get("float") in _UNBOUNDED:
            return _UNBOUNDED[value["float"]]
        return {k: config_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [config_from_json(v) for v in value]
    return value


def check_numbers(value: Any, name: str, where: str) -> None:
    """Every number in a JSON tree finite and within int32 (a LoadError naming the first that is not)."""
    stack = [(value, name)]
    while stack:
        value, name = stack.pop()
        if isinstance(value, dict):
            stack.extend((item, f"{name}.{key}") for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{name}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise LoadError(f"{where}: {name} is {value}; a config's numbers are finite")
        elif type(value) is int and abs(value) > MAX_INT:
            raise LoadError(f"{where}: {name} is {str(value)[:40]}, beyond what any model's config needs "
                            f"(|n| <= 2**31)")


def check_generation(fields: Any, where: str) -> None:
    """A generation config's numbers before transformers uses them: finite, within int32, and the
    ones that multiply generate's work (beams, returned sequences) within what real models ship
    (1 to 5 beams; translation models' most)."""
    if not isinstance(fields, dict):
        raise LoadError(f"{where} is not a JSON object; recompile the model")
    check_numbers(fields, "generation config", where)
    for field in GENERATION_WIDTHS:
        value = fields.get(field)
        if value is not None and (type(value) is not int or not 1 <= value <= MAX_BEAMS):
            raise LoadError(f"{where}: {field} is {value!r}, expected an integer from 1 to {MAX_BEAMS}")


def make_config(manifest: dict[str, Any], where: str) -> Any:
    """The transformers config the manifest describes, with its attention and experts functions:
    its numbers checked first (``check_config``), so a bad one is a LoadError, not a traceback or
    minutes of construction."""
    from transformers import AutoConfig

    check_config(manifest, where)
    fields = {k: config_from_json(v) for k, v in manifest["config"].items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(manifest["model_type"], **fields)
        config._attn_implementation = manifest["attn_implementation"]
        config._experts_implementation = manifest["experts_implementation"]
    except CONFIG_ERRORS as exc:
        raise LoadError(f"{where}: config does not make a {manifest['model_type']!r} config "
                        f"({str(exc).splitlines()[0][:200]}); recompile the model") from None
    layers = getattr(config, "num_hidden_layers", None)
    if type(layers) is not int or not 0 < layers <= MAX_LAYERS:
        raise LoadError(f"{where}: config.num_hidden_layers is {layers!r}, expected 1 to {MAX_LAYERS}")
    return config


def derive(manifest: dict[str, Any], config: Any, dtype: torch.dtype, where: str) -> Derived:
    """The graph and layouts the manifest's config and options compile to."""
    key = json.dumps([manifest["model_type"], manifest["config"], manifest.get("attn_implementation"),
                      manifest.get("experts_implementation"), manifest["dtype"], manifest["options"]], sort_keys=True)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        options = CompileOptions.from_json(manifest["options"]).known_policy(POLICIES)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{where}: options {manifest['options']!r} are not compile options ({exc})") from None
    try:
        skeleton = build_skeleton(config, dtype)
        gm, info = compile_graph(skeleton, options)
    except (TraceFailure, RuntimeError, *CONFIG_ERRORS) as exc:
        raise LoadError(f"{where}: its config does not compile ({str(exc).splitlines()[0][:300]}); "
                        "recompile the model") from None
    layouts = {layer: ExpertLayout.for_module(layer, path, skeleton.get_submodule(path.removeprefix("lm.")))
               for layer, path in sorted(info.experts.items())}
    _CACHE[key] = derived = Derived(graph_to_json(gm.graph), layouts,
                                    Driver(build_skeleton(config, dtype)))
    while len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return derived


_CACHE: OrderedDict[str, Derived] = OrderedDict()
