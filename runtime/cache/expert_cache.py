"""The expert cache: a fixed number of slots on the device, fed from the host store.

Every rule (which slot a copy takes, reservations, waves, cancellation, counters) is the cache
model's (``cache_model.CacheModel``, which the simulators drive too); this adds what a device
needs on top: the slot tensors, real copies on the copy engine, the expert-to-slot tables the
compute reads, and the one host read per wait of the routing decision and queued prefetches.
``prefetch`` queues predicted experts with their ids still on the device; ``plan`` reads them
with the wait's route; ``acquire`` makes every expert the router chose resident (loading
mispredictions on demand: the run-time correction) and pins those slots until the compute that
reads them is queued.
"""

from __future__ import annotations

import torch

from .cache_model import CacheModel
from .records import Handle, LayerStats
from .device_state import SlotTable, StallClock
from .policy import Policy, make_policy
from .pool import Pool
from ..store.direct import aligned_rows
from ..store.host import ExpertLayout, HostStore
from .streams import CopyEngine, Ticket

__all__ = ["ExpertCache", "Handle", "LayerStats"]


class ExpertCache(CacheModel):
    def __init__(self, layouts: dict[int, ExpertLayout], store: HostStore, slots: int,
                 device: torch.device, engine: CopyEngine, policy: Policy | None = None):
        super().__init__({layer: lay.num_experts for layer, lay in layouts.items()},
                         {layer: lay.signature for layer, lay in layouts.items()}, slots,
                         policy if policy is not None else make_policy("layer_cycle", list(layouts)),
                         settled_first=device.type == "cuda")
        self.layouts, self.store, self.engine = layouts, store, engine
        # Expert id -> slot, per layer: the compute remaps ids with one gather on the device. The
        # host edits its own copy; the device table is refreshed by one asynchronous upload per
        # layer that changed (a Python-int write into a CUDA tensor would be a blocking copy each).
        self.tables = {layer: SlotTable(lay.num_experts, device) for layer, lay in layouts.items()}
        self.host_syncs = 0           # device-to-host reads made by the cache (one per wait)
        self._pending: list[Handle] = []   # prefetches issued, not yet read back
        self.resolved: list[Handle] = []   # the prefetches the last wait read back, in issue order
        self.routed: list[int] = []        # the last wait's top-k ids (flat), as read back
        # the reuse predictor's estimates ([layers, experts] ints), read with the next wait's ids
        self._reuse: torch.Tensor | None = None
        self.reuse_read: list[int] | None = None  # what the last wait read of them (the routing log's)
        self.stall = StallClock(device)
        for layer, layout in layouts.items():
            pool = self.pool(layer)
            if pool.tensor is None:  # on CPU block-aligned rows: a blob on disk is read straight into one
                pool.tensor = (aligned_rows(slots, layout.blob_bytes) if device.type == "cpu"
                               else torch.empty(slots, layout.blob_bytes, dtype=torch.uint8, device=device))
                engine.adopt(pool.tensor)

    def _submit(self, pool: Pool, slot: int, layer: int, expert: int, demand: bool) -> Ticket:
        return self.engine.submit((pool.ident, slot), pool.tensor[slot], self.store.blob(layer, expert),
                                  f"L{layer} E{expert}", demand=demand)

    def _placed(self, layer: int, expert: int, slot: int) -> None:
        self.tables[layer].set(expert, slot)

    def _read(self, pool: Pool, slots: list[int]) -> None:
        self.engine.mark_read([(pool.ident, s) for s in slots])

    def _await(self, layer: int, pool: Pool, slots: list[int]) -> None:
        start = self.stall.start()
        super()._await(layer, pool, slots)
        self.stall.stop(layer, start, self.stats)

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

    def prefetch(self, layer: int, ids: torch.Tensor, demand: bool = False, copy: bool = True) -> Handle:
        """Queues a prefetch of ``layer``'s predicted experts. Nothing is read back here: the next
        wait reads these ids with its own routing decision, reserves the resident ones, and starts
        the copies of the others right after its own demand loads (``copy=False``: only tells the
        policy)."""
        handle = Handle(layer, ids=ids.detach(), demand=demand, copy=copy)
        self._pending.append(handle)
        return handle

    def expect_reuse(self, values: torch.Tensor) -> None:
        """Queues the reuse predictor's estimates (``runtime/predict/reuse.encode``'d, [layers, experts]
        in layer order) for the next wait's host read, which hands them to the policy."""
        self._reuse = values.detach()

    def plan(self, layer: int, handle: Handle | None, top_k_index: torch.Tensor) -> list[list[int]]:
        """The experts ``top_k_index`` needs, in waves that each fit the slots (resident first)."""
        pending, self._pending = self._pending, []
        reuse, self._reuse = self._reuse, None
        *predicted, routed = self._host_ids([h.ids for h in pending] + ([reuse] if reuse is not None else [])
                                            + [top_k_index])
        self.reuse_read = predicted.pop() if reuse is not None else None
        if self.reuse_read is not None:
            self.policy.expect(self.reuse_read)  # before begin: they are about the step starting
        for h, ids in zip(pending, predicted):
            if self.resolve(h, ids, layer):
                self.defer(h)
        self.resolved, self.routed = pending, routed
        return self.waves(layer, [handle] if handle is not None else [], routed)

    def abort(self) -> None:
        """The model's ``abort``, and prefetches queued but not read back are forgotten."""
        self._pending, self._reuse = [], None
        super().abort()
