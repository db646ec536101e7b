"""Train a small Mixtral-architecture MoE on the Python standard library's own sources.

    python examples/train_tiny_moe.py [--out DIR] [--steps N] [--seed S] [--minutes M]

This is how the shipped preset ``tiny-trained-moe`` (tools/presets/preset_models/tiny-trained-moe) was
made: a ~2.7M-parameter ``MixtralForCausalLM`` (4 layers, 8 experts, top-2) with a byte-level BPE
tokenizer, both trained here on CPU in a few minutes, so its routing is learned (peaked,
balanced by the auxiliary loss), not random, and its greedy text looks like Python.

The corpus is text every Python has offline: the .py files of a fixed, sorted list of stdlib
modules, read from ``sysconfig.get_paths()["stdlib"]``. A few other modules are held out; the
held-out loss is measured on EVAL_WINDOWS windows of SEQ_LEN tokens spread evenly over them.
Everything is seeded (weights, data order), so the same machine gives the same model; the
``--minutes`` budget only stops training early, and TRAINING.md then says so.

The output directory gets only what ``from_pretrained`` needs (config, safetensors weights,
generation config, tokenizer files) and TRAINING.md: the command, versions, corpus, parameter
count, training time and losses.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import shlex
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tools" / "presets" / "preset_models" / "tiny-trained-moe"

#: Training text: stdlib modules (dotted names, read as files; packages as their __init__.py).
TRAIN_MODULES = tuple(sorted("""
    abc argparse ast base64 bdb bisect cmd code codecs collections colorsys configparser contextlib
    copy csv dataclasses datetime difflib dis email.message enum filecmp fileinput fnmatch ftplib
    functools gettext glob gzip heapq hmac http.client http.server inspect ipaddress json.decoder
    json.encoder keyword linecache logging logging.handlers mimetypes netrc numbers operator optparse
    os pathlib pdb pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random
    reprlib sched secrets selectors shelve shutil smtplib socket socketserver stat statistics string
    subprocess tabnanny tempfile threading timeit token tokenize trace traceback tracemalloc types
    typing unittest.case urllib.parse uuid warnings wave weakref zipapp zipfile
""".split()))
#: Held-out text: never trained on (neither the tokenizer nor the model).
HELDOUT_MODULES = ("calendar", "fractions", "getopt", "shlex", "textwrap")

SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2, as tools/presets/preset_tokenizer
PAD, BOS, EOS = 0, 1, 2
VOCAB = 2048
SEQ_LEN = 128
BATCH = 16
#: The held-out loss: mean next-token cross-entropy over this many windows of SEQ_LEN tokens.
EVAL_WINDOWS = 64

MODEL = dict(hidden_size=128, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)

#: Every file the output directory gets (save_pretrained of the model and the tokenizer, TRAINING.md).
WRITES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "TRAINING.md"})
PROMPTS = ("def __init__(self", "import os\n", "    def ")
#: Weight of the load-balancing loss. transformers' Mixtral loss pools the router logits of all
#: layers, so at its default (0.001) single layers still let experts die; this script applies the
#: same loss to each layer separately (the mean over layers) with the Switch Transformer weight.
AUX_COEF = 0.01


# --- corpus -----------------------------------------------------------------------------------

def stdlib_file(module: str) -> Path | None:
    """The source file of a stdlib module (``a.b`` -> a/b.py or a/b/__init__.py), or None."""
    root = Path(sysconfig.get_paths()["stdlib"])
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def corpus(modules: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module, source text) for each module this Python has, in the given order."""
    out = []
    for module in modules:
        path = stdlib_file(module)
        if path is not None:
            out.append((module, path.read_text(encoding="utf-8")))
    return out


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE trained on ``texts``, built as tools/presets/preset_tokenizer builds the presets'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from expertflow.tools.presets.preset_tokenizer import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((line for text in texts for line in text.splitlines(keepends=True)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    assert [tok.token_to_id(s) for s in SPECIAL] == [PAD, BOS, EOS]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left", model_max_length=MODEL["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts as one stream of ids: each module is ``<s>`` + its tokens + ``</s>``."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [BOS, *encoding.ids, EOS]
    return torch.tensor(ids, dtype=torch.long)


def heldout_text() -> str:
    """The held-out modules' sources, joined; its sha256 is recorded in TRAINING.md."""
    return "\n".join(text for _, text in corpus(HELDOUT_MODULES))


