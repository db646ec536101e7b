"""Calibration: run a compiled model through ExpertFlow's own runtime on text and record routing.

What is recorded, per token (its sequence, position, and whether it is a training or a held-out
token), is what the predictors need: every MoE layer's top-k expert ids and weights, the token
embedding, the first MoE layer's output and the last MoE block's input (the routing-path
predictor's inputs: the embedding; its second stage's, that output; the previous position's last
block input as their context), and what the
cross-layer gate would have predicted for every lookahead d (layer j's router applied to the
input of MoE layer j-d, the embedding for j < d). It runs with a bounded expert cache, so a
model too large for the device calibrates as it will run. The result is ``calibration.safetensors``
in the compiled directory (plain tensors, no code).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ...ir import meta_keys, ops
from ...runtime.store.tokenizer import encode_text
from ...passes.insert_prefetch import copy_slice, layer_output, router_slice

FILE = "calibration.safetensors"
#: Text every Python has offline, none of it seen by tiny-trained-moe's training: the predictors
#: are fitted on the first list and evaluated on the second.
CALIBRATION_MODULES = ("tarfile", "locale", "doctest", "imaplib", "mailbox", "pydoc", "bz2", "lzma",
                       "graphlib", "symtable", "_pydecimal", "turtle")
HELDOUT_MODULES = ("calendar", "fractions", "getopt", "shlex", "textwrap")
WINDOW = 128
#: Cross-layer-gate lookaheads recorded: 1 .. min(MoE layers - 1, MAX_LOOKAHEAD).
MAX_LOOKAHEAD = 8


class CalibrationError(ValueError):
    """Bad calibration input (a missing file, no tokenizer, too little text)."""


def _stdlib(modules: tuple[str, ...]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for module in modules:
        base = root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
                break
    return "\n".join(texts)


def texts(source: str) -> tuple[str, str | None, str]:
    """(calibration text, held-out text or None, a label). ``builtin`` is stdlib sources; a file is
    UTF-8 text whose last fifth is held out (see ``split_ids``)."""
    if source == "builtin":
        return _stdlib(CALIBRATION_MODULES), _stdlib(HELDOUT_MODULES), "builtin (Python stdlib sources)"
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"calibration file {source} does not exist; pass a UTF-8 text file or 'builtin'")
    try:
        return path.read_text(encoding="utf-8"), None, path.name
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {source} is not UTF-8 text (byte {exc.start}); "
                               "pass a UTF-8 text file or 'builtin'") from None


def windows(ids: list[int], tokens: int, window: int) -> torch.Tensor:
    """The first ``tokens`` ids cut into windows of ``window`` (a shorter last one dropped)."""
    ids = ids[:tokens]
    count = len(ids) // window
    return torch.tensor(ids[:count * window], dtype=torch.long).reshape(count, window)


@dataclass(frozen=True)
class Probe:
    """Node names in the compiled graph whose values calibration records."""

    embed: str
    block_inputs: dict[int, str]  # MoE layer -> the node feeding its MoE block
    routes: dict[int, str]        # MoE layer -> its route node (top-k ids)
    weights: dict[int, str]       # MoE layer -> the node of its top-k weights
    #: the first MoE layer's decoder output (the predictor's second stage reads it), if found
    first_output: str | None = None

    @staticmethod
    def of(gm: fx.GraphModule) -> "Probe":
        computes = [n for n in gm.graph.nodes if n.target is ops.expert_compute]
        embed = next(n for n in gm.graph.nodes if n.meta.get(meta_keys.ROLE) == "embed")
        by_name = {n.name: n for n in gm.graph.nodes}
        first = by_name.get(computes[0].meta.get(meta_keys.BLOCK_INPUT) or "") if len(computes) > 1 else None
        output = layer_output(first) if first is not None else None
        return Probe(embed.name, {n.args[1]: n.meta[meta_keys.BLOCK_INPUT] for n in computes},
                     {n.args[1]: ops.unpermuted(n.args[3]).name for n in computes},
                     {n.args[1]: ops.unpermuted(n.args[4]).name for n in computes},
                     output.name if output is not None else None)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = value
        return value


class _Run(nn.Module):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.graph = recorder.module  # a submodule: the model's parameters stay the model's
        self.recorder = recorder

    def forward(self, *args: Any) -> Any:
        return self.recorder.run(*args)


def router_functions(gm: fx.GraphModule, probe: Probe) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Each MoE layer's router as a function of a hidden state: the graph's own router nodes."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out = {}
    for layer, block in probe.block_inputs.items():
        route = by_name[probe.routes[layer]]
        nodes = router_slice(by_name[block], route.args[2])
        if nodes is None:
            continue  # a router reading more than the hidden state: no cross-layer gate for it
        graph = fx.Graph()
        hidden = graph.placeholder("hidden")
        graph.output(copy_slice(graph, nodes, by_name[block], hidden)[-1])
        out[layer] = fx.GraphModule(gm, graph)
    return out


def record(model: Any, probe: Probe, batches: list[tuple[torch.Tensor, int]],
           progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Runs ``model`` (a loaded CompiledModel) over ``batches`` of (windows, split) and returns
    the calibration tensors (module docstring). ``progress(n)`` hears of tokens done."""
    layers = sorted(probe.routes)
    names = {probe.embed, *probe.block_inputs.values(), *probe.routes.values(), *probe.weights.values()}
    if probe.first_output is not None:
        names.add(probe.first_output)
    routers = router_functions(model.graph_module, probe)
    lookaheads = range(1, min(len(layers) - 1, MAX_LOOKAHEAD) + 1)
    cols: dict[str, list[torch.Tensor]] = {}
    recorder = _Recorder(model.graph_module, names)
    plain = model.graph_module
    seq = 0
    try:
        model.graph_module = _Run(recorder)  # forward's inputs and cache handling stay the model's
        for ids, split in batches:
            recorder.seen = {}
            model(ids, logits_to_keep=1)
            n = ids.numel()
            v = recorder.seen
            flat = lambda name: v[name].reshape(n, -1)  # noqa: E731
            hiddens = [v[probe.embed]] + [v[probe.block_inputs[layer]] for layer in layers]
            _add(cols, "experts", torch.stack([flat(probe.routes[l]) for l in layers], 1).to(torch.int32))
            _add(cols, "weights", torch.stack([flat(probe.weights[l]) for l in layers], 1).float())
            _add(cols, "embeds", _stored(hiddens[0].reshape(n, -1)))
            _add(cols, "late", _stored(hiddens[-1].reshape(n, -1)))  # the routing-path predictor's context
            if probe.first_output is not None:
                _add(cols, "first_out", _stored(flat(probe.first_output)))  # its second stage's input
            for d in lookaheads:
                preds = []
                for j, layer in enumerate(layers):
                    router = routers.get(layer)
                    source = hiddens[j - d + 1] if j >= d else hiddens[0]
                    preds.append(router(source).reshape(n, -1) if router is not None else flat(probe.routes[layer]) * 0 - 1)
                _add(cols, f"xgate{d}", torch.stack(preds, 1).to(torch.int32))
            batch, length = ids.shape
            _add(cols, "seq", (torch.arange(batch) + seq).repeat_interleave(length).to(torch.int32))
            _add(cols, "token", torch.arange(length).repeat(batch).to(torch.int32))
            _add(cols, "split", torch.full((n,), split, dtype=torch.uint8))
            seq += batch
            if progress is not None:
                progress(n)
    finally:
        model.graph_module = plain
    out = {k: torch.cat(v).contiguous() for k, v in cols.items()}
    out["layers"] = torch.tensor(layers, dtype=torch.int32)
    return out


