"""``model.generate_many``: many prompts, micro-batched by route (``runtime/generate/scheduler.py``).

1. Every prompt's route is estimated: with a routing-path predictor, from its tokens' embeddings
   alone (the predictor's top-k per layer; no layer runs); otherwise from its prefill, one
   forward per FIFO chunk of prompts (only the last position's logits kept) with the runtime's
   routing recorder on. The estimate is the share of the prompt's own tokens (padding left out)
   sent to each (MoE layer, expert).
2. The scheduler partitions the prompts into micro-batches of at most ``batch_size``.
3. Continuous batching (``runtime/generate/continuous.py``, the default where it applies): one running
   batch whose finished rows are replaced by the waiting prompts that best share its experts.
   Otherwise (``continuous=False``, or generation options only transformers' own loop has),
   each micro-batch runs transformers' ``generate``, left-padded, and each output is cut to its
   own tokens (padding before, and anything after its end-of-sequence token, removed).

Either way outputs come back in the caller's order: one per prompt, as if generated alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import continuous as cb
from .continuous import padded
from .inputs import check_input_ids
from ..observe.routing import RoutingTrace
from ..store.tokenizer import encode_text, load_tokenizer
from .scheduler import SCHEDULES, Picker, distinct_experts, expert_sets, plan_batches


@dataclass(frozen=True)
class Schedule:
    """What ``generate_many`` ran. Fixed micro-batches: ``batches`` (prompt indices) and the
    experts each touches by its prefill estimate. Continuous: ``batches`` are the prompts
    admitted together (the first is the initial batch) and ``distinct_experts`` what the running
    batch touches right after each admission."""

    batches: list[list[int]]
    distinct_experts: list[int]
    continuous: bool = False


def check_request(prompts: Any, batch_size: Any, schedule: Any, strings_ok: bool, continuous: Any = None) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate_many needs a non-empty list of prompts (token-id lists or strings)")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a positive number of prompts per micro-batch")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if continuous is not None and type(continuous) is not bool:
        raise ValueError(f"continuous={continuous!r}: give True, False or None (continuous where it applies)")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not strings_ok:
                raise ValueError(f"prompt {i} is a string but this model has no tokenizer: pass token-id lists")
        elif not (isinstance(p, (list, tuple)) and p and all(type(t) is int for t in p)):
            raise ValueError(f"prompt {i} is neither a string nor a non-empty list of token ids")


def predicted_estimates(model: Any, prompts: Sequence[list[int]]) -> torch.Tensor | None:
    """[prompts, layers * experts] from the routing-path predictor, before any layer runs: each
    prompt's share of predicted top-k choices per (MoE layer, expert). None without a predictor."""
    predictor = model.context.path_predictor
    if predictor is None:
        return None
    embed = model.get_input_embeddings()
    out = torch.zeros(len(prompts), predictor.layers, predictor.experts)
    for i, p in enumerate(prompts):
        ids = predictor(embed(torch.tensor(p, device=model.device)))  # [tokens, layers, top_k]
        for j in range(predictor.layers):
            out[i, j] = torch.bincount(ids[:, j].flatten().cpu(), minlength=predictor.experts).float() / len(p)
    return out.flatten(1)


def route_estimates(model: Any, prompts: Sequence[list[int]], chunk: int, pad: int) -> torch.Tensor:
    """[prompts, layers * experts]: each prompt's share of tokens per (MoE layer, expert), from the
    routing-path predictor when the directory has one (no model forward), else from a prefill."""
    predicted = predicted_estimates(model, prompts)
    if predicted is not None:
        return predicted
    layouts = model.context.cache.layouts
    layers = sorted(layouts)
    width = max(lay.num_experts for lay in layouts.values())
    out = torch.zeros(len(prompts), len(layers), width)
    saved = model.routing, model.context.routing
    trace = model.routing = model.context.routing = RoutingTrace()
    try:
        for start in range(0, len(prompts), chunk):
            rows = list(range(start, min(start + chunk, len(prompts))))
            ids, mask = padded(prompts, rows, pad)
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


def _limits(generation_kwargs: dict[str, Any], count: int) -> list[int] | None:
    """Per-prompt new-token limits when ``max_new_tokens`` is a list (then it leaves the kwargs)."""
    limits = generation_kwargs.get("max_new_tokens")
    if not isinstance(limits, (list, tuple)):
        return None
    if len(limits) != count or not all(type(n) is int and n > 0 for n in limits):
        raise ValueError(f"max_new_tokens is a list of {len(limits)}; give one positive int per prompt ({count})")
    generation_kwargs["max_new_tokens"] = max(limits)
    return list(limits)