def heldout_windows(tokenizer: Any, count: int = EVAL_WINDOWS) -> torch.Tensor:
    """``count`` windows of SEQ_LEN ids spread evenly over the held-out stream: [count, SEQ_LEN]."""
    stream = encode_stream(tokenizer, [text for _, text in corpus(HELDOUT_MODULES)])
    stride = (len(stream) - SEQ_LEN) // max(count - 1, 1)
    return torch.stack([stream[i * stride:i * stride + SEQ_LEN] for i in range(count)])


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch: int = BATCH) -> float:
    """Mean next-token cross-entropy (nats) over every prediction in ``windows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        x = windows[start:start + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def routing_stats(model: Any, windows: torch.Tensor) -> list[dict[str, Any]]:
    """Per MoE layer: the share of top-k choices each expert gets, and the mean top-1 router probability."""
    model.eval()
    out = model(input_ids=windows, output_router_logits=True)
    k, n = model.config.num_experts_per_tok, model.config.num_local_experts
    stats = []
    for logits in out.router_logits:  # [tokens, experts] per layer
        probs = logits.float().softmax(-1)
        chosen = probs.topk(k, dim=-1).indices.reshape(-1)
        load = torch.bincount(chosen, minlength=n).float() / chosen.numel()
        stats.append({"load": load.tolist(), "top1": probs.max(-1).values.mean().item()})
    return stats


# --- training ---------------------------------------------------------------------------------

def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to a tenth of it at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory to write the model, tokenizer and TRAINING.md into (default "
                        "tools/presets/preset_models/tiny-trained-moe); it may hold only files this script writes, "
                        "which are replaced")
    p.add_argument("--steps", type=int, default=1800,
                   help=f"optimizer steps of {BATCH} windows of {SEQ_LEN} tokens; the learning-rate schedule "
                        "(warmup, cosine decay) spans this many (default 1800)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the data order (default 0)")
    p.add_argument("--minutes", type=float, default=9.0,
                   help="wall-time budget for the training loop: stop early, at the step that crosses it, "
                        "if --steps has not finished (default 9; the default --steps take ~5-6 on 2 idle cores)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--experts", type=int, default=MODEL["num_local_experts"],
                   help=f"experts per MoE layer (default {MODEL['num_local_experts']}, the shipped preset); more "
                        "experts of a smaller --expert-ffn keep the size and make route-aware batching measurable")
    p.add_argument("--top-k", type=int, default=MODEL["num_experts_per_tok"],
                   help=f"experts each token is routed to (default {MODEL['num_experts_per_tok']})")
    p.add_argument("--expert-ffn", type=int, default=MODEL["intermediate_size"],
                   help=f"intermediate size of each expert (default {MODEL['intermediate_size']})")
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"],
                   help=f"decoder layers, each with an MoE block (default {MODEL['num_hidden_layers']}); deeper "
                        "models change their residual stream less per layer, which cross-layer gates rely on")
    args = p.parse_args(argv)
    if args.steps < 1 or args.minutes <= 0:
        p.error("--steps and --minutes must be positive")
    if not 1 <= args.top_k <= args.experts or args.expert_ffn < 1 or args.layers < 1:
        p.error("--top-k must be between 1 and --experts, and --expert-ffn and --layers positive")
    stray = sorted(f.name for f in args.out.iterdir() if f.name not in WRITES) if args.out.is_dir() else []
    if stray:  # the shipped directory must hold only the model: no checkpoints, no leftovers
        more = f" and {len(stray) - 5} more" if len(stray) > 5 else ""
        p.error(f"--out {args.out} holds {', '.join(stray[:5])}{more}, which this script does not write; "
                "pass a new or empty directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tokenizers
    import transformers
    from tqdm import tqdm
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()

    train = corpus(TRAIN_MODULES)
    missing = sorted(set(TRAIN_MODULES) - {m for m, _ in train})
    held = corpus(HELDOUT_MODULES)
    tokenizer = build_tokenizer([text for _, text in train])
    stream = encode_stream(tokenizer, [text for _, text in train])
    windows = heldout_windows(tokenizer)
    train_chars = sum(len(t) for _, t in train)
    held_chars = sum(len(t) for _, t in held)
    held_tokens = len(encode_stream(tokenizer, [t for _, t in held]))
    print(f"corpus: {len(train)} modules, {train_chars:,} chars, {len(stream):,} tokens "
          f"({train_chars / len(stream):.2f} chars/token); held out: {len(held)} modules, {held_chars:,} chars, "
          f"{held_tokens:,} tokens; tokenizer: {len(tokenizer)} ids ({time.perf_counter() - t0:.1f} s)")

    torch.manual_seed(args.seed)
    shape = {**MODEL, "num_local_experts": args.experts, "num_experts_per_tok": args.top_k,
             "intermediate_size": args.expert_ffn, "num_hidden_layers": args.layers}
    config = MixtralConfig(vocab_size=len(tokenizer), output_router_logits=False, router_aux_loss_coef=AUX_COEF,
                           **shape)
    # transformers' per-expert loop ("eager") trains fastest on CPU at this size; the saved config
    # does not record it, so from_pretrained uses its default kernels.
    config._experts_implementation = "eager"
    model = MixtralForCausalLM(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: MixtralForCausalLM, {params:,} parameters ({4 * params / 2**20:.1f} MiB in float32)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    warmup = max(1, min(30, args.steps // 10))
    data = torch.Generator().manual_seed(args.seed)
    k, n = config.num_experts_per_tok, config.num_local_experts
    budget = 60 * args.minutes
    history: list[tuple[int, float, float]] = []  # (step, train CE, aux loss)
    evals: list[tuple[int, float]] = []
    start = time.perf_counter()
    stopped_early = False
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=data)
        x = torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])
        out = model(input_ids=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = sum(load_balancing_loss_func((r,), n, k) for r in out.router_logits) / len(out.router_logits)
        loss = ce + AUX_COEF * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((step + 1, ce.item(), aux.item()))
        bar.set_postfix(loss=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            recent = history[-50:]
            held_loss = evaluate(model, windows[::4])  # a quarter of the eval windows, to stay cheap
            evals.append((step + 1, held_loss))
            tqdm.write(f"step {step + 1:4d}  lr {opt.param_groups[0]['lr']:.2e}  "
                       f"train {sum(h[1] for h in recent) / len(recent):.4f}  "
                       f"aux {sum(h[2] for h in recent) / len(recent):.3f}  held-out (16 windows) {held_loss:.4f}  "
                       f"{time.perf_counter() - start:.0f} s")
        if time.perf_counter() - start > budget and step + 1 < args.steps:
            stopped_early = True
            tqdm.write(f"--minutes {args.minutes} reached: stopping after step {step + 1} of {args.steps}")
            break
    bar.close()
    train_seconds = time.perf_counter() - start
    steps_done = len(history)

    model.eval()
    final_train = sum(h[1] for h in history[-50:]) / len(history[-50:])
    final_aux = sum(h[2] for h in history[-50:]) / len(history[-50:])
    held_loss = evaluate(model, windows)
    routing = routing_stats(model, windows)
    print(f"trained {steps_done} steps in {train_seconds:.0f} s; train loss (mean of last 50 steps) "
          f"{final_train:.4f}; held-out loss ({EVAL_WINDOWS} windows) {held_loss:.4f}")

    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                                               do_sample=False)
    samples = []
    for prompt in PROMPTS:
        batch = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=48, do_sample=False)
        text = prompt + tokenizer.decode(tokens[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append(text)
        print(f"\n--- greedy from {prompt!r} ---\n{text}")

    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    config.output_router_logits = False
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "model.safetensors").chmod(0o644)  # save_pretrained leaves it 0600; it ships with the package
    tokenizer.save_pretrained(out_dir)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [_rel(Path(sys.argv[0])), *(sys.argv[1:] if argv is None else argv)])
    (out_dir / "TRAINING.md").write_text(_report(
        command=command, versions=dict(python=platform.python_version(), torch=torch.__version__,
                                       transformers=transformers.__version__, tokenizers=tokenizers.__version__),
        threads=args.threads, train=train, missing=missing, held=held, train_chars=train_chars,
        train_tokens=len(stream), held_chars=held_chars, held_tokens=held_tokens, vocab=len(tokenizer),
        config=config, params=params, args=args, warmup=warmup, steps_done=steps_done, stopped_early=stopped_early,
        train_seconds=train_seconds, total_seconds=time.perf_counter() - t0, final_train=final_train,
        final_aux=final_aux, held_loss=held_loss, evals=evals, routing=routing, samples=samples))
    print(f"\nwrote {', '.join(sorted(p.name for p in out_dir.iterdir()))} to {out_dir}")
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _report(**r: Any) -> str:
    c = r["config"]
    held_sha = hashlib.sha256(heldout_text().encode()).hexdigest()
    routing_rows = "\n".join(
        f"| {i} | {' '.join(f'{x:.3f}' for x in s['load'])} | {s['top1']:.3f} |" for i, s in enumerate(r["routing"]))
    evals = ", ".join(f"{s}: {v:.3f}" for s, v in r["evals"])
    samples = "\n\n".join(f"```python\n{s}\n```" for s in r["samples"])
    v = r["versions"]
    modules = textwrap.fill(", ".join(m for m, _ in r["train"]) + ".", 100, initial_indent="  ",
                            subsequent_indent="  ")
    missing = f"  Missing on this Python (skipped): {', '.join(r['missing'])}.\n" if r["missing"] else ""
    stop = (f"stopped early by --minutes after {r['steps_done']} of {r['args'].steps} steps"
            if r["stopped_early"] else f"all {r['steps_done']} steps")
    return f"""# {r['args'].out.name}: how it was trained

