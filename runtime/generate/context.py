"""The execution context the compiled graph's ExpertFlow ops call into.

``expert_compute`` runs transformers' own experts function (whichever implementation the
config selects: grouped_mm, batched_mm, eager, ...) on a view of the slot pool, with top-k
expert ids remapped to slot ids. Activation, bias, clamping, interleaving and dtype handling
are therefore the model's own, not re-written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...ir import meta_keys
from ..cache.expert_cache import ExpertCache, Handle
from .permutation import wave_order
from ..predict.reuse import encode, expected_next_use
from ..predict.route_tables import RouteTables
from ..observe.routing import RoutingTrace
from ..store.host import ExpertLayout
from ..observe.timeline import Timeline


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


#: The most expert groups one experts call may take: torch's grouped GEMM refuses more than 1,024
#: ("Can't process more than 1024 groups"), and a view spans slots lo..hi, so a pool of 1,024+
#: slots whose step's experts sit far apart needs several calls (``slot_windows``).
MAX_GROUPS = 1024


def slot_windows(slots: list[int], most: int) -> list[tuple[int, int]]:
    """The slots in use as (lo, hi) windows, each spanning at most ``most`` slots, in order."""
    ordered = sorted(slots)
    windows, lo, last = [], ordered[0], ordered[0]
    for slot in ordered[1:]:
        if slot - lo >= most:
            windows.append((lo, last))
            lo = slot
        last = slot
    windows.append((lo, last))
    return windows


def _to_device(values: list[int], like: torch.Tensor) -> torch.Tensor:
    """A small host list on ``like``'s device without blocking (pinned source, async copy)."""
    host = torch.tensor(values, dtype=like.dtype)
    if like.device.type == "cpu":
        return host
    return host.pin_memory().to(like.device, non_blocking=True)


@dataclass
class SlotPlan:
    layer: int
    waves: list[list[int]]
    first_slots: list[int]
    demand: bool = True  # the wait's misses copy on the demand stream
    routed: list[int] = field(default_factory=list)  # the step's top-k ids, as the wait read them
    rows: list[tuple[int, int]] | None = None  # per wave, the rows it computes (set by permute)


@dataclass
class PathState:
    """The routing-path predictor's context between steps: the last MoE block's input at each
    row's last position ([rows, hidden]), and the rows of the step that is running."""

    last: torch.Tensor | None = None
    rows: int = 0
    context: torch.Tensor | None = None  # what this step's predict_path read (refine_path reads it too)


