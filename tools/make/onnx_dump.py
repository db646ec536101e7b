"""The scheduled graph as an ONNX file, for browsing in Netron: a picture, not a runnable model.

Every fx node becomes one ONNX node named like it, whose single output value carries the same
name, so edges follow fx's data flow. ExpertFlow ops sit in the custom domain ``ai.expertflow``
(op_type ``prefetch``, ``wait``, ...); everything else in ``ai.expertflow.torch`` with an op_type
from its target (``linear``, ``call_method:view``, ``call_module:MixtralAttention``). Placeholders
are graph inputs, the output node's inputs are graph outputs. Values are typed as an opaque
``ai.expertflow.Value``: the graph holds caches and handles as well as tensors, and has no shapes.
Built with onnx.helper from :mod:`expertflow.ir.graph_view` records, so a graph.json works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from ...ir import meta_keys
from ...ir.graph_view import NodeInfo, node_records

EF_DOMAIN = "ai.expertflow"
TORCH_DOMAIN = "ai.expertflow.torch"
#: Meta keys exported as node attributes (the ONNX attribute name drops the ``ef.`` prefix).
META_ATTRS = (meta_keys.LAYER, meta_keys.STREAM, meta_keys.ROLE, meta_keys.MODULE)


def _value_type() -> onnx.TypeProto:
    t = onnx.TypeProto()
    t.opaque_type.domain = EF_DOMAIN
    t.opaque_type.name = "Value"
    return t


def op_type(rec: NodeInfo) -> tuple[str, str]:
    """(domain, op_type) for a node: ExpertFlow ops by name, the rest by what they call."""
    if rec.ef_op:
        return EF_DOMAIN, rec.ef_op
    if rec.op == "call_function":
        return TORCH_DOMAIN, rec.short_target
    if rec.op == "call_module":
        # The class says what it is (MixtralAttention); from graph.json only the path's last part is known.
        return TORCH_DOMAIN, f"call_module:{rec.module_class or rec.target.rpartition('.')[2]}"
    return TORCH_DOMAIN, f"{rec.op}:{rec.target}" if rec.op == "call_method" else rec.op


def _attributes(rec: NodeInfo) -> dict[str, Any]:
    attrs: dict[str, Any] = {"target": rec.target}
    if rec.args_text:
        attrs["args"] = rec.args_text
    for key in META_ATTRS:
        value = rec.meta.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            attrs[key.removeprefix("ef.")] = value
    return attrs


def to_onnx(graph: Any, name: str = "expertflow") -> onnx.ModelProto:
    """An ONNX model of ``graph`` (fx.GraphModule, fx.Graph or graph.json dict) that passes the checker."""
    records = node_records(graph)
    inputs, outputs, nodes = [], [], []
    for rec in records:
        if rec.op == "placeholder":
            inputs.append(onnx.ValueInfoProto(name=rec.name, type=_value_type()))
        elif rec.op == "output":
            outputs.extend(onnx.ValueInfoProto(name=src, type=_value_type()) for src in rec.inputs)
        else:
            domain, kind = op_type(rec)
            nodes.append(helper.make_node(kind, list(rec.inputs), [rec.name], name=rec.name, domain=domain,
                                          **_attributes(rec)))
    onnx_graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(onnx_graph, producer_name="expertflow",
                              opset_imports=[helper.make_opsetid(EF_DOMAIN, 1),
                                             helper.make_opsetid(TORCH_DOMAIN, 1)])
    onnx.checker.check_model(model)  # a file Netron refuses is worse than no file
    return model


def write_onnx(gm: Any, path: Path | str) -> Path:
    """Writes ``gm``'s graph as ONNX to ``path``; returns the path."""
    path = Path(path)
    onnx.save_model(to_onnx(gm, name=type(gm).__name__ if hasattr(gm, "graph") else "expertflow"), str(path))
    return path