A {r['params']:,}-parameter Mixtral-architecture MoE (`MixtralForCausalLM`, float32) trained on CPU
from scratch on Python standard-library sources by `examples/train_tiny_moe.py`. Its routing is
learned; its text is Python-like, not good Python.

## Command

```
{r['command']}
```

Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, tokenizers {v['tokenizers']};
{r['threads']} CPU threads on {platform.machine()} ({platform.system()}).

## Corpus

The `.py` files of stdlib modules under `sysconfig.get_paths()["stdlib"]` of Python {v['python']}.

- Training: {len(r['train'])} modules, {r['train_chars']:,} characters, {r['train_tokens']:,} tokens
  (each module `<s>` + tokens + `</s>`, concatenated):
{modules}
{missing}- Held out (neither tokenizer nor model saw them): {', '.join(m for m, _ in r['held'])};
  {r['held_chars']:,} characters, {r['held_tokens']:,} tokens.
  held-out text sha256: {held_sha}

## Tokenizer

Byte-level BPE (`tokenizers`), trained on the training modules only: {r['vocab']} ids; `<pad>`=0, `<s>`=1,
`</s>`=2, then the 256 bytes and the merges. `<s>` is prepended, padding is on the left, and the chat
template is `expertflow.tools.presets.preset_tokenizer.CHAT_TEMPLATE`.

