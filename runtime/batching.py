"""``model.generate_many``: many prompts, micro-batched by route (``runtime/scheduler.py``).

1. Every prompt's route is estimated from its prefill: one forward per FIFO chunk of prompts
   (only the last position's logits are kept), with the runtime's routing recorder on; the
   estimate is the share of the prompt's own tokens (padding left out) sent to each
   (MoE layer, expert).
2. The scheduler partitions the prompts into micro-batches of at most ``batch_size``.
3. Each micro-batch runs transformers' ``generate``, left-padded; each output is cut to its own
   tokens (padding before, and anything after its end-of-sequence token, removed) and put back
   in the caller's order: one output per prompt, as if it had been generated alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .routing import RoutingTrace
from .scheduler import SCHEDULES, distinct_experts, expert_sets, plan_batches


@dataclass(frozen=True)
class Schedule:
    """What ``generate_many`` ran: micro-batches (prompt indices) and the experts each touched
    in its prefill estimate."""

    batches: list[list[int]]
    distinct_experts: list[int]


def check_request(prompts: Any, batch_size: Any, schedule: Any, strings_ok: bool) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate_many needs a non-empty list of prompts (token-id lists or strings)")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a positive number of prompts per micro-batch")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not strings_ok:
                raise ValueError(f"prompt {i} is a string but this model has no tokenizer: pass token-id lists")
        elif not (isinstance(p, (list, tuple)) and p and all(type(t) is int for t in p)):
            raise ValueError(f"prompt {i} is neither a string nor a non-empty list of token ids")


def _padded(prompts: Sequence[list[int]], rows: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompts[i]) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(prompts[i])
        ids[r, width - n:] = torch.tensor(prompts[i])
        mask[r, width - n:] = 1
    return ids, mask


def route_estimates(model: Any, prompts: Sequence[list[int]], chunk: int, pad: int) -> torch.Tensor:
    """[prompts, layers * experts]: each prompt's share of tokens per (MoE layer, expert)."""
    layouts = model.context.cache.layouts
    layers = sorted(layouts)
    width = max(lay.num_experts for lay in layouts.values())
    out = torch.zeros(len(prompts), len(layers), width)
    saved = model.routing, model.context.routing
    trace = model.routing = model.context.routing = RoutingTrace()
    try:
        for start in range(0, len(prompts), chunk):
            rows = list(range(start, min(start + chunk, len(prompts))))
            ids, mask = _padded(prompts, rows, pad)
            trace.steps.clear()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            step = trace.steps[-1]
            for j, layer in enumerate(layers):
                routed = step.routes[layer].reshape(len(rows), ids.shape[1], -1).long()
                for r, i in enumerate(rows):
                    own = routed[r, mask[r].bool()].flatten()
                    own = own[(own >= 0) & (own < width)]
                    out[i, j] = torch.bincount(own, minlength=width)[:width].float() / max(len(prompts[i]), 1)
    finally:
        model.routing, model.context.routing = saved
    return out.flatten(1)


def _own_tokens(row: torch.Tensor, pad_front: int, prompt_len: int, eos: set[int]) -> list[int]:
    tokens = row[pad_front:].tolist()
    for n in range(prompt_len, len(tokens)):
        if tokens[n] in eos:
            return tokens[:n + 1]
    return tokens


def generate_many(model: Any, prompts: list[list[int]], batch_size: int, schedule: str, pad: int,
                  eos: set[int], **generation_kwargs: Any) -> tuple[list[list[int]], Schedule]:
    """Each prompt's full sequence (prompt + new tokens), in the caller's order, and the schedule."""
    estimates = route_estimates(model, prompts, batch_size, pad)
    batches = plan_batches(estimates, [len(p) for p in prompts], batch_size, schedule)
    touched = expert_sets(estimates, len(model.context.cache.layouts))
    outputs: list[list[int]] = [[] for _ in prompts]
    for rows in batches:
        ids, mask = _padded(prompts, rows, pad)
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **generation_kwargs)
        for r, i in enumerate(rows):
            outputs[i] = _own_tokens(out[r], ids.shape[1] - len(prompts[i]), len(prompts[i]), eos)
    return outputs, Schedule(batches, distinct_experts(touched, batches))
