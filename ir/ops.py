"""The ExpertFlow operations: first-class graph nodes.

Each op is a plain module-level function, so an fx graph calls it as a ``call_function`` node
that prints as readable code (``expertflow.ir.ops.prefetch(ef_ctx, 3, ids)``) and serialises
by qualified name. The ops take the execution context (``ef_ctx``, a graph input) as their first
argument and delegate to it: the graph says *what* moves and *when*; the runtime context
(``expertflow.runtime.generate.context``) says *how*. Ops with side effects are registered with fx so
dead-code elimination keeps them. Three ops take the cache input instead of the context: the
history a model keeps on transformers' cache object (``cache_state``, ``extend_state``,
``set_cache_state``), which the front end makes of the model's own attribute reads and writes.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Protocol

import torch
from torch.fx.node import has_side_effect


class ExecutionContext(Protocol):
    """What the graph needs from whoever runs it (the runtime, or a reference executor)."""

    def route(self, layer: int, top_k_index: torch.Tensor) -> None: ...
    def predict_path(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def refine_path(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...
    def predict_reuse(self, embeds: torch.Tensor) -> None: ...
    def path_context(self, hidden: torch.Tensor) -> None: ...
    def predict_frequency(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...
    def predict_transition(self, layer: int, previous_index: torch.Tensor) -> torch.Tensor: ...
    def prefetch(self, layer: int, expert_ids: torch.Tensor, copy: bool = True) -> Any: ...
    def wait(self, layer: int, handle: Any, top_k_index: torch.Tensor) -> Any: ...
    def expert_compute(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor, slots: Any,
    ) -> torch.Tensor: ...
    def permute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                slots: Any) -> Any: ...


def route(ctx: ExecutionContext, layer: int, top_k_index: torch.Tensor) -> torch.Tensor:
    """Marks the router's true top-k ids of ``layer``; records them for prefetch accuracy."""
    ctx.route(layer, top_k_index)
    return top_k_index


def predict(ctx: ExecutionContext, layer: int, predicted_index: torch.Tensor) -> torch.Tensor:
    """Marks a predictor's output for ``layer``: the expert ids it expects the router to pick.

    The predictor's math is ordinary graph nodes before this one; ``predict`` only names the
    result so analyses and dumps can find it.
    """
    return predicted_index


def predict_path(ctx: ExecutionContext, hidden: torch.Tensor) -> torch.Tensor:
    """The routing-path predictor: every MoE layer's expected experts for each token of ``hidden``
    (the token embeddings), as ids [tokens, MoE layers, k], from one forward of the network the
    compiled directory ships (``runtime/predict/path_predictor.py``)."""
    return ctx.predict_path(hidden)


