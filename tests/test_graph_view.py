"""graph_view: the networkx view, critical path, stream summary and layer lookup, on known graphs."""

from __future__ import annotations

import json
import operator

import pytest
import torch
from torch import fx

from expertflow.ir import graph_view as gv
from expertflow.ir import ops
from expertflow.ir.serialize import graph_to_json
from expertflow.passes.schedule import schedule


def _node(name: str, op: str, target: str, *inputs: str, **meta) -> dict:
    args = {"tuple": [{"node": i} for i in inputs]}
    return {"name": name, "op": op, "target": target, "args": args, "kwargs": {"dict": []}, "meta": meta}


def _diamond() -> dict:
    """Two branches from x: a-b (a module call, heavy) and c-d-e (three glue ops, light).

    Unit cost: the long branch wins, 3 + join 1 = 4. Weighted: a (4) + b (1) + join (1) = 6 beats 4.
    """
    nodes = [
        _node("x", "placeholder", "x"),
        _node("w", "get_attr", "lm.model.layers.2.mlp.gate.weight"),
        _node("a", "call_module", "lm.model.layers.2.self_attn", "x"),
        _node("b", "call_function", "_operator.add", "a", "w"),
        _node("c", "call_function", "torch.relu", "x"),
        _node("d", "call_method", "view", "c"),
        _node("e", "call_function", "torch.relu", "d"),
        _node("j", "call_function", "_operator.add", "b", "e"),
        _node("output", "output", "output", "j"),
    ]
    return {"schema": 1, "nodes": nodes}


def test_critical_path_unit_cost_known_answer():
    g = gv.to_networkx(_diamond())
    length, path = gv.critical_path(g)
    assert length == 4
    assert path == ["x", "c", "d", "e", "j", "output"]


def test_critical_path_weighted_cost_prefers_module_branch():
    length, path = gv.critical_path(gv.to_networkx(_diamond()), gv.weighted_cost)
    assert length == 6
    assert path == ["x", "a", "b", "j", "output"]


def test_critical_path_custom_cost_and_empty_graph():
    g = gv.to_networkx(_diamond())
    # Only the weight read costs anything: the path must go through it.
    length, path = gv.critical_path(g, lambda a: 5.0 if a["op"] == "get_attr" else 0.0)
    assert length == 5 and path[0] == "w"
    assert gv.critical_path(gv.to_networkx({"nodes": []})) == (0.0, [])


def test_networkx_view_nodes_edges_and_attributes():
    g = gv.to_networkx(_diamond())
    assert list(g.nodes) == [n["name"] for n in _diamond()["nodes"]]
    assert set(g.edges) == {("x", "a"), ("a", "b"), ("w", "b"), ("x", "c"), ("c", "d"), ("d", "e"),
                            ("b", "j"), ("e", "j"), ("j", "output")}
    assert g.nodes["b"]["short"] == "add" and g.nodes["b"]["target"] == "_operator.add"
    assert g.nodes["a"]["layer"] == 2 and g.nodes["w"]["layer"] == 2 and g.nodes["b"]["layer"] is None
    assert [g.nodes[n]["index"] for n in g.nodes] == list(range(9))


def test_layer_of_meta_wins_then_module_path():
    assert gv.layer_of({"op": "call_module", "target": "lm.model.layers.7.mlp", "meta": {"ef.layer": 3}}) == 3
    assert gv.layer_of({"op": "call_module", "target": "lm.model.layers.12.self_attn", "meta": {}}) == 12
    assert gv.layer_of({"op": "call_module", "target": "lm.model.norm", "meta": {}}) is None
    # A function's target is never a path, even when it looks like one.
    assert gv.layer_of({"op": "call_function", "target": "layers.1.x", "meta": {}}) is None


def _moe_graph(with_prefetch: bool = True) -> fx.GraphModule:
    """One MoE layer by hand: prefetch issued, then a weight read, relu, relu, add, route, wait, compute."""
    g = fx.Graph()
    x, ctx = g.placeholder("x"), g.placeholder("ef_ctx")
    handle = None
    if with_prefetch:
        handle = g.call_function(ops.prefetch, (ctx, 0, g.call_function(ops.predict, (ctx, 0, x))))
    weight = g.get_attr("w")  # free: a weight read must not count as overlapped compute
    h = g.call_function(operator.add, (g.call_function(torch.relu, (g.call_function(torch.relu, (x,)),)), weight))
    ids = g.call_function(ops.route, (ctx, 0, x))
    slots = g.call_function(ops.wait, (ctx, 0, handle, ids))
    g.output(g.call_function(ops.expert_compute, (ctx, 0, h, ids, x, slots)))
    for n in g.nodes:
        if ops.op_name(n.target):
            n.meta["ef.layer"] = 0
    root = torch.nn.Module()
    root.register_buffer("w", torch.zeros(1))
    gm = fx.GraphModule(root, g)
    return schedule(gm).graph_module


def test_stream_summary_counts_compute_between_prefetch_and_wait():
    summary = gv.stream_summary(gv.to_networkx(_moe_graph()))
    assert summary.nodes_per_stream == {"compute": 10, "copy": 1, "demand": 1}
    (p,) = summary.prefetches
    assert (p.layer, p.prefetch, p.wait) == (0, "prefetch", "wait")
    assert p.compute_nodes == 4  # relu, relu_1, add, route; not the weight read w
    assert p.compute_cost == 4.0
    assert summary.on_demand_waits == []


def test_stream_summary_reports_waits_without_prefetch():
    summary = gv.stream_summary(gv.to_networkx(_moe_graph(with_prefetch=False)))
    assert summary.prefetches == [] and summary.on_demand_waits == ["wait"]


def test_fx_and_graph_json_give_the_same_view():
    gm = _moe_graph()
    from_fx = gv.to_networkx(gm)
    from_json = gv.to_networkx(json.loads(json.dumps(graph_to_json(gm.graph))))
    assert list(from_fx.nodes(data=True)) == list(from_json.nodes(data=True))
    assert list(from_fx.edges) == list(from_json.edges)
    fx_text = [r.args_text for r in gv.node_records(gm)]
    assert fx_text == [r.args_text for r in gv.node_records(graph_to_json(gm.graph))]
    assert "%ef_ctx, 0, %prefetch, %route" in fx_text


@pytest.fixture(scope="module")
def mixtral_graph(compiled_dir):
    return gv.to_networkx(json.loads((compiled_dir("tiny-mixtral") / "graph.json").read_text()))


def test_compiled_mixtral_prefetches_pair_with_their_waits(mixtral_graph):
    summary = gv.stream_summary(mixtral_graph)
    assert [p.layer for p in summary.prefetches] == [0, 1, 2, 3]
    for p in summary.prefetches:
        assert mixtral_graph.nodes[p.wait]["ef_op"] == "wait"
        assert mixtral_graph.nodes[p.wait]["layer"] == p.layer
        assert p.compute_nodes > 0  # the copy hides behind some compute, or prefetching is pointless
    assert summary.nodes_per_stream["copy"] == summary.nodes_per_stream["demand"] == 4


def test_compiled_mixtral_critical_path_runs_through_every_expert_layer(mixtral_graph):
    length, path = gv.critical_path(mixtral_graph)
    on_path = [mixtral_graph.nodes[n]["ef_op"] for n in path]
    assert on_path.count("expert_compute") == 4
    assert length == sum(gv.unit_cost(mixtral_graph.nodes[n]) for n in path)
    assert length < sum(gv.unit_cost(a) for _, a in mixtral_graph.nodes(data=True))
