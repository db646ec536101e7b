"""expertflow-generate: text in, text out, with a fixed budget of expert slots.

Streams the new text to the terminal as it is generated. MODEL is a compiled directory, or
anything expertflow-compile takes (a save_pretrained directory, a hub id already in the local
Hugging Face cache, a built-in preset): that is compiled once into --cache-dir and reused while
the source is unchanged. Generation is transformers' own (greedy by default; --sample draws with
--temperature, --top-k, --top-p); --chat wraps the prompt in the model's chat template.
--prompts-file runs many prompts at once (``tools/generate_batch.py``): one JSON line each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..runtime.chat import render_chat
from ..runtime.tokenizer import encode_text
from .source import UserError

EXAMPLES = """
examples:
  expertflow-generate tiny-trained-moe "def __init__(self" --stats
  expertflow-generate compiled/ "Explain MoE offloading." --chat --budget 4GiB --device cuda
  expertflow-generate ./my-model "Once upon a time" --sample --temperature 0.7 --top-p 0.9 --seed 1
  expertflow-generate tiny-trained-moe --prompts-file prompts.jsonl --batch-size 16 --max-new-tokens 32
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertflow-generate", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="compiled directory, model directory, cached hub id, or preset name")
    p.add_argument("prompt", nargs="?", help="the text to continue (with --chat: the user's message); or give "
                   "--prompts-file")
    p.add_argument("--prompts-file", type=Path, metavar="FILE", help="many prompts instead of PROMPT: one per line "
                   "(a .jsonl file: a JSON string or {\"prompt\": ...} per line); printed as one JSON line per "
                   "prompt, in the file's order, batched by --schedule with continuous batching")
    p.add_argument("--batch-size", type=int, default=8, help="with --prompts-file: sequences generated together "
                   "(default 8)")
    p.add_argument("--schedule", choices=("route-aware", "fifo"), default="route-aware",
                   help="with --prompts-file: route-aware (default) batches prompts whose routes share experts; "
                        "fifo keeps the file's order")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--budget", default="25%", help="expert cache on the device: slots (8), a size (4GiB), a "
                   "fraction of all experts (25%%), 'auto' (the most that fits the device's free memory after "
                   "the dense weights, a KV cache for this prompt and --max-new-tokens, and a margin), or 'all' "
                   "(default 25%%)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample: divide logits by this (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample: keep the K likeliest tokens; 0 keeps all "
                   "(default 50, as transformers)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: keep the smallest set of tokens whose "
                   "probability reaches P (default 1.0: all)")
    p.add_argument("--seed", type=int, help="with --sample: seed torch's generator, for a repeatable draw")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt as a user "
                   "message and generate the assistant's reply")
    p.add_argument("--stats", action="store_true", help="after the text, print the expert cache's statistics per "
                   "MoE layer (hits, misses, prefetch precision and recall, bytes moved, stall) as a table")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "expertflow",
                   help="where models given by name or directory are compiled once and reused "
                        "(default ~/.cache/expertflow)")
    p.add_argument("--timeline", type=Path, metavar="PATH", help="write a Chrome/Perfetto trace of the copy and "
                   "compute streams (a span per expert copy, per layer's wait and expert compute, per step) to "
                   "PATH; open it in ui.perfetto.dev or chrome://tracing")
    p.add_argument("--trace-out", type=Path, metavar="PATH", help="write the routes taken (one JSON line per "
                   "sequence, token and MoE layer: its top-k experts) to PATH, for expertflow-simulate --trace")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes; only the generated text")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give a PROMPT or --prompts-file FILE (one of the two)")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def compiled_path(model: str, cache_dir: Path, quiet: bool) -> Path:
    """``model`` itself when it is a compiled directory; else its compiled copy under
    ``cache_dir``, compiled now if there is none for this source, ExpertFlow and transformers."""
    path = Path(model).expanduser()
    if (path / "manifest.json").is_file():
        return path
    from ..passes.options import CompileOptions
    from .compile import compile_model
    from .source import resolve_model

    source = resolve_model(model)
    out = cache_dir / "compiled" / f"{_safe(model)}-{_fingerprint(model, source)}"
    if (out / "manifest.json").is_file():
        return out
    if not quiet:
        print(f"compiling {model} once into {out}", file=sys.stderr)
    return compile_model(model, out, CompileOptions(), dumps=False, quiet=quiet)


