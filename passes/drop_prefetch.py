"""Drop prediction from a graph whose experts will all be resident.

Rewrites: every ``wait`` loses its prefetch handle (``wait(ef_ctx, L, None, ids)``); the
``prefetch``, ``path_context`` and ``predict_reuse`` nodes go, and the predictor math that fed only
them becomes dead code and goes too (:func:`dce`). The loader runs it when the budget holds every
expert: nothing moves, so nothing needs predicting (and no predictor costs a forward).

Before: a lowered graph, with or without prediction. After: no prefetch, path_context or
predict_reuse node; every wait's handle is None; the experts are computed exactly as before.
A graph without prediction is left unchanged (``modified`` False).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..ir import ops
from .dce import dce
from .manager import PassResult

#: Ops that only serve prediction: what the copies and the cache policy would be told.
PREDICTION_OPS = (ops.prefetch, ops.path_context, ops.predict_reuse)


def drop_prefetch(gm: fx.GraphModule, options: Any = None) -> PassResult:
    graph = gm.graph
    modified = False
    for node in graph.nodes:
        if node.target is ops.wait and node.args[2] is not None:
            node.update_arg(2, None)
            modified = True
    for node in [n for n in graph.nodes if n.target in PREDICTION_OPS]:
        graph.erase_node(node)  # side effects only: the waits no longer read the prefetches' handles
        modified = True
    if modified:
        dce(gm)
    return PassResult(gm, modified)
