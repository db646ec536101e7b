"""The expert cache: a fixed number of slots on the device, fed from the host store.

A slot holds one (layer, expert) blob. ``prefetch`` starts copies for predicted experts into
free or least-recently-used slots and reserves them for their layer; ``wait`` makes every
expert the router actually chose resident (loading mispredictions on demand: the run-time
correction) and pins those slots until the compute that reads them is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .device_state import SlotTable, StallClock
from .policy import Policy, make_policy
from .pool import Pool
from .store import ExpertLayout, HostStore
from .streams import CopyEngine
from .victims import Victims


@dataclass
class LayerStats:
    hits: int = 0               # needed experts ready at the wait: resident + in_flight
    misses: int = 0             # needed experts loaded on demand at the wait
    resident: int = 0           # needed and already in their slot when the wait began
    in_flight: int = 0          # needed, prefetched, copy still running when the wait began
    predicted: int = 0          # experts named by prefetches
    predicted_used: int = 0     # of those, chosen by the router
    needed: int = 0             # distinct experts the router chose, summed over steps
    prefetch_dropped: int = 0   # predictions with no free slot to go to
    prefetch_cancelled: int = 0  # unneeded prefetches whose copy had not started when their layer ran
    prefetch_wasted: int = 0    # prefetched experts (copied) their layer did not need
    waves: int = 0              # expert-compute waves, one per step unless it is split
    split_steps: int = 0        # steps needing more experts than slots: computed in several waves
    bytes_moved: int = 0
    stall_s: float = 0.0


@dataclass
class Handle:
    """One prefetch. Issued with its ids still on the device (``ids``); resolved at the next wait,
    whose one host synchronisation reads them together with that wait's routing decision."""

    layer: int
    predicted: list[int] = field(default_factory=list)
    loaded: list[int] = field(default_factory=list)  # the predicted experts this prefetch copied
    ids: torch.Tensor | None = None  # set until resolved
    demand: bool = False  # its copies take the demand stream (the schedule pass said so)
    copy: bool = True     # False: a hint, the policy is told and nothing is copied early