def _stored(hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states as recorded: in the model's own 16-bit type (they are exact there, and on a
    large model they are most of the file), else float32; training reads them as float32."""
    return hidden if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.float()


def _add(cols: dict[str, list[torch.Tensor]], key: str, value: torch.Tensor) -> None:
    cols.setdefault(key, []).append(value.detach().to("cpu"))


def run(directory: Path, source: str, tokens: int, probe: Probe, budget: str | int = "25%", seed: int = 0,
        progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Calibrates the compiled ``directory`` in place: records routing on ``source`` text, trains
    the routing-path predictor and fits the routing prior; returns the manifest's ``calibration``
    field. Writes calibration.safetensors, predictor.safetensors, prior.safetensors and
    tables.safetensors (the frequency and transition predictors' counts)."""
    from safetensors.torch import save_file

    from ... import runtime
    from ...runtime.store.manifest import LoadError
    from ...runtime.predict.path_predictor import FILE as PREDICTOR, REFINER_FILE as REFINER
    from ...runtime.predict.reuse import FILE as REUSE
    from ...runtime.predict.prior import FILE as PRIOR, prior_tensors
    from ...runtime.predict.route_tables import FILE as TABLES, fit_tables
    from .train_predictor import write_path_predictors

    model = runtime.load(directory, expert_cache=budget, verify=False, predictor="none")
    try:
        tokenizer = runtime.load_tokenizer(directory)
    except LoadError:
        raise CalibrationError("calibration needs the model's tokenizer, and the source model has none") from None
    window = min(WINDOW, int(getattr(model.config, "max_position_embeddings", WINDOW) or WINDOW))
    if tokens < 2 * window:
        raise CalibrationError(f"--calibration-tokens {tokens} is too few: pass at least {2 * window} "
                               f"(two windows of {window} tokens)")
    text, held, label = texts(source)
    # the text is cut into windows after encoding, so its length past the context is expected (verbose=False)
    encode = lambda t: encode_text(tokenizer, t, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    ids = encode(text)
    if held is None:  # a user's file: its last fifth is held out
        cut = min(len(ids), tokens) * 4 // 5
        train, heldout = windows(ids[:cut], tokens, window), windows(ids[cut:], tokens, window)
    else:
        train, heldout = windows(ids, tokens, window), windows(encode(held), max(tokens // 4, window), window)
    if len(train) < 1 or len(heldout) < 1:
        raise CalibrationError(f"calibration text {label} has {len(ids)} tokens, too few for a training and a "
                               f"held-out window of {window}; pass a longer text")
    batch = 8
    batches = [(train[i:i + batch], 0) for i in range(0, len(train), batch)]
    batches += [(heldout[i:i + batch], 1) for i in range(0, len(heldout), batch)]
    rec = record(model, probe, batches, progress)
    layouts = model.context.cache.layouts
    experts = {lay.num_experts for lay in layouts.values()}
    top_k = rec["experts"].shape[2]
    field: dict[str, Any] = {"source": label, "window": window, "train_tokens": int((rec["split"] == 0).sum()),
                             "heldout_tokens": int((rec["split"] == 1).sum()), "top_k": top_k}
    is_train = rec["split"] == 0
    if len(experts) == 1:
        n = experts.pop()
        field["routing_path"] = write_path_predictors(directory, rec, n, top_k, seed)
        rec["experts_per_layer"] = torch.tensor([n], dtype=torch.int32)
        save_file(fit_tables(rec["experts"][is_train], n), str(directory / TABLES))
    train_routes = rec["experts"][is_train]
    save_file(prior_tensors(train_routes, rec["seq"][is_train]), str(directory / PRIOR))
    save_file(rec, str(directory / FILE))
    mode = (directory / "dense.safetensors").stat().st_mode & 0o777
    for name in (FILE, PREDICTOR, REFINER, REUSE, PRIOR, TABLES):
        if (directory / name).exists():
            (directory / name).chmod(mode)  # safetensors writes 0600; the directory's files are alike
    return {"calibration": field}

