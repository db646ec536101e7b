"""expertflow-inspect: what a compiled directory holds, and how its graph overlaps copies with compute."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...ir import graph_view as gv
from ...runtime.store.manifest import SCHEMA_VERSION as MANIFEST_SCHEMA  # noqa: F401  (stdlib-only: no torch import)
from ...runtime.store.manifest import JSON_LIMIT, LoadError, check_files, read_bytes, read_json, read_manifest
from ..make.dumps import colour_key, node_table, to_dot
from ..shell import UserError, run_command

PROG = "expertflow-inspect"
# The formats this reader understands. Duplicated from tools.artefact / ir.serialize because those
# import torch and inspect should start instantly; tests/test_inspect.py checks they agree.
GRAPH_SCHEMA = 3

HELP = __doc__ + f"""

COMPILED is a directory written by expertflow-compile. Without an option, a summary: source
model, dtype, memory plan, MoE layers with the compute each prefetch overlaps, node counts per
op and stream, and the critical path. Reads manifest.json and graph.json only (no weights, no
torch). --table, --code, --dot and --onnx show the dumps/ files written at compile time; --table,
--dot, --svg and --onnx --out PATH also work on a directory compiled with --no-dumps. Options
may come before or after COMPILED: only --out takes a value.

--dot and --svg draw one box (cluster) per decoder layer, with embeddings, final norm and head
outside, and a legend of the colours:
{colour_key()}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compiled", type=Path, metavar="COMPILED", help="directory written by expertflow-compile")
    show = p.add_mutually_exclusive_group()
    show.add_argument("--summary", action="store_true", help="print the summary (the default)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON, for scripts")
    show.add_argument("--table", action="store_true",
                      help="print the node table: name, op, target, layer, stream")
    show.add_argument("--code", action="store_true", help="print the generated Python code (dumps/graph.py)")
    show.add_argument("--dot", action="store_true",
                      help="print the graph as Graphviz DOT, a cluster per decoder layer (colours above)")
    show.add_argument("--svg", action="store_true",
                      help="render that DOT graph as SVG and print it (needs Graphviz's 'dot' on PATH)")
    show.add_argument("--onnx", action="store_true",
                      help="print the path of dumps/graph.onnx (open it in Netron); with --out, write the "
                           "ONNX view of graph.json there instead")
    p.add_argument("-o", "--out", type=Path, metavar="PATH",
                   help="write the output to the file PATH instead of printing it, then print PATH "
                        "(with --svg the SVG, with --onnx the .onnx file)")
    args, extra = p.parse_known_args(argv)
    if extra:  # --svg and --onnx used to take the output file: say how to give it now
        p.error(f"unrecognized arguments: {' '.join(extra)} (only --out takes a value, e.g. --svg --out PATH)")
    return args


def load_compiled(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, graph) of a compiled directory, read as the loader reads it (regular files
    inside the directory, the manifest's digest, graph.json's checksum); UserError says what
    is wrong with it."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    try:
        manifest = read_manifest(path)
        graph = read_json(path, "graph.json", digest=manifest["files"]["graph.json"])  # checked as read
    except LoadError as exc:
        raise UserError(str(exc)) from None
    if not isinstance(graph, dict) or graph.get("schema") != GRAPH_SCHEMA or not isinstance(graph.get("nodes"), list):
        schema = graph.get("schema") if isinstance(graph, dict) else None
        raise UserError(f"{path}/graph.json has schema {schema!r}, {PROG} reads {GRAPH_SCHEMA}")
    _check_nodes(path / "graph.json", graph["nodes"])
    return manifest, graph


def _dump(path: Path, manifest: dict[str, Any], name: str) -> str | None:
    """A dumps/ file written at compile time, checked against its checksum; None if there is none."""
    key = f"dumps/{name}"
    if key not in manifest["files"]:
        return None
    try:
        return read_bytes(path, key, JSON_LIMIT, manifest["files"][key]).decode()  # checked as read
    except (LoadError, OSError, UnicodeDecodeError) as exc:
        raise UserError(str(exc) if isinstance(exc, LoadError) else f"cannot read {path / key}: {exc}") from None


