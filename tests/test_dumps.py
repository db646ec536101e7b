"""Compile-time dumps: the ONNX view (checker-valid, custom domains, right counts) and DOT/table."""

from __future__ import annotations

import collections
import json

import onnx
import pytest

from expertflow.ir.graph_view import node_records
from expertflow.tools.dumps import node_table, to_dot
from expertflow.tools.onnx_dump import EF_DOMAIN, TORCH_DOMAIN, to_onnx

MOE_LAYERS = 4  # tiny-mixtral: every one of its 4 decoder layers is a MoE layer


@pytest.fixture(scope="module")
def mixtral(compiled_dir):
    return compiled_dir("tiny-mixtral")


@pytest.fixture(scope="module")
def graph_json(mixtral):
    return json.loads((mixtral / "graph.json").read_text())


@pytest.fixture(scope="module")
def onnx_model(mixtral):
    path = mixtral / "dumps" / "graph.onnx"
    assert path.is_file(), "compile should write dumps/graph.onnx"
    return onnx.load(str(path))


def test_onnx_passes_the_full_checker(onnx_model):
    onnx.checker.check_model(onnx_model, full_check=True)
    domains = {o.domain: o.version for o in onnx_model.opset_import}
    assert domains == {EF_DOMAIN: 1, TORCH_DOMAIN: 1}


def test_onnx_has_one_expertflow_op_of_each_kind_per_moe_layer(onnx_model):
    counts = collections.Counter(n.op_type for n in onnx_model.graph.node if n.domain == EF_DOMAIN)
    assert counts == {op: MOE_LAYERS for op in ("predict", "prefetch", "route", "wait", "expert_compute")}
    for node in onnx_model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("prefetch", "wait"):
            assert attrs["stream"] == b"copy"
        if node.domain == EF_DOMAIN and node.op_type != "predict":
            # layer j uses slot group j % 2: the double buffer
            assert attrs["slot_group"] == attrs["layer"] % 2
            assert attrs["target"] == f"expertflow.ir.ops.{node.op_type}".encode()


def test_onnx_mirrors_the_fx_graph(onnx_model, graph_json):
    records = node_records(graph_json)
    inner = [r for r in records if r.op not in ("placeholder", "output")]
    assert [n.name for n in onnx_model.graph.node] == [r.name for r in inner]
    assert [list(n.input) for n in onnx_model.graph.node] == [list(r.inputs) for r in inner]
    assert [list(n.output) for n in onnx_model.graph.node] == [[r.name] for r in inner]
    assert [i.name for i in onnx_model.graph.input] == [r.name for r in records if r.op == "placeholder"]
    assert [o.name for o in onnx_model.graph.output] == list(records[-1].inputs) == ["lm_lm_head"]
    torch_ops = {n.op_type for n in onnx_model.graph.node if n.domain == TORCH_DOMAIN}
    # Written from the live GraphModule, so modules are named by class.
    assert {"call_module:MixtralAttention", "linear", "softmax", "topk", "call_method:view", "get_attr"} <= torch_ops


def test_onnx_from_graph_json_matches_the_compile_time_file(onnx_model, graph_json):
    rebuilt = to_onnx(graph_json)
    key = lambda m: [(n.name, n.domain, list(n.input)) for n in m.graph.node]  # noqa: E731
    assert key(rebuilt) == key(onnx_model)
    # Without the weights the module class is unknown: the path's last part stands in.
    assert "call_module:self_attn" in {n.op_type for n in rebuilt.graph.node}


def test_checker_needs_the_custom_opset_imports(graph_json):
    model = to_onnx(graph_json)
    del model.opset_import[:]
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)


def test_dot_contains_every_op_and_the_prefetch_wait_edges(mixtral, graph_json):
    dot = (mixtral / "dumps" / "graph.dot").read_text()
    assert dot.startswith("digraph expertflow {") and dot.rstrip().endswith("}")
    for op in ("predict", "prefetch", "route", "wait", "expert_compute"):
        for layer in range(MOE_LAYERS):
            assert f"\\n{op} L{layer}\"" in dot
    for suffix in ("", "_1", "_2", "_3"):
        assert f'"prefetch{suffix}" -> "wait{suffix}";' in dot
    assert dot.count('fillcolor="gold"') == 5 * MOE_LAYERS
    assert dot.count(" -> ") == sum(len(r.inputs) for r in node_records(graph_json))


def test_dumps_rebuilt_from_graph_json_equal_the_stored_ones(mixtral, graph_json):
    assert to_dot(graph_json) == (mixtral / "dumps" / "graph.dot").read_text()
    table = node_table(graph_json)
    assert table == (mixtral / "dumps" / "nodes.txt").read_text()
    wait_row = next(line.split() for line in table.splitlines() if line.startswith("wait_2 "))
    assert wait_row == ["wait_2", "call_function", "wait", "2", "copy", "0"]
