"""The scheduled graph as JSON, and back, validated whole before any code is generated from it.

Loading runs no code from the artefact and unpickles nothing: a node's target is a name on the
closed lists of ``ir/allowlist.py`` (tensor operations, tensor methods, ExpertFlow's ops), a
parameter or buffer of the model skeleton (``get_attr``), or one of its submodules; every string
that fx pastes into generated Python (node names, inputs, keywords, module paths) must be a
plain identifier or path.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
from typing import Any

import torch
from torch import fx
from torch.fx.node import _get_qualified_name
from transformers import PreTrainedConfig

from . import allowlist, meta_keys, ops

SCHEMA = 3  # 3: the Driver is the causal LM's own forward (2-D mask in, masks built in the graph)
META_KEYS = meta_keys.STORED
#: The graph's inputs, in order: the Driver's forward, then the ExpertFlow execution context.
INPUTS = ("input_ids", "attention_mask", "position_ids", "cache", "logits_to_keep", "ef_ctx")
_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "torch", "inf", "nan", "NoneType"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,199}")
_PATH_PART = re.compile(r"[A-Za-z0-9_]{1,200}")


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
    if len(value) != 1:
        raise GraphFormatError(f"argument encoding {str(value)[:60]} is not one tagged value")
    (kind, payload), = value.items()
    if kind == "node":
        if payload not in env:
            raise GraphFormatError(f"node {payload!r} is used before it is defined")
        return env[payload]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if kind == "dict":
        if not isinstance(payload, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                    for p in payload):
            raise GraphFormatError("a dict argument must be a list of [string key, value] pairs")
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


def resolve_function(name: str) -> Any:
    """The callable for a qualified name on the closed list (``ir/allowlist.py``)."""
    try:
        return allowlist.function(name)
    except (KeyError, TypeError):
        raise GraphFormatError(f"call target {name!r} is not on ExpertFlow's closed list of tensor operations "
                               "(ir/allowlist.py)") from None


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


def _plain_name(value: Any, what: str) -> str:
    """``value`` if it can be pasted into generated Python as a name: an identifier that shadows
    no keyword, builtin or name the generated code uses."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in _RESERVED:
        raise GraphFormatError(f"{what} {str(value)[:60]!r} is not a plain identifier")
    return value


def _module_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not all(_PATH_PART.fullmatch(p) and not p.startswith("_")
                                             for p in value.split(".")):
        raise GraphFormatError(f"{what} {str(value)[:60]!r} is not a module path")
    return value


def _check_call(op: str, target: Any, args: Any, kwargs: Any, name: str) -> None:
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise GraphFormatError(f"node {name!r}: args must be a tuple and kwargs a dict")
    for key in kwargs:  # pasted into generated code as ``f(x, key=...)``
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key) or key.startswith("__"):
            raise GraphFormatError(f"node {name!r}: keyword {str(key)[:60]!r} is not an identifier")
    if target is getattr and not (len(args) == 2 and not kwargs and allowlist.readable(*args)):
        calls = sorted({getattr(t, "__name__", t) for _, t in allowlist.RETURN_FIELDS})
        raise GraphFormatError(f"node {name!r}: getattr of {str(args[1:])[:60]} from {str(args[:1])[:60]}: only "
                               f"{sorted(allowlist.ATTRIBUTES)} of any value, or a field of the named tuple one of "
                               f"{calls} returns, read from that call's node")
    if target in (ops.cache_state, ops.set_cache_state):
        cache = args[0] if args else None
        if not ops.is_cache_input(cache) or kwargs \
                or len(args) != (3 if target is ops.cache_state else 4):
            raise GraphFormatError(f"node {name!r}: {target.__name__} takes the cache input, a path and a name")
        try:
            ops.check_state_address(args[1], args[2])
        except ValueError as exc:
            raise GraphFormatError(f"node {name!r}: {exc}") from None
    if target in (len, int, float) and kwargs:
        raise GraphFormatError(f"node {name!r}: {target.__name__} takes no keywords")


def graph_from_json(data: Any, root: torch.nn.Module) -> fx.Graph:
    """Rebuilds and validates the graph before any code is generated from it: node names are
    plain identifiers, the inputs are exactly :data:`INPUTS`, call targets are on the closed
    lists, ``get_attr`` reads only parameters, buffers and module configs of ``root`` and ``call_module`` only
    its submodules. Raises GraphFormatError naming the node."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise GraphFormatError(f"graph schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                               f"this ExpertFlow reads {SCHEMA}")
    items = data.get("nodes")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise GraphFormatError("nodes must be a non-empty list of objects")
    tensors = {n for n, _ in root.named_parameters()} | {n for n, _ in root.named_buffers()}
    # a module's config: what transformers' mask builders take (passes/leaves.py)
    configs = {f"{n}.config" for n, m in root.named_modules() if n and isinstance(getattr(m, "config", None),
                                                                               PreTrainedConfig)}
    modules = {n for n, _ in root.named_modules() if n}
    graph, env = fx.Graph(), {}
    for index, item in enumerate(items):
        name = _plain_name(item.get("name"), f"node {index}'s name")
        op, target = item.get("op"), item.get("target")
        expected_input = INPUTS[index] if index < len(INPUTS) else None
        if (op == "placeholder") != (expected_input is not None) or (op == "placeholder" and target != expected_input):
            raise GraphFormatError(f"node {name!r}: the graph's inputs must be exactly {', '.join(INPUTS)}")
        if (op == "output") != (index == len(items) - 1):
            raise GraphFormatError(f"node {name!r}: the graph must end in its one output node")
        if op == "call_function":
            target = resolve_function(target)
        elif op == "call_method":
            pass  # checked with its receiver, below
        elif op == "get_attr":
            if _module_path(target, f"node {name!r}: get_attr target") not in tensors | configs:
                raise GraphFormatError(f"get_attr target {target!r} is not a parameter, buffer or config of the model")
        elif op == "call_module":
            if _module_path(target, f"node {name!r}: call_module target") not in modules:
                raise GraphFormatError(f"call_module target {target!r} is not in the model skeleton")
        elif op not in ("placeholder", "output"):
            raise GraphFormatError(f"unknown node op {str(op)[:40]!r}")
        args, kwargs = _decode(item.get("args"), env), _decode(item.get("kwargs"), env)
        if op == "call_method" and target not in allowlist.METHODS and not (
                target in allowlist.CACHE_METHODS and isinstance(args, tuple) and args
                and ops.is_cache_input(args[0])):
            raise GraphFormatError(f"method {str(target)[:60]!r} is not on ExpertFlow's closed list of "
                                   "tensor methods")
        if op in ("call_function", "call_method", "call_module"):
            _check_call(op, target, args, kwargs, name)
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        if node.name != name or name in env:  # fx renamed it: a clash with another name
            raise GraphFormatError(f"node name {name!r} clashes with another name in the graph")
        meta = item.get("meta", {})
        if isinstance(meta, dict):
            node.meta.update({k: v for k, v in meta.items() if k in META_KEYS and isinstance(v, (int, str))})
        env[name] = node
    graph.lint()
    return graph
