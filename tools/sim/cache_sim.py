"""Replays a routing trace through the runtime's expert cache, demand loading only, per policy.

The cache is the runtime's cache model (``runtime/cache/cache_model.py``, with a clock: ``sim_cache``):
one pool of C slots shared by every MoE layer (all layers are assumed to share one expert
layout, hence one pool), each slot holding one (layer, expert). The layer cycle is the MoE
layers the trace names, ascending (the runtime's sorted layouts). A *step* is one trace record,
one MoE layer of one token. Its distinct experts must be resident together while the layer
computes, so eviction never picks one of them. Rule for a step, as the model applies it:

- experts are taken in ascending id, those already resident first;
  each resident one is a hit, each other one a miss, i.e. one load (a copy of expert_bytes);
- a load fills an empty slot if there is one, else evicts the policy's victim among slots not
  holding an expert of the step;
- a step needing more than C experts runs in waves of C, as the runtime does: the first wave
  fills every slot, and each later wave evicts experts of earlier waves, already computed.
  Each needed expert is still loaded at most once per step, so the loads of a step are exactly
  the experts not resident when it starts, whatever the policy.

Policies are the runtime's (``runtime/cache/policy.POLICIES``) and Belady's MIN (``sim_cache.Belady``).
Prefetching predictors replay through ``prefetch_sim``, on the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sim_cache import SIM_POLICIES as POLICIES, Clock, SimCache, TimeModel, Totals, make_sim_policy, next_uses
from .trace_file import Access

#: A bare trace's default rows: every policy but predictive, whose predictions a trace does not
#: carry (without them it ranks by each expert's online popularity; ask for it by name).
TRACE_DEFAULT = tuple(p for p in POLICIES if p != "predictive")

__all__ = ["POLICIES", "TRACE_DEFAULT", "Access", "LayerCounts", "SimResult", "TimeModel", "TimeReport", "next_uses",
           "predict_time", "simulate"]


@dataclass(frozen=True)
class LayerCounts:
    hits: int
    loads: int


@dataclass(frozen=True)
class SimResult(Totals):
    policy: str
    capacity: int
    expert_bytes: int
    steps: int
    tokens: int      # distinct (seq, token)
    accesses: int    # (layer, expert) needs summed over steps: hits + loads
    hits: int
    loads: int       # misses; each is one copy of expert_bytes
    per_layer: dict[int, LayerCounts]


def simulate(trace: Sequence[Access], policy: str, capacity: int, expert_bytes: int = 1,
             future: Sequence[tuple[int, ...]] | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Replays ``trace`` through a cache of ``capacity`` slots (rules in the module docstring).

    ``future`` is ``next_uses(trace)``, to share between Belady runs; ``progress(n)`` is told of
    steps done, every few thousand.
    """
    layers = sorted({a.layer for a in trace})
    chooser = make_sim_policy(policy, layers, trace, future=future)
    if capacity < 1 or expert_bytes < 1:
        raise ValueError(f"capacity and expert_bytes must be at least 1, got {capacity} and {expert_bytes}")
    experts = 1 + max((e for a in trace for e in a.experts), default=0)
    cache = SimCache(layers, experts, capacity, chooser, Clock(None), expert_bytes)
    tokens, last_token, reported = 0, None, 0
    for step, access in enumerate(trace):
        if (access.seq, access.token) != last_token:
            tokens, last_token = tokens + 1, (access.seq, access.token)
        for wave in cache.waves(access.layer, [], list(access.experts)):
            cache.release(access.layer, cache.acquire(access.layer, wave))
        if progress is not None and step + 1 - reported >= 4096:
            progress(step + 1 - reported)
            reported = step + 1
    if progress is not None and len(trace) > reported:
        progress(len(trace) - reported)
    per_layer = {layer: LayerCounts(cache.stats[layer].hits, cache.stats[layer].misses) for layer in layers}
    total_hits = sum(c.hits for c in per_layer.values())
    total_loads = sum(c.loads for c in per_layer.values())
    return SimResult(policy, capacity, expert_bytes, len(trace), tokens, total_hits + total_loads,
                     total_hits, total_loads, per_layer)


@dataclass(frozen=True)
class TimeReport:
    ms_per_token: float
    bound_ms_per_token: float
    over_bound: float | None  # None when nothing is copied (the bound is 0)


def predict_time(result: SimResult, model: TimeModel) -> TimeReport:
    if model.expert_bytes != result.expert_bytes:
        raise ValueError(f"the replay counted {result.expert_bytes} bytes per expert, the time model "
                         f"{model.expert_bytes}")
    tokens = max(result.tokens, 1)
    copy_ms = result.bytes / (model.bandwidth_gbps * 1e9) * 1e3
    total_ms = copy_ms + result.steps * model.layer_ms
    bound = copy_ms / tokens
    return TimeReport(total_ms / tokens, bound, total_ms / copy_ms if copy_ms > 0 else None)
