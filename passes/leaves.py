"""transformers' own helpers that a graph calls whole: mask builders and per-step containers.

A causal LM's forward builds its attention masks with ``transformers.masking_utils``
(``create_causal_mask``, ``create_sliding_window_causal_mask``, ``create_recurrent_attention_mask``
for linear-attention and convolution layers...), whose Python branches on the cache and the
input's sizes; and some models make a fresh container each step that their layers share
(Gemma 4's ``KVSharingDict`` of shared keys and values). One graph cannot follow that Python, and
need not: while tracing, every such callable the model's modules name is replaced by one that
records a single ``call_function`` node to transformers' own function, which the compiled model
then runs each step, exactly as the model's forward does. A config argument becomes a
``get_attr`` of the module's ``config`` (the graph's code reads it from the model it runs on).

The list (``ir/hf_compat.leaf_callables``) is read from the installed transformers, so a release
that adds a mask kind is followed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.proxy import Proxy
from transformers import PreTrainedConfig

from ..ir.hf_compat import leaf_callables
from .driver import TraceFailure


_BY_ID = {id(f): f for f in leaf_callables().values()}


def is_leaf_callable(target: Any) -> bool:
    return id(target) in _BY_ID


def _config_paths(root: nn.Module) -> dict[int, str]:
    return {id(m.config): f"{name}.config" if name else "config" for name, m in root.named_modules()
            if isinstance(getattr(m, "config", None), PreTrainedConfig)}


class _Recording(type):
    """A stand-in for a class while tracing: calling it records a node; isinstance sees the original."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.original)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.record(*args, **kwargs)


@contextlib.contextmanager
def leaf_callables(tracer: fx.Tracer, root: nn.Module) -> Iterator[None]:
    """While tracing ``root``: each leaf callable named in the globals of a module of ``root``
    records one node (its config arguments read with ``get_attr``) instead of running."""
    configs = _config_paths(root)
    saved: list[tuple[dict, str, Any]] = []

    def record(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            def config_node(value: Any) -> Any:
                if isinstance(value, PreTrainedConfig):
                    if id(value) not in configs:
                        raise TraceFailure(f"{original.__name__} is given a config that is no module's own config")
                    return tracer.create_proxy("get_attr", configs[id(value)], (), {})
                return value

            args, kwargs = pytree.tree_map(config_node, (args, kwargs))
            return tracer.create_proxy("call_function", original, args, kwargs)
        if isinstance(original, type):  # the model's own isinstance checks must still hold
            return _Recording(original.__name__, (), {"original": original, "record": staticmethod(call)})
        return call

    scopes = {id(vars(sys.modules[type(m).__module__])): vars(sys.modules[type(m).__module__])
              for m in root.modules() if type(m).__module__ in sys.modules}
    try:
        for scope in scopes.values():
            for name, value in list(scope.items()):
                if callable(value) and not isinstance(value, Proxy) and is_leaf_callable(value):
                    saved.append((scope, name, value))
                    scope[name] = record(value)
        yield
    finally:
        for scope, name, value in saved:
            scope[name] = value
