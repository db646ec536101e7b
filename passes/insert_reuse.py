"""Insert the reuse predictor, which tells the predictive cache policy when each expert is next needed.

Rewrites: with the routing-path predictor (``options.predictor == "routing_path"``) and the
predictive policy (``options.policy == "predictive"``), right after ``predict_path(ef_ctx,
embeds)`` it inserts ``predict_reuse(ef_ctx, embeds)``: once per step, from the token embedding
and the same context, the expected number of tokens until each (MoE layer, expert) is used again
after this step. The runtime reads the estimates with the next wait's routing decision and the
policy evicts the expert whose next use is farthest (``runtime/predict/reuse.py``). It computes nothing the
model's outputs depend on (a side effect).

Before: ``insert_prefetch`` has run (a ``predict_path`` node with the embedding as its input).
After: exactly one ``predict_reuse`` right after it, reading the same embedding; other options
or graphs: unchanged (``modified=False``).
"""

from __future__ import annotations

from torch import fx

from ..ir import meta_keys, ops
from .lower_experts import context_node
from .manager import PassResult
from .options import CompileOptions

PASS = "insert_reuse"


def insert_reuse(gm: fx.GraphModule, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    if options.predictor != "routing_path" or options.policy != "predictive":
        return PassResult(gm, False)
    graph = gm.graph
    paths = [n for n in graph.nodes if n.target is ops.predict_path]
    if len(paths) != 1 or any(n.target is ops.predict_reuse for n in graph.nodes):
        return PassResult(gm, False)
    with graph.inserting_after(paths[0]):
        node = graph.call_function(ops.predict_reuse, (context_node(graph), paths[0].args[1]))
    node.meta.update({meta_keys.ROLE: "predictor"})
    return PassResult(gm, True)