def _prepare(model: Any, prompts: Any, tokenizer: Any, batch_size: Any, schedule: Any, continuous: Any,
             generation_kwargs: dict[str, Any]) -> tuple[list[list[int]], list[int] | None, int, set[int], Any]:
    """Token ids, per-prompt limits, pad id, end-of-sequence ids and the tokenizer (None without
    strings); one-line ValueErrors first."""
    strings = isinstance(prompts, (list, tuple)) and any(isinstance(p, str) for p in prompts)
    if strings and tokenizer is None and model.directory is not None:
        tokenizer = load_tokenizer(model.directory)
    check_request(prompts, batch_size, schedule, tokenizer is not None, continuous)
    ids = [encode_text(tokenizer, p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    gc = model.generation_config
    limits = _limits(generation_kwargs, len(ids))
    context = getattr(model.config, "max_position_embeddings", None)
    for i, p in enumerate(ids):
        new = limits[i] if limits else int(generation_kwargs.get("max_new_tokens") or gc.max_new_tokens or 0)
        check_input_ids(torch.tensor([p]), model.config.vocab_size, f"prompt {i}")
        if context and len(p) + new > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={new} it exceeds the model's "
                             f"context of {context}: shorten it or lower max_new_tokens")
    pad, eos = pad_and_eos(model, generation_kwargs)
    return ids, limits, pad, eos, tokenizer if strings else None


def pad_and_eos(model: Any, generation_kwargs: dict[str, Any]) -> tuple[int, set[int]]:
    """The pad id and the end-of-sequence ids: the caller's, else the model's generation config's.
    The caller's pad_token_id leaves ``generation_kwargs`` (it is given to generate once)."""
    gc = model.generation_config
    pad = next((t for t in (generation_kwargs.pop("pad_token_id", None), gc.pad_token_id, gc.eos_token_id,
                            getattr(model.config, "pad_token_id", None), 0) if t is not None), 0)
    pad = pad[0] if isinstance(pad, list) else pad
    eos = gc.eos_token_id if generation_kwargs.get("eos_token_id") is None else generation_kwargs["eos_token_id"]
    return pad, set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def generate_many(model: Any, prompts: Any, batch_size: Any, schedule: Any, tokenizer: Any, continuous: Any,
                  generation_kwargs: dict[str, Any]) -> tuple[list, Schedule]:
    """One output per prompt in the caller's order (``CompiledModel.generate_many``), and the schedule."""
    generation_kwargs = dict(generation_kwargs)
    ids, limits, pad, eos, tokenizer = _prepare(model, prompts, tokenizer, batch_size, schedule, continuous,
                                                generation_kwargs)
    outputs, made = _generate(model, ids, limits, batch_size, schedule, pad, eos, continuous, generation_kwargs)
    if tokenizer is not None:
        outputs = [tokenizer.decode(out[len(p):], skip_special_tokens=True) for out, p in zip(outputs, ids)]
    return outputs, made


def _generate(model: Any, prompts: list[list[int]], limits: list[int] | None, batch_size: int, schedule: str,
              pad: int, eos: set[int], continuous: bool | None,
              generation_kwargs: dict[str, Any]) -> tuple[list[list[int]], Schedule]:
    why_not = cb.unsupported(model, generation_kwargs) if continuous is not False else None
    if continuous and why_not:
        raise ValueError(f"continuous batching cannot run this request: {why_not}; pass continuous=False")
    estimates = route_estimates(model, prompts, batch_size, pad)
    touched = expert_sets(estimates, len(model.context.cache.layouts))
    lengths = [len(p) for p in prompts]
    if continuous is not False and why_not is None:
        picker = Picker(estimates, lengths) if schedule == "route-aware" else None
        outputs, made = cb.run(model, prompts, batch_size, picker, pad, eos, generation_kwargs, limits)
        return outputs, Schedule(made.groups, distinct_experts(touched, made.members), continuous=True)
    batches = plan_batches(estimates, lengths, batch_size, schedule)
    outputs = [[] for _ in prompts]
    for rows in batches:
        ids, mask = padded(prompts, rows, pad)
        if limits:  # the batch runs to its longest limit; each output is cut to its own
            generation_kwargs["max_new_tokens"] = max(limits[i] for i in rows)
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **generation_kwargs)
        for r, i in enumerate(rows):
            own = _own_tokens(out[r], ids.shape[1] - len(prompts[i]), len(prompts[i]), eos)
            outputs[i] = own[:len(prompts[i]) + limits[i]] if limits else own
    return outputs, Schedule(batches, distinct_experts(touched, batches))
