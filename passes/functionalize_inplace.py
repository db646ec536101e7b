"""Make in-place method calls visible as data flow.

Rewrites: for every ``call_method`` node whose method mutates its receiver (``scatter_``,
``add_``, ``masked_fill_``, ...), later users of the receiver read the in-place node instead.
In-place methods return their receiver, so values are unchanged; but now the mutation is an
ancestor of whatever reads the mutated tensor, so dead-code elimination and router slicing
keep it. (fx treats call_method as pure: without this, DCE deletes the ``scatter_`` in
DeepSeek/GLM group-limited routers and the result is silently wrong.)

Before: a traced graph. After: no node reads the receiver of an in-place call after that call.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .manager import PassResult


def is_inplace_method(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else ""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def functionalize_inplace(gm: fx.GraphModule, options: Any = None) -> PassResult:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modified = False
    for node in list(gm.graph.nodes):
        if not is_inplace_method(node) or not isinstance(node.args[0], fx.Node):
            continue
        receiver = node.args[0]
        for user in list(receiver.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(receiver, node)
                modified = True
    return PassResult(gm, modified)
