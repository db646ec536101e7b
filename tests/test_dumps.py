"""Compile-time output: the ONNX view (checker-valid, custom domains, right counts), DOT with a
cluster per decoder layer and a legend, the node table, and the progress bars."""

from __future__ import annotations

import collections
import json
import re
import shutil

import onnx
import pytest

from expertflow.ir.graph_view import node_records
from expertflow.tools.make.dumps import LEGEND_NODE, NODE_KINDS, PREFETCH_EDGE, colour_key, node_table, to_dot
from expertflow.tools.make.onnx_dump import EF_DOMAIN, TORCH_DOMAIN, to_onnx

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
    assert counts == {op: MOE_LAYERS for op in ("predict", "prefetch", "route", "wait", "expert_compute", "permute",
                                                "unpermute")}
    for node in onnx_model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("prefetch", "wait"):
            assert attrs["stream"] == {"prefetch": b"copy", "wait": b"demand"}[node.op_type]
        if node.domain == EF_DOMAIN and node.op_type != "predict":
            assert "slot_group" not in attrs
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


def _edges(dot: str) -> list[tuple[str, str, str]]:
    """(source, target, attributes) of every edge statement, invisible layout edges included."""
    return re.findall(r'^  "([^"]+)" -> "([^"]+)"(?: \[(.*)\])?;$', dot, flags=re.M)


def test_dot_contains_every_op_and_the_prefetch_wait_edges(mixtral, graph_json):
    dot = (mixtral / "dumps" / "graph.dot").read_text()
    assert dot.startswith("digraph expertflow {") and dot.rstrip().endswith("}")
    for op in ("predict", "prefetch", "route", "wait", "expert_compute", "permute", "unpermute"):
        for layer in range(MOE_LAYERS):
            assert f"\\n{op} L{layer}\"" in dot
    edges = _edges(dot)
    handles = {(a, b) for a, b, attrs in edges if f'color="{PREFETCH_EDGE}"' in attrs}
    assert handles == {(f"prefetch{s}", f"wait{s}") for s in ("", "_1", "_2", "_3")}
    # The stream decides the colour: prefetch and wait are copy-stream ops, the other five compute.
    assert dot.count('fillcolor="lightblue"') == 2 * MOE_LAYERS
    assert dot.count('fillcolor="gold"') == 5 * MOE_LAYERS
    visible = [(a, b) for a, b, attrs in edges if "invis" not in attrs]
    assert len(visible) == sum(len(r.inputs) for r in node_records(graph_json))
    assert {(a, r.name) for r in node_records(graph_json) for a in r.inputs} == set(visible)


def _clusters(dot: str) -> tuple[dict[str, int | None], dict[int, str]]:
    """Node -> cluster layer (None outside), and the label of each cluster."""
    where: dict[str, int | None] = {}
    labels: dict[int, str] = {}
    layer = None
    for line in dot.splitlines():
        if m := re.match(r"\s*subgraph cluster_layer(\d+) \{", line):
            layer = int(m.group(1))
        elif line.strip() == "}":
            layer = None
        elif m := re.match(r'\s*label="([^"]+)";', line):
            labels[layer] = m.group(1)
        elif (m := re.match(r'\s*"([^"]+)" \[label=', line)) and m.group(1) != LEGEND_NODE:
            where[m.group(1)] = layer
    return where, labels


