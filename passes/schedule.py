"""Assign every node to a stream: what the runtime's copy engine and compute stream do.

Rewrites (metadata only): ``ef.stream`` is ``"copy"`` on ``prefetch`` (speculative copies, on the
copy stream, in issue order), ``"demand"`` on ``wait`` (its mispredicted experts are copied on the
high-priority demand stream, ahead of every queued prefetch, and the compute stream joins the
copies there) and ``"compute"`` on everything else. The runtime reads these at load time
(``runtime/assemble/loader.copy_streams``): the stream a node names is the stream its copies take.

Before: lowered graph. After: every node has ``ef.stream``.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..ir import meta_keys, ops
from .manager import PassResult

#: The stream of each ExpertFlow op that copies; every other node computes.
STREAM_OF = {"prefetch": meta_keys.COPY, "wait": meta_keys.DEMAND}


def schedule(gm: fx.GraphModule, options: Any = None) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        name = ops.op_name(node.target) if node.op == "call_function" else None
        stream = STREAM_OF.get(name or "", meta_keys.COMPUTE)
        if node.meta.get(meta_keys.STREAM) != stream:
            node.meta[meta_keys.STREAM] = stream
            modified = True
    return PassResult(gm, modified)
