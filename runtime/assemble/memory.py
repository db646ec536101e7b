"""How many expert slots, and where the experts live: ``expert_cache='auto'`` from free memory,
and ``host_memory`` (the experts on disk, the slots the host tier)."""

from __future__ import annotations

from typing import Any

import torch

from ..store.arena import available_host_bytes
from ..store.budget import AutoBudget, auto_budget
from ..store.host import ExpertLayout
from ..store.manifest import LoadError


def auto_slots(manifest: dict[str, Any], layouts: dict[int, ExpertLayout], config: Any, dtype: torch.dtype,
          dev: torch.device, batch: int, context: int | None, on_disk: bool = False) -> AutoBudget:
    """``expert_cache='auto'``: free memory where the slots live, less what else lives there."""
    if type(batch) is not int or batch < 1 or (context is not None and (type(context) is not int or context < 1)):
        raise LoadError(f"batch_size={batch!r} and max_context={context!r} must be positive integers")
    limit = int(getattr(config, "max_position_embeddings", 0) or 4096)
    context = context if context is not None else min(limit, 4096)
    plan = manifest["memory_plan"]
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:  # the host holds the expert arena as well as the slots, unless the experts stay on disk
        host = available_host_bytes()
        if host is None:
            raise LoadError("expert_cache='auto' cannot tell this host's free memory; give a size such as '4GiB'")
        free = host if on_disk else max(host - plan["expert_bytes_total"], 0)
    return auto_budget(layouts, free, plan["dense_bytes"], config, batch, context, dtype)


def host_tier(host_memory: int | str, expert_cache: int | str | None, dev: torch.device) -> int | str:
    """``host_memory`` as the slot budget: on a CPU device the slots are the host tier."""
    if dev.type != "cpu":
        raise LoadError(f"host_memory streams experts from disk into a CPU device's expert slots; on {dev} "
                        "the disk tier is not built yet: leave host_memory unset")
    if expert_cache is not None:
        raise LoadError("on a CPU device the expert slots are the host tier: give host_memory or expert_cache, "
                        "not both")
    return host_memory
