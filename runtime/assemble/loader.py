"""runtime.load: a compiled directory in, a runnable CompiledModel out.

The directory may come from a stranger (ARCHITECTURE.md, threat model). In order: the manifest
(a regular file: schema version, its own digest, field types), the device and budget, every
file's sha256, the config, then what can be derived from the config (the graph, the expert
layouts: ``runtime/assemble/derive.py``) against what the directory claims, the dense
weights against the skeleton's names, shapes and dtypes, and the experts file's header against
the layouts. Nothing is unpickled and no code from the directory runs: the graph that runs is the
derived one (``graph.json`` must equal it, or be from another ExpertFlow, torch or transformers
release), weights are safetensors, the rest is JSON. :func:`check` is all of these checks, the
same code ``load`` runs, without reading the weights: expertflow-compile runs it on what it wrote,
so a directory that compiles loads.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import fx

from ... import __version__
from ...ir import meta_keys, ops
from ...ir.hf_compat import cache_maker
from ...ir.serialize import GraphFormatError, graph_from_json
from ...ir.skeleton import assign_weights, build_skeleton
from ...passes.driver import Driver
from ..store.budget import Budget, all_slots
from ..cache.expert_cache import ExpertCache
from ..generate.context import RuntimeContext
from .dense import DENSE, check_dense, expected_dense, read_dense
from .memory import auto_slots, check_top_k, host_tier
from .derive import CONFIG_ERRORS, Derived, check_generation, derive, make_config
from ..store.device import check_device
from ..store.manifest import (VERIFIED_AS_READ, LoadError, check_files, memory_plan, read_json, read_manifest,
                       regular_file)
from ..store.tensor_file import read_header
from ..generate.model import CompiledModel, model_class
from ..store.disk import READERS, DiskStore, load_digests
from ..store.host import ExpertLayout, HostStore
from ...passes.drop_prefetch import drop_prefetch
from ...passes.options import CompileOptions
from ..predict.path_predictor import FILE as PREDICTOR_FILE
from ..predict.attach import attach_predictors
from ..predict.route_tables import FILE as TABLES_FILE
from ..cache.policy import POLICIES, make_policy
from ..predict.prior import load_prior
from ..observe.routing import RoutingTrace
from ..cache.streams import CopyEngine
from ..observe.timeline import Timeline

EXPERTS = "experts.safetensors"
GENERATION_CONFIG_LIMIT = 2**20  # bytes: real ones are under 2 KiB


def _layouts(manifest: dict[str, Any], where: str) -> dict[int, ExpertLayout]:
    layouts: dict[int, ExpertLayout] = {}
    for i, raw in enumerate(manifest["layouts"]):
        try:
            layout = ExpertLayout.from_json(raw, f"layouts[{i}]")
        except ValueError as exc:
            raise LoadError(f"{where}: {exc}; recompile the model") from None
        if layout.layer in layouts:
            raise LoadError(f"{where}: layouts[{i}] repeats layer {layout.layer}; recompile the model")
        layouts[layout.layer] = layout
    return layouts


def _check_derived(path: Path, manifest: dict[str, Any], layouts: dict[int, ExpertLayout], derived: Derived) -> None:
    where = f"{path}/manifest.json"
    if layouts != derived.layouts:
        layer = next((l for l in sorted(set(layouts) | set(derived.layouts))
                      if layouts.get(l) != derived.layouts.get(l)), None)
        raise LoadError(f"{where}: the layout of MoE layer {layer} is not what its config compiles to "
                        "(edited offsets, shapes or experts?); recompile the model")
    dense_bytes = regular_file(path, "dense.safetensors").stat().st_size
    claimed = manifest.get("memory_plan")
    if isinstance(claimed, dict) and claimed.get("dense_bytes") != dense_bytes:
        raise LoadError(f"{path}/dense.safetensors is {dense_bytes} bytes, its manifest says "
                        f"{str(claimed.get('dense_bytes'))[:20]} (truncated or edited); recompile the model")
    if claimed != memory_plan(layouts, dense_bytes):
        raise LoadError(f"{where}: memory_plan does not add up from the layouts and dense.safetensors; "
                        "recompile the model")


def _graph(path: Path, manifest: dict[str, Any], derived: Derived, digests: dict[str, str]) -> dict[str, Any]:
    """The graph to run, as JSON: graph.json validated whole, and equal to the derived graph when
    the same ExpertFlow, torch and transformers wrote it; else (another release) the derived one.
    Read once, checked against its digest as read, and no larger than a few derived graphs (its
    parse costs some 25 times its size)."""
    import transformers

    limit = 4 * len(json.dumps(derived.graph)) + 2**20
    stored = read_json(path, "graph.json", limit, digests.get("graph.json"))
    try:
        graph_from_json(stored, derived.driver)
    except (GraphFormatError, AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise LoadError(f"{path}/graph.json is not a valid ExpertFlow graph ({_what(exc)}); "
                        "recompile the model") from None
    release = (__version__, torch.__version__, transformers.__version__)
    if (manifest["expertflow"], manifest["torch"], manifest["transformers"]) == release and stored != derived.graph:
        raise LoadError(f"{path}/graph.json is not the graph its manifest's config and options compile to "
                        "(edited?); recompile the model")
    return derived.graph


def _what(exc: Exception) -> str:
    return f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc).split("\n")[0]


def copy_streams(graph: fx.Graph, where: str) -> dict[tuple[str, int], str]:
    """Which copy stream each layer's prefetch and wait copies on, as the schedule pass decided
    (``ef.stream``): "copy" (speculative, in issue order) or "demand" (ahead of every prefetch)."""
    streams = {}
    for node in graph.nodes:
        name = ops.op_name(node.target) if node.op == "call_function" else None
        if name in ("prefetch", "wait"):
            stream = node.meta.get(meta_keys.STREAM)
            if stream not in meta_keys.COPY_STREAMS:
                raise LoadError(f"{where}: {name} node {node.name} copies on stream {stream!r}; the runtime has the "
                                "'copy' and 'demand' streams; recompile the model")
            streams[(name, node.args[1])] = stream
    return streams


@dataclass(frozen=True)
class Checked:
    """A directory that passed every check ``load`` makes before it allocates weights or experts."""

    manifest: dict[str, Any]
    layouts: dict[int, ExpertLayout]
    config: Any
    dtype: torch.dtype
    derived: Derived  # under the options in effect
    graph: fx.Graph  # the graph to run, validated (fresh: load's GraphModule takes it)
    options: dict[str, Any]
    generation_config: Any


def check(path: str | Path, verify: bool = True, predictor: str | None = None, lookahead: int | None = None,
          policy: str | None = None, prefetch: str | None = None) -> Checked:
    """Every check :func:`load` makes (its own code, in its order), without reading the weights
    or allocating the expert arena: the manifest, the checksums, the config, what it derives
    (graph, layouts), graph.json validated against the closed lists, the dense and
    experts files' headers against the skeleton and the layouts, the graph's streams, the
    predictor files the graph calls and the generation config. expertflow-compile runs it on what
    it wrote before the directory appears, so what compiles loads. Raises LoadError."""
    path = Path(path)
    manifest, layouts = read_layouts(path)
    return _checked(path, manifest, layouts, verify, (predictor, lookahead, policy, prefetch))


def read_layouts(path: Path) -> tuple[dict[str, Any], dict[int, ExpertLayout]]:
    """The checked manifest and its expert layouts (what a budget resolves against); nothing else read."""
    manifest = read_manifest(path)
    return manifest, _layouts(manifest, f"{path}/manifest.json")


def _checked(path: Path, manifest: dict[str, Any], layouts: dict[int, ExpertLayout], verify: bool,
             overrides: tuple[Any, ...]) -> Checked:
    where = f"{path}/manifest.json"
    digests = manifest["files"] if verify else {}  # checked as each file is read
    if verify:
        check_files(path, manifest, skip=(*VERIFIED_AS_READ, *_unread(manifest)))  # those: during their one read
    config = make_config(manifest, where)
    dtype = getattr(torch, manifest["dtype"])
    derived = derive(manifest, config, dtype, where)
    _check_derived(path, manifest, layouts, derived)
    graph = _graph(path, manifest, derived, digests)  # validated before any code is generated from it
    options = _options(manifest, where, *overrides)
    if options != {**DEFAULT_OPTIONS, **manifest["options"]}:  # an override changes the graph: derive that one
        derived = derive({**manifest, "options": options}, config, dtype, where)
        graph = derived.graph
    header = read_header(path, DENSE)
    check_dense(path / DENSE, {k: (dtype_, tuple(shape)) for k, (dtype_, shape, _, _) in header.items()},
                 expected_dense(derived.driver.lm, layouts))
    HostStore.check(regular_file(path, EXPERTS), layouts)
    run = graph_from_json(graph, derived.driver)  # the skeleton's names are the loaded model's
    copy_streams(run, where)
    attach_predictors(SimpleNamespace(), run, path, manifest, config.hidden_size, layouts, torch.device("cpu"))
    if options["policy"] == "predictive":
        load_prior(path, manifest, layouts)
    generation = _generation_config(path, manifest, config, digests)
    return Checked(manifest, layouts, config, dtype, derived, run, options, generation)


def load(path: str | Path, device: str | torch.device = "cpu", expert_cache: int | str | None = None,
         verify: bool = True, preload: bool | None = None, timeline: bool = False,
         record_routing: bool = False, predictor: str | None = None, lookahead: int | None = None,
         policy: str | None = None, batch_size: int = 1, max_context: int | None = None,
         prefetch: str | None = None, host_memory: int | str | None = None,
         memory: int | str | None = None) -> CompiledModel:
    """Loads a compiled directory; ``expert_cache`` is slots, a size ('4GiB'), a fraction ('25%'),
    or None for every expert resident.

    ``verify=False`` skips the files' sha256 (every other check stays). ``preload`` copies experts
    into the slots now (default: only when all of them fit), so the first steps do not pay for
    cold misses; bytes moved then are counted in ``stats()``. ``timeline`` records the copy and
    compute streams (``model.timeline.write("trace.json")`` for Perfetto / chrome://tracing);
    ``record_routing`` the routes taken (``model.routing.write_jsonl(path)`` for expertflow-simulate).
    ``predictor`` ("cross_layer_gate", "routing_path", "transition", "frequency", "none"),
    ``lookahead``, ``policy`` ("layer_cycle", "lru", "lfu", "predictive") and ``prefetch``
    ("copy": predictions start copies; "hint": they only steer eviction) override what the model
    was compiled with: the graph is derived again with them (they change what is loaded, never
    what is computed).
    ``expert_cache="auto"`` takes the most slots that fit the device's free memory after the dense
    weights, a KV cache for ``batch_size`` sequences of ``max_context`` tokens (default: the
    model's context, at most 4096) and a margin; ``model.budget`` says what it chose.
    ``host_memory`` (CPU device; the same forms as ``expert_cache``) keeps the experts on disk:
    the expert slots are the host tier, holding that much, and every other blob is read from
    ``experts.safetensors`` when a prediction or a miss asks for it, checked as read
    (``runtime/store/disk.py``); load reads headers only. At or above every expert, every blob
    is read (and checked) into the slots at load, once. Below one layer's top-k it is refused.
    ``memory`` (CPU device; a size or 'auto') is one total for the host instead: the dense
    weights, a KV cache as for 'auto' and a margin come first, the expert slots get the rest
    (``model.budget.describe()`` says how it was split), and the other experts stay on disk.
    """
    path = Path(path)
    manifest, layouts = read_layouts(path)
    dev = check_device(device)
    # before the checksums: a bad budget fails at once
    tier = host_tier(host_memory, memory, expert_cache, dev)
    request = tier if tier is not None else Budget.read(expert_cache)
    sized = request.auto or memory is not None  # slots from memory sizes, once the config is read
    slots = 0 if sized else request.slots_on(layouts)
    ok = _checked(path, manifest, layouts, verify, (predictor, lookahead, policy, prefetch))
    config, dtype, options = ok.config, ok.dtype, ok.options
    where, digests = f"{path}/manifest.json", manifest["files"] if verify else {}
    auto = None
    if sized:
        auto = auto_slots(manifest, layouts, config, dtype, dev, batch_size, max_context, tier is not None,
                          request if memory is not None else None)
        slots = auto.slots
    if tier is not None:
        check_top_k(slots, config, layouts, request)
    lm = build_skeleton(config, dtype)
    driver = Driver(lm)
    assign_weights(lm, read_dense(path, lm, layouts, dev, digests.get(DENSE)))
    for module in lm.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != dev and buf.device.type != "meta":
                module._buffers[name] = buf.to(dev)
    gm = fx.GraphModule(driver, ok.graph)
    everything = slots == all_slots(layouts)
    if everything:
        drop_prefetch(gm)
        gm.recompile()
    if tier is not None:  # the slots are the host tier, even when they hold every expert: no second copy
        digests, algorithm = load_digests(path, manifest, layouts, verify)
        store = DiskStore(regular_file(path, EXPERTS), layouts, digests if verify else None, algorithm)
    else:
        store = HostStore(regular_file(path, EXPERTS), layouts, pin=dev.type == "cuda",
                          digest=manifest["files"][EXPERTS] if verify else None)
    prior = load_prior(path, manifest, layouts) if options["policy"] == "predictive" else None
    engine = CopyEngine(dev, READERS if isinstance(store, DiskStore) else 1)
    cache = ExpertCache(layouts, store, slots, dev, engine, make_policy(options["policy"], list(layouts), prior))
    if preload or (preload is None and everything):
        cache.preload()
    modules = {layer: driver.get_submodule(lay.module) for layer, lay in layouts.items()}
    context = RuntimeContext(cache, modules, copy_streams(gm.graph, where))
    attach_predictors(context, gm.graph, path, manifest, config.hidden_size, layouts, dev)
    cls = model_class(manifest["architecture"])
    model = cls(gm, config, context, cache_maker(lm), ok.generation_config)
    model.budget, model.directory = auto, path
    # The copy engine's worker thread ends with the model (it would otherwise outlive it, one per load).
    weakref.finalize(model, cache.engine.close)
    if timeline:
        model.timeline = context.timeline = cache.engine.timeline = Timeline(dev)
    if record_routing:
        model.routing = context.routing = RoutingTrace()
    return model


DEFAULT_OPTIONS = CompileOptions().to_json()


def _unread(manifest: dict[str, Any]) -> list[str]:
    """Listed files the runtime never opens, so it need not hash them on every load: the
    calibration traces (hundreds of MB of hidden states on a large model; the simulator checks
    them) and the human-readable dumps."""
    return [name for name in manifest["files"] if name == "calibration.safetensors" or name.startswith("dumps/")]


def _options(manifest: dict[str, Any], where: str, predictor: str | None, lookahead: int | None,
             policy: str | None, prefetch: str | None = None) -> dict[str, Any]:
    """The manifest's compile options with the caller's overrides, checked (LoadError)."""
    try:
        options = CompileOptions.from_json(manifest["options"], predictor=predictor, lookahead=lookahead,
                                           policy=policy, prefetch=prefetch).known_policy(POLICIES).to_json()
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{where}: {exc}") from None
    if options["predictor"] == "routing_path" and PREDICTOR_FILE not in manifest["files"]:
        raise LoadError(f"{path_of(where)} has no routing-path predictor (compile with --calibration to train "
                        "one); use predictor='cross_layer_gate'")
    if options["predictor"] in ("frequency", "transition") and TABLES_FILE not in manifest["files"]:
        raise LoadError(f"{path_of(where)} has no routing tables for predictor={options['predictor']!r} (compile "
                        "with --calibration to count them); use predictor='cross_layer_gate'")
    return options


def path_of(where: str) -> str:
    return where.removesuffix("/manifest.json")


def _generation_config(path: Path, manifest: dict[str, Any], config: Any, digests: dict[str, str]) -> Any:
    """The source model's generation config (eos ids, sampling defaults), as from_pretrained reads
    it; read once as JSON from inside the directory (checked against its digest as read), never
    from a hub."""
    from transformers import GenerationConfig

    if "generation_config.json" not in manifest["files"]:
        return GenerationConfig.from_model_config(config)
    fields = read_json(path, "generation_config.json", GENERATION_CONFIG_LIMIT, digests.get("generation_config.json"))
    check_generation(fields, f"{path}/generation_config.json")
    try:
        return GenerationConfig.from_dict(fields)
    except CONFIG_ERRORS as exc:
        raise LoadError(f"{path}/generation_config.json is not a valid generation config ({_what(exc)}); "
                        "recompile the model") from None
