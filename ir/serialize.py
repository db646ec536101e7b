"""The scheduled graph as JSON, and back, with every target resolved against an allowlist.

Loading runs no code from the artefact and unpickles nothing: a node's target is a qualified
name that must resolve inside an allowlisted module (torch, operator, math, ExpertFlow's ops),
a ``torch.Tensor`` method name, or a submodule/attribute path of the model skeleton.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
from typing import Any

import torch
from torch import fx
from torch.fx.node import _get_qualified_name

from . import ops
from .hf_compat import rename_cache_keyword

SCHEMA = 2  # 2: the Driver takes logits_to_keep
ALLOWED_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.functional", "torch.special",
                   "torch.linalg", "operator", "_operator", "math", "expertflow.ir.ops")
ALLOWED_BUILTINS = {"getattr": getattr, "len": len, "int": int, "float": float, "max": max, "min": min}
#: Callables in allowlisted modules that touch files: no compiled graph calls them.
DENIED_FUNCTIONS = frozenset({"torch.save", "torch.load", "torch.from_file"})
META_KEYS = ("ef.layer", "ef.role", "ef.stream", "ef.slot_group", "ef.module")


class GraphFormatError(ValueError):
    """The serialised graph is malformed or names a target outside the allowlist."""


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    raise GraphFormatError(f"cannot store argument {value!r} of type {type(value).__name__}")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        if payload not in env:
            raise GraphFormatError(f"node {payload!r} is used before it is defined")
        return env[payload]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in payload}
    if kind == "slice":
        return slice(*(_decode(v, env) for v in payload))
    if kind in ("dtype", "memory_format", "layout"):
        resolved = getattr(torch, payload, None)
        if not isinstance(resolved, (torch.dtype, torch.memory_format, torch.layout)):
            raise GraphFormatError(f"unknown torch {kind} {payload!r}")
        return resolved
    simple = {"size": lambda p: torch.Size(p), "device": torch.device, "float": float,
              "ellipsis": lambda p: Ellipsis}
    if kind in simple:
        return simple[kind](payload)
    raise GraphFormatError(f"unknown argument encoding {kind!r}")


def function_name(target: Any) -> str:
    name = ops.op_name(target)
    return f"expertflow.ir.ops.{name}" if name else _get_qualified_name(target)


@functools.lru_cache(maxsize=1)
def _torch_callables() -> frozenset:
    """Torch functions a graph may call: those that dispatch on tensors, plus the factories."""
    from torch.overrides import get_overridable_functions

    funcs = set().union(*get_overridable_functions().values())
    funcs |= {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
              torch.linspace, torch.eye, torch.finfo, torch.iinfo, torch.randn, torch.rand}
    return frozenset(f for f in funcs if f not in (torch.save, torch.load, torch.from_file))


def resolve_function(name: str) -> Any:
    """The callable for a qualified name, if it lies in the allowlist."""
    if name in ALLOWED_BUILTINS:
        return ALLOWED_BUILTINS[name]
    module_name, _, attr = name.rpartition(".")
    if module_name not in ALLOWED_MODULES or attr.startswith("__") or name in DENIED_FUNCTIONS:
        raise GraphFormatError(f"call target {name!r} is outside the allowlist {ALLOWED_MODULES}")
    obj = getattr(importlib.import_module(module_name), attr, None)
    if module_name.startswith("torch") and obj not in _torch_callables():
        raise GraphFormatError(f"call target {name!r} is not a tensor operation; ExpertFlow graphs call "
                               "only torch functions that take tensors and the tensor factories")
    if not callable(obj):
        raise GraphFormatError(f"call target {name!r} does not exist in this torch/ExpertFlow version")
    return obj


def graph_to_json(graph: fx.Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        target = function_name(node.target) if node.op == "call_function" else node.target
        if node.op == "call_function":
            resolve_function(target)  # fail at compile time, not at load time
        meta = {k: node.meta[k] for k in META_KEYS if node.meta.get(k) is not None}
        try:
            args, kwargs = _encode(node.args), _encode(node.kwargs)
        except GraphFormatError as exc:
            raise GraphFormatError(f"{exc} in {node.format_node()}") from exc
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": args, "kwargs": kwargs,
                      "meta": meta})
    return {"schema": SCHEMA, "nodes": nodes}


def graph_from_json(data: dict[str, Any], root: torch.nn.Module) -> fx.Graph:
    """Rebuilds the graph; module and attribute targets must exist on ``root``."""
    if data.get("schema") != SCHEMA:
        raise GraphFormatError(f"graph schema {data.get('schema')!r}, this ExpertFlow reads {SCHEMA}")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for item in data["nodes"]:
        op, target = item["op"], item["target"]
        if op == "call_function":
            target = resolve_function(target)
        elif op == "call_method" and not (isinstance(target, str) and not target.startswith("_")
                                          and hasattr(torch.Tensor, target)):
            # Dunder methods (``__call__``, ``__subclasses__``) would let a graph call anything.
            raise GraphFormatError(f"method {target!r} is not a public torch.Tensor method")
        elif op in ("call_module", "get_attr"):
            try:
                module = root.get_submodule(target) if op == "call_module" else operator.attrgetter(target)(root)
            except AttributeError as exc:
                raise GraphFormatError(f"{op} target {target!r} is not in the model skeleton") from exc
        elif op not in ("placeholder", "output", "call_method"):
            raise GraphFormatError(f"unknown node op {op!r}")
        args = _decode(item["args"], env)
        kwargs = _decode(item["kwargs"], env)
        if op == "call_module" and isinstance(kwargs, dict):  # compiled under a release with the other name
            kwargs = rename_cache_keyword(kwargs, module)
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
            # ``getattr(x, "__class__")`` and friends reach module globals, and from there os.system.
            raise GraphFormatError(f"getattr of {args[1:]!r} in node {item['name']!r}: only public attributes")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=item["name"])
        node.meta.update(item.get("meta", {}))
        env[node.name] = node
    graph.lint()
    return graph

