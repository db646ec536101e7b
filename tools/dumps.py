"""Human-readable dumps of a compiled graph: code, node table, Graphviz DOT/SVG, ONNX."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from torch import fx

from ..ir import ops


def node_table(gm: fx.GraphModule) -> str:
    rows = [("name", "op", "target", "layer", "stream", "slot_group")]
    for n in gm.graph.nodes:
        target = ops.op_name(n.target) if n.op == "call_function" and ops.op_name(n.target) else n.target
        target = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        rows.append((n.name, n.op, target, str(n.meta.get("ef.layer", "")), n.meta.get("ef.stream", ""),
                     str(n.meta.get("ef.slot_group", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def to_dot(gm: fx.GraphModule) -> str:
    colors = {"copy": "lightblue", "compute": "white"}
    lines = ["digraph expertflow {", "  rankdir=TB; node [shape=box, style=filled, fontname=monospace];"]
    for n in gm.graph.nodes:
        name = ops.op_name(n.target) if n.op == "call_function" else None
        label = f"{n.name}\\n{name or n.op}"
        if "ef.layer" in n.meta:
            label += f" L{n.meta['ef.layer']}"
        fill = "gold" if name else colors.get(n.meta.get("ef.stream", "compute"), "white")
        lines.append(f'  "{n.name}" [label="{label}", fillcolor="{fill}"];')
        for a in n.all_input_nodes:
            lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dumps(gm: fx.GraphModule, out: Path) -> None:
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
    except ImportError:
        return
    write_onnx(gm, out / "graph.onnx")
