"""Victims for one cache decision: the slots a wait's demand loads or a prefetch's copies evict.

A decision may need many slots (a layer's misses, a prefetch's copies). Its candidates are the
pool's resident slots outside pins, reservations and ``protect``, least recently used first; the
policy ranks them once, and each slot taken is the next in that ranking. That is what a fresh
``Policy.victim`` call per slot would pick: within one decision the only slots whose state
changes (loaded, used, moved to the LRU end) are the ones it loads, which ``protect`` or the pins
already hold out. Empty slots are taken first, lowest first, before any eviction.

With ``settled_first`` (the cache model's, set where copies run in the order made: CUDA, and a
simulator modelling its queue), slots whose last copy is still running (a prefetch nobody has
read yet) are ranked only after every other candidate is taken: there a copy into such a slot
queues behind that copy, and evicting it wastes the bytes in flight (issue 24).
"""

from __future__ import annotations

from itertools import islice

from .policy import Key, Policy
from .pool import Pool


class Victims:
    def __init__(self, pool: Pool, policy: Policy, protect: set[int], need: int = 4, settled_first: bool = False):
        self.pool, self.policy, self.protect = pool, policy, protect
        self._empty: list[int] | None = None   # empty slots not yet taken, lowest last
        self._ranked: list[Key] = []  # the policy's next victims, next last
        # victims asked of the policy at a time, doubling: the slots the decision will fill (its
        # misses, its copies), so one ranking serves it unless empty slots or guards get in the way
        self._chunk = max(need, 1)
        self._exhausted = False  # the policy has ranked every candidate
        self._busy: set[int] = set()  # slots held out of the first ranking: their last copy is still running
        self._busy_too = not settled_first  # busy slots are candidates too (always, unless settled_first)

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
                if self._busy_too or not self._busy:
                    return None
                # every settled slot is taken: now the busy ones, ranked afresh with the rest
                self._busy_too, self._exhausted, self._chunk = True, False, max(self._chunk // 2, 1)
            # Ranked afresh from the slots still candidates: the victims already taken are gone,
            # and the rest rank as they did (nothing they depend on has changed).
            held = pool.pinned | pool.reserved.keys() | self.protect
            if not self._busy_too:  # first the slots whose last copy has landed (module docstring)
                busy = {s for s, ticket in pool.tickets.items() if not ticket.ready()}
                if busy:
                    held, self._busy = held | busy, busy
            # An LRU-ordered policy ranks a prefix of the candidates: only that much is built (a
            # pool of hundreds of slots is scanned at every decision that evicts).
            owner = pool.owner
            found = (owner[s] for s in pool.lru if s not in held and owner[s] is not None)
            candidates = list(islice(found, self._chunk)) if self.policy.prefix else list(found)
            ranked = self.policy.ranking(candidates, self._chunk)
            self._exhausted = len(ranked) >= len(candidates) and not (self.policy.prefix and len(candidates) == self._chunk)
            self._ranked, self._chunk = ranked[::-1], self._chunk * 2
