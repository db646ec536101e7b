"""Human-readable dumps of a compiled graph: code, node table, Graphviz DOT/SVG, ONNX.

``node_table`` and ``to_dot`` take an fx.GraphModule or a compiled directory's graph.json (via
:mod:`expertflow.ir.graph_view`), so ``expertflow-inspect`` can redo them without torch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..ir.graph_view import node_records


def node_table(graph: Any) -> str:
    rows = [("name", "op", "target", "layer", "stream", "slot_group")]
    for n in node_records(graph):
        rows.append((n.name, n.op, n.short_target, str(n.meta.get("ef.layer", "")), n.meta.get("ef.stream", ""),
                     str(n.meta.get("ef.slot_group", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def to_dot(graph: Any) -> str:
    colors = {"copy": "lightblue", "compute": "white"}
    lines = ["digraph expertflow {", "  rankdir=TB; node [shape=box, style=filled, fontname=monospace];"]
    for n in node_records(graph):
        label = f"{n.name}\\n{n.ef_op or n.op}"
        if "ef.layer" in n.meta:
            label += f" L{n.meta['ef.layer']}"
        fill = "gold" if n.ef_op else colors.get(n.meta.get("ef.stream", "compute"), "white")
        lines.append(f'  "{n.name}" [label="{label}", fillcolor="{fill}"];')
        for a in n.inputs:
            lines.append(f'  "{a}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


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
