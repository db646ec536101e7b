"""What the installed transformers calls things, read from its signatures, never assumed.

transformers renames keywords between releases: 5.24 calls the KV cache ``cache`` where 5.17 to
5.23 call it ``past_key_values`` (in decoder layers, attention modules, the masking functions and
the model outputs alike). Every place ExpertFlow hands transformers a cache asks here which name
the callee takes, so the front end and the runtime follow the release that is
installed. (A graph compiled under another release is not patched: ``runtime.load`` runs the
graph the installed release derives from the same config and options.)
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import torch

#: The names transformers has given the KV-cache keyword, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


def parameters(fn: Any) -> frozenset[str]:
    """The parameter names of ``fn`` (through decorators that keep ``__wrapped__``); empty if unknown."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_keyword_of(fn: Any) -> str | None:
    """The KV-cache keyword ``fn`` declares, or None when it declares neither name."""
    names = parameters(fn)
    return next((k for k in CACHE_KEYWORDS if k in names), None)


@functools.cache
def mask_cache_keyword() -> str:
    """The cache keyword of transformers' masking functions (``create_causal_mask`` and kin)."""
    from transformers import masking_utils

    keyword = cache_keyword_of(masking_utils.create_causal_mask)
    if keyword is None:
        raise RuntimeError("transformers.masking_utils.create_causal_mask takes no cache argument "
                           f"({', '.join(CACHE_KEYWORDS)}); this transformers release is not supported")
    return keyword


def module_cache_keyword(module: Any) -> str:
    """The cache keyword of a module's forward; a forward that only takes ``**kwargs`` passes them
    on to modules of the same release, so it gets that release's name (the masking functions')."""
    return cache_keyword_of(type(module).forward) or mask_cache_keyword()


def output_cache_field(output_class: type) -> str:
    """The field of a transformers ``ModelOutput`` class that carries the cache."""
    names = {f.name for f in dataclasses.fields(output_class)}
    field = next((k for k in CACHE_KEYWORDS if k in names), None)
    if field is None:
        raise RuntimeError(f"{output_class.__name__} has no cache field ({', '.join(CACHE_KEYWORDS)})")
    return field


def _made_cache_class(stack_cls: type) -> tuple[type, bool] | None:
    """The Cache class a decoder stack's forward makes when it is given none (``if use_cache and
    cache is None: cache = X(config=self.config)``), and whether it passes the config; None when
    the forward makes none that way."""
    from transformers.cache_utils import Cache

    try:
        fn = inspect.unwrap(stack_cls.forward)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    scope = getattr(fn, "__globals__", {})
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            made = scope.get(node.value.func.id)
            if isinstance(made, type) and issubclass(made, Cache):
                return made, any(k.arg == "config" for k in node.value.keywords)
    return None


def cache_maker(lm: Any) -> Callable[[], Any]:
    """What makes an empty cache of the kind the model's own forward makes when generation passes
    none (``DynamicCache(config=...)``, whose layers follow ``config.layer_types``: keys and
    values, linear-attention and convolution states alike; MiniMax's own ``MiniMaxCache``)."""
    from transformers import DynamicCache

    stack = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", lm)
    made = _made_cache_class(type(stack))
    if made is None:
        return functools.partial(DynamicCache, config=stack.config)
    cls, with_config = made
    return functools.partial(cls, config=stack.config) if with_config else cls


def new_cache(lm: Any) -> Any:
    """An empty cache for ``lm``, as its own forward would make it (:func:`cache_maker`)."""
    return cache_maker(lm)()


def cached_length(cache: Any) -> int:
    """Tokens ``cache`` holds. ``cache.get_seq_length()`` asks layer 0, or the first layer it
    recognises as attention; a cache that makes its layers lazily (MiniMax's, whose layer 0 may be
    lightning attention that never fills its key/value layer) answers 0 there. The longest
    layer is the count: every key/value layer holds the tokens seen (a sliding one counts them all)."""
    lengths = [layer.get_seq_length() for layer in getattr(cache, "layers", ()) if hasattr(layer, "get_seq_length")]
    lengths.append(cache.get_seq_length())
    # Linear-attention layers count their tokens in a device tensor (transformers >= 5.2x): reading
    # it stalls the host on a GPU, so the attention layers' integer counts decide when any has one.
    counted = [n for n in lengths if not isinstance(n, torch.Tensor)]
    if any(counted):
        return max(counted)
    return int(max(int(n) for n in lengths)) if lengths else 0


def _mask_builders() -> dict[str, Any]:
    from transformers import masking_utils

    return {f"{masking_utils.__name__}.{name}": fn for name, fn in vars(masking_utils).items()
            if name.startswith("create_") and callable(fn) and getattr(fn, "__module__", None) == masking_utils.__name__}


def _step_containers() -> dict[str, Any]:
    """Classes of ``cache_utils`` that hold no cache but what one forward shares between its layers
    (Gemma 4's ``KVSharingDict``), and the plain ``UserDict`` earlier releases share instead:
    made afresh each step."""
    from transformers import cache_utils

    found = {f"{cache_utils.__name__}.{name}": cls for name, cls in vars(cache_utils).items()
             if isinstance(cls, type) and cls.__module__ == cache_utils.__name__ and name.endswith("Dict")
             and not issubclass(cls, cache_utils.Cache)}
    return {**found, "collections.UserDict": collections.UserDict}


@functools.cache
def leaf_callables() -> dict[str, Any]:
    """Qualified name -> transformers' own function or class that a compiled graph calls whole: the
    mask builders of ``masking_utils`` (every ``create_*``) and per-step containers. Read from
    the installed release, so a mask kind a release adds is followed."""
    return {**_mask_builders(), **_step_containers()}
