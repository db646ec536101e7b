"""The closed lists of what a stored graph may call: tensor math, and nothing that reaches further.

A graph.json may come from a stranger. Its call targets resolve against these lists only (never
against whole modules), so no reflective or higher-order callable (``operator.attrgetter``,
``operator.call``, ``getattr`` on any name, a builtin with a ``key=`` callable, ``torch.vmap``,
``Tensor.register_hook``, ``Tensor.set_``/``as_strided`` that alias arbitrary memory, anything
that touches files or global state) can be named. The lists hold what the routers of every
architecture in the sweep compile to (under every routing option their config classes offer), plus
the tensor operations routers are made of; a model that needs another one fails at compile time,
naming it (compile runs the loader's own checks on what it wrote). ``getattr`` reads a closed set
of value attributes, and the fields of the named tuples torch's own calls on these lists return
(``.values``/``.indices`` of ``max``, ``topk``...), only from such a call's node.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .hf_compat import leaf_callables

_OPERATOR = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "invert", "getitem",
             "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "matmul")
_TORCH = ("abs", "add", "all", "amax", "amin", "any", "arange", "argmax", "argmin", "argsort", "bmm", "cat",
          "chunk", "clamp", "clamp_max", "clamp_min", "clip", "concat", "cumsum", "div", "einsum", "eq", "exp",
          "flatten", "full", "full_like", "gather", "ge", "gt", "index_select", "isin", "le", "log", "log1p", "log_softmax",
          "logsumexp", "lt", "masked_fill", "matmul", "max", "maximum", "mean", "min", "minimum", "mul", "ne", "neg",
          "ones", "ones_like", "permute", "pow", "reciprocal", "relu", "reshape", "rsqrt", "scatter", "scatter_add",
          "sigmoid", "sign", "softmax", "sort", "split", "sqrt", "square", "squeeze", "stack", "sub", "sum", "tanh",
          "topk", "transpose", "unbind", "unsqueeze", "where", "zeros", "zeros_like")
_FUNCTIONAL = ("embedding", "gelu", "linear", "log_softmax", "normalize", "relu", "sigmoid", "silu", "softmax", "softplus",
               "tanh")
_BUILTINS: dict[str, Any] = {"getattr": getattr, "len": len, "int": int, "float": float}

#: Qualified name (as ``graph_to_json`` writes it) -> callable.
FUNCTIONS: dict[str, Any] = {
    **{f"{mod}.{name}": getattr(operator, name) for name in _OPERATOR for mod in ("operator", "_operator")},
    **{f"torch.{name}": getattr(torch, name) for name in _TORCH},
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in _FUNCTIONAL},
    "torch._C._nn.linear": torch._C._nn.linear,
    "torch._C._nn.gelu": torch._C._nn.gelu,
    "torch._C._nn.softplus": torch._C._nn.softplus,  # F.softplus's own name (Ergo's residual gates)
    "torch._C._nn.log_sigmoid": torch._C._nn.log_sigmoid,  # F.logsigmoid's own name (Inkling's gates)
    "math.sqrt": math.sqrt,
    **_BUILTINS,
    **{f"expertflow.ir.ops.{name}": fn for name, fn in ops.OPS.items()},
    # transformers' mask builders and per-step containers, called whole (passes/leaves.py)
    **leaf_callables(),
}

#: Tensor methods a graph may call.
METHODS = frozenset({
    "abs", "add", "all", "amax", "any", "argmax", "argsort", "bfloat16", "bool", "chunk", "clamp", "clamp_min",
    "clone", "contiguous", "cumsum", "detach", "div", "double", "eq", "exp", "expand", "expand_as", "flatten", "float", "gather", "ge",
    "gt", "half", "index", "index_select", "int", "le", "log", "long", "lt", "masked_fill", "masked_fill_", "matmul", "max",
    "mean", "min", "mul", "ne", "neg", "new_full", "new_ones", "new_zeros", "norm", "permute", "pow", "reshape",
    "repeat", "rsqrt", "scatter", "scatter_", "scatter_add", "scatter_add_", "sigmoid", "size", "softmax", "sort", "split",
    "sqrt", "squeeze", "sub", "sum", "t", "tanh", "to", "topk", "transpose", "type", "type_as", "unbind", "unsqueeze",
    "view", "view_as", "where",
})

#: Methods a graph may call on the cache input (the graph's ``cache``): questions about its size,
#: which transformers' mask code asks (Inkling 2's ``cache.get_mask_sizes``); nothing that writes.
CACHE_METHODS = frozenset({"get_mask_sizes", "get_seq_length", "get_query_offset"})

#: What the cache input says of its own layout (fixed by the config, not by what it holds so far):
#: attributes a graph may read of it, and that the front end treats as fixed when compiling.
CACHE_ATTRIBUTES = frozenset({"is_sliding", "is_compileable", "is_linear", "is_dummy", "is_croppable"})

#: What ``getattr`` may read of any value: values, never methods or anything that leads to code.
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT"})


def _fields(name: str) -> tuple[str, ...]:
    """The fields of the named tuple torch returns from ``name`` (``torch.return_types.max``:
    values, indices), read from torch; () where it returns no named tuple."""
    kind = getattr(torch.return_types, name, None)
    return tuple(getattr(kind, "__match_args__", ())) if isinstance(kind, type) else ()


#: (node op, target) of the calls on these lists that return one of torch's named tuples, and the
#: fields ``getattr`` may read from their result (``x.max(dim=-1).values``, DeepSeek-V2's
#: group-limited routing): tensors, read from that node only, so no other value's ``values``.
RETURN_FIELDS: dict[tuple[str, Any], frozenset[str]] = {
    **{("call_function", getattr(torch, n)): frozenset(_fields(n)) for n in _TORCH if _fields(n)},
    **{("call_method", n): frozenset(_fields(n)) for n in METHODS if _fields(n)},
}


def readable(source: Any, attribute: Any) -> bool:
    """Whether a graph may read ``attribute`` of ``source`` (an fx node, or a constant) with getattr."""
    if attribute in ATTRIBUTES:
        return True
    op, target = getattr(source, "op", None), getattr(source, "target", None)
    if attribute in CACHE_ATTRIBUTES and ops.is_cache_input(source):
        return True
    try:
        return attribute in RETURN_FIELDS.get((op, target), ())
    except TypeError:  # an unhashable target: no call on these lists
        return False


def function(name: str) -> Any:
    """The callable for a qualified name in :data:`FUNCTIONS`; KeyError otherwise."""
    return FUNCTIONS[name]
