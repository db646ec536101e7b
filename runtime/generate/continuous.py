"""Continuous batching for ``generate_many``: finished sequences leave, waiting prompts join.

One running batch holds at most ``batch_size`` sequences. Before each decode step:

1. rows that finished (end-of-sequence token or their new-token limit) leave: their KV rows are
   dropped;
2. free places are filled from the waiting prompts. ``fifo`` takes them in the caller's order;
   ``route-aware`` takes, one at a time, the prompt whose route estimate is most like the
   running rows' (``scheduler.Picker``). The newcomers are prefilled together, left-padded, and
   their KV joins the batch's: both sides left-padded to one length, padding masked out, and
   columns no row uses any more trimmed;
3. one decode step runs every row, each at its own position.

Each output is the one the prompt gets alone: padding is masked, each row's positions count its
own tokens (as transformers' ``generate`` does for left padding), and transformers' logits
processors are built per row from its own prompt length and applied to its own tokens.
Beam search, several sequences per prompt, stop strings and callbacks need ``generate`` itself:
``generate_many(..., continuous=False)`` runs them in fixed micro-batches.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ...ir import ops
from .scheduler import Picker


@dataclass
class Row:
    """One running sequence: its prompt's index, every token so far and its new-token limit."""

    prompt: int
    tokens: list[int]
    limit: int
    processors: Any  # transformers' LogitsProcessorList for this row's prompt length
    new: int = 0
    done: bool = False


@dataclass
class Running:
    """The batch between steps: rows, their KV cache and its 2-D mask (1 = a real token)."""

    rows: list[Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Admissions:
    """What ran: the prompts admitted together (the first group is the initial batch) and the
    batch's members right after each admission."""

    groups: list[list[int]]
    members: list[list[int]]


def unsupported(model: Any, generation_kwargs: dict[str, Any]) -> str | None:
    """Why continuous batching cannot run this request (None: it can)."""
    cache = model.new_cache()
    others = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [None])} - {"DynamicLayer"})
    if type(cache) is not DynamicCache or others:  # MiniMaxCache keeps its linear states outside .layers
        kinds = ", ".join(others or [type(cache).__name__])
        return (f"this model's cache has sliding-window or recurrent-state layers ({kinds}), whose rows cannot "
                "be realigned as sequences join and leave")
    kept = sorted({n.args[2] for n in model.graph_module.graph.nodes if n.target is ops.set_cache_state})
    if kept:
        return (f"this model's forward keeps state on its cache ({', '.join(kept)}) that continuous batching "
                "cannot realign as sequences join and leave")
    if not all(hasattr(model, f) for f in ("_get_logits_processor", "_prepare_generated_length")):
        return "this transformers release does not expose generate's processors and length rules"
    try:
        config = generation_config(model, generation_kwargs)
    except ValueError as exc:
        return str(exc)
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return "beam search and several sequences per prompt need generate's own loop"
    if config.stop_strings or config.return_dict_in_generate:
        return "stop strings and dict outputs need generate's own loop"
    return None


def generation_config(model: Any, generation_kwargs: dict[str, Any]) -> Any:
    """The generation config ``generate`` would use (the model's, its defaults, the caller's
    options: transformers' own merge); ValueError for options that are not generation options."""
    if not hasattr(model, "_prepare_generation_config"):
        raise ValueError("this transformers release does not expose generate's configuration merge")
    config, rest = model._prepare_generation_config(None, **generation_kwargs)
    if rest:
        raise ValueError(f"{', '.join(sorted(rest))} are not generation options continuous batching can apply")
    config.validate()
    if hasattr(model, "_prepare_special_tokens"):  # the token tensors processors read (min length, ...)
        wanted = {"generation_config": config, "kwargs_has_attention_mask": True, "device": model.device,
                  "batch_size": 1}
        names = inspect.signature(model._prepare_special_tokens).parameters
        model._prepare_special_tokens(**{k: v for k, v in wanted.items() if k in names})
    return config


def _processors(model: Any, config: Any, prompt_len: int) -> Any:
    wanted = {"generation_config": config, "input_ids_seq_length": prompt_len, "device": model.device}
    names = inspect.signature(model._get_logits_processor).parameters
    return model._get_logits_processor(**{k: v for k, v in wanted.items() if k in names})


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rebuild(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    return DynamicCache(ddp_cache_data=kv, config=model.config)


def merge(model: Any, run: Running, cache: Any, mask: torch.Tensor, rows: list[Row]) -> None:
    """Append ``rows`` (prefilled into ``cache``/``mask``) to the running batch."""
    if not run.rows:
        run.rows, run.cache, run.mask = rows, cache, mask
        return
    width = max(run.mask.shape[1], mask.shape[1])
    full = torch.cat([_left_pad(run.mask, width, 1), _left_pad(mask, width, 1)])
    start = int(full.any(0).long().argmax())  # columns before the first real token of any row go
    kv = [tuple(torch.cat([_left_pad(a, width, 2), _left_pad(b, width, 2)])[:, :, start:]
                for a, b in zip(old, new)) for old, new in zip(_kv(run.cache), _kv(cache))]
    run.rows, run.cache, run.mask = run.rows + rows, _rebuild(model, kv), full[:, start:]


def drop_finished(model: Any, run: Running) -> None:
    keep = [i for i, row in enumerate(run.rows) if not row.done]
    if len(keep) == len(run.rows):
        return
    if not keep:
        run.rows, run.cache, run.mask = [], None, None
        return
    index = torch.tensor(keep, device=run.mask.device)
    mask = run.mask[index]
    start = int(mask.any(0).long().argmax())
    kv = [(k[index][:, :, start:], v[index][:, :, start:]) for k, v in _kv(run.cache)]
    run.rows, run.cache, run.mask = [run.rows[i] for i in keep], _rebuild(model, kv), mask[:, start:]


def _choose(rows: Sequence[Row], logits: torch.Tensor, config: Any, eos: set[int]) -> None:
    """Each row's next token from its own logits, through its own processors; one read of the
    chosen tokens for the whole batch."""
    scores = logits.float()
    if any(row.processors for row in rows):
        scores = torch.cat([row.processors(torch.tensor([row.tokens], device=logits.device), scores[r:r + 1])
                            for r, row in enumerate(rows)])
    if config.do_sample:
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]
    else:
        tokens = scores.argmax(-1)
    for row, token in zip(rows, tokens.tolist()):
        append_token(row, token, eos)


