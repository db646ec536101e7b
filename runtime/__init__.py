"""ExpertFlow runtime: ``load`` a compiled directory and run it with a fixed expert-slot budget.

Names are imported on first use, so ``expertflow.runtime.store.manifest`` (stdlib only) can be read by
tools that must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Budget": "store.budget", "budget_argument": "store.budget",
          "check_device": "store.device", "load": "assemble.loader", "load_tokenizer": "store.tokenizer",
          "LoadError": "store.manifest", "CompiledModel": "generate.model"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'expertflow.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
