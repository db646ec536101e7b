"""The execution context the compiled graph's ExpertFlow ops call into.

``expert_compute`` runs transformers' own experts function (whichever implementation the
config selects: grouped_mm, batched_mm, eager, ...) on a view of the slot pool, with top-k
expert ids remapped to slot ids. Activation, bias, clamping, interleaving and dtype handling
are therefore the model's own, not re-written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import ExpertCache, Handle
from .routing import RoutingTrace
from .store import ExpertLayout
from .timeline import Timeline


def slot_view_module(module: nn.Module, layout: ExpertLayout, pool: torch.Tensor) -> nn.Module:
    """A shallow copy of ``module`` whose expert-indexed parameters are views of ``pool``."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_parameters"] = {k: v for k, v in module._parameters.items()
                                    if k not in {p.name for p in layout.parts}}
    view.__dict__.update(layout.views(pool))
    if hasattr(module, "num_experts"):
        view.__dict__["num_experts"] = pool.shape[0]
    return view


@dataclass
class SlotPlan:
    layer: int
    waves: list[list[int]]
    first_slots: list[int]


class RuntimeContext:
    def __init__(self, cache: ExpertCache, modules: dict[int, nn.Module]):
        self.cache = cache
        self.modules = modules
        self._views: dict[tuple[int, int, int], nn.Module] = {}
        self.timeline: Timeline | None = None  # set by runtime.load(timeline=True)
        self.routing: RoutingTrace | None = None  # set by runtime.load(record_routing=True)
        self.path_predictor: nn.Module | None = None  # set by runtime.load for a routing_path graph

    def _view(self, layer: int, lo: int, hi: int) -> nn.Module:
        """The experts module over slots lo..hi only: experts functions pay per expert group, so
        the view spans the slots in use, not the whole pool."""
        key = (layer, lo, hi)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 4096:
                self._views.clear()
            pool = self.cache.pool(layer).tensor[lo:hi + 1]
            view = self._views[key] = slot_view_module(self.modules[layer], self.cache.layouts[layer], pool)
        return view

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        if self.routing is not None:
            self.routing.add(layer, top_k_index)

    def predict_path(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.path_predictor is None:
            raise RuntimeError("this graph calls the routing-path predictor but none was loaded")
        return self.path_predictor(hidden)

    def prefetch(self, layer: int, expert_ids: torch.Tensor) -> Handle:
        handle = self.cache.prefetch(layer, expert_ids)
        if self.routing is not None:
            self.routing.request("prefetch", layer, handle.predicted)
        return handle

    def wait(self, layer: int, handle: Handle | None, top_k_index: torch.Tensor) -> SlotPlan:
        start = self.timeline.mark() if self.timeline is not None else None
        waves = self.cache.plan(layer, handle, top_k_index)
        if self.routing is not None:
            self.routing.request("wait", layer, sorted(e for wave in waves for e in wave))
        plan = SlotPlan(layer, waves, self.cache.acquire(layer, waves[0]))
        if self.timeline is not None:
            self.timeline.add("compute", f"wait L{layer}", start, self.timeline.mark(), experts=sum(map(len, waves)))
        return plan

    def _run(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
             slots: list[int]) -> torch.Tensor:
        lo, hi = min(slots), max(slots)
        local = self.cache.luts[layer][index]  # every id in ``index`` is resident: acquired above
        if lo:
            local = local - lo
        view = self._view(layer, lo, hi)
        return type(view).forward(view, hidden, local.to(index.dtype), weights)

    def expert_compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
        if self.timeline is None:
            return self._compute(layer, hidden, top_k_index, top_k_weights, plan)
        start = self.timeline.mark()
        out = self._compute(layer, hidden, top_k_index, top_k_weights, plan)
        self.timeline.add("compute", f"experts L{layer}", start, self.timeline.mark(), waves=len(plan.waves))
        return out

    def _compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
        if len(plan.waves) == 1:
            try:
                return self._run(layer, hidden, top_k_index, top_k_weights, plan.first_slots)
            finally:
                self.cache.release(layer, plan.first_slots)
        # More experts than slots: compute in waves. Positions routed outside the wave keep a
        # valid slot id but weight zero, so each wave adds exactly its own experts' share.
        out = None
        for i, wave in enumerate(plan.waves):
            slots = plan.first_slots if i == 0 else self.cache.acquire(layer, wave)
            try:
                wave_ids = torch.tensor(wave, dtype=top_k_index.dtype, device=top_k_index.device)
                inside = torch.isin(top_k_index, wave_ids)
                index = torch.where(inside, top_k_index, wave_ids[0])
                weights = top_k_weights * inside.to(top_k_weights.dtype)
                part = self._run(layer, hidden, index, weights, slots)
            finally:
                self.cache.release(layer, slots)
            out = part if out is None else out + part
        return out

    def permute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor):
        perm = torch.argsort(top_k_index[:, 0], stable=True)
        return hidden[perm], top_k_index[perm], perm