def _check_nodes(path: Path, nodes: list[Any]) -> None:
    """Checked up front so a damaged file is one error line, not a traceback from the analysis."""
    for i, node in enumerate(nodes):
        if not (isinstance(node, dict) and all(isinstance(node.get(k), str) for k in ("name", "op", "target"))):
            raise UserError(f"{path} node {i} lacks a name, op or target")
    try:
        records = gv.node_records(nodes)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} has a malformed argument: {exc}") from None
    seen: set[str] = set()
    for rec in records:
        missing = next((name for name in rec.inputs if name not in seen), None)
        if missing is not None:
            raise UserError(f"{path} node {rec.name!r} uses {missing!r} before it is defined")
        seen.add(rec.name)


def _moe_layers(manifest: dict[str, Any], g: Any, streams: gv.StreamSummary) -> list[dict[str, Any]]:
    by_layer = {p.layer: p for p in streams.prefetches}
    rows = []
    for lay in sorted(manifest.get("layouts", []), key=lambda lay: lay["layer"]):
        pre = by_layer.get(lay["layer"])
        rows.append({"layer": lay["layer"], "module": lay.get("module"), "num_experts": lay.get("num_experts"),
                     "blob_bytes": lay.get("blob_bytes"), "prefetch": pre.prefetch if pre else None,
                     "wait": pre.wait if pre else None,
                     "overlap_nodes": pre.compute_nodes if pre else 0,
                     "overlap_cost": pre.compute_cost if pre else 0.0})
    return rows


def summarize(path: Path, manifest: dict[str, Any], graph: dict[str, Any]) -> dict[str, Any]:
    """Everything the summary shows, as JSON-ready data."""
    g = gv.to_networkx(graph)
    streams = gv.stream_summary(g)
    unit_len, unit_path = gv.critical_path(g, gv.unit_cost)
    weighted_len, weighted_path = gv.critical_path(g, gv.weighted_cost)
    return {
        "path": str(path),
        **{k: manifest.get(k) for k in ("source", "source_path", "architecture", "model_type", "dtype",
                                        "options", "created", "torch")},
        "schema": {"manifest": manifest.get("schema_version"), "graph": graph.get("schema")},
        "memory_plan": manifest.get("memory_plan", {}),
        "moe_layers": _moe_layers(manifest, g, streams),
        "graph": {"nodes": g.number_of_nodes(), "edges": g.number_of_edges(), "by_op": gv.count_by(g, "op"),
                  "by_stream": streams.nodes_per_stream, "expertflow_ops": gv.count_by(g, "ef_op"),
                  "prefetches": [asdict(p) for p in streams.prefetches],
                  "on_demand_waits": streams.on_demand_waits},
        "critical_path": {"unit": {"length": unit_len, "path": unit_path},
                          "weighted": {"length": weighted_len, "path": weighted_path}},
    }


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n:,} B" if unit == "B" else f"{n:,} B ({size:.1f} {unit})"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _layer_table(rows: list[dict[str, Any]]) -> list[str]:
    table = [("layer", "experts", "blob", "prefetch -> wait", "overlap nodes", "overlap cost")]
    for r in rows:
        where = f"{r['prefetch']} -> {r['wait'] or 'nothing'}" if r["prefetch"] else "none (on demand)"
        blob = f"{r['blob_bytes']:,} B" if isinstance(r["blob_bytes"], int) else "?"
        overlap = (str(r["overlap_nodes"]), f"{r['overlap_cost']:g}") if r["prefetch"] else ("-", "-")
        table.append((str(r["layer"]), str(r["num_experts"]), blob, where, *overlap))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]