def append_token(row: Row, token: int, eos: set[int]) -> None:
    row.tokens.append(token)
    row.new += 1
    row.done = token in eos or row.new >= row.limit


def padded(prompts: Sequence[list[int]], rows: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts ``rows`` names, left-padded with ``pad`` to the longest: ids and the 2-D mask."""
    width = max(len(prompts[i]) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(prompts[i])
        ids[r, width - n:] = torch.tensor(prompts[i])
        mask[r, width - n:] = 1
    return ids, mask


def prefill(model: Any, prompts: Sequence[list[int]], group: list[int], pad: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    ids, mask = padded(prompts, group, pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = model.new_cache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    return cache, mask, out.logits[:, -1]


def decode(model: Any, run: Running) -> torch.Tensor:
    last = torch.tensor([[row.tokens[-1]] for row in run.rows], device=run.mask.device)
    positions = run.mask.sum(1, keepdim=True)
    run.mask = torch.cat([run.mask, torch.ones_like(run.mask[:, :1])], dim=1)
    out = model(input_ids=last, attention_mask=run.mask, position_ids=positions, past_key_values=run.cache,
                logits_to_keep=1)
    return out.logits[:, -1]


def next_group(picker: Picker | None, waiting: list[int], members: list[int], count: int) -> list[int]:
    if picker is None:
        return waiting[:count]
    free = torch.zeros(len(picker.length), dtype=torch.bool)
    free[waiting] = True
    group: list[int] = []
    anchor_of = members or [picker.longest(free)]
    anchor = float(picker.length[anchor_of].mean())
    for _ in range(min(count, len(waiting))):
        pick = picker.pick(members + group, free, anchor)
        group.append(pick)
        free[pick] = False
    return group


def run(model: Any, prompts: Sequence[list[int]], batch_size: int, picker: Picker | None, pad: int,
        eos: set[int], generation_kwargs: dict[str, Any],
        limits: Sequence[int] | None = None) -> tuple[list[list[int]], Admissions]:
    """Every prompt's tokens (prompt + new), in the caller's order, and the admissions made.
    ``picker`` None admits in the caller's order (fifo); ``limits``: new tokens per prompt."""
    config = generation_config(model, generation_kwargs)
    outputs: list[list[int]] = [[] for _ in prompts]
    # rows are made first: a prompt generate would refuse is refused before any token is generated
    made = [make_row(model, config, i, p, limits[i] if limits else None, generation_kwargs) for i, p in enumerate(prompts)]
    waiting, state = list(range(len(prompts))), Running()
    groups: list[list[int]] = []
    members: list[list[int]] = []
    while waiting or state.rows:
        while waiting and len(state.rows) < batch_size:
            group = next_group(picker, waiting, [row.prompt for row in state.rows], batch_size - len(state.rows))
            waiting = [i for i in waiting if i not in set(group)]
            cache, mask, logits = prefill(model, prompts, group, pad)
            rows = [made[i] for i in group]
            _choose(rows, logits, config, eos)
            merge(model, state, cache, mask, rows)
            groups.append(sorted(group))
            members.append(sorted(row.prompt for row in state.rows))
            _finish(model, state, outputs)
        if state.rows:
            _choose(state.rows, decode(model, state), config, eos)
            _finish(model, state, outputs)
    return outputs, Admissions(groups, members)


def make_row(model: Any, config: Any, prompt: int, tokens: list[int], limit: int | None,
         kwargs: dict[str, Any]) -> Row:
    """A row with generate's own length rules for its prompt (``_prepare_generated_length``: the
    default max_length means 20 new tokens) and processors built for its prompt length."""
    config = copy.deepcopy(config)
    ids = torch.tensor([tokens], device=model.device)
    own = model.generation_config
    wanted = {"generation_config": config, "model_input_name": "input_ids", "input_ids_length": len(tokens),
              "inputs_tensor": ids,
              "has_default_max_length": kwargs.get("max_length") is None and own.max_length is None,
              "has_default_min_length": kwargs.get("min_length") is None and own.min_length is None}
    names = inspect.signature(model._prepare_generated_length).parameters
    config = model._prepare_generated_length(**{k: v for k, v in wanted.items() if k in names})
    if limit is None and len(tokens) >= config.max_length:  # as generate refuses it
        raise ValueError(f"prompt {prompt} has {len(tokens)} tokens but max_length is {config.max_length}: "
                         "raise max_length or pass max_new_tokens")
    new = limit if limit is not None else int(config.max_length) - len(tokens)
    return Row(prompt, list(tokens), new, _processors(model, config, len(tokens)))


def _finish(model: Any, state: Running, outputs: list[list[int]]) -> None:
    for row in state.rows:
        if row.done:
            outputs[row.prompt] = row.tokens
    drop_finished(model, state)
