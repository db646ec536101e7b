"""A slot pool: the slots of every layer whose experts share one layout, and what each holds.

Its own module so that the cache model (``cache_model.py``) and the victim ranking (``victims.py``)
both read it without importing each other. Device-free: what backs the slots (``tensor``) and
what copies into them (``tickets``) are the driver's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pool:
    """Slots for every layer whose experts share one layout."""

    tensor: Any  # the slots' storage: the runtime's [slots, blob bytes] tensor; None in a simulator
    owner: list[tuple[int, int] | None]
    ident: int = 0  # which pool: the copy engine orders copies per (pool, slot)
    where: dict[tuple[int, int], int] = field(default_factory=dict)
    lru: OrderedDict = field(default_factory=OrderedDict)
    pinned: set[int] = field(default_factory=set)
    reserved: dict[int, int] = field(default_factory=dict)  # slot -> layer it was prefetched for
    tickets: dict[int, Any] = field(default_factory=dict)  # slot -> its copy in flight (cache_model.Copy)
    #: slots whose load or eviction has begun and not finished: only an interrupt leaves one here,
    #: and ``CacheModel.abort`` then clears what it left half-done (``_settle``)
    unsettled: set[int] = field(default_factory=set)