def _safe(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/"))[-64:] or "model"


def _fingerprint(model: str, source: Path) -> str:
    """What the compiled copy depends on: the source's files (names, sizes, times) and the versions."""
    import transformers

    from .. import __version__
    from ..runtime.manifest import SCHEMA_VERSION

    digest = hashlib.sha256(json.dumps([model, str(source.resolve()), __version__, SCHEMA_VERSION,
                                        transformers.__version__]).encode())
    for file in sorted(source.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def encode(tokenizer: Any, prompt: str, chat: bool) -> dict[str, Any]:
    """The prompt's ids; the directory's tokenizer and chat template run bounded (runtime/chat.py)."""
    if not chat:
        return encode_text(tokenizer, prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template; drop --chat to continue plain text")
    text = render_chat(tokenizer, [{"role": "user", "content": prompt}])
    return encode_text(tokenizer, text, return_tensors="pt", add_special_tokens=False)


def stats_table(stats: dict[str, Any]) -> str:
    """The cache statistics as an aligned table: one row per MoE layer and a total."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    head = ("layer", "hits", "misses", "hit rate", "precision", "recall", "waves", "MiB moved", "stall ms")
    rows = [head]
    for name, s in [*((str(k), v) for k, v in stats["layers"].items()), ("total", stats["total"])]:
        rows.append((name, str(s["hits"]), str(s["misses"]), pct(s["hit_rate"]), pct(s["prefetch_precision"]),
                     pct(s["prefetch_recall"]), str(s["waves"]), f"{s['bytes_moved'] / 2**20:.2f}",
                     f"{1000 * s['stall_s']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return f"expert cache: {stats['slots']} slots per pool\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TextStreamer

    from .. import runtime
    from ..runtime.manifest import read_manifest
    from . import presets
    from .generate_batch import generate_batch, read_prompts

    budget = runtime.budget_argument(args.budget)
    runtime.check_budget(budget)  # a bad budget or device fails now, not after a compile
    runtime.check_device(args.device)
    texts = read_prompts(args.prompts_file) if args.prompts_file is not None else [args.prompt]
    path = compiled_path(args.model, args.cache_dir, args.quiet)
    manifest = read_manifest(path)  # checked as runtime.load checks it: the directory may be a stranger's
    if not args.quiet and presets.is_random(manifest.get("source") or ""):
        print(f"note: {manifest['source']} is a preset with seeded random weights: its text is gibberish, "
              "but exactly the text transformers would give", file=sys.stderr)
    tokenizer = runtime.load_tokenizer(path)
    prompts = [encode(tokenizer, text, args.chat)["input_ids"][0].tolist() for text in texts]
    model = runtime.load(path, device=args.device, expert_cache=budget, timeline=args.timeline is not None,
                         record_routing=args.trace_out is not None,
                         max_context=max(len(p) for p in prompts) + args.max_new_tokens,
                         batch_size=args.batch_size if args.prompts_file is not None else 1)
    if model.budget is not None and not args.quiet:
        print(model.budget.describe(), file=sys.stderr)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.sample else dict(do_sample=False)
    if args.sample and args.seed is not None:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.prompts_file is not None:
        new = generate_batch(model, tokenizer, prompts, texts, args, sampling)
    else:
        if not args.chat:
            print(args.prompt, end="", flush=True)
        ids = torch.tensor([prompts[0]])
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             streamer=streamer, **sampling)
        new = out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    if args.timeline is not None:
        model.timeline.write(args.timeline)
    if args.trace_out is not None:
        model.routing.write_jsonl(args.trace_out)
    return {"path": path, "new_tokens": new, "seconds": seconds, "stats": model.stats()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..runtime import LoadError
    from .compile import one_line

    try:
        result = run(args)
    except (UserError, LoadError, ValueError, OSError, ImportError) as exc:
        print(f"expertflow-generate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexpertflow-generate: interrupted", file=sys.stderr)
        return 130
    if args.stats:
        print(f"\n{result['new_tokens']} tokens in {result['seconds']:.2f} s "
              f"({result['new_tokens'] / result['seconds']:.1f} tokens/s), compiled model {result['path']}")
        print(stats_table(result["stats"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
