"""Assign every node to the copy or the compute stream, and double-buffer the slots.

Rewrites (metadata only): ``ef.stream`` is ``"copy"`` for ``prefetch`` and ``wait`` (the copy
stream's issue and its join point) and ``"compute"`` for everything else; ``ef.slot_group`` is
the MoE layer's depth parity on its prefetch, wait, route and expert_compute, so layer j+1's
copies land in the other half of the double buffer while layer j computes.

Before: lowered graph. After: every node has ``ef.stream``; every ExpertFlow op of a MoE layer
has ``ef.slot_group``.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..ir import ops
from .manager import PassResult


def schedule(gm: fx.GraphModule, options: Any = None) -> PassResult:
    computes = [n for n in gm.graph.nodes if n.target is ops.expert_compute]
    group = {n.args[1]: depth % 2 for depth, n in enumerate(computes)}
    modified = False
    for node in gm.graph.nodes:
        name = ops.op_name(node.target) if node.op == "call_function" else None
        stream = "copy" if name in ops.COPY_OPS else "compute"
        if node.meta.get("ef.stream") != stream:
            node.meta["ef.stream"] = stream
            modified = True
        if name in ("prefetch", "wait", "route", "expert_compute") and node.args[1] in group:
            if node.meta.get("ef.slot_group") != group[node.args[1]]:
                node.meta["ef.slot_group"] = group[node.args[1]]
                modified = True
    return PassResult(gm, modified)
