"""expertflow-compile: a Hugging Face MoE model in, a compiled directory out."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from ...passes.options import PREDICTORS, PREFETCH, CompileOptions
from ...runtime.cache.policy import POLICIES
from ..shell import UserError, one_line, run_command
from ..make.source import resolve_model

HELP = __doc__ + """

MODEL is a directory written by save_pretrained, a hub id already in the local Hugging Face
cache (ExpertFlow never downloads), or a built-in preset: tiny-trained-moe (a 2.7M-parameter
Mixtral trained on the Python stdlib's sources, shipped in the package: learned routing,
Python-like text); seeded random weights of tiny-mixtral, tiny-qwen2-moe, tiny-qwen3-moe,
tiny-olmoe, tiny-deepseek-v3, tiny-gpt-oss, tiny-granitemoe; bench-mixtral-240m, a 459 MiB
bfloat16 Mixtral for benchmarks; and the standard benchmark loads with real expert dimensions
(gigabytes, made on first use): load-mixtral-8x7b-shaped, load-qwen3-30b-a3b-shaped.

The output directory holds manifest.json (checksums, config, memory plan), graph.json (the
scheduled graph), dense.safetensors, experts.safetensors (one contiguous blob per layer and
expert) and dumps/ (generated code, node table, Graphviz DOT/SVG, ONNX for Netron).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertflow-compile", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, cached hub id, or preset name")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--lookahead", type=int, default=1,
                   help="prefetch MoE layer j+LOOKAHEAD while layer j computes (default 1)")
    p.add_argument("--predictor", choices=list(PREDICTORS), default="cross_layer_gate",
                   help="routing predictor driving prefetch: cross_layer_gate (layer j+LOOKAHEAD's router on "
                        "layer j's hidden state, training-free), routing_path (a small network trained on the "
                        "calibration traces predicts every layer's experts from the token embedding and, in "
                        "decode, the previous position's last MoE input, before the first layer runs, and a "
                        "second stage predicts the later layers again from the first MoE layer's output; needs "
                        "--calibration), transition (layer j's likeliest experts given layer j-1's true route, "
                        "counted on the calibration traces; needs --calibration), frequency (each layer's most "
                        "popular experts, the static baseline; needs --calibration), or none (every expert "
                        "loads on demand). "
                        "runtime.load(predictor=...) can override it")
    p.add_argument("--prefetch", choices=list(PREFETCH), default="copy",
                   help="what a prediction does: copy (start copying the predicted experts before their layer "
                        "runs; default) or hint (only tell the cache policy, which keeps them and evicts others; "
                        "nothing moves early: fewer bytes). In the simulator's time model copy is faster where one "
                        "expert copies in under about two layers' compute (small experts), hint "
                        "where copies dominate (large ones); expertflow-simulate --bandwidth --layer-ms says for "
                        "yours. runtime.load(prefetch=...) can override it")
    p.add_argument("--no-permute", action="store_true",
                   help="leave out the token-permutation nodes (permute/unpermute around each expert compute). "
                        "With them, a step whose experts outnumber the slots (a long prefill, a large batch) "
                        "computes each wave of experts on one contiguous range of tokens instead of all of them")
    p.add_argument("--policy", choices=list(POLICIES), default="layer_cycle",
                   help="expert-cache eviction: layer_cycle (evict from the layer that runs again last), lru, lfu, "
                        "or predictive (farthest predicted next use; reads the routing prior --calibration "
                        "fits). runtime.load(policy=...) can override it")
    p.add_argument("--calibration", metavar="FILE|builtin",
                   help="run the compiled model on this text (a UTF-8 file, its last fifth held out; or "
                        "'builtin': Python standard-library sources, with other modules held out) and store "
                        "the routing traces, the routing-path predictor and the routing prior in the output")
    p.add_argument("--calibration-tokens", type=int, default=32768, metavar="N",
                   help="calibration tokens to record (default 32768: the predictors' recall still grows up to "
                        "there; each 1024 tokens is one pass over the experts; the held-out part adds a quarter "
                        "for builtin)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routing-path predictor's training (default 0)")
    p.add_argument("--no-dumps", action="store_true", help="skip the human-readable graph dumps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Calibration:
    source: str  # a text file, or "builtin"
    tokens: int = 32768
    seed: int = 0


def compile_model(model: str, output: Path, options: CompileOptions, force: bool = False,
                  dumps: bool = True, quiet: bool = True, calibration: Calibration | None = None) -> Path:
    """Compiles ``model`` into ``output``; raises UserError on bad input (ValueError, like the
    options' own checks, for a cache policy the runtime does not have)."""
    options.known_policy(POLICIES)  # before the output is checked: bad options fail before anything is read
    output = Path(output)
    check_output(output, force)  # before the model is loaded: a bad -o should fail in a second
    if options.predictor in ("routing_path", "transition", "frequency") and calibration is None:
        raise UserError(f"--predictor {options.predictor} is fitted on calibration traces: pass --calibration "
                        "builtin (or a text file)")
    if calibration is not None:
        from ..make.calibrate import texts
        texts(calibration.source)  # a missing or non-UTF-8 file fails now, not after the compile
    with _libraries_quiet(quiet):
        return _compile(model, output, options, force, dumps, quiet, calibration)


def _compile(model: str, output: Path, options: CompileOptions, force: bool, dumps: bool,
             quiet: bool, calibration: Calibration | None = None) -> Path:
    import torch
    import transformers
    from transformers import AutoConfig

    from ... import __version__
    from ...ir.skeleton import build_skeleton, config_dtype
    from ...passes.manager import PassError
    from ...passes.pipeline import PIPELINE, compile_graph
    from ...passes.trace import TraceFailure
    from ...runtime.assemble import loader
    from ...runtime.assemble.derive import config_to_json
    from ...runtime.store.manifest import SCHEMA_VERSION, LoadError, memory_plan
    from ..make import artefact
    from safetensors import SafetensorError

    from ..make.stream_load import WeightStream

    source = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # reading the user's files: any failure there is bad input, not a bug
        raise UserError(f"cannot read the config of {model}: {one_line(exc)}") from None
    dtype = config_dtype(config)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    say(f"loading {source}")
    try:
        # A meta skeleton and a plan over the shards: tensors are read a decoder layer at a time
        # while write_weights writes them, so the whole model is never in memory.
        weights = WeightStream(source, dtype)
        lm = weights.model
    except Exception as exc:  # e.g. safetensors' own error type for a truncated weights file
        raise UserError(f"cannot load the weights of {model}: {one_line(exc)}") from None
    skeleton = build_skeleton(lm.config, dtype)  # traced on meta: the weights stay where they are
    bar = tqdm(desc="passes", total=len(PIPELINE), disable=quiet, unit="pass")
    try:
        gm, info = compile_graph(skeleton, options, on_pass=lambda name: (bar.set_postfix_str(name), bar.update()))
    except TraceFailure as exc:
        raise UserError(one_line(exc)) from None
    except PassError as exc:  # a model shape the passes do not handle: say which node, no traceback
        raise UserError(f"cannot compile {model}: {exc}") from None
    finally:
        bar.close()
    layouts = artefact.layouts_of(lm, info)

    def build(tmp: Path) -> dict[str, Any]:
        def progress(groups: Any) -> Iterator[Any]:
            # The stream's groups are decoder layers plus the non-layer weights; count the MoE
            # layers (what the summary line counts), each once its group has been written.
            with tqdm(total=len(layouts), desc="packing experts", unit="MoE layer", disable=quiet) as moe:
                for group in groups:
                    yield group
                    moe.update(group[0] in layouts)
        try:
            artefact.write_weights(weights, layouts, tmp, progress)
        except (OSError, SafetensorError) as exc:  # the user's shards, read lazily while writing
            raise UserError(f"cannot read the weights of {model}: {one_line(exc)}") from None
        artefact.graph_file(gm, tmp)
        artefact.write_text_files(source, lm, tmp)
        if dumps:
            from ..make.dumps import write_dumps
            write_dumps(gm, tmp / "dumps")
        dense_bytes = (tmp / "dense.safetensors").stat().st_size
        return {
            "schema_version": SCHEMA_VERSION, "source": str(model), "source_path": str(source),
            # What was built, not what the checkpoint names: a multimodal checkpoint's (Qwen3.6's
            # ForConditionalGeneration) causal LM is its text model, with the text config.
            "architecture": type(lm).__name__, "model_type": lm.config.model_type,
            "dtype": artefact.dtype_name(dtype), "config": config_to_json(lm.config.to_dict()),
            "attn_implementation": lm.config._attn_implementation,
            "experts_implementation": lm.config._experts_implementation,
            "transformers": transformers.__version__, "expertflow": __version__,
            "options": options.to_json(),
            "layouts": [lay.to_json() for lay in layouts.values()],
            "memory_plan": memory_plan(layouts, dense_bytes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
        }

    def finish(tmp: Path) -> dict[str, Any]:
        from ..make.calibrate import CalibrationError, Probe, run

        total = calibration.tokens * 5 // 4
        with tqdm(total=total, desc="calibrating", unit="tok", disable=quiet) as bar:
            try:
                return run(tmp, calibration.source, calibration.tokens, Probe.of(gm), seed=calibration.seed,
                           progress=bar.update)
            except CalibrationError as exc:
                raise UserError(str(exc)) from None

    def check(tmp: Path) -> None:
        try:
            loader.check(tmp)
        except LoadError as exc:  # the compiler wrote what the loader refuses: a compile error, nothing kept
            why = str(exc).replace(f"{tmp}/", "").replace(str(tmp), str(output)).removesuffix("; recompile the model")
            raise UserError(f"cannot compile {model}: the compiled directory would not load: {why}") from None

    try:
        return artefact.write_compiled(output, force, build, finish if calibration is not None else None, check)
    except artefact.OutputExists:  # it appeared while compiling
        raise UserError(f"{output} already exists; pass --force to replace it") from None


def check_output(output: Path, force: bool) -> None:
    """Refuses an output that exists (without ``force``), that ``force`` must not delete, or
    whose parent cannot hold a directory."""
    try:
        if os.path.lexists(output):
            if not force:
                raise UserError(f"{output} already exists; pass --force to replace it")
            if output.is_symlink() or not output.is_dir():
                raise UserError(f"{output} exists and is not a directory; --force only replaces a compiled "
                                "directory: remove it yourself or choose another --output")
            if any(output.iterdir()):
                from ...runtime.store.manifest import is_compiled_directory

                why = is_compiled_directory(output)
                if why is not None:  # a web app's manifest.json is no licence to delete its folder
                    found = "it has no manifest.json" if not os.path.lexists(output / "manifest.json") else \
                        "its manifest.json is not one this ExpertFlow wrote: schema or digest do not check out"
                    raise UserError(f"{output} is not a compiled ExpertFlow directory ({found}), so --force will "
                                    "not delete it; remove it yourself or choose another --output")
        parent = output.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"cannot create {output}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot create {output}: {parent} is not writable")
    except OSError as exc:
        raise UserError(f"cannot use {output} as the output: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _libraries_quiet(quiet: bool) -> Iterator[None]:
    """With ``quiet``, transformers' own progress bars and warnings stay off, then are restored:
    a failing --quiet run prints exactly one line."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command("expertflow-compile", lambda: _main(args), (ValueError, OSError, ImportError, KeyError),
                       interrupted="interrupted; nothing was written")


def _main(args: argparse.Namespace) -> int:
    from ..make.artefact import remove_stale

    for stale in remove_stale(args.output):
        print(f"expertflow-compile: removed {stale}, left by a compile that was killed", file=sys.stderr)
    options = CompileOptions(lookahead=args.lookahead, predictor=args.predictor, policy=args.policy,
                             permute=not args.no_permute, prefetch=args.prefetch)
    calibration = Calibration(args.calibration, args.calibration_tokens, args.seed) if args.calibration else None
    out = compile_model(args.model, args.output, options, force=args.force, dumps=not args.no_dumps,
                        quiet=args.quiet, calibration=calibration)
    plan = json.loads((out / "manifest.json").read_text())["memory_plan"]
    print(f"compiled {args.model} -> {out} ({plan['moe_layers']} MoE layers, "
          f"{plan['all_resident_slots']} experts of {plan['expert_blob_bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
