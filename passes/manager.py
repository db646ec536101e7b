"""PassResult and the small pass manager every pipeline runs on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule, Any], PassResult]


class PassError(RuntimeError):
    """A pass found the graph in a state it cannot handle; the message names the node and pass."""

    def __init__(self, pass_name: str, message: str, node: fx.Node | None = None):
        where = f" at {node.format_node()}" if node is not None else ""
        super().__init__(f"[{pass_name}] {message}{where}")
        self.pass_name = pass_name
        self.node = node


class PassManager:
    """Runs passes in order; with ``verify`` set, checks the graph after every pass."""

    def __init__(self, passes: Sequence[Pass], verify: Callable[[fx.GraphModule, str], None] | None = None,
                 on_pass: Callable[[str], None] | None = None):
        self.passes = list(passes)
        self.verify = verify
        self.on_pass = on_pass

    def __call__(self, gm: fx.GraphModule, options: Any) -> PassResult:
        modified = False
        for p in self.passes:
            name = getattr(p, "__name__", type(p).__name__)
            if self.on_pass is not None:
                self.on_pass(name)
            result = p(gm, options)
            gm, modified = result.graph_module, modified or result.modified
            gm.graph.lint()
            if self.verify is not None:
                self.verify(gm, name)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
