"""The proxies the front end traces with, and its rules for which values are fixed when compiled.

Every proxy carries a meta-device value (``node.meta["ef.meta"]``) computed while tracing, so
code that star-unpacks ``x.shape`` traces (the rank is known) and a Python branch on a value fixed
at compile time (a dtype, a rank, a size the code gives literally, the cache's layout) is taken.
:func:`is_static_value` says which values those are; anything else raises
:class:`DynamicPython`, which the tracer (``passes/trace.py``) turns into a module run whole or a
refusal naming the module.
"""

from __future__ import annotations

import dis
import inspect
import operator
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.fx.proxy import Attribute, Proxy

from ..ir import meta_keys, ops
from ..ir.allowlist import CACHE_ATTRIBUTES
from .driver import TraceFailure
from .leaves import is_leaf_callable


def to_meta(value: Any) -> Any:
    if isinstance(value, Proxy):
        return value.node.meta.get(meta_keys.VALUE)
    if isinstance(value, (list, tuple)):
        items = [to_meta(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(to_meta(value.start), to_meta(value.stop), to_meta(value.step))
    return value


def _static_length(proxy: Proxy) -> int | None:
    """The length of a traced sequence known while tracing (a shape, a tuple of outputs), else None.

    Tensors have no static length: their first dimension is the batch or the sequence, which the
    graph must not fix at the sizes it was traced with.
    """
    meta = proxy.node.meta.get(meta_keys.VALUE)
    return len(meta) if isinstance(meta, (tuple, list, torch.Size)) else None


class DynamicPython(TraceFailure):
    """Python control flow or iteration on a value that is not fixed when the model is compiled;
    ``branch``: the index of the undecided ``if`` among the trace's dynamic branches, when it is one."""

    def __init__(self, message: str, module: str | None = None, branch: int | None = None):
        super().__init__(message, module)
        self.branch = branch



def _unknown_length(proxy: Proxy, what: str) -> TraceFailure:
    meta = proxy.node.meta.get(meta_keys.VALUE)
    why = (f"it is a tensor of shape {tuple(meta.shape)}, whose length is a run-time size"
           if isinstance(meta, torch.Tensor) else
           proxy.node.meta.get(meta_keys.VALUE_ERROR, "its value is data-dependent"))
    return DynamicPython(f"cannot {what} {proxy.node.format_node()}: its length is unknown ({why})")


def cache_address(node: Any) -> tuple[fx.Node, tuple] | None:
    """(the cache input, the path :func:`ops.cache_state` takes) when ``node`` is the cache input
    (``()``) or one of its layers (``cache.layers[i]``: ``("layers", i)``); else None."""
    if not isinstance(node, fx.Node):
        return None
    if ops.is_cache_input(node):
        return node, ()
    if node.op == "call_function" and node.target is operator.getitem and type(node.args[1]) is int:
        layers = node.args[0]
        if isinstance(layers, fx.Node) and layers.op == "call_function" and layers.target is getattr \
                and layers.args[1] == "layers" and ops.is_cache_input(layers.args[0]):
            index = node.args[1] % max(len(layers.meta.get(meta_keys.VALUE) or ()), 1)
            return layers.args[0], ("layers", index)
    return None


def _from_cache(node: Any) -> bool:
    """Whether ``node`` is the cache input or reached from it by attribute reads and indexing."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (getattr, operator.getitem,
                                                                                     ops.cache_state):
        node = node.args[0]
    return ops.is_cache_input(node)


def _holds_state(node: fx.Node, name: str) -> bool:
    """Whether attribute ``name`` of the traced object is state: a tensor, or nothing yet."""
    current = getattr(node.meta.get(meta_keys.VALUE), "__dict__", {}).get(name)
    return current is None or isinstance(current, torch.Tensor)


#: What fx's proxies set on themselves; any other attribute written to a proxy is the model's code.
_PROXY_FIELDS = frozenset({"node", "tracer", "root", "attr", "_node"})


class MetaProxy(Proxy):
    """A proxy that can be iterated and measured when its meta value has a static length.

    ``x.shape`` is the case that matters: fx's proxies refuse ``view(*x.shape)`` and
    ``a, b = x.shape[:2]`` outside a direct unpacking, but the rank of a tensor is static.
    """

    def __getattr__(self, k: str) -> "MetaAttribute":
        return MetaAttribute(self, k)  # fx's own Attribute would lose the meta-aware methods

    def __setattr__(self, name: str, value: Any) -> None:
        """The model writing state onto its cache (``cache.layers[i].history = x``: a tensor where
        there was none or a tensor) is a graph node, :func:`ops.set_cache_state`; anything else
        keeps fx's behaviour, a Python attribute of the proxy (Inkling 2's loop extends
        ``cache.layers`` when the cache lacks its loop layers, which the cache it runs with has)."""
        if name in _PROXY_FIELDS or not _from_cache(self.node) or not _holds_state(self.node, name):
            return object.__setattr__(self, name, value)
        address = cache_address(self.node)
        if address is None:
            raise DynamicPython(f"cannot trace a write to {_describe(self.node)}.{name}: state a graph carries "
                                "on the cache lives on the cache object or one of its layers")
        cache, path = address
        self.tracer.create_proxy("call_function", ops.set_cache_state,
                                 (self.tracer.proxy(cache), path, name, value), {})

    def __iter__(self) -> Iterator[Proxy]:
        n = _static_length(self)
        if n is None:  # fx's own rule: ``a, b = t`` unpacks as many items as the code names
            n = _unpack_count(inspect.currentframe())
        if n is None:
            raise _unknown_length(self, "iterate")
        return iter([self[i] for i in range(n)])

    def __len__(self) -> int:
        n = _static_length(self)
        if n is None:
            raise _unknown_length(self, "take len() of")
        return n

    def __bool__(self) -> bool:
        """Branching on a value fixed at compile time (a weight's dtype, ``x.dtype == torch.float32``)
        takes the branch; anything that can change between calls is control flow fx refuses."""
        meta = self.node.meta.get(meta_keys.VALUE)
        if self.node.meta.get(meta_keys.STATIC) and isinstance(meta, bool):
            return meta
        if isinstance(meta, bool) and _compares_sizes(self.node) and self.tracer.resample(self.node) is meta:
            return meta
        branch, forced = self.tracer.dynamic_branch()
        if forced is not None:  # the trace is exploring both sides of this branch (trace.py)
            return forced
        raise DynamicPython(f"Python control flow on {_describe(self.node)}, whose value is not fixed when the "
                           "model is compiled (it depends on the input's values or sizes, or on the device the "
                           "compiled model runs on); one graph cannot follow both branches", branch=branch)


def _compares_sizes(node: fx.Node) -> bool:
    """``a == b`` or ``a != b`` of two sizes that both come from the traced values (not a literal):
    Gemma 4 asks ``hidden_states.shape[1] == input_ids.shape[1]``, whether its stack sliced."""
    return (node.op == "call_function" and node.target in (operator.eq, operator.ne) and len(node.args) == 2
            and all(isinstance(a, fx.Node) and type(a.meta.get(meta_keys.VALUE)) is int for a in node.args))


def _describe(node: fx.Node, depth: int = 3) -> str:
    """A short expression for ``node`` (``hidden_states.is_cuda``, ``x.sum() > 0``) for messages."""
    if depth == 0 or node.op in ("placeholder", "get_attr", "call_module"):
        return node.name if node.op != "get_attr" else str(node.target)

    def arg(a: Any) -> str:
        return _describe(a, depth - 1) if isinstance(a, fx.Node) else repr(a)

    if node.op == "call_function" and node.target is getattr:
        return f"{arg(node.args[0])}.{node.args[1]}"
    if node.op == "call_method":
        return f"{arg(node.args[0])}.{node.target}({', '.join(arg(a) for a in node.args[1:])})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(arg(a) for a in node.args)})"


def _unpack_count(frame: types.FrameType | None) -> int | None:
    """N when the caller of ``frame`` is executing ``UNPACK_SEQUENCE N`` (``a, b = proxy``)."""
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return None
    for inst in dis.get_instructions(caller.f_code):
        if inst.offset == caller.f_lasti:
            return inst.argval if inst.opname == "UNPACK_SEQUENCE" else None
    return None


class CacheProxy(MetaProxy):
    """The graph's cache input: the model's own ``isinstance(cache, MiniMaxCache)`` sees the class
    of the cache it was traced with (what runs is made by the same rule: ``hf_compat.cache_maker``)."""

    @property
    def __class__(self) -> type:  # type: ignore[override]
        meta = self.node.meta.get(meta_keys.VALUE)
        return type(meta) if meta is not None else MetaProxy


class MetaAttribute(Attribute, MetaProxy):
    """fx's lazily created attribute proxy (``x.shape``, ``x.view``), with MetaProxy's methods."""


_STATIC_ATTRIBUTES = frozenset({"dtype", "ndim"})  # a graph input's rank is fixed when compiled


#: Methods whose literal size arguments fix those dimensions of the result: ``expand(4, b, -1)``
#: has 4 rows whatever the input (Qwen3.5's text/temporal/height/width position ids).
_SIZED = frozenset({"expand", "view", "reshape"})


def fixed_dims(node: fx.Node) -> frozenset[int]:
    """The dimensions of ``node``'s tensor whose size is a literal in the code, not an input's size."""
    if node.op != "call_method" or node.target not in _SIZED:
        return frozenset()
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return frozenset(i for i, size in enumerate(sizes) if type(size) is int and size >= 0)


def _is_fixed_size(node: fx.Node) -> bool:
    """``t.shape[i]`` or ``t.size(i)`` for a dimension :func:`fixed_dims` knows."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        tensor, index = node.args
    elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
          and node.args[0].op == "call_function" and node.args[0].target is getattr
          and node.args[0].args[1] == "shape"):
        tensor, index = node.args[0].args[0], node.args[1]
    else:
        return False
    meta = tensor.meta.get(meta_keys.VALUE) if isinstance(tensor, fx.Node) else None
    if type(index) is not int or not isinstance(meta, torch.Tensor):
        return False
    return index % max(meta.dim(), 1) in tensor.meta.get(meta_keys.FIXED_DIMS, frozenset())


def is_static_value(node: fx.Node) -> bool:
    """True when the node's value is fixed when the model is compiled: weights and buffers, their
    shapes, any tensor's dtype and rank, sizes the code gives literally, and what is computed from
    those alone. Not: anything that depends on the input's sizes or values, or on the device
    (``x.is_cuda``) the compiled model runs on."""
    if node.op == "get_attr" or _is_fixed_size(node):
        return True
    if node.op == "placeholder":
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _STATIC_ATTRIBUTES:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in CACHE_ATTRIBUTES and ops.is_cache_input(node.args[0]):
        return True
    if node.op == "call_method" and node.target == "dim" and len(node.args) == 1:
        return True
    if node.op not in ("call_function", "call_method") or is_leaf_callable(node.target):
        return False
    return all(a.meta.get(meta_keys.STATIC, False) for a in node.all_input_nodes)
