"""A torch-free view of a scheduled graph, for dumps and analysis.

The same questions (what runs on which stream, how much compute hides each prefetch, what the
critical path is) are asked of a live ``fx.GraphModule`` right after compiling and of a compiled
directory's ``graph.json`` by ``expertflow-inspect``, which should not need torch or the weights.
So both are first normalised into :class:`NodeInfo` records, and everything else (networkx view,
node table, DOT, ONNX) is built from those. torch is imported only when an fx graph is passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from . import meta_keys

EF_PREFIX = "expertflow.ir.ops."
#: Node kinds that cost nothing at run time: graph inputs/outputs and weight reads.
FREE_OPS = frozenset({"placeholder", "get_attr", "output"})
_LAYER_IN_PATH = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class NodeInfo:
    """One graph node, whichever form it came from."""

    name: str
    op: str  # fx node kind: placeholder, call_function, call_method, call_module, get_attr, output
    target: str  # qualified function name, method name, or module/attribute path
    ef_op: str | None  # ExpertFlow op short name (prefetch, wait, ...), None for anything else
    inputs: tuple[str, ...]  # names of the input nodes, first use order, no duplicates
    meta: Mapping[str, Any] = field(default_factory=dict)
    args_text: str = ""  # args/kwargs with node references as %name, for dumps
    module_class: str | None = None  # class of a call_module target, when the module is at hand

    @property
    def short_target(self) -> str:
        """``prefetch``, ``linear``, ``view``, or the module path: what a table shows."""
        if self.ef_op:
            return self.ef_op
        return self.target.rpartition(".")[2] if self.op == "call_function" else self.target

    @property
    def layer(self) -> int | None:
        return layer_of(self)


class _Ref(str):
    """A reference printed bare inside a repr (``%view`` rather than ``'%view'``)."""

    def __repr__(self) -> str:
        return str(self)


def layer_of(node: Any) -> int | None:
    """The decoder layer of a NodeInfo, fx node or graph.json node dict, or None.

    ``ef.layer`` metadata wins (the passes put it on every ExpertFlow op and predictor node);
    otherwise a module or weight path ``...layers.N...`` names it, so attention and norms of a
    layer are found too. Glue nodes (getitem, add) carry neither and belong to no layer.
    """
    if isinstance(node, Mapping):
        meta, op, target = node.get("meta", {}), node.get("op"), node.get("target")
    else:
        meta, op, target = node.meta, node.op, node.target
    if isinstance(meta.get(meta_keys.LAYER), int):
        return meta[meta_keys.LAYER]
    if op in ("call_module", "get_attr") and isinstance(target, str):
        match = _LAYER_IN_PATH.search(target)
        return int(match.group(1)) if match else None
    return None


def _json_value(value: Any) -> Any:
    """graph.json's argument encoding as plain Python values, node references as _Ref."""
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return _Ref("%" + payload)
    if kind == "tuple":
        return tuple(_json_value(v) for v in payload)
    if kind == "dict":
        return {k: _json_value(v) for k, v in payload}
    if kind == "slice":
        return slice(*(_json_value(v) for v in payload))
    if kind in ("dtype", "memory_format", "layout"):
        return _Ref("torch." + payload)
    if kind == "size":
        return _Ref(f"torch.Size({payload})")
    return _Ref(f"{kind}({payload!r})")


def _refs(value: Any, out: dict[str, None]) -> None:
    if isinstance(value, list):
        for v in value:
            _refs(v, out)
    elif isinstance(value, dict) and len(value) == 1:
        (kind, payload), = value.items()
        if kind == "node":
            out.setdefault(payload)
        elif kind in ("tuple", "slice"):
            _refs(payload, out)
        elif kind == "dict":
            _refs([v for _, v in payload], out)