def refine_path(ctx: ExecutionContext, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The routing-path predictor's second stage: the expected experts of every MoE layer after
    the first, as ids [tokens, MoE layers - 1, k], from the token embeddings ``embeds`` and
    ``hidden``, the first MoE layer's output (with the same context as ``predict_path``)."""
    return ctx.refine_path(embeds, hidden)


def predict_reuse(ctx: ExecutionContext, embeds: torch.Tensor) -> torch.Tensor:
    """The reuse predictor: tells the cache policy, from the token embeddings (and the context
    ``predict_path`` read), how many tokens until each expert is needed again after this step
    (``runtime/predict/reuse.py``); returns ``embeds`` unchanged (a side effect, like ``path_context``)."""
    ctx.predict_reuse(embeds)
    return embeds


def path_context(ctx: ExecutionContext, hidden: torch.Tensor) -> torch.Tensor:
    """Keeps the last MoE block's input of each sequence's last position (``hidden``) as the
    context the routing-path predictor reads at the next step; returns ``hidden`` unchanged."""
    ctx.path_context(hidden)
    return hidden


def predict_frequency(ctx: ExecutionContext, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The frequency prior: ``layer``'s most often chosen experts (calibration counts the compiled
    directory ships, ``runtime/predict/route_tables.py``), as ids [tokens, k], one row per token of
    ``hidden``; the same for every token (the static-cache baseline)."""
    return ctx.predict_frequency(layer, hidden)


def predict_transition(ctx: ExecutionContext, layer: int, previous_index: torch.Tensor) -> torch.Tensor:
    """The expert-transition predictor: ``layer``'s likeliest experts per token given the previous
    MoE layer's true top-k ids ``previous_index``, as ids [tokens, k]."""
    return ctx.predict_transition(layer, previous_index)


def path_layer(paths: torch.Tensor, position: int) -> torch.Tensor:
    """The predicted ids of the ``position``-th MoE layer (in depth order) out of ``predict_path``."""
    return paths[:, position]


def prefetch(ctx: ExecutionContext, layer: int, expert_ids: torch.Tensor, copy: bool = True) -> Any:
    """Starts copying ``layer``'s predicted experts into cache slots on the copy stream; with
    ``copy=False`` only tells the cache policy they will be needed (nothing moves early)."""
    if copy:
        return ctx.prefetch(layer, expert_ids)
    return ctx.prefetch(layer, expert_ids, copy)


def wait(ctx: ExecutionContext, layer: int, handle: Any, top_k_index: torch.Tensor) -> Any:
    """Blocks until ``handle``'s copies land, then loads any expert that was mispredicted.

    Returns the slot plan the compute reads: which slot holds each expert ``top_k_index`` needs.
    """
    return ctx.wait(layer, handle, top_k_index)


def expert_compute(
    ctx: ExecutionContext, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor, slots: Any,
) -> torch.Tensor:
    """Runs ``layer``'s experts on the cached slots; same result as the original experts call."""
    return ctx.expert_compute(layer, hidden, top_k_index, top_k_weights, slots)


def permute(ctx: ExecutionContext, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, slots: Any) -> Any:
    """Reorders the step's tokens (rows) in the order their experts become resident (``slots``,
    the wait's plan); returns (hidden, top_k_index, top_k_weights, perm), all in the new order.
    ``perm`` is None when the order is kept (nothing to gain: one wave)."""
    return ctx.permute(layer, hidden, top_k_index, top_k_weights, slots)


def unpermute(perm: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """Undoes :func:`permute` on the rows of ``hidden`` (row i goes back to row perm[i])."""
    if perm is None:
        return hidden
    out = torch.empty_like(hidden)
    out[perm] = hidden
    return out


def _permute_item(node: Any) -> Any:
    """The ``permute`` node whose output ``node`` is an item of (``permute(...)[i]``), or None."""
    if getattr(node, "target", None) is operator.getitem and getattr(node.args[0], "target", None) is permute:
        return node.args[0]
    return None


def permute_of(compute: Any) -> Any:
    """The ``permute`` node an ``expert_compute`` node reads its tokens from, or None."""
    return _permute_item(compute.args[2])


def unpermuted(node: Any) -> Any:
    """The value before permutation of an expert_compute input (``permute(...)[i]`` -> its input)."""
    source = _permute_item(node)
    return node if source is None else source.args[2 + node.args[1]]


_STATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def check_state_address(path: Any, name: Any) -> None:
    """Raises ValueError unless (``path``, ``name``) can name state a model keeps on its cache:
    ``path`` is ``()`` (the cache object) or ``("layers", i)`` (one of its layers), ``name`` a
    plain lower-case attribute name (never a dunder, method or anything that leads to code)."""
    if not (path == () or (isinstance(path, tuple) and len(path) == 2 and path[0] == "layers"
                           and type(path[1]) is int and 0 <= path[1] < 100_000)):
        raise ValueError(f"cache state path {str(path)[:60]!r} is neither () nor ('layers', index)")
    if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
        raise ValueError(f"cache state name {str(name)[:60]!r} is not a plain lower-case attribute name")


def is_cache_input(node: Any) -> bool:
    """Whether ``node`` (an fx node, or anything) is the graph's cache input."""
    return getattr(node, "op", None) == "placeholder" and getattr(node, "target", None) == "cache"


def _state_holder(cache: Any, path: tuple) -> Any:
    """The object ``path`` names (checked by the caller: :func:`check_state_address`)."""
    return cache if path == () else cache.layers[path[1]]


def cache_state(cache: Any, path: tuple, name: str) -> torch.Tensor | None:
    """State the model's own forward keeps between steps on transformers' cache object (``path``
    ``()``) or one of its layers (``("layers", i)``) as the instance attribute ``name``: its
    tensor, or None before the forward first writes it (Qwen4-exp's indexer position history,
    which the model appends to at every step). Only instance attributes are read: never a
    method, property or class attribute."""
    check_state_address(path, name)
    value = vars(_state_holder(cache, path)).get(name)
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"cache state {name!r} holds a {type(value).__name__}, not a tensor")
    return value


def set_cache_state(cache: Any, path: tuple, name: str, value: torch.Tensor) -> None:
    """Writes the state :func:`cache_state` reads: a tensor, as an instance attribute, never over
    anything the holder's class defines (a method or property)."""
    check_state_address(path, name)
    holder = _state_holder(cache, path)
    if not isinstance(value, torch.Tensor) or hasattr(type(holder), name):
        raise TypeError(f"cache state {name!r}: only a tensor, and not over {type(holder).__name__}'s own attributes")
    setattr(holder, name, value)


def extend_state(state: torch.Tensor | None, tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat([state, *tensors], dim)``, or ``tensors`` alone while ``state`` is None: how a
    forward appends to history it keeps on the cache, at its first step as at any other."""
    parts = list(tensors) if state is None else [state, *tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


for _fn in (route, predict_reuse, path_context, prefetch, wait, set_cache_state):
    has_side_effect(_fn)

#: Ops by short name, for serialisation and dumps.
OPS = {fn.__name__: fn for fn in (route, predict, predict_path, refine_path, predict_reuse, path_context, predict_frequency,
                                  predict_transition, path_layer, prefetch, wait, expert_compute, permute, unpermute,
                                  cache_state, set_cache_state, extend_state)}


def op_name(target: object) -> str | None:
    """The short name of an ExpertFlow op target, or None for anything else."""
    for name, fn in OPS.items():
        if target is fn:
            return name
    return None
