"""The cache model: what each expert slot holds, and every rule that decides it.

One model, two drivers. ``runtime/cache/expert_cache.ExpertCache`` adds device tensors and real copies on top
(its ``_submit`` queues a copy on the copy engine); the simulators (``tools/sim``) add a clock
(their ``_submit`` queues a modelled copy). Both hand the model the same calls, so a rule changed
here (a victim, a reservation, a wave, a cancellation, a counter) changes in both at once:

- ``resolve(handle, ids, running)``: a prefetch's predictions are known: the policy is told,
  resident ones are reserved for their layer, and whether copies remain to start is returned;
- ``issue(handle)``: starts those copies into empty slots or the policy's victims;
- ``waves(layer, handles, routed)``: a wait knows its route: unneeded prefetches are cancelled
  (not started) or counted wasted, reservations of the layer end, and the needed experts come
  back in waves that each fit the slots, resident ones first;
- ``acquire(layer, experts)`` / ``release``: a wave is made resident and pinned (misses load on
  demand; reservations of other layers yield to a compute that must run), then unpinned.

A slot holds one (layer, expert) blob; layers whose experts share a layout share a pool of
``slots`` slots. Nothing here touches a device: a copy is a ticket (``ready``, ``cancel``,
``wait``, ``nbytes``) that the driver's ``_submit`` returns.
"""

from __future__ import annotations

from collections.abc import Hashable

from .policy import Policy
from .pool import Pool
from .records import Copy, Handle, LayerStats
from .victims import Victims

__all__ = ["CacheModel", "Copy", "Handle", "LayerStats"]