class ExpertCache:
    def __init__(self, layouts: dict[int, ExpertLayout], store: HostStore, slots: int,
                 device: torch.device, engine: CopyEngine, policy: Policy | None = None):
        self.layouts, self.store, self.slots, self.engine = layouts, store, slots, engine
        self.policy = policy if policy is not None else make_policy("layer_cycle", list(layouts))
        self.stats = {layer: LayerStats() for layer in layouts}
        # Expert id -> slot, per layer: the compute remaps ids with one gather on the device. The
        # host edits its own copy; the device table is refreshed by one asynchronous upload per
        # layer that changed (a Python-int write into a CUDA tensor would be a blocking copy each).
        self.tables = {layer: SlotTable(lay.num_experts, device) for layer, lay in layouts.items()}
        self.host_syncs = 0           # device-to-host reads made by the cache (one per wait)
        self._pending: list[Handle] = []   # prefetches issued, not yet read back
        self._deferred: list[Handle] = []  # read back; their copies start after the wait's demand loads
        self.resolved: list[Handle] = []   # the prefetches the last wait read back, in issue order
        self.routed: list[int] = []        # the last wait's top-k ids (flat), as read back
        # the reuse predictor's estimates ([layers, experts] ints), read with the next wait's ids
        self._reuse: torch.Tensor | None = None
        self.reuse_read: list[int] | None = None  # what the last wait read of them (the routing log's)
        self.stall = StallClock(device)
        self.pools: dict[tuple, Pool] = {}
        for layout in layouts.values():
            if layout.signature not in self.pools:
                tensor = torch.empty(slots, layout.blob_bytes, dtype=torch.uint8, device=device)
                self.pools[layout.signature] = Pool(tensor, [None] * slots, ident=len(self.pools))
        # Per-layer lookup, built once: the signature tuple is too costly to rebuild per op.
        self._pool_of = {layer: self.pools[lay.signature] for layer, lay in layouts.items()}

    def preload(self) -> None:
        """Fills the slots in layer order (all experts, when they fit), so a warm start has no misses."""
        for layer, layout in self.layouts.items():
            pool = self.pool(layer)
            held = set(pool.where.values())  # so only empty slots are taken
            room = Victims(pool, self.policy, held)
            for e in range(layout.num_experts):
                slot = room.take()
                if slot is None:
                    break
                self._load(pool, slot, layer, e)
                held.add(slot)
            for ticket in pool.tickets.values():
                ticket.wait()
            pool.tickets.clear()

    def pool(self, layer: int) -> Pool:
        return self._pool_of[layer]

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
            # land after this one. Cancel it if it has not started, else let it finish first.
            if previous.cancel():
                if old is not None:
                    self.stats[old[0]].bytes_moved -= previous.nbytes
                    self.stats[old[0]].prefetch_cancelled += 1
            else:
                previous.wait()
        ticket = self.engine.submit((pool.ident, slot), pool.tensor[slot], self.store.blob(layer, expert),
                                    f"L{layer} E{expert}", demand=demand)
        pool.tickets[slot] = ticket  # a hit waits for it; until here the slot is empty to the host
        self.stats[layer].bytes_moved += ticket.nbytes
        pool.lru[slot] = None
        pool.lru.move_to_end(slot)
        self._name(pool, slot, layer, expert)
        pool.unsettled.discard(slot)

    def _forget(self, pool: Pool, slot: int, key: tuple[int, int]) -> None:
        """``slot`` no longer holds ``key``: not resident from the first statement on."""
        del pool.where[key]
        self.tables[key[0]].set(key[1], -1)
        pool.owner[slot] = None

    def _name(self, pool: Pool, slot: int, layer: int, expert: int) -> None:
        """``slot`` holds (``layer``, ``expert``), its copy recorded: resident from the last statement."""
        self.tables[layer].set(expert, slot)
        pool.owner[slot] = (layer, expert)
        pool.where[(layer, expert)] = slot

    def _settle(self, pool: Pool) -> None:
        """Clears what interrupted loads and evictions left in ``pool``: owners ``where`` no longer
        names and table entries that disagree with ``where`` (each step idempotent, the set
        emptied last: an interrupt here too is settled at the next ``abort``)."""
        for slot in sorted(pool.unsettled):
            key = pool.owner[slot]
            if key is not None and pool.where.get(key) != slot:
                pool.owner[slot] = None
        for layer, table in self.tables.items():
            if self._pool_of[layer] is pool:
                for e in range(self.layouts[layer].num_experts):
                    slot = pool.where.get((layer, e), -1)
                    if table.get(e) != slot:
                        table.set(e, slot)
        pool.unsettled.clear()

    def _host_ids(self, tensors: list[torch.Tensor]) -> list[list[int]]:
        """The ids of every tensor, read to the host in one transfer: the one synchronisation a
        wait makes (the routing decision must reach the host to choose what to copy)."""
        flat = [t.reshape(-1) for t in tensors]
        values = torch.cat([f.to(flat[-1].device, torch.long) for f in flat]).tolist() if flat else []
        self.host_syncs += 1
        out, at = [], 0
        for f in flat:
            out.append(values[at:at + f.numel()])
            at += f.numel()
        return out

    def _valid(self, layer: int, ids: list[int]) -> list[int]:
        n = self.layouts[layer].num_experts
        return sorted({e for e in ids if 0 <= e < n})

    def prefetch(self, layer: int, ids: torch.Tensor, demand: bool = False, copy: bool = True) -> Handle:
        """Queues a prefetch of ``layer``'s predicted experts. Nothing is read back here: the next
        wait reads these ids with its own routing decision, reserves the resident ones, and starts
        the copies of the others right after its own demand loads (``copy=False``: only tells the
        policy)."""
        handle = Handle(layer, ids=ids.detach(), demand=demand, copy=copy)
        self._pending.append(handle)
        return handle

    def expect_reuse(self, values: torch.Tensor) -> None:
        """Queues the reuse predictor's estimates (``runtime/reuse.encode``'d, [layers, experts]
        in layer order) for the next wait's host read, which hands them to the policy."""
        self._reuse = values.detach()

    def _resolve(self, handle: Handle, ids: list[int], running: int) -> None:
        """Reserves ``handle``'s resident predictions; the others load after ``running``'s demand
        loads, unless the prediction is for ``running`` itself (its wait loads what is needed)."""
        pool, layer, stats = self.pool(handle.layer), handle.layer, self.stats[handle.layer]
        handle.predicted, handle.ids = self._valid(layer, ids), None
        stats.predicted += len(handle.predicted)
        self.policy.hint(layer, handle.predicted)
        if not handle.copy:
            return
        for e in handle.predicted:
            slot = pool.where.get((layer, e))
            if slot is not None:
                pool.reserved[slot] = layer
        if layer != running:
            self._deferred.append(handle)

    def _issue(self, handle: Handle) -> None:
        """Starts the copies of ``handle``'s predictions that are not resident."""
        pool, layer, stats = self.pool(handle.layer), handle.layer, self.stats[handle.layer]
        protect = {pool.where[(layer, e)] for e in handle.predicted if (layer, e) in pool.where}
        room = Victims(pool, self.policy, protect)
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
            self._issue(handle)

    def plan(self, layer: int, handle: Handle | None, top_k_index: torch.Tensor) -> list[list[int]]:
        """The experts ``top_k_index`` needs, in waves that each fit the slots (resident first)."""
        pool, stats = self.pool(layer), self.stats[layer]
        pending, self._pending = self._pending, []
        reuse, self._reuse = self._reuse, None
        *predicted, routed = self._host_ids([h.ids for h in pending] + ([reuse] if reuse is not None else [])
                                            + [top_k_index])
        self.reuse_read = predicted.pop() if reuse is not None else None
        if self.reuse_read is not None:
            self.policy.expect(self.reuse_read)  # before begin: they are about the step starting
        for h, ids in zip(pending, predicted):
            self._resolve(h, ids, layer)
        self.resolved, self.routed = pending, routed
        needed = self._valid(layer, routed)
        stats.needed += len(needed)
        self.policy.begin(layer)
        if handle is not None:
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
            pool.unsettled.discard(slot)

    def acquire(self, layer: int, experts: list[int], demand: bool = True) -> list[int]:
        """Makes ``experts`` resident and pinned (misses copy on the demand stream unless
        ``demand`` is False); returns their slots in the same order."""
        pool, stats = self.pool(layer), self.stats[layer]
        protect = {pool.where[(layer, e)] for e in experts if (layer, e) in pool.where}
        room, slots = Victims(pool, self.policy, protect), []
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
        start = self.stall.start()
        for slot in slots:
            ticket = pool.tickets.get(slot)
            if ticket is not None:  # forgotten only once waited for: an interrupted wait keeps it
                ticket.wait()
                pool.tickets.pop(slot, None)
        self.stall.stop(layer, start, self.stats)
        return slots

    def release(self, layer: int, slots: list[int]) -> None:
        pool = self.pool(layer)
        self.engine.mark_read([(pool.ident, s) for s in slots])
        pool.pinned.difference_update(slots)

    def abort(self) -> None:
        """Returns the cache to its between-steps state after a step stopped part way (an
        exception, Ctrl-C): pins and reservations are released, a half-done load or eviction is
        settled; copies still in flight stay recorded against their slots, so the next use of a
        slot waits for its bytes."""
        self._pending, self._deferred, self._reuse = [], [], None
        for pool in self.pools.values():
            self.engine.mark_read([(pool.ident, s) for s in sorted(pool.pinned)])  # queued reads come first
            pool.pinned.clear()
            pool.reserved.clear()
            if pool.unsettled:
                self._settle(pool)
