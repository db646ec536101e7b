"""What the installed transformers calls things, read from its signatures, never assumed.

transformers renames keywords between releases: 5.24 calls the KV cache ``cache`` where 5.17 to
5.23 call it ``past_key_values`` (in decoder layers, attention modules, the masking functions and
the model outputs alike). Every place ExpertFlow hands transformers a cache asks here which name
the callee takes, so the front end, the support check and the runtime follow the release that is
installed. (A graph compiled under another release is not patched: ``runtime.load`` runs the
graph the installed release derives from the same config and options.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

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
