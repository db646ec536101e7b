"""Experts whose router scores scale their inputs, run on the chosen experts only (Llama 4).

transformers' Llama 4 MoE block does not use the experts interface: its router writes a dense
score per (token, expert) (the sigmoid of the logit for the top-k, 0 elsewhere), every expert
runs on every token's input *times its score*, and the outputs are summed over experts. An
expert whose input is zero outputs exactly zero (no biases, ``up * act(gate)`` with ``up = 0``),
so only the top-k experts add anything, and the block equals

    shared(x) + sum over the top-k experts e of  e(x * score_e)

which is what :class:`InputScaledExperts` computes when called the interface's way
(``experts(hidden, top_k_index, top_k_weights)``), after :func:`adapt_experts` has rewritten the
block to call it so. The front end then lowers it like any experts call, and the runtime runs it
on a view of its slot pool. Bit-exactness with the dense original is kept on purpose: each chosen
expert multiplies all the step's rows (zero rows for tokens routed elsewhere), as the dense batched
product does, and a single expert is padded to a batch of two (torch's one-matrix product takes
another kernel, and rounds differently in float32). The sum over experts runs in slot order; with
Llama 4's one expert per token (every released checkpoint) or two, order cannot change a bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:  # the only transformers family whose experts are built this way
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe
    DENSE_BLOCKS: tuple[type, ...] = (Llama4TextMoe,)
    DENSE_EXPERTS: tuple[type, ...] = (Llama4TextExperts,)
except ImportError:  # a release without Llama 4
    DENSE_BLOCKS = DENSE_EXPERTS = ()


class InputScaledExperts(nn.Module):
    """``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``: the sum over
    each token's k experts of ``down(up(x * w) * act(gate(x * w)))``, weights laid out as the dense
    original's (``gate_up_proj`` [E, H, 2I], gate then up; ``down_proj`` [E, I, H]).

    It declares transformers' experts-interface flags, so the front end, the artefact writer and
    the runtime treat it as an experts module; ``rows_independent`` False tells the permutation pass
    that a row's result depends on the rows computed with it (the batched product's shape)."""

    is_transposed = True
    is_concatenated = True
    has_bias = False
    has_gate = True
    rows_independent = False

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.num_experts = dense.num_experts
        self.hidden_size = dense.hidden_size
        self.gate_up_proj = dense.gate_up_proj
        self.down_proj = dense.down_proj
        self.act_fn = dense.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        used, position = torch.unique(top_k_index, sorted=True, return_inverse=True)
        tokens, k = top_k_index.shape
        # Dense scores over the chosen experts only; accumulate, as a position the runtime masks
        # (weight 0, another expert's id) may share a cell with a real score.
        scores = hidden_states.new_zeros(max(used.numel(), 2), tokens)
        rows = torch.arange(tokens, device=top_k_index.device).unsqueeze(1).expand(tokens, k)
        scores.index_put_((position, rows), top_k_weights.to(hidden_states.dtype), accumulate=True)
        ids = used if used.numel() > 1 else used.repeat(2)
        routed_in = hidden_states.unsqueeze(0) * scores.unsqueeze(-1)
        gate, up = torch.bmm(routed_in, self.gate_up_proj[ids]).chunk(2, dim=-1)
        out = torch.bmm(up * self.act_fn(gate), self.down_proj[ids])
        return out[:used.numel()].sum(dim=0)


def sparse_block_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense block's forward with its experts called the interface's way. The router is the
    block's own (its scores and logits as it computes them); its top-k ids are taken again from
    its logits by the same ``topk`` call, and each id's weight read from its scores."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)
    top_k_index = torch.topk(router_logits, self.top_k, dim=1).indices
    routed = self.experts(hidden_states, top_k_index, router_scores.gather(1, top_k_index))
    return self.shared_expert(hidden_states) + routed, router_logits  # the original adds in place: same sum


_SPARSE_CLASSES: dict[type, type] = {}


def adapt_experts(model: nn.Module) -> int:
    """Rewrites every dense input-scaled MoE block of ``model`` in place to call
    :class:`InputScaledExperts` (same parameters, same names: checkpoints load unchanged).
    Returns how many blocks changed; 0 for every model that uses the experts interface."""
    changed = 0
    for module in list(model.modules()):
        if type(module) in DENSE_BLOCKS and isinstance(module.experts, DENSE_EXPERTS):
            module.experts = InputScaledExperts(module.experts)
            base = type(module)
            if base not in _SPARSE_CLASSES:
                _SPARSE_CLASSES[base] = type(base.__name__, (base,), {"forward": sparse_block_forward,
                                                                      "__module__": base.__module__})
            module.__class__ = _SPARSE_CLASSES[base]
            changed += 1
    return changed
