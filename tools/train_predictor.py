"""Training the routing-path predictor, and fitting the trace-only predictors, on calibration data.

The routing-path predictor (``runtime/path_predictor.py``) learns, from the training tokens of a
calibration record (``tools/calibrate.py``), to score every (MoE layer, expert) for a token from
its embedding and, given ``context``, the previous position's last MoE block input: a multi-label
problem (the router's top-k are the positives), trained with binary cross-entropy and Adam. The
context is dropped (read as its mean) at a sequence's first position and, at random, for
``context_dropout`` of the other tokens, so the predictor also serves steps that lack it
(prefill). Everything is seeded: the same calibration and seed give the same bytes.
The frequency prior and the transition table need only the routes (``runtime/route_tables.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..runtime.path_predictor import PathPredictor


@dataclass(frozen=True)
class TrainReport:
    parameters: int
    seconds: float
    train_tokens: int
    final_loss: float


def multi_hot(experts: torch.Tensor, n: int) -> torch.Tensor:
    """[tokens, layers, k] ids (negative: none) -> [tokens, layers, n] 0/1 float."""
    out = torch.zeros(*experts.shape[:2], n)
    out.scatter_(2, experts.clamp(min=0).long(), (experts >= 0).float())
    return out


def previous(values: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's previous position's row of ``values`` [tokens, ...] (tokens in order within
    each sequence ``seq``), and whether there is one (False at a sequence's first token)."""
    known = torch.zeros(len(seq), dtype=torch.bool)
    known[1:] = seq[1:] == seq[:-1]
    out = torch.zeros_like(values)
    out[1:] = values[:-1]
    return out * known.reshape(-1, *[1] * (values.dim() - 1)).to(values.dtype), known


def train_path_predictor(inputs: torch.Tensor, experts: torch.Tensor | None, n_experts: int, top_k: int,
                         seed: int = 0, width: int = 256, epochs: int = 40, batch: int = 256,
                         lr: float = 3e-3, context: tuple[torch.Tensor, torch.Tensor] | None = None,
                         context_dropout: float = 0.15, targets: torch.Tensor | None = None,
                         weights: torch.Tensor | None = None) -> tuple[PathPredictor, TrainReport]:
    """Fits a PathPredictor mapping ``inputs`` [tokens, hidden] (and ``context`` = (previous
    position's context [tokens, hidden], known [tokens] bool)) to the routes ``experts`` [tokens,
    layers, k], or to any 0/1 ``targets`` [tokens, groups, n_experts] (``weights`` of the same
    shape: 0 where a target is unknown). Deterministic under ``seed`` (its own generator; the
    global RNG is left alone)."""
    start = time.perf_counter()
    tokens, hidden = inputs.shape
    target = multi_hot(experts, n_experts) if targets is None else targets.float()
    layers = target.shape[1]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PathPredictor(hidden, width, layers, n_experts, top_k, 0 if context is None else context[0].shape[1])
    if context is not None:
        ctx, known = context
        seen = ctx[known] if known.any() else ctx
        mean = torch.cat([inputs.mean(0), seen.mean(0)])
        std = torch.cat([inputs.std(0), seen.std(0)]).clamp(min=1e-5)
        keep = known & (torch.rand(tokens, generator=gen) >= context_dropout)
    else:
        mean, std = inputs.mean(0), inputs.std(0).clamp(min=1e-5)
    with torch.no_grad():
        model.mean.copy_(mean)
        model.std.copy_(std)
    opt = torch.optim.Adam([p for p in model.parameters()], lr=lr)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    steps = epochs * max(1, (tokens + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    last = float("nan")
    model.train()
    for _ in range(epochs):
        order = torch.randperm(tokens, generator=gen)
        for i in range(0, tokens, batch):
            idx = order[i:i + batch]
            if context is None:
                scores = model.scores(inputs[idx])
            else:
                scores = model.scores(inputs[idx], ctx[idx], keep[idx])
            loss = loss_fn(scores, target[idx], weight=None if weights is None else weights[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, TrainReport(params, time.perf_counter() - start, tokens, last)


def next_use(experts: torch.Tensor, seq: torch.Tensor, n_experts: int, horizons: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reuse predictor's training targets for routes ``experts`` [tokens, layers, k] of
    consecutive tokens (``seq``: their sequences): [tokens, layers x horizons, n] 1 where the
    (layer, expert)'s next use after the token comes within h tokens, and weights 0 where that is
    unknown (the sequence ends first and no use was seen)."""
    tokens, layers, _ = experts.shape
    hot = multi_hot(experts, n_experts).bool()
    big = float(2 ** 20)
    dist = torch.full((tokens, layers, n_experts), big)   # tokens to the next use after t
    left = torch.zeros(tokens)                            # tokens of the sequence after t
    nxt, rest = torch.full((layers, n_experts), big), 0.0
    for t in range(tokens - 1, -1, -1):
        if t == tokens - 1 or seq[t + 1] != seq[t]:
            nxt, rest = torch.full((layers, n_experts), big), 0.0
        dist[t], left[t] = nxt, rest
        nxt = torch.where(hot[t], torch.ones(layers, n_experts), nxt + 1)
        rest += 1
    h = torch.tensor(horizons, dtype=torch.float32)[None, None, :, None]
    within = dist[:, :, None] <= h                                    # [tokens, layers, H, n]
    known = within | (left[:, None, None, None] >= h)
    shape = (tokens, layers * len(horizons), n_experts)
    return within.float().reshape(shape), known.float().reshape(shape)