class RuntimeContext:
    def __init__(self, cache: ExpertCache, modules: dict[int, nn.Module],
                 streams: dict[tuple[str, int], str] | None = None):
        self.cache = cache
        self.modules = modules
        # (op, layer) -> "copy" | "demand": the stream the schedule pass gave each copying node
        self.demand = {key: stream == meta_keys.DEMAND for key, stream in (streams or {}).items()}
        self._views: dict[tuple[int, int, int], nn.Module] = {}
        self.timeline: Timeline | None = None  # set by runtime.load(timeline=True)
        self.routing: RoutingTrace | None = None  # set by runtime.load(record_routing=True)
        self.path_predictor: nn.Module | None = None  # set by runtime.load for a routing_path graph
        self.path_refiner: nn.Module | None = None  # its second stage (refine_path), when the graph has one
        self.reuse_predictor: nn.Module | None = None  # predict_reuse's network, when the graph has one
        self.path_state = PathState()
        self.route_tables: RouteTables | None = None  # set by runtime.load for a frequency/transition graph

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
        state = self.path_state
        rows = hidden.shape[0] if hidden.dim() == 3 else 1
        state.rows = rows
        context = None
        # a decode step (one position per row) after a step of as many rows: the context is known
        if (getattr(self.path_predictor, "context", False) and state.last is not None and hidden.dim() == 3
                and hidden.shape[1] == 1 and state.last.shape[0] == rows):
            context = state.last
        state.context = context
        return self.path_predictor(hidden, context)

    def refine_path(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.path_refiner is None:
            raise RuntimeError("this graph calls the routing-path predictor's second stage but none was loaded")
        return self.path_refiner(torch.cat([embeds, hidden.to(embeds.dtype)], -1), self.path_state.context)

    def _tables(self) -> RouteTables:
        if self.route_tables is None:
            raise RuntimeError("this graph calls a trace predictor but no routing tables were loaded")
        return self.route_tables

    def predict_frequency(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._tables().predict_frequency(layer, hidden.reshape(-1, hidden.shape[-1]).shape[0])

    def predict_transition(self, layer: int, previous_index: torch.Tensor) -> torch.Tensor:
        return self._tables().predict_transition(layer, previous_index)

    def predict_reuse(self, embeds: torch.Tensor) -> None:
        if self.reuse_predictor is None:
            raise RuntimeError("this graph calls the reuse predictor but none was loaded")
        # each row's last position: the estimates are about the tokens after this step
        rows = embeds[:, -1] if embeds.dim() == 3 else embeds.reshape(-1, embeds.shape[-1])
        scores = self.reuse_predictor.scores(rows, self.path_state.context)  # [rows, layers x horizons, experts]
        layers = len(self.cache.layouts)
        logits = scores.reshape(rows.shape[0], layers, -1, scores.shape[-1])
        self.cache.expect_reuse(encode(expected_next_use(logits)))

    def path_context(self, hidden: torch.Tensor) -> None:
        state = self.path_state
        if not getattr(self.path_predictor, "context", False) or not state.rows:
            return
        # rows stay in order across steps; a reordered batch (beam search) only predicts worse
        state.last = hidden.reshape(state.rows, -1, hidden.shape[-1])[:, -1].detach().clone()

    def prefetch(self, layer: int, expert_ids: torch.Tensor, copy: bool = True) -> Handle:
        return self.cache.prefetch(layer, expert_ids, demand=self.demand.get(("prefetch", layer), False), copy=copy)

    def wait(self, layer: int, handle: Handle | None, top_k_index: torch.Tensor) -> SlotPlan:
        start = self.timeline.mark() if self.timeline is not None else None
        waves = self.cache.plan(layer, handle, top_k_index)
        if self.routing is not None:
            if self.cache.reuse_read is not None:  # the reuse estimates this wait read, before its begin
                self.routing.request("reuse", layer, self.cache.reuse_read)
            for resolved in self.cache.resolved:  # read back by this wait, in the order issued
                self.routing.request("prefetch" if resolved.copy else "hint", resolved.layer, resolved.predicted)
            self.routing.request("wait", layer, sorted(e for wave in waves for e in wave))
        demand = self.demand.get(("wait", layer), True)
        plan = SlotPlan(layer, waves, self.cache.acquire(layer, waves[0], demand), demand, self.cache.routed)
        if self.timeline is not None:
            self.timeline.add("compute", f"wait L{layer}", start, self.timeline.mark(), experts=sum(map(len, waves)))
        return plan

    def _run(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
             slots: list[int]) -> torch.Tensor:
        local = self.cache.tables[layer].on_device()[index]  # every id in ``index`` is resident: acquired above
        windows = slot_windows(slots, MAX_GROUPS)
        if len(windows) == 1:
            lo, hi = windows[0]
            return self._grouped(layer, hidden, local - lo if lo else local, index.dtype, weights, lo, hi)
        # The slots in use spread over more than one view's groups: each window of slots adds its
        # own experts' share, the positions routed elsewhere weighted zero (as waves do).
        out = None
        for lo, hi in windows:
            inside = (local >= lo) & (local <= hi)
            part = self._grouped(layer, hidden, torch.where(inside, local - lo, 0), index.dtype,
                                 weights * inside.to(weights.dtype), lo, hi)
            out = part if out is None else out + part
        return out

    def _grouped(self, layer: int, hidden: torch.Tensor, local: torch.Tensor, dtype: torch.dtype,
                 weights: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        view = self._view(layer, lo, hi)
        return type(view).forward(view, hidden, local.to(dtype), weights)

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
        # valid slot id but weight zero, so each wave adds exactly its own experts' share. After
        # ``permute`` each wave computes only its range of rows; the others would add zeros.
        out = None
        rows = plan.rows or [(0, hidden.shape[0])] * len(plan.waves)
        for i, (wave, (lo, hi)) in enumerate(zip(plan.waves, rows)):
            slots = plan.first_slots if i == 0 else self.cache.acquire(layer, wave, plan.demand)
            try:
                if hi > lo:
                    wave_ids = _to_device(wave, top_k_index)
                    index = top_k_index[lo:hi]
                    # Membership by a gather from a host-made table, not ``isin``: on a GPU a
                    # large ``isin`` takes a path that synchronises with the host. The last entry
                    # (0) stands for ids outside the layer's experts, which no wave computes.
                    n = self.cache.layouts[layer].num_experts
                    member = [0] * (n + 1)
                    for e in wave:
                        member[e] = 1
                    inside = _to_device(member, index)[index.clamp(-1, n)].bool()
                    weights = top_k_weights[lo:hi] * inside.to(top_k_weights.dtype)
                    part = self._run(layer, hidden[lo:hi], torch.where(inside, index, wave_ids[0]), weights, slots)
                    if out is None:
                        out = part.new_zeros((hidden.shape[0], *part.shape[1:]))
                    out[lo:hi] += part
            finally:
                self.cache.release(layer, slots)
        return out

    def permute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                plan: SlotPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if len(plan.waves) == 1 or hidden.shape[0] < 2:
            return hidden, top_k_index, top_k_weights, None  # one wave: the order changes nothing
        order = wave_order(plan.routed, top_k_index.shape[1], plan.waves, self.cache.layouts[layer].num_experts)
        plan.rows = order.rows
        perm = _to_device(order.order, top_k_index)
        return hidden[perm], top_k_index[perm], top_k_weights[perm], perm
