"""Check the invariants of a lowered, scheduled graph; name the offending node.

Checked: no experts module is still called (every MoE layer is lowered); every
``expert_compute`` reads the ``wait`` of its own layer and every ``wait`` feeds exactly one
compute; every prefetch handle is waited on by its own layer, and issued before that wait;
between a layer's wait and its compute no other wait of the same slot group runs (so no slot
is reused while a compute reads it); once scheduled, every node has a stream.
"""

from __future__ import annotations

from torch import fx

from ..ir import ops
from .manager import PassError

PASS = "verify"


def verify_graph(gm: fx.GraphModule, after: str = "") -> None:
    where = f"{PASS} after {after}" if after else PASS
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lowered = any(n.target is ops.expert_compute for n in gm.graph.nodes)
    scheduled = any("ef.stream" in n.meta for n in gm.graph.nodes)
    waits = [n for n in gm.graph.nodes if n.target is ops.wait]
    for node in gm.graph.nodes:
        if lowered and node.op == "call_module" and node.meta.get("ef.role") == "experts":
            raise PassError(where, "MoE layer is not lowered", node)
        if scheduled and "ef.stream" not in node.meta:
            raise PassError(where, "node has no stream", node)
        if node.target is ops.expert_compute:
            wait = node.args[5]
            if not (isinstance(wait, fx.Node) and wait.target is ops.wait and wait.args[1] == node.args[1]):
                raise PassError(where, "expert_compute does not read its own layer's wait", node)
        if node.target is ops.wait:
            _check_wait(node, waits, order, where)
        if node.target is ops.prefetch:
            users = [u for u in node.users if u.target is ops.wait]
            if not users or any(u.args[1] != node.args[1] or order[u] < order[node] for u in users):
                raise PassError(where, "prefetch is not waited on by its own layer, after it", node)


def _check_wait(node: fx.Node, waits: list[fx.Node], order: dict, where: str) -> None:
    computes = [u for u in node.users if u.target is ops.expert_compute]
    if len(computes) != 1:
        raise PassError(where, f"wait feeds {len(computes)} expert_compute nodes, expected 1", node)
    group = node.meta.get("ef.slot_group")
    if group is None:
        return
    for other in waits:
        if other is not node and other.meta.get("ef.slot_group") == group and \
                order[node] < order[other] < order[computes[0]]:
            raise PassError(where, f"slot group {group} is refilled by {other.name} while its compute reads it",
                            node)
