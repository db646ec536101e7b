"""Human-readable dumps of a compiled graph: code, node table, Graphviz DOT/SVG, ONNX.

``node_table`` and ``to_dot`` take an fx.GraphModule or a compiled directory's graph.json (via
:mod:`expertflow.ir.graph_view`), so ``expertflow-inspect`` can redo them without torch.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...ir import meta_keys
from ...ir.graph_view import FREE_OPS, NodeInfo, node_records

# Node fill colours (Graphviz names) by kind, in legend order. The legend, to_dot and
# expertflow-inspect's --help are all built from this table, so they cannot disagree.
NODE_KINDS: dict[str, tuple[str, str]] = {
    "copy": ("lightblue", "copy streams (ef.stream): prefetch (copy), wait (demand)"),
    "expertflow": ("gold", "ExpertFlow op on the compute stream: predict, route, permute, expert_compute, unpermute"),
    "predictor": ("palegreen", "cross-layer predictor: a later layer's router, run early"),
    "free": ("lightgrey", "graph input or output, weight read"),
    "compute": ("white", "other compute-stream node"),
}
# The edge from a prefetch to the wait that reads its handle: it crosses from the layer where the
# copy starts to the (later) layer that needs the experts, which is the overlap the graph buys.
PREFETCH_EDGE = "red"
PREFETCH_EDGE_TEXT = "a prefetch to the wait for its experts (crosses layers)"
_PREFETCH_EDGE_ATTRS = f'color="{PREFETCH_EDGE}", style=bold, constraint=false'
LEGEND_NODE = "__legend__"


def node_table(graph: Any) -> str:
    rows = [("name", "op", "target", "layer", "stream")]
    for n in node_records(graph):
        rows.append((n.name, n.op, n.short_target, str(n.meta.get(meta_keys.LAYER, "")),
                     n.meta.get(meta_keys.STREAM, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def node_kind(rec: NodeInfo) -> str:
    """The NODE_KINDS key of a node: its stream first, so copies stand out whatever they are."""
    if rec.meta.get(meta_keys.STREAM) in meta_keys.COPY_STREAMS:
        return "copy"
    if rec.ef_op:
        return "expertflow"
    if rec.meta.get(meta_keys.ROLE) == "predictor":
        return "predictor"
    return "free" if rec.op in FREE_OPS else "compute"


def colour_key() -> str:
    """For --help: one indented line per node fill colour, then the prefetch edge colour."""
    rows = [*NODE_KINDS.values(), (f"{PREFETCH_EDGE} edge", PREFETCH_EDGE_TEXT)]
    return "\n".join(f"  {colour:<10}  {text}" for colour, text in rows)


def placement(records: Sequence[NodeInfo]) -> list[int | None]:
    """The decoder layer each node runs in (None: outside the layers), by walking program order.

    ``ef.layer`` names the layer a node works *for*, which for the predictor is not where it
    runs: the prefetch of MoE layer j sits in layer j-lookahead (or after the embeddings). So
    only nodes that belong to their own layer move the walk into it: modules and weights under
    ``layers.N.`` and route/wait/expert_compute. A module outside the layers (embeddings,
    rotary, final norm, head) leaves them. Glue nodes (getitem, add, the predictor) stay where
    the walk is, which is where the tracer put them.
    """
    where: list[int | None] = []
    current: int | None = None
    for rec in records:
        if rec.op in ("placeholder", "output"):
            where.append(None)
            continue
        ahead = rec.ef_op in ("predict", "prefetch") or rec.meta.get(meta_keys.ROLE) == "predictor"
        if not ahead:
            layer = rec.layer
            if layer is not None:
                current = layer
            elif rec.op == "call_module":
                current = None
        where.append(current)
    return where


def _legend(records: Sequence[NodeInfo]) -> str:
    """An HTML-like table node: a row per node kind this graph has, then the prefetch edge if any."""
    kinds = {node_kind(rec) for rec in records}
    rows = [f'<TR><TD BGCOLOR="{colour}" WIDTH="24"></TD><TD ALIGN="LEFT">{text}</TD></TR>'
            for kind, (colour, text) in NODE_KINDS.items() if kind in kinds]
    if any(rec.ef_op == "prefetch" for rec in records):
        rows.append(f'<TR><TD><FONT COLOR="{PREFETCH_EDGE}"><B>&#8594;</B></FONT></TD>'
                    f'<TD ALIGN="LEFT">{PREFETCH_EDGE_TEXT}</TD></TR>')
    table = '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">' + "".join(rows) + "</TABLE>"
    return f'  "{LEGEND_NODE}" [shape=plaintext, style="", label=<{table}>];'


def _node_line(rec: NodeInfo, layer: int | None) -> str:
    name = rec.name
    prefix = f"lm_model_layers_{layer}_"
    if layer is not None and name.startswith(prefix):  # the cluster's label already says which layer
        name = name[len(prefix):]
    # The fx name already says what a glue node does (getitem_3, linear_2): a second line only
    # where it adds something, the ExpertFlow op and the layer it works for.
    tags = [t for t in (rec.ef_op, f"L{rec.meta['ef.layer']}" if meta_keys.LAYER in rec.meta else None) if t]
    label = "\\n".join([name, " ".join(tags)] if tags else [name])
    return f'  "{rec.name}" [label="{label}", fillcolor="{NODE_KINDS[node_kind(rec)][0]}"];'


def to_dot(graph: Any) -> str:
    """Graphviz DOT: one cluster per decoder layer, nodes coloured by NODE_KINDS, and a legend."""
    records = node_records(graph)
    where = placement(records)
    lines = ["digraph expertflow {",
             # newrank: rank across clusters, so the layers stack top to bottom in program order
             "  rankdir=TB; newrank=true; ranksep=0.15; nodesep=0.12;",
             '  node [shape=box, style=filled, fontname=monospace, fontsize=8, height=0.2, margin="0.04,0.01"];',
             "  edge [arrowsize=0.4, color=gray40];",
             _legend(records),
             *_node_lines(records, where),
             *_edge_lines(records, where)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_lines(records: Sequence[NodeInfo], where: Sequence[int | None]) -> list[str]:
    """Node statements, those of decoder layer N inside ``subgraph cluster_layerN``.

    Consecutive nodes of one layer share a block; a layer met again reopens its cluster (DOT
    merges subgraphs of one name), so placement need not be contiguous.
    """
    lines: list[str] = []
    open_layer: int | None = None
    for rec, layer in zip(records, where):
        if layer != open_layer:
            if open_layer is not None:
                lines.append("  }")
            if layer is not None:
                lines += [f"  subgraph cluster_layer{layer} {{",
                          f'    label="decoder layer {layer}"; style=rounded; color=gray50; fontname=monospace;']
            open_layer = layer
        lines.append(("  " if layer is not None else "") + _node_line(rec, layer))
    if open_layer is not None:
        lines.append("  }")
    return lines


def _edge_lines(records: Sequence[NodeInfo], where: Sequence[int | None]) -> list[str]:
    """Every data edge, then invisible ordering edges; all outside the clusters, because an edge
    written inside a cluster pulls both its ends into it."""
    prefetches = {rec.name for rec in records if rec.ef_op == "prefetch"}
    lines = []
    for rec in records:
        for a in rec.inputs:
            handle = a in prefetches and rec.ef_op == "wait"
            lines.append(f'  "{a}" -> "{rec.name}"' + (f" [{_PREFETCH_EDGE_ATTRS}];" if handle else ";"))
    # A layer node fed only from outside its layer (a weight, the rotary cos/sin) would be ranked
    # near the top, stretching its cluster up beside the earlier layers: the staircase that made
    # the picture three times as wide. An invisible edge from the layer's first node holds it down.
    layer_of = dict(zip((rec.name for rec in records), where))
    first: dict[int, str] = {}
    for rec, layer in zip(records, where):
        if layer is None:
            continue
        if layer not in first:
            first[layer] = rec.name
        elif not any(layer_of.get(a) == layer for a in rec.inputs):
            lines.append(f'  "{first[layer]}" -> "{rec.name}" [style=invis];')
    return lines


def write_dumps(gm: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph.py").write_text(gm.code)
    (out / "nodes.txt").write_text(node_table(gm))
    (out / "graph.dot").write_text(to_dot(gm))
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, "-Tsvg", str(out / "graph.dot"), "-o", str(out / "graph.svg")],
                       check=False, capture_output=True, timeout=300)
    try:
        from .onnx_dump import write_onnx
    except ImportError:  # onnx not installed: the other dumps still help
        return
    write_onnx(gm, out / "graph.onnx")
