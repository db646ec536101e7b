"""The token order of a layer computed in waves: what ``permute`` computes from the wait's plan.

A wave is a group of experts resident at once (``ExpertCache.plan``: resident experts first).
Each token's experts fall in some waves, from its first ``a`` to its last ``b``. Sorting tokens
by (a, b) puts together the tokens that the same waves need, so wave w's tokens all lie in one
range of rows: from the first token with a <= w <= b to the last. Rows in that range that route
outside the wave keep a zero weight for it, as the unpermuted compute did for every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WaveOrder:
    order: list[int]              # new row i is old row order[i]
    rows: list[tuple[int, int]]   # per wave, the [lo, hi) range of new rows it computes


def wave_order(routed: list[int], k: int, waves: list[list[int]], num_experts: int) -> WaveOrder:
    """The order of ``routed`` (flat top-k ids, ``k`` per token, read to the host by the wait) that
    makes every wave's tokens one row range. Host work only: nothing here touches the device."""
    count = len(waves)
    ids = torch.tensor(routed, dtype=torch.long).view(-1, k) if routed else torch.zeros(0, k, dtype=torch.long)
    wave_of = torch.full((num_experts + 1,), count, dtype=torch.long)  # the spare entry: ids out of range
    for w, wave in enumerate(waves):
        wave_of[torch.tensor(wave, dtype=torch.long)] = w
    valid = (ids >= 0) & (ids < num_experts)
    of = wave_of[torch.where(valid, ids, num_experts)]
    first = of.min(dim=1).values                                   # count: the token needs no wave
    last = torch.where(of < count, of, -1).max(dim=1).values
    order = torch.argsort(first * (count + 1) + last.clamp(min=0), stable=True)
    first, last = first[order], last[order]
    rows = []
    for w in range(count):
        hit = torch.nonzero((first <= w) & (last >= w)).flatten()
        rows.append((int(hit[0]), int(hit[-1]) + 1) if hit.numel() else (0, 0))
    return WaveOrder(order.tolist(), rows)
