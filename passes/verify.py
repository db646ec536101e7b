"""Check the invariants of a lowered, scheduled graph; name the offending node.

Checked: no experts module is still called (every MoE layer is lowered); every
``expert_compute`` reads the ``wait`` of its own layer and every ``wait`` feeds exactly one
compute; every prefetch handle is waited on by its own layer, and issued before that wait;
between a layer's wait and its compute no other wait runs (a wait pins its slots until its
compute is queued: two open at once could pin every slot); once scheduled, every node has a
known stream and prefetch and wait copy on a copy stream; permutes and unpermutes pair up: a
``permute`` of layer L feeds one ``expert_compute`` of L (its tokens, ids and weights) and its
``perm`` one ``unpermute`` of that compute's output, and every unpermute reads such a pair.
"""

from __future__ import annotations

import operator

from torch import fx

from ..ir import meta_keys, ops
from .manager import PassError

PASS = "verify"


def verify_graph(gm: fx.GraphModule, after: str = "") -> None:
    where = f"{PASS} after {after}" if after else PASS
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lowered = any(n.target is ops.expert_compute for n in gm.graph.nodes)
    scheduled = any(meta_keys.STREAM in n.meta for n in gm.graph.nodes)
    waits = [n for n in gm.graph.nodes if n.target is ops.wait]
    for node in gm.graph.nodes:
        if lowered and node.op == "call_module" and node.meta.get(meta_keys.ROLE) == "experts":
            raise PassError(where, "MoE layer is not lowered", node)
        if scheduled:
            _check_stream(node, where)
        if node.target is ops.expert_compute:
            wait = node.args[5]
            if not (isinstance(wait, fx.Node) and wait.target is ops.wait and wait.args[1] == node.args[1]):
                raise PassError(where, "expert_compute does not read its own layer's wait", node)
        if node.target is ops.wait:
            _check_wait(node, waits, order, where)
        if node.target is ops.permute or node.target is ops.unpermute:
            _check_permute(node if node.target is ops.permute else _source_permute(node, where), where)
        if node.target is ops.prefetch:
            users = [u for u in node.users if u.target is ops.wait]
            if not users or any(u.args[1] != node.args[1] or order[u] < order[node] for u in users):
                raise PassError(where, "prefetch is not waited on by its own layer, after it", node)


def _check_stream(node: fx.Node, where: str) -> None:
    stream = node.meta.get(meta_keys.STREAM)
    if stream is None:
        raise PassError(where, "node has no stream", node)
    if stream not in meta_keys.STREAMS:
        raise PassError(where, f"unknown stream {stream!r} (streams: {', '.join(meta_keys.STREAMS)})", node)
    if (node.target is ops.prefetch or node.target is ops.wait) and stream == meta_keys.COMPUTE:
        raise PassError(where, "a copy op is on the compute stream", node)


def _source_permute(unpermute: fx.Node, where: str) -> fx.Node:
    perm = unpermute.args[0]
    source = getattr(perm, "args", (None,))[0] if getattr(perm, "target", None) is operator.getitem else None
    if getattr(source, "target", None) is not ops.permute or perm.args[1] != 3:
        raise PassError(where, "unpermute does not read a permute's perm", unpermute)
    return source


def _check_permute(node: fx.Node, where: str) -> None:
    """The permute's four outputs go to exactly one compute of its layer and one unpermute of it."""
    parts: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.target is not operator.getitem or not 0 <= user.args[1] <= 3:
            raise PassError(where, f"permute output read by {user.name}, not by item 0-3", node)
        parts.setdefault(user.args[1], []).append(user)
    computes = {u for i in (0, 1, 2) for g in parts.get(i, []) for u in g.users}
    compute = next(iter(computes)) if len(computes) == 1 else None
    if compute is None or compute.target is not ops.expert_compute or compute.args[1] != node.args[1] or \
            [ops.unpermuted(a) for a in compute.args[2:5]] != list(node.args[2:5]) or \
            any(getattr(a, "args", (None,))[0] is not node for a in compute.args[2:5]):
        raise PassError(where, "permute does not feed exactly one expert_compute of its layer (tokens, ids, "
                        "weights)", node)
    undo = [u for g in parts.get(3, []) for u in g.users]
    if len(undo) != 1 or undo[0].target is not ops.unpermute or undo[0].args[1] is not compute:
        raise PassError(where, "permute's perm does not feed exactly one unpermute of its compute's output", node)


def _check_wait(node: fx.Node, waits: list[fx.Node], order: dict, where: str) -> None:
    computes = [u for u in node.users if u.target is ops.expert_compute]
    if len(computes) != 1:
        raise PassError(where, f"wait feeds {len(computes)} expert_compute nodes, expected 1", node)
    for other in waits:
        if other is not node and order[node] < order[other] < order[computes[0]]:
            raise PassError(where, f"{other.name} waits while {node.name}'s compute has not run: both would pin "
                            "slots at once", node)