class CacheModel:
    """Pools, victims, reservations, waves, cancellation and statistics (module docstring).

    ``experts``: layer -> routed experts; ``pool_of``: layer -> its layout's key (layers with
    equal keys share a pool). A driver overrides ``_submit`` and may override ``_placed`` (an
    expert's slot changed), ``_read`` (a compute released slots) and ``_await`` (a wave waits
    for its copies).
    """

    def __init__(self, experts: dict[int, int], pool_of: dict[int, Hashable], slots: int, policy: Policy,
                 settled_first: bool = False):
        self.experts, self.slots, self.policy = experts, slots, policy
        #: victims among slots whose last copy has landed first (``victims.py``): where copies run in
        #: the order made (CUDA), a copy into a busy slot queues behind the copy running into it;
        #: where a queued copy is cancelled instead (a CPU device) the rule would only make the
        #: decisions depend on thread timing
        self.settled_first = settled_first
        self.stats = {layer: LayerStats() for layer in experts}
        self._deferred: list[Handle] = []  # resolved; their copies start after the wait's demand loads
        self.pools: dict[Hashable, Pool] = {}
        for key in pool_of.values():
            if key not in self.pools:
                self.pools[key] = Pool(None, [None] * slots, ident=len(self.pools))
        # Per-layer lookup, built once: a layout's key is too costly to hash per op.
        self._pool_of = {layer: self.pools[key] for layer, key in pool_of.items()}

    # ----- what a driver supplies -----

    def _submit(self, pool: Pool, slot: int, layer: int, expert: int, demand: bool) -> Copy:
        raise NotImplementedError

    def _placed(self, layer: int, expert: int, slot: int) -> None:
        """(``layer``, ``expert``) is now in ``slot`` (-1: in none)."""

    def _read(self, pool: Pool, slots: list[int]) -> None:
        """A compute has been queued that reads ``slots``: later copies into them come after it."""

    def _await(self, layer: int, pool: Pool, slots: list[int]) -> None:
        """The compute of ``layer`` needs ``slots``: waits for their copies (each forgotten only
        once waited for: an interrupted wait keeps it)."""
        for slot in slots:
            ticket = pool.tickets.get(slot)
            if ticket is not None:
                try:
                    ticket.wait()
                except Exception:  # the copy failed (a blob that fails its check): its slot holds no expert
                    self._failed(pool, slot)
                    raise
                pool.tickets.pop(slot, None)

    def _failed(self, pool: Pool, slot: int) -> None:
        """The copy into ``slot`` ended in an error: the expert it was for is forgotten, so no later
        step computes with what the slot holds, and the next use loads it again."""
        key = pool.owner[slot]
        if key is not None and pool.where.get(key) == slot:
            self._forget(pool, slot, key)
        pool.tickets.pop(slot, None)
        pool.lru.pop(slot, None)
        pool.reserved.pop(slot, None)

    # ----- the rules -----

    def pool(self, layer: int) -> Pool:
        return self._pool_of[layer]

    def preload(self) -> None:
        """Fills the slots in layer order (all experts, when they fit), so a warm start has no misses."""
        for layer, n in self.experts.items():
            pool = self.pool(layer)
            held = set(pool.where.values())  # so only empty slots are taken
            room = Victims(pool, self.policy, held, settled_first=self.settled_first)
            for e in range(n):
                slot = room.take()
                if slot is None:
                    break
                self._load(pool, slot, layer, e)
                held.add(slot)
            for ticket in pool.tickets.values():
                ticket.wait()
            pool.tickets.clear()

    def _yielding(self, pool: Pool, protect: set[int]) -> int | None:
        """The policy's victim among reserved slots too (only pins and ``protect`` hold)."""
        candidates = [pool.owner[s] for s in pool.lru if s not in pool.pinned and s not in protect
                      and pool.owner[s] is not None]
        key = self.policy.victim(candidates)
        return pool.where[key] if key is not None else None

    def _load(self, pool: Pool, slot: int, layer: int, expert: int, demand: bool = True) -> None:
        # Safe to interrupt at any statement or call (tests/test_robustness.py tries each): the host
        # calls an expert resident only while ``pool.where`` names it. The old owner leaves
        # ``where`` first, before its copy can be cancelled or its bytes overwritten; the new one
        # enters last, after its copy's ticket and its table entry. What a cut-short load leaves
        # besides (an owner or table entry ``where`` does not back) is cleared by ``abort``.
        pool.unsettled.add(slot)
        old = pool.owner[slot]
        if old is not None:
            self._forget(pool, slot, old)
        previous = pool.tickets.get(slot)
        if previous is not None and not previous.ready():
            # Demand copies overtake queued prefetches: an earlier copy into this slot must never
            # land after this one. Cancel it if it has not started; one that has is ordered before
            # this one by the copy engine itself (on CUDA the copy stream waits for the slot's last
            # write, on CPU a worker waits for the slot's running copy), so nothing here waits for
            # it: a compute that never reads that copy must not stall on it (issue 24).
            if previous.cancel() and old is not None:
                self.stats[old[0]].bytes_moved -= previous.nbytes
                self.stats[old[0]].prefetch_cancelled += 1
        ticket = self._submit(pool, slot, layer, expert, demand)
        pool.tickets[slot] = ticket  # a hit waits for it; until here the slot is empty to the host
        self.stats[layer].bytes_moved += ticket.nbytes
        pool.lru[slot] = None
        pool.lru.move_to_end(slot)
        self._name(pool, slot, layer, expert)
        pool.unsettled.discard(slot)

    def _forget(self, pool: Pool, slot: int, key: tuple[int, int]) -> None:
        """``slot`` no longer holds ``key``: not resident from the first statement on."""
        del pool.where[key]
        self._placed(key[0], key[1], -1)
        pool.owner[slot] = None

    def _name(self, pool: Pool, slot: int, layer: int, expert: int) -> None:
        """``slot`` holds (``layer``, ``expert``), its copy recorded: resident from the last statement."""
        self._placed(layer, expert, slot)
        pool.owner[slot] = (layer, expert)
        pool.where[(layer, expert)] = slot

    def _settle(self, pool: Pool) -> None:
        """Clears what interrupted loads and evictions left in ``pool``: owners ``where`` no longer
        names, and every placement of its layers said again as ``where`` has it (each step
        idempotent, the set emptied last: an interrupt here too is settled at the next ``abort``)."""
        for slot in sorted(pool.unsettled):
            key = pool.owner[slot]
            if key is not None and pool.where.get(key) != slot:
                pool.owner[slot] = None
        for layer, n in self.experts.items():
            if self._pool_of[layer] is pool:
                for e in range(n):
                    self._placed(layer, e, pool.where.get((layer, e), -1))
        pool.unsettled.clear()

    def valid(self, layer: int, ids: list[int]) -> list[int]:
        """The distinct ids that name one of ``layer``'s experts, ascending."""
        n = self.experts[layer]
        return sorted({e for e in ids if 0 <= e < n})

    def resolve(self, handle: Handle, ids: list[int], running: int | None) -> bool:
        """``handle``'s predictions are ``ids``: tells the policy, reserves the resident ones;
        True when copies remain to start (``issue``): not a hint, and not for ``running`` itself
        (the layer whose wait reads them: that wait loads what is needed)."""
        pool, layer, stats = self.pool(handle.layer), handle.layer, self.stats[handle.layer]
        handle.predicted, handle.ids = self.valid(layer, ids), None
        stats.predicted += len(handle.predicted)
        self.policy.hint(layer, handle.predicted)
        if not handle.copy:
            return False
        for e in handle.predicted:
            slot = pool.where.get((layer, e))
            if slot is not None:
                pool.reserved[slot] = layer
        return layer != running

    def defer(self, handle: Handle) -> None:
        """``handle``'s copies start after the next wave's demand loads (``acquire``)."""
        self._deferred.append(handle)

    def issue(self, handle: Handle) -> None:
        """Starts the copies of ``handle``'s predictions that are not resident."""
        pool, layer, stats = self.pool(handle.layer), handle.layer, self.stats[handle.layer]
        protect = {pool.where[(layer, e)] for e in handle.predicted if (layer, e) in pool.where}
        room = Victims(pool, self.policy, protect, len(handle.predicted) - len(protect), self.settled_first)
        for e in handle.predicted:
            if (layer, e) in pool.where:
                continue
            slot = room.take()
            if slot is None:
                stats.prefetch_dropped += 1
                continue
            self._load(pool, slot, layer, e, demand=handle.demand)
            handle.loaded.append(e)
            pool.reserved[slot] = layer
            protect.add(slot)

    def issue_deferred(self) -> None:
        """Starts the copies the last wait's read-back decided (after its demand loads)."""
        deferred, self._deferred = self._deferred, []
        for handle in deferred:
            self.issue(handle)

    def waves(self, layer: int, handles: list[Handle], routed: list[int]) -> list[list[int]]:
        """``layer``'s wait, its route ``routed`` known (``handles``: the prefetches made for it):
        the needed experts in waves that each fit the slots, resident first."""
        pool, stats = self.pool(layer), self.stats[layer]
        needed = self.valid(layer, routed)
        stats.needed += len(needed)
        self.policy.begin(layer)
        for handle in handles:
            stats.predicted_used += len(set(handle.predicted) & set(needed))
            self._drop_unneeded(pool, layer, [e for e in handle.loaded if e not in needed])
        for slot, owner_layer in list(pool.reserved.items()):
            if owner_layer == layer:
                del pool.reserved[slot]
        needed.sort(key=lambda e: (layer, e) not in pool.where)
        waves = [needed[i:i + self.slots] for i in range(0, len(needed), self.slots)] or [[]]
        stats.waves += len(waves)
        stats.split_steps += len(waves) > 1
        return waves

    def _drop_unneeded(self, pool: Pool, layer: int, experts: list[int]) -> None:
        """Prefetches this layer turned out not to need: a copy not started yet is cancelled (no
        byte moves, the slot is empty again); one that ran is a wasted prefetch."""
        stats = self.stats[layer]
        for e in experts:
            slot = pool.where.get((layer, e))
            ticket = pool.tickets.get(slot) if slot is not None else None
            if ticket is None or ticket.ready():
                stats.prefetch_wasted += 1
                stats.bytes_wasted += ticket.nbytes if ticket is not None else 0
                continue
            # Forgotten before the cancel, as in ``_load``: a resident expert's copy always lands.
            pool.unsettled.add(slot)
            self._forget(pool, slot, (layer, e))
            if ticket.cancel():
                stats.prefetch_cancelled += 1
                stats.bytes_moved -= ticket.nbytes
                pool.lru.pop(slot, None)
                pool.reserved.pop(slot, None)
            else:  # the copy has started: its bytes land, and the expert stays
                self._name(pool, slot, layer, e)
                stats.prefetch_wasted += 1
                stats.bytes_wasted += ticket.nbytes
            pool.unsettled.discard(slot)

    def acquire(self, layer: int, experts: list[int], demand: bool = True) -> list[int]:
        """Makes ``experts`` resident and pinned (misses copy on the demand stream unless
        ``demand`` is False); returns their slots in the same order."""
        pool, stats = self.pool(layer), self.stats[layer]
        protect = {pool.where[(layer, e)] for e in experts if (layer, e) in pool.where}
        room, slots = Victims(pool, self.policy, protect, len(experts) - len(protect), self.settled_first), []
        for e in experts:
            slot = pool.where.get((layer, e))
            if slot is None:
                stats.misses += 1
                slot = room.take()
                if slot is None:  # reservations of other layers yield to a compute that must run
                    slot = self._yielding(pool, protect)
                    if slot is None:
                        raise RuntimeError(f"layer {layer}: all {self.slots} expert slots are pinned by "
                                           "computes in flight; the graph waits twice before computing")
                    pool.reserved.pop(slot, None)
                self._load(pool, slot, layer, e, demand=demand)
            else:
                stats.hits += 1
                ticket = pool.tickets.get(slot)
                if ticket is not None and not ticket.ready():
                    stats.in_flight += 1
                else:
                    stats.resident += 1
                pool.lru.move_to_end(slot)
            self.policy.use((layer, e))
            pool.pinned.add(slot)
            protect.add(slot)
            slots.append(slot)
        self.issue_deferred()  # the next layers' prefetches queue behind this layer's demand copies
        self._await(layer, pool, slots)
        return slots

    def release(self, layer: int, slots: list[int]) -> None:
        pool = self.pool(layer)
        self._read(pool, slots)
        pool.pinned.difference_update(slots)

    def abort(self) -> None:
        """Returns the model to its between-steps state after a step stopped part way (an
        exception, Ctrl-C): pins and reservations are released, a half-done load or eviction is
        settled; copies still in flight stay recorded against their slots, so the next use of a
        slot waits for its bytes."""
        self._deferred = []
        for pool in self.pools.values():
            self._read(pool, sorted(pool.pinned))  # queued reads come first
            pool.pinned.clear()
            pool.reserved.clear()
            if pool.unsettled:
                self._settle(pool)
