"""Insert token-permutation nodes around every expert compute.

Rewrites each ``out = expert_compute(ef_ctx, L, hidden, ids, weights, plan)`` whose inputs are not
permuted yet into::

    p       = permute(ef_ctx, L, hidden, ids, weights, plan)
    hidden' = p[0]; ids' = p[1]; weights' = p[2]; perm = p[3]
    out'    = expert_compute(ef_ctx, L, hidden', ids', weights', plan)
    out     = unpermute(perm, out')          # every former reader of out reads this

At run time (``RuntimeContext.permute``) the permutation orders the step's tokens by the waves in
which their experts become resident (the wait's plan: resident experts first), so each wave of a
layer whose experts outnumber the slots computes one contiguous range of rows instead of every
row; with one wave (decode, small batches) it returns no permutation and both nodes cost nothing.
Either way each expert is loaded once per layer per step: the waves partition the needed experts.

Before: lowered graph (``lower_experts``). After: every expert_compute reads the outputs of one
permute of its own layer and feeds exactly one unpermute, which reads that permute's ``perm``
(``verify_graph`` checks the pairing), except where the experts module says its rows are not
independent (``rows_independent = False``). ``options.permute`` False leaves the graph unchanged.
"""

from __future__ import annotations

import operator

from torch import fx

from ..ir import meta_keys, ops
from .manager import PassResult
from .options import CompileOptions


def insert_permute(gm: fx.GraphModule, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    if not options.permute:
        return PassResult(gm, False)
    graph = gm.graph
    computes = [n for n in graph.nodes if n.target is ops.expert_compute and ops.permute_of(n) is None
                and _rows_independent(gm, n)]
    for compute in computes:
        _wrap(graph, compute)
    return PassResult(gm, bool(computes))


def _rows_independent(gm: fx.GraphModule, compute: fx.Node) -> bool:
    """Whether the experts' result for a row is the same whichever rows are computed with it: not
    so for experts that multiply every row of the step as one batched product to stay bit-exact
    (``ir/input_scaled.py``), whose rows stay in place and whole."""
    module = gm.get_submodule(compute.meta[meta_keys.MODULE]) if compute.meta.get(meta_keys.MODULE) else None
    return getattr(module, "rows_independent", True)


def _wrap(graph: fx.Graph, compute: fx.Node) -> None:
    ctx, layer, hidden, ids, weights, plan = compute.args
    with graph.inserting_before(compute):
        permuted = graph.call_function(ops.permute, (ctx, layer, hidden, ids, weights, plan))
        parts = [graph.call_function(operator.getitem, (permuted, i)) for i in range(4)]
    with graph.inserting_after(compute):
        restored = graph.call_function(ops.unpermute, (parts[3], compute))
    compute.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
    compute.args = (ctx, layer, parts[0], parts[1], parts[2], plan)
    for node in (permuted, *parts, restored):
        node.meta[meta_keys.LAYER] = layer
        node.meta[meta_keys.MODULE] = compute.meta.get(meta_keys.MODULE)
