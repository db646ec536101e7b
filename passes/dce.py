"""Dead-code elimination that keeps side effects.

Rewrites: removes nodes whose values nobody reads. Keeps placeholders, the output, calls fx
knows to be impure (ExpertFlow's ``prefetch``/``wait``/``route`` are registered as such), and
in-place method calls, which fx would otherwise treat as pure.

Before: any graph. After: every remaining node is read, or has a side effect.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .functionalize_inplace import is_inplace_method
from .manager import PassResult


def _impure(node: fx.Node) -> bool:
    return is_inplace_method(node) or node.is_impure()


def dce(gm: fx.GraphModule, options: Any = None) -> PassResult:
    modified = False
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not _impure(node):
            gm.graph.erase_node(node)
            modified = True
    return PassResult(gm, modified)
