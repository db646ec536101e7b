"""Training the routing-path predictor, and fitting the trace-only predictors, on calibration data.

The routing-path predictor (``runtime/predict/path_predictor.py``) learns, from the training tokens of a
calibration record (``tools/make/calibrate.py``), to score every (MoE layer, expert) for a token from
its embedding and, given ``context``, the previous position's last MoE block input: a multi-label
problem (the router's top-k are the positives), trained with binary cross-entropy and Adam. The
context is dropped (read as its mean) at a sequence's first position and, at random, for
``context_dropout`` of the other tokens, so the predictor also serves steps that lack it
(prefill). Its second stage learns the same from [embedding, first MoE layer's output]. The
reuse predictor learns, from the same inputs, when each expert is next used (``next_use``).
``write_path_predictors`` trains all three and writes them into the compiled directory.
Everything is seeded: the same calibration and seed give the same bytes. The frequency prior and
the transition table need only the routes (``runtime/predict/route_tables.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...runtime.predict.path_predictor import PathPredictor


#: Share of the calibration's training sequences that only decide when training stops.
VALIDATION = 0.125


@dataclass(frozen=True)
class TrainReport:
    parameters: int
    seconds: float
    train_tokens: int
    final_loss: float
    epochs: int = 0                        # epochs run (fewer than asked once validation stopped it)
    validation_loss: float | None = None   # the kept epoch's, with a validation split


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
                         weights: torch.Tensor | None = None, seq: torch.Tensor | None = None,
                         validation: float = 0.0, patience: int = 3) -> tuple[PathPredictor, TrainReport]:
    """Fits a PathPredictor mapping ``inputs`` [tokens, hidden] (and ``context`` = (previous
    position's context [tokens, hidden], known [tokens] bool)) to the routes ``experts`` [tokens,
    layers, k], or to any 0/1 ``targets`` [tokens, groups, n_experts] (``weights`` of the same
    shape: 0 where a target is unknown). With ``validation`` > 0 and the tokens' sequences
    ``seq``, that share of the sequences (the last ones) is held out, and training stops once
    their loss has not improved for ``patience`` epochs, keeping the best epoch's weights: these
    predictors overfit a few thousand calibration tokens well before ``epochs``. Deterministic
    under ``seed`` (its own generator; the global RNG is left alone)."""
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
    fit, val = _split(tokens, seq, validation)
    steps = epochs * max(1, (len(fit) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)

    def loss_of(idx: torch.Tensor, keep_ctx: torch.Tensor | None) -> torch.Tensor:
        scores = model.scores(inputs[idx]) if context is None else model.scores(inputs[idx], ctx[idx], keep_ctx[idx])
        return loss_fn(scores, target[idx], weight=None if weights is None else weights[idx])

    last, best, best_state, stale, ran = float("nan"), float("inf"), None, 0, 0
    for ran in range(1, epochs + 1):
        model.train()
        order = fit[torch.randperm(len(fit), generator=gen)]
        for i in range(0, len(order), batch):
            loss = loss_of(order[i:i + batch], None if context is None else keep)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
        if val is None:
            continue
        model.eval()
        with torch.no_grad():  # held-out sequences see the context whenever it is known, as in decode
            score = float(loss_of(val, None if context is None else known))
        if score < best:
            best, stale = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, TrainReport(params, time.perf_counter() - start, tokens, last, ran,
                              None if best_state is None else best)


def _split(tokens: int, seq: torch.Tensor | None, share: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token indices to fit on and to validate on: the last ``share`` of the distinct sequences
    validate (whole sequences, since neighbouring tokens route alike); none without ``seq``."""
    everything = torch.arange(tokens)
    if seq is None or share <= 0:
        return everything, None
    ids = torch.unique(seq)
    held = ids[len(ids) - int(len(ids) * share):] if int(len(ids) * share) > 0 else ids[:0]
    is_val = torch.isin(seq, held)
    if not is_val.any() or is_val.all():
        return everything, None
    return everything[~is_val], everything[is_val]


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


def write_path_predictors(directory: Path, rec: dict[str, torch.Tensor], n: int, top_k: int,
                          seed: int) -> dict[str, Any]:
    """Trains the routing-path predictor (and, with ``first_out`` recorded, its second stage) on
    the training tokens, writes them, and adds to ``rec`` the predictions that drive each layer's
    copies on every token: ``path`` (decode: the previous position's context known) and
    ``path_cold`` (prefill: not), with ``path_positions``, the layer position each is issued at."""
    from safetensors.torch import save_file

    from ...runtime.predict.path_predictor import FILE as PREDICTOR, REFINER_FILE as REFINER

    is_train = rec["split"] == 0
    ctx, known = previous(rec["late"].float(), rec["seq"])
    context = (ctx[is_train], known[is_train])
    embeds = rec["embeds"].float()
    stages = [(PREDICTOR, embeds, rec["experts"])]
    if "first_out" in rec:
        stages.append((REFINER, torch.cat([embeds, rec["first_out"].float()], 1), rec["experts"][:, 1:]))
    field: dict[str, Any] = {}
    preds: dict[str, list[torch.Tensor]] = {"path": [], "path_cold": []}
    for i, (file, inputs, routes) in enumerate(stages):
        predictor, report = train_path_predictor(inputs[is_train], routes[is_train], n, top_k, seed=seed,
                                                 context=context, seq=rec["seq"][is_train], validation=VALIDATION)
        with torch.no_grad():
            for name, c in (("path", ctx), ("path_cold", None)):
                ids = predictor.scores(inputs, c, known).topk(top_k, dim=-1).indices.to(torch.int32)
                preds[name].append(ids if i or len(stages) == 1 else ids[:, :1])  # stage 1 drives layer 0 only
        save_file({k: v.contiguous() for k, v in predictor.tensors().items()}, str(directory / file))
        key = "refiner" if i else "predictor"
        field[key] = _summary(report)
    for name, parts in preds.items():
        rec[name] = torch.cat(parts, 1).contiguous()
    field["reuse"] = _write_reuse(directory, rec, n, top_k, seed, (ctx, known))
    layers = rec["experts"].shape[1]
    rec["path_positions"] = torch.tensor([0] + [1 if len(stages) > 1 else 0] * (layers - 1), dtype=torch.int32)
    return {"parameters": sum(f["parameters"] for f in field.values() if "parameters" in f), "seed": seed,
            "train_seconds": round(sum(f["train_seconds"] for f in field.values()), 2), **field}


def _write_reuse(directory: Path, rec: dict[str, torch.Tensor], n: int, top_k: int, seed: int,
                 context: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Trains the reuse predictor (``runtime/predict/reuse.py``) on the training tokens' future routes,
    writes it, and adds ``reuse_logits`` (float16 [tokens, layers x horizons, experts]) to ``rec``."""
    from safetensors.torch import save_file

    from ...runtime.predict.reuse import FILE as REUSE, HORIZONS

    is_train = rec["split"] == 0
    targets, weights = next_use(rec["experts"], rec["seq"], n, HORIZONS)
    ctx, known = context
    embeds = rec["embeds"].float()
    predictor, report = train_path_predictor(embeds[is_train], None, n, 1, seed=seed,
                                             context=(ctx[is_train], known[is_train]),
                                             targets=targets[is_train], weights=weights[is_train],
                                             seq=rec["seq"][is_train], validation=VALIDATION)
    with torch.no_grad():
        rec["reuse_logits"] = predictor.scores(embeds, ctx, known).half().contiguous()
    save_file({k: v.contiguous() for k, v in predictor.tensors().items()}, str(directory / REUSE))
    return {**_summary(report), "horizons": list(HORIZONS)}


def _summary(report: TrainReport) -> dict[str, Any]:
    """What the manifest says of one trained predictor."""
    out = {"parameters": report.parameters, "train_seconds": round(report.seconds, 2),
           "final_loss": round(report.final_loss, 4), "epochs": report.epochs}
    if report.validation_loss is not None:
        out["validation_loss"] = round(report.validation_loss, 4)
    return out
