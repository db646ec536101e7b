"""Lower every experts call to explicit route, wait and expert_compute nodes.

Rewrites: each ``call_module`` of an experts module (``node.meta["ef.role"] == "experts"``,
set by the front end), called as ``experts(hidden, top_k_index, top_k_weights)``, becomes::

    ids   = route(ef_ctx, L, top_k_index)
    slots = wait(ef_ctx, L, None, ids)           # handle filled in by insert_prefetch
    out   = expert_compute(ef_ctx, L, hidden, ids, top_k_weights, slots)

and adds the ``ef_ctx`` graph input. Before: a traced graph with ``ef.layer`` on experts calls.
After: no experts module is called; every MoE layer has one route, wait and expert_compute.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..ir import meta_keys, ops
from .manager import PassError, PassResult

PASS = "lower_experts"
CTX = "ef_ctx"


def context_node(graph: fx.Graph) -> fx.Node:
    """The ``ef_ctx`` placeholder, created after the last input if missing."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        if n.target == CTX:
            return n
    with graph.inserting_after(placeholders[-1]):
        return graph.placeholder(CTX)


def _experts_args(node: fx.Node) -> tuple[Any, Any, Any]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    args = list(node.args) + [node.kwargs[k] for k in names[len(node.args):] if k in node.kwargs]
    if len(args) != 3:
        raise PassError(PASS, "experts call is not experts(hidden_states, top_k_index, top_k_weights)", node)
    return args[0], args[1], args[2]


def lower_experts(gm: fx.GraphModule, options: Any = None) -> PassResult:
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_module" and n.meta.get(meta_keys.ROLE) == "experts"]
    if not calls:
        return PassResult(gm, False)
    ctx = context_node(graph)
    for node in calls:
        layer = node.meta.get(meta_keys.LAYER)
        if layer is None:
            raise PassError(PASS, "experts call has no ef.layer annotation", node)
        hidden, index, weights = _experts_args(node)
        with graph.inserting_before(node):
            ids = graph.call_function(ops.route, (ctx, layer, index))
            slots = graph.call_function(ops.wait, (ctx, layer, None, ids))
            out = graph.call_function(ops.expert_compute, (ctx, layer, hidden, ids, weights, slots))
        for new in (ids, slots, out):
            new.meta[meta_keys.LAYER] = layer
            new.meta[meta_keys.MODULE] = node.target
        out.meta[meta_keys.VALUE] = node.meta.get(meta_keys.VALUE)
        out.meta[meta_keys.BLOCK_INPUT] = _block_input(node, hidden)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return PassResult(gm, True)


def _block_input(experts: fx.Node, hidden: Any) -> str | None:
    """The name of the MoE block's input: walk up from the experts' hidden arg out of the block."""
    block = experts.target.rpartition(".")[0]
    node = hidden
    while isinstance(node, fx.Node) and _in_module(node, block):
        node = next((a for a in node.all_input_nodes), None)
    return node.name if isinstance(node, fx.Node) else None


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    prefix = path.removeprefix("lm.")
    return any(p == path or p == prefix or p.endswith("." + prefix) for p, _ in stack.values())