## Model

hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads ({c.num_key_value_heads} kv heads),
{c.num_local_experts} experts per layer, top-{c.num_experts_per_tok}, expert intermediate size {c.intermediate_size},
max positions {c.max_position_embeddings}, untied embeddings, vocab {c.vocab_size}.
Parameters: {r['params']:,} ({4 * r['params'] / 2**20:.1f} MiB of float32).

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {r['args'].lr:g}, {r['warmup']} warmup steps, cosine
decay to a tenth over {r['args'].steps} steps; batch {BATCH} windows x {SEQ_LEN} tokens drawn at random
(seed {r['args'].seed}) from the training stream; gradient clipping 1.0; loss = cross-entropy + {AUX_COEF} x
load-balancing loss (`output_router_logits=True`; transformers' Mixtral `load_balancing_loss_func` applied
to each layer's router logits separately and averaged over layers, so that every layer balances its
experts: pooled over layers, as transformers' own `aux_loss` does, single layers left experts unused).
Final aux loss (mean of the last 50 steps; 2.0 is perfectly balanced): {r['final_aux']:.3f}.
Ran {stop}: {r['steps_done'] * BATCH * SEQ_LEN:,} tokens seen.

- Training time: {r['train_seconds']:.0f} s for the training loop ({r['total_seconds']:.0f} s in all, with
  corpus, tokenizer, evaluation and samples).
- Final train loss (mean cross-entropy of the last 50 steps): {r['final_train']:.4f}
- Held-out loss during training (16 windows), by step: {evals}

## Held-out loss

held-out loss: {r['held_loss']:.4f}

Mean next-token cross-entropy (nats) of the saved model over {EVAL_WINDOWS} windows of {SEQ_LEN} tokens
spread evenly over the held-out stream (`heldout_windows` and `evaluate` in the script;
`tests/test_trained_preset.py` reproduces it).

## Routing on the held-out windows

Share of top-{c.num_experts_per_tok} choices per expert, and the mean top-1 router probability
(uniform would be {1 / c.num_local_experts:.3f}):

| layer | expert load (0..{c.num_local_experts - 1}) | mean top-1 prob |
|---|---|---|
{routing_rows}

## Greedy samples

{samples}
"""


if __name__ == "__main__":
    sys.exit(main())
