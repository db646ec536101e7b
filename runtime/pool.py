"""A slot pool: the slots of every layer whose experts share one layout, and what each holds.

Its own module so that the cache (``cache.py``) and the victim ranking (``victims.py``) both read
it without importing each other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .streams import Ticket


@dataclass
class Pool:
    """Slots for every layer whose experts share one layout."""

    tensor: torch.Tensor
    owner: list[tuple[int, int] | None]
    ident: int = 0  # which pool: the copy engine orders copies per (pool, slot)
    where: dict[tuple[int, int], int] = field(default_factory=dict)
    lru: OrderedDict = field(default_factory=OrderedDict)
    pinned: set[int] = field(default_factory=set)
    reserved: dict[int, int] = field(default_factory=dict)  # slot -> layer it was prefetched for
    tickets: dict[int, Ticket] = field(default_factory=dict)
    #: slots whose load or eviction has begun and not finished: only an interrupt leaves one here,
    #: and ``ExpertCache.abort`` then clears what it left half-done (``_settle``)
    unsettled: set[int] = field(default_factory=set)