def _args_text(args: Any, kwargs: Mapping[str, Any]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _from_json_node(item: Mapping[str, Any]) -> NodeInfo:
    target = str(item["target"])
    inputs: dict[str, None] = {}
    _refs(item.get("args"), inputs)  # args before kwargs: the order fx's all_input_nodes uses
    _refs(item.get("kwargs"), inputs)
    args = _json_value(item.get("args", {"tuple": []}))
    kwargs = _json_value(item.get("kwargs", {"dict": []}))
    ef_op = target.removeprefix(EF_PREFIX) if item["op"] == "call_function" and target.startswith(EF_PREFIX) else None
    return NodeInfo(item["name"], item["op"], target, ef_op, tuple(inputs), dict(item.get("meta", {})),
                    _args_text(args, kwargs))


def _from_fx(graph: Any, root: Any) -> list[NodeInfo]:
    from torch.fx.node import map_arg

    from .serialize import function_name

    def ref(node: Any) -> _Ref:
        return _Ref("%" + node.name)

    records = []
    for n in graph.nodes:
        target = function_name(n.target) if n.op == "call_function" else str(n.target)
        ef_op = target.removeprefix(EF_PREFIX) if n.op == "call_function" and target.startswith(EF_PREFIX) else None
        module_class = None
        if n.op == "call_module" and root is not None:
            try:
                module_class = type(root.get_submodule(n.target)).__name__
            except AttributeError:  # a graph detached from its module: the path is all we have
                pass
        text = _args_text(map_arg(n.args, ref), map_arg(n.kwargs, ref))
        records.append(NodeInfo(n.name, n.op, target, ef_op, tuple(a.name for a in n.all_input_nodes),
                                dict(n.meta), text, module_class))
    return records


def node_records(graph: Any) -> list[NodeInfo]:
    """Normalises an ``fx.GraphModule``, ``fx.Graph``, graph.json dict or list of its nodes."""
    if isinstance(graph, Mapping):
        graph = graph["nodes"]
    if isinstance(graph, list):
        return [_from_json_node(item) for item in graph]
    root = graph if hasattr(graph, "graph") and hasattr(graph, "get_submodule") else None
    return _from_fx(root.graph if root is not None else graph, root)


def to_networkx(graph: Any) -> nx.DiGraph:
    """A DiGraph keyed by node name, edges from producer to consumer, in program order.

    Node attributes: op, target (qualified), short (table name), ef_op, layer, stream,
    role, index (position in the graph: the order the runtime issues nodes).
    """
    g = nx.DiGraph()
    for index, rec in enumerate(node_records(graph)):
        g.add_node(rec.name, op=rec.op, target=rec.target, short=rec.short_target, ef_op=rec.ef_op,
                   layer=rec.layer, stream=rec.meta.get(meta_keys.STREAM), role=rec.meta.get(meta_keys.ROLE),
                   index=index)
        for src in rec.inputs:
            g.add_edge(src, rec.name)
    return g


NodeCost = Callable[[Mapping[str, Any]], float]


def unit_cost(attrs: Mapping[str, Any]) -> float:
    """1 per node the compute stream executes; inputs, weights, outputs and copy ops are free."""
    return 0.0 if attrs["op"] in FREE_OPS or attrs.get("stream") in meta_keys.COPY_STREAMS else 1.0


def weighted_cost(attrs: Mapping[str, Any]) -> float:
    """A rough relative cost: experts and whole modules (attention, norms) dwarf glue ops.

    The weights are orders of magnitude, not measurements: they rank paths, nothing more.
    """
    base = unit_cost(attrs)
    if attrs.get("ef_op") == "expert_compute":
        return 8.0 * base
    if attrs["op"] == "call_module":
        return 4.0 * base
    return base


def critical_path(g: nx.DiGraph, cost: NodeCost = unit_cost) -> tuple[float, list[str]]:
    """The heaviest source-to-sink path by summed node ``cost``: (its cost, its node names).

    Ties go to the predecessor earliest in program order and to the latest end node, so the answer
    is deterministic and runs to the graph's output.
    """
    best: dict[str, float] = {}
    prev: dict[str, str | None] = {}
    index = lambda n: g.nodes[n].get("index", 0)  # noqa: E731
    for name in nx.lexicographical_topological_sort(g, key=index):
        preds = sorted(g.predecessors(name), key=lambda n: (-best[n], index(n)))
        prev[name] = preds[0] if preds else None
        best[name] = cost(g.nodes[name]) + (best[preds[0]] if preds else 0.0)
    if not best:
        return 0.0, []
    end = max(best, key=lambda n: (best[n], index(n)))  # on a tie, the later node: the path runs to the sink
    path = [end]
    while (p := prev[path[-1]]) is not None:
        path.append(p)
    return best[end], path[::-1]


@dataclass(frozen=True)
class PrefetchOverlap:
    """How much compute a prefetch's copy can hide behind before its wait blocks."""

    layer: int | None
    prefetch: str
    wait: str | None  # None: nothing waits on it (the handle is unused)
    compute_nodes: int  # compute-stream nodes issued between the prefetch and its wait
    compute_cost: float  # the same nodes by weighted_cost: how heavy that window is


@dataclass(frozen=True)
class StreamSummary:
    nodes_per_stream: dict[str, int]
    prefetches: list[PrefetchOverlap]
    on_demand_waits: list[str]  # waits no prefetch feeds: every expert loads when routed


def stream_summary(g: nx.DiGraph) -> StreamSummary:
    """Nodes per stream and, per prefetch, the compute window its copies overlap."""
    order = sorted(g.nodes, key=lambda n: g.nodes[n]["index"])
    per_stream: dict[str, int] = {}
    for name in order:
        stream = g.nodes[name].get("stream") or "unscheduled"
        per_stream[stream] = per_stream.get(stream, 0) + 1
    prefetches, fed = [], set()
    for name in order:
        attrs = g.nodes[name]
        if attrs.get("ef_op") != "prefetch":
            continue
        wait = next((s for s in sorted(g.successors(name), key=lambda s: g.nodes[s]["index"])
                     if g.nodes[s].get("ef_op") == "wait"), None)
        end = g.nodes[wait]["index"] if wait else len(order)
        window = [g.nodes[n] for n in order[attrs["index"] + 1:end]]
        busy = [a for a in window if unit_cost(a) > 0]
        fed.add(wait)
        prefetches.append(PrefetchOverlap(attrs.get("layer"), name, wait, len(busy),
                                          sum(weighted_cost(a) for a in busy)))
    on_demand = [n for n in order if g.nodes[n].get("ef_op") == "wait" and n not in fed]
    return StreamSummary(per_stream, prefetches, on_demand)


def count_by(g: nx.DiGraph, key: str, nodes: Iterable[str] | None = None) -> dict[str, int]:
    """How many nodes have each value of attribute ``key`` (None values skipped), by first use."""
    counts: dict[str, int] = {}
    for name in g.nodes if nodes is None else nodes:
        value = g.nodes[name].get(key)
        if value is not None:
            counts[str(value)] = counts.get(str(value), 0) + 1
    return counts
