"""Request scheduling: which prompts share a micro-batch.

Each prompt comes with a route estimate: a vector over (MoE layer, expert) of the share of its
tokens routed there (from its prefill, or the routing-path predictor). A micro-batch moves the
union of its members' experts, so prompts whose routes are alike should meet:

- ``fifo``: prompts in the caller's order, ``batch_size`` at a time;
- ``route-aware``: greedy clustering. The longest prompt not yet placed seeds a batch (so
  lengths stay balanced and padding small); the batch then takes, one at a time, the prompt
  whose estimate is most like the batch's mean (cosine), less a small penalty for a length far
  from the seed's. Ties go to the earlier prompt, so the plan is deterministic.

Both return a partition of ``range(n)`` into batches of at most ``batch_size`` (the last may be
smaller); callers restore the caller's order from the indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULES = ("route-aware", "fifo")
LENGTH_PENALTY = 0.1  # cosine similarity given up per unit of relative length difference


class Picker:
    """Route-aware choice of the next prompt for a batch: the free prompt whose estimate is most
    like the batch's members (cosine to their mean direction), less ``LENGTH_PENALTY`` per unit of
    relative length difference from ``anchor``. Ties go to the earlier prompt (deterministic)."""

    def __init__(self, estimates: torch.Tensor, lengths: Sequence[int]):
        self.unit = torch.nn.functional.normalize(estimates.double(), dim=1)
        self.length = torch.tensor(list(lengths), dtype=torch.float64)
        self.scale = max(float(self.length.max()), 1.0) if len(lengths) else 1.0

    def longest(self, free: torch.Tensor) -> int:
        """The longest free prompt (the earliest of equals): a batch's seed."""
        return int(torch.where(free, self.length, torch.tensor(-1.0, dtype=torch.float64)).argmax())

    def pick(self, members: Sequence[int], free: torch.Tensor, anchor: float) -> int:
        """The free prompt that best joins ``members`` (none: the longest free prompt)."""
        if not members:
            return self.longest(free)
        centre = torch.nn.functional.normalize(self.unit[list(members)].sum(0), dim=0)
        score = self.unit @ centre - LENGTH_PENALTY * (self.length - anchor).abs() / self.scale
        score[~free] = float("-inf")
        return int(score.argmax())  # argmax returns the first maximum: deterministic ties


def plan_batches(estimates: torch.Tensor, lengths: Sequence[int], batch_size: int, schedule: str) -> list[list[int]]:
    """Micro-batches of prompt indices; ``estimates`` is [prompts, features], rows sum to anything."""
    n = len(lengths)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "fifo":
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    picker = Picker(estimates, lengths)
    free = torch.ones(n, dtype=torch.bool)
    batches = []
    while bool(free.any()):
        seed = picker.longest(free)
        batch, free[seed] = [seed], False
        while len(batch) < batch_size and bool(free.any()):
            pick = picker.pick(batch, free, float(picker.length[seed]))
            batch.append(pick)
            free[pick] = False
        batches.append(sorted(batch))
    return batches


def expert_sets(estimates: torch.Tensor, layers: int) -> list[set[tuple[int, int]]]:
    """Per prompt: the (MoE layer position, expert) pairs its estimate gives any weight."""
    return [{(j, e) for j, e in torch.nonzero(row.view(layers, -1)).tolist()} for row in estimates]


def distinct_experts(sets: Sequence[set[tuple[int, int]]], batches: list[list[int]]) -> list[int]:
    """Per micro-batch: how many (layer, expert) its members touch together."""
    return [len(set().union(*(sets[i] for i in batch))) for batch in batches]