def test_dot_has_one_cluster_per_decoder_layer(mixtral, graph_json):
    dot = (mixtral / "dumps" / "graph.dot").read_text()
    where, labels = _clusters(dot)
    assert labels == {i: f"decoder layer {i}" for i in range(MOE_LAYERS)}
    assert set(where) == {r.name for r in node_records(graph_json)}
    for i in range(MOE_LAYERS):
        s = f"_{i}" if i else ""
        mine = ["route", "wait", "expert_compute", f"lm_model_layers_{i}_self_attn",
                f"lm_model_layers_{i}_input_layernorm", f"lm_model_layers_{i}_mlp_gate_weight"]
        assert {where[n if n.startswith("lm_") else n + s] for n in mine} == {i}
    # The predictor of layer j runs in layer j-1 (lookahead 1): the block input it reads is there.
    for j in range(1, MOE_LAYERS):
        assert where[f"predict_{j}"] == where[f"prefetch_{j}"] == j - 1
        assert where[f"lm_model_layers_{j}_mlp_gate_weight_1"] == j - 1
    outside = ["input_ids", "ef_ctx", "lm_model_embed_tokens", "lm_model_rotary_emb", "lm_model_norm",
               "lm_lm_head", "output", "predict", "prefetch"]  # layer 0's predictor reads the embeddings
    assert {where[n] for n in outside} == {None}
    crossing = [(where[a], where[b]) for a, b, attrs in _edges(dot) if f'color="{PREFETCH_EDGE}"' in attrs]
    assert crossing == [(None, 0)] + [(j - 1, j) for j in range(1, MOE_LAYERS)]  # in program order
    # Drawn between clusters, they must not pull the ranking out of program order.
    assert all("constraint=false" in attrs for *_, attrs in _edges(dot) if PREFETCH_EDGE in attrs)


def test_legend_colours_are_the_node_colours(mixtral):
    dot = (mixtral / "dumps" / "graph.dot").read_text()
    legend = next(line for line in dot.splitlines() if line.strip().startswith(f'"{LEGEND_NODE}"'))
    node_fills = set(re.findall(r'fillcolor="([^"]+)"', dot))
    assert set(re.findall(r'BGCOLOR="([^"]+)"', legend)) == node_fills
    assert node_fills == {colour for colour, _ in NODE_KINDS.values()}  # this graph has every kind
    assert re.findall(r'FONT COLOR="([^"]+)"', legend) == [PREFETCH_EDGE]
    edge_colours = {m for *_, attrs in _edges(dot) for m in re.findall(r'color="([^"]+)"', attrs)}
    assert edge_colours == {PREFETCH_EDGE}
    for colour in node_fills | {PREFETCH_EDGE}:
        assert colour in colour_key()


def test_legend_lists_only_the_kinds_present():
    nodes = [{"name": "x", "op": "placeholder", "target": "x", "meta": {"ef.stream": "compute"}},
             {"name": "output", "op": "output", "target": "output", "args": {"tuple": [{"node": "x"}]}}]
    dot = to_dot(nodes)
    legend = next(line for line in dot.splitlines() if LEGEND_NODE in line)
    assert re.findall(r'BGCOLOR="([^"]+)"', legend) == [NODE_KINDS["free"][0]]
    assert "FONT COLOR" not in legend  # no prefetch, no red edge to explain
    assert "subgraph" not in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")
def test_svg_is_compact(mixtral):
    svg = (mixtral / "dumps" / "graph.svg").read_text()
    width, height = map(float, re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg).groups())
    # Before clusters and smaller nodes the same graph was 2375 x 6040 pt.
    assert width * height < 0.4 * 2375 * 6040, (width, height)
    assert svg.count('class="cluster"') == MOE_LAYERS


def test_progress_bars_count_passes_and_moe_layers(capsys, model_dir, tmp_path):
    # Compile-time output: the bars should count what the summary line counts.
    from expertflow.passes.pipeline import PIPELINE
    from expertflow.tools.cli.compile import main

    assert main([str(model_dir("tiny-mixtral")), "-o", str(tmp_path / "c"), "--no-dumps"]) == 0
    out, err = capsys.readouterr()
    assert f"({MOE_LAYERS} MoE layers," in out
    final = {line.partition(":")[0]: line for line in err.replace("\r", "\n").splitlines() if "100%" in line}
    n = len(PIPELINE)
    assert f"| {n}/{n} [" in final["passes"]
    assert f"| {MOE_LAYERS}/{MOE_LAYERS} [" in final["packing experts"] and "MoE layer/s" in final["packing experts"]
    assert not re.search(r"passes: \d+pass", err)  # the bar has a total from the start


def test_dumps_rebuilt_from_graph_json_equal_the_stored_ones(mixtral, graph_json):
    assert to_dot(graph_json) == (mixtral / "dumps" / "graph.dot").read_text()
    table = node_table(graph_json)
    assert table == (mixtral / "dumps" / "nodes.txt").read_text()
    wait_row = next(line.split() for line in table.splitlines() if line.startswith("wait_2 "))
    assert wait_row == ["wait_2", "call_function", "wait", "2", "demand"]
