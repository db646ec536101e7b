"""How many expert slots, and where the experts live: ``expert_cache='auto'`` from free memory,
``host_memory`` (the experts on disk, the slots the host tier) and ``memory`` (one total for the
host, split by the same rule as 'auto')."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..store.arena import available_host_bytes
from ..store.budget import AutoBudget, Budget, all_slots, auto_budget, routed_per_token, slot_bytes
from ..store.host import ExpertLayout
from ..store.manifest import LoadError


def auto_slots(manifest: dict[str, Any], layouts: dict[int, ExpertLayout], config: Any, dtype: torch.dtype,
               dev: torch.device, batch: int, context: int | None, on_disk: bool = False,
               total: Budget | None = None) -> AutoBudget:
    """``expert_cache='auto'``: free memory where the slots live, less what else lives there.
    ``total`` (``memory=``, a size): that many bytes instead of the free memory, the experts that
    do not fit left on disk."""
    if type(batch) is not int or batch < 1 or (context is not None and (type(context) is not int or context < 1)):
        raise LoadError(f"batch_size={batch!r} and max_context={context!r} must be positive integers")
    limit = int(getattr(config, "max_position_embeddings", 0) or 4096)
    context = context if context is not None else min(limit, 4096)
    plan = manifest["memory_plan"]
    request = "expert_cache='auto'"
    if total is not None and not total.auto:
        free, request = int(total.nbytes), f"memory={total.given!r}"
    elif dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:  # the host holds the expert arena as well as the slots, unless the experts stay on disk
        host = available_host_bytes()
        if host is None:
            raise LoadError("expert_cache='auto' cannot tell this host's free memory; give a size such as '4GiB'")
        free = host if on_disk else max(host - plan["expert_bytes_total"], 0)
        request = "memory='auto'" if total is not None else request
    chosen = auto_budget(layouts, free, plan["dense_bytes"], config, batch, context, dtype, request)
    if on_disk:
        chosen = dataclasses.replace(chosen, on_disk=all_slots(layouts) - chosen.slots)
    return chosen


def host_tier(host_memory: int | str | None, memory: int | str | None, expert_cache: int | str | None,
              dev: torch.device) -> Budget | None:
    """The request that sizes the host tier (``host_memory`` or the total ``memory``), read once;
    None when neither is given. On a CPU device the slots are the host tier."""
    if host_memory is None and memory is None:
        return None
    what = "host_memory" if memory is None else "memory"
    if dev.type != "cpu":
        raise LoadError(f"{what} streams experts from disk into a CPU device's expert slots; on {dev} "
                        f"the disk tier is not built yet: leave {what} unset")
    if expert_cache is not None or (host_memory is not None and memory is not None):
        raise LoadError(f"on a CPU device the expert slots are the host tier: give one of expert_cache, host_memory "
                        f"and memory, not {what} with another")
    if memory is None:
        return Budget.read(host_memory, "host_memory")
    total = Budget.read(memory, "memory")
    if total.slots is not None or total.percent is not None or total.given in (None, "all"):
        raise LoadError(f"memory={memory!r}: give the total for the host as a size such as '12GiB' (dense weights, "
                        "KV cache and expert slots; the other experts stay on disk) or 'auto'")
    return dataclasses.replace(total, auto=True) if total.auto else total


def check_top_k(slots: int, config: Any, layouts: dict[int, ExpertLayout], request: Budget) -> None:
    """A host tier must hold one layer's top-k: below it every token would read each of its
    experts from disk again, in waves. LoadError naming the least that works."""
    k = routed_per_token(config)
    if k is not None and slots < min(k, all_slots(layouts)):
        one = slot_bytes(layouts)
        raise LoadError(f"{request.what}={request.given!r} holds {slots} expert slot(s), fewer than the {k} experts "
                        f"each token is routed to: give at least {k} slots ({k * one / 2**20:.1f} MiB)")
