"""Victims for one cache decision: the slots a wait's demand loads or a prefetch's copies evict.

A decision may need many slots (a layer's misses, a prefetch's copies). Its candidates are the
pool's resident slots outside pins, reservations and ``protect``, least recently used first; the
policy ranks them once, and each slot taken is the next in that ranking. That is what a fresh
``Policy.victim`` call per slot would pick: within one decision the only slots whose state
changes (loaded, used, moved to the LRU end) are the ones it loads, which ``protect`` or the pins
already hold out. Empty slots are taken first, lowest first, before any eviction.
"""

from __future__ import annotations

from .policy import Key, Policy
from .pool import Pool


class Victims:
    def __init__(self, pool: Pool, policy: Policy, protect: set[int]):
        self.pool, self.policy, self.protect = pool, policy, protect
        self._empty: list[int] | None = None   # empty slots not yet taken, lowest last
        self._ranked: list[Key] = []  # the policy's next victims, next last
        self._chunk = 4  # victims asked of the policy at a time (doubling): most decisions need few
        self._exhausted = False  # the policy has ranked every candidate

    def take(self) -> int | None:
        """The next slot to fill: an empty one, else the policy's next victim (None: no slot can go)."""
        pool = self.pool
        if self._empty is None:  # a full pool (the usual case) skips the scan
            self._empty = [] if len(pool.where) == len(pool.owner) else [
                s for s in reversed(range(len(pool.owner)))
                if pool.owner[s] is None and s not in pool.pinned and s not in pool.reserved]
        while self._empty:
            slot = self._empty.pop()
            if pool.owner[slot] is None and slot not in pool.pinned and slot not in pool.reserved:
                return slot
        while True:
            while self._ranked:
                slot = pool.where.get(self._ranked.pop())
                # a slot this decision filled since the ranking is held out; the check is the guard
                if slot is not None and slot not in pool.pinned and slot not in pool.reserved and slot not in self.protect:
                    return slot
            if self._exhausted:
                return None
            # Ranked afresh from the slots still candidates: the victims already taken are gone,
            # and the rest rank as they did (nothing they depend on has changed).
            held = pool.pinned | pool.reserved.keys() | self.protect
            owner = pool.owner
            candidates = [owner[s] for s in pool.lru if s not in held and owner[s] is not None]
            ranked = self.policy.ranking(candidates, self._chunk)
            self._exhausted = len(ranked) >= len(candidates)
            self._ranked, self._chunk = ranked[::-1], self._chunk * 2