def format_summary(s: dict[str, Any]) -> str:
    plan, graph, crit = s["memory_plan"], s["graph"], s["critical_path"]
    opts = s.get("options") or {}
    unit, weighted = crit["unit"], crit["weighted"]
    lines = [
        f"compiled model  {s['path']}",
        f"  source        {s['source']} ({s['source_path']})",
        f"  architecture  {s['architecture']} ({s['model_type']}), dtype {s['dtype']}",
        f"  schema        manifest {s['schema']['manifest']}, graph {s['schema']['graph']}; "
        f"built {s['created']} with torch {s['torch']}",
        f"  options       lookahead {opts.get('lookahead')}, predictor {opts.get('predictor')}, "
        f"policy {opts.get('policy')}, prefetch {opts.get('prefetch', 'copy')}",
        "memory plan",
        f"  dense weights   {_bytes(plan.get('dense_bytes'))}",
        f"  expert blob     {_bytes(plan.get('expert_blob_bytes'))} per expert",
        f"  experts         {plan.get('all_resident_slots')} in {plan.get('moe_layers')} MoE layers "
        f"({plan.get('experts_per_layer')} per layer), {_bytes(plan.get('expert_bytes_total'))} in all",
        f"  cache slots     min {plan.get('min_slots')}, all resident {plan.get('all_resident_slots')}, "
        f"pools {plan.get('pools')}",
        f"MoE layers ({len(s['moe_layers'])}); overlap = compute nodes issued between a prefetch and its wait",
        *_layer_table(s["moe_layers"]),
        "graph",
        f"  nodes           {graph['nodes']} ({graph['edges']} edges)",
        f"  per op          {_counts(graph['by_op'])}",
        f"  per stream      {_counts(graph['by_stream'])}",
        f"  ExpertFlow ops  {_counts(graph['expertflow_ops'])}",
        f"  critical path   {unit['length']:g} compute nodes ({len(unit['path'])} nodes in all, "
        f"{unit['path'][0] if unit['path'] else '-'} -> {unit['path'][-1] if unit['path'] else '-'}); "
        f"weighted cost {weighted['length']:g}",
    ]
    if graph["on_demand_waits"]:
        lines.append(f"  on demand       {len(graph['on_demand_waits'])} waits have no prefetch")
    return "\n".join(lines) + "\n"


def _dump_file(path: Path, manifest: dict[str, Any], name: str) -> str:
    text = _dump(path, manifest, name)
    if text is None:
        raise UserError(f"{path} has no dumps/{name} (compiled with --no-dumps?); recompile without it")
    return text


def render_svg(dot_text: str, out: Path | None) -> str:
    """SVG of ``dot_text``: returned, or written to ``out`` (then "")."""
    dot = shutil.which("dot")
    if dot is None:
        raise UserError("graphviz 'dot' not found; install graphviz or use --dot")
    try:
        done = subprocess.run([dot, "-Tsvg", *(["-o", str(out)] if out else [])], input=dot_text, text=True,
                              capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"graphviz 'dot' failed: {exc}") from None
    if done.returncode != 0:
        raise UserError(f"graphviz 'dot' failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return "" if out else done.stdout


def run(args: argparse.Namespace) -> str:
    """What to print for ``args`` (with --out, the file is written and its path printed);
    raises UserError on bad input."""
    path: Path = args.compiled
    out: Path | None = args.out
    manifest, graph = load_compiled(path)
    if args.onnx:
        return _onnx(path, manifest, graph, out)
    if args.svg:
        svg = render_svg(_stored_or(path, manifest, "graph.dot", to_dot, graph), out)
        return f"{out}\n" if out else svg
    if args.code:
        text = _dump_file(path, manifest, "graph.py")
    elif args.table:
        text = _stored_or(path, manifest, "nodes.txt", node_table, graph)
    elif args.dot:
        text = _stored_or(path, manifest, "graph.dot", to_dot, graph)
    else:
        summary = summarize(path, manifest, graph)
        text = json.dumps(summary, indent=2) + "\n" if args.json else format_summary(summary)
    if out is None:
        return text
    try:
        out.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror}") from None
    return f"{out}\n"


def _stored_or(path: Path, manifest: dict[str, Any], name: str, make: Callable[[Any], str],
               graph: dict[str, Any]) -> str:
    """The dumps/ file written at compile time, else the same view made from graph.json."""
    text = _dump(path, manifest, name)
    return text if text is not None else make(graph)


def _onnx(path: Path, manifest: dict[str, Any], graph: dict[str, Any], out: Path | None) -> str:
    if out is None:
        if "dumps/graph.onnx" not in manifest["files"]:
            raise UserError(f"{path} has no dumps/graph.onnx; add --out PATH to write one from graph.json")
        try:
            check_files(path, manifest, only=("dumps/graph.onnx",))
        except LoadError as exc:
            raise UserError(str(exc)) from None
        return f"{path / 'dumps' / 'graph.onnx'}\n"
    try:
        from ..make.onnx_dump import write_onnx
    except ImportError as exc:
        raise UserError(f"cannot write ONNX: {exc}") from None
    try:
        return f"{write_onnx(graph, out)}\n"
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    sys.stdout.write(run(args))
    sys.stdout.flush()  # a reader that closed the pipe (`| head`) ends here, quietly (tools/shell.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
