"""expertflow-generate: text in, text out, with a fixed budget of expert slots.

Streams the new text to the terminal (stdout) as it is generated; notes and --stats go to
stderr. MODEL is a compiled directory, or anything expertflow-compile takes (a save_pretrained
directory, a hub id already in the local Hugging Face cache, a built-in preset): that is compiled
once into --cache-dir and reused while the source is unchanged (--list-cache, --clean-cache). Generation is transformers' own (greedy by default; --sample draws with
--temperature, --top-k, --top-p); --chat wraps the prompt in the model's chat template;
--interactive holds a multi-turn chat in the terminal (``tools/cli/chat.py``). --prompts-file
runs many prompts at once (``tools/cli/generate_batch.py``): one JSON line each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ...runtime.store.chat import render_chat
from ...runtime.store.tokenizer import encode_text
from . import model_args
from ..shell import UserError, run_command

EXAMPLES = """
examples:
  expertflow-generate tiny-trained-moe "def __init__(self" --stats
  expertflow-generate compiled/ "Explain MoE offloading." --chat --budget 4GiB --device cuda
  expertflow-generate ./my-model "Once upon a time" --sample --temperature 0.7 --top-p 0.9 --seed 1
  expertflow-generate tiny-trained-moe --prompts-file prompts.jsonl --batch-size 16 --max-new-tokens 32
  expertflow-generate tiny-trained-moe --interactive --system "You are terse." --max-new-tokens 128
  expertflow-generate --list-cache       (and --clean-cache: remove what --cache-dir holds)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="expertflow-generate", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="compiled directory, model directory, cached hub id, or preset name")
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
    model_args.add_arguments(p, "this prompt and --max-new-tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample: divide logits by this (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample: keep the K likeliest tokens; 0 keeps all "
                   "(default 50, as transformers)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: keep the smallest set of tokens whose "
                   "probability reaches P (default 1.0: all)")
    p.add_argument("--seed", type=int, help="with --sample: seed torch's generator, for a repeatable draw")
    p.add_argument("--repetition-penalty", type=float, help="divide the scores of tokens already in the text by "
                   "this (transformers' repetition_penalty; above 1 repeats less; default: the model's, else none)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop once the new text contains TEXT (it is "
                   "printed, as transformers' stop_strings keep it); repeat for several; with one PROMPT or "
                   "--interactive")
    p.add_argument("--interactive", action="store_true", help="a multi-turn chat in the terminal with the model's "
                   "chat template: Enter sends, Ctrl-C stops an answer (not the chat), /reset forgets the "
                   "conversation, Ctrl-D or /exit quits; PROMPT, if given, is the first message")
    p.add_argument("--system", metavar="TEXT", help="with --interactive or --chat: the system message")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt as a user "
                   "message and generate the assistant's reply")
    p.add_argument("--stats", action="store_true", help="after the text, print the expert cache's statistics per "
                   "MoE layer (hits, misses, prefetch precision and recall, wasted, cancelled and dropped "
                   "prefetches, split steps, bytes moved, stall) as a table with a legend, on stderr")
    p.add_argument("--list-cache", action="store_true", help="list the models compiled into --cache-dir (size, "
                   "date, source) and exit")
    p.add_argument("--clean-cache", action="store_true", help="remove the models compiled into --cache-dir and "
                   "exit")
    p.add_argument("--timeline", type=Path, metavar="PATH", help="write a Chrome/Perfetto trace of the copy and "
                   "compute streams (a span per expert copy, per layer's wait and expert compute, per step) to "
                   "PATH; open it in ui.perfetto.dev or chrome://tracing")
    p.add_argument("--trace-out", type=Path, metavar="PATH", help="write the routes taken (one JSON line per "
                   "sequence, token and MoE layer: its top-k experts) to PATH, for expertflow-simulate --trace")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes; only the generated text")
    args = p.parse_args(argv)
    if args.list_cache or args.clean_cache:
        if args.model is not None or args.prompts_file is not None or (args.list_cache and args.clean_cache):
            p.error("--list-cache and --clean-cache take no MODEL or prompt, and go alone")
        return args
    if args.model is None:
        p.error("give a MODEL (a compiled directory, model directory, cached hub id or preset), or --list-cache")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.interactive and args.prompts_file is not None:
        p.error("--interactive chats one message at a time: drop --prompts-file")
    if not args.interactive and (args.prompt is None) == (args.prompts_file is None):
        p.error("give a PROMPT or --prompts-file FILE (one of the two), or --interactive")
    if args.stop and args.prompts_file is not None:
        p.error("--stop works with one PROMPT or --interactive; --prompts-file batches without stop strings")
    if args.system is not None and not (args.interactive or args.chat):
        p.error("--system needs --interactive or --chat: plain text has no system message")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        p.error(f"--repetition-penalty must be above 0, got {args.repetition_penalty}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def encode(tokenizer: Any, prompt: str, chat: bool, system: str | None = None) -> dict[str, Any]:
    """The prompt's ids; the directory's tokenizer and chat template run bounded (runtime/store/chat.py)."""
    if not chat:
        return encode_text(tokenizer, prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template; drop --chat to continue plain text")
    first = [{"role": "system", "content": system}] if system else []
    text = render_chat(tokenizer, first + [{"role": "user", "content": prompt}])
    return encode_text(tokenizer, text, return_tensors="pt", add_special_tokens=False)


STATS_LEGEND = """\
hits: experts a step needed that were in a slot (or on their way) when its layer's wait began;
  misses: loaded on demand there; hit rate = hits / (hits + misses)
precision: predicted experts the router then chose / experts predicted (prefetched or hinted);
  recall: predicted experts the router chose / experts the router chose
wasted: prefetches copied and then not used; cancelled: unneeded prefetches stopped before their
  copy began (no bytes moved); dropped: predictions with no free slot to copy into
split: steps needing more experts than there are slots, computed in several waves"""


def stats_table(stats: dict[str, Any]) -> str:
    """The cache statistics as an aligned table, one row per MoE layer and a total, with a legend."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    head = ("layer", "hits", "misses", "hit rate", "precision", "recall", "wasted", "cancelled", "dropped", "split",
            "MiB moved", "stall ms")
    rows = [head]
    for name, s in [*((str(k), v) for k, v in stats["layers"].items()), ("total", stats["total"])]:
        rows.append((name, str(s["hits"]), str(s["misses"]), pct(s["hit_rate"]), pct(s["prefetch_precision"]),
                     pct(s["prefetch_recall"]), str(s["prefetch_wasted"]), str(s["prefetch_cancelled"]),
                     str(s["prefetch_dropped"]), str(s["split_steps"]), f"{s['bytes_moved'] / 2**20:.2f}",
                     f"{1000 * s['stall_s']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    pools = stats["pools"]
    where = "one pool shared by every MoE layer" if pools == 1 else \
        f"{pools} pools, one per expert shape, each shared by the MoE layers of that shape"
    disk = stats.get("disk")
    if disk is not None:  # the disk tier: every copy above was a read from the compiled directory
        rate = "-" if disk["read_gbps"] is None else f"{disk['read_gbps']:.2f} GB/s"
        lines.append(f"disk: {disk['reads']} reads, {disk['bytes_read'] / 2**20:.2f} MiB read, "
                     f"{1000 * disk['read_s']:.2f} ms reading ({rate}, {'direct' if disk['direct'] else 'buffered'}), "
                     f"{1000 * disk['check_s']:.2f} ms checking digests, summed over the reading threads")
    return (f"expert cache: {stats['slots']} slots (each holds one expert) in {where}\n" + "\n".join(lines)
            + "\n" + STATS_LEGEND)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TextStreamer

    from .generate_batch import generate_batch, read_prompts

    texts = read_prompts(args.prompts_file) if args.prompts_file is not None else [args.prompt]
    src = model_args.resolve(args)
    tokenizer = src.tokenizer
    limit = src.manifest["config"].get("max_position_embeddings")
    if args.interactive:
        return _interactive(src, args, limit if isinstance(limit, int) and limit > 1 else None)
    prompts = [encode(tokenizer, text, args.chat, args.system)["input_ids"][0].tolist() for text in texts]
    context = max(len(p) for p in prompts) + args.max_new_tokens
    if isinstance(limit, int) and context > limit:
        print(f"warning: {context - args.max_new_tokens} prompt tokens + --max-new-tokens {args.max_new_tokens} "
              f"exceed the model's context of {limit} positions; text past it is unreliable", file=sys.stderr)
    path = src.path
    model = model_args.load(src, args, context, args.batch_size if args.prompts_file is not None else 1,
                            timeline=args.timeline is not None, record_routing=args.trace_out is not None)
    sampling = _sampling(args, tokenizer)
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


def _sampling(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """generate's keyword arguments for the decoding options (the seed set here)."""
    import torch

    sampling: dict[str, Any] = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p) if args.sample else dict(do_sample=False)
    if args.sample and args.seed is not None:
        torch.manual_seed(args.seed)
    if args.repetition_penalty is not None:
        sampling["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        sampling.update(stop_strings=list(args.stop), tokenizer=tokenizer)
    return sampling


def _interactive(src: Any, args: argparse.Namespace, limit: int | None) -> dict[str, Any]:
    from .chat import run_chat

    context = min(limit or model_args.DEFAULT_CONTEXT, model_args.DEFAULT_CONTEXT)
    if args.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the "
                        f"{context}-token context; lower it")
    model = model_args.load(src, args, context, 1, timeline=args.timeline is not None,
                            record_routing=args.trace_out is not None)
    start = time.perf_counter()
    new = run_chat(model, src.tokenizer, args, _sampling(args, src.tokenizer), context)
    return {"path": src.path, "new_tokens": new, "seconds": time.perf_counter() - start, "stats": model.stats()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ...runtime.store.manifest import LoadError

    return run_command("expertflow-generate", lambda: _main(args), (LoadError, ValueError, OSError, ImportError))


def _main(args: argparse.Namespace) -> int:
    from ...runtime.store.device import check_device

    if args.list_cache or args.clean_cache:
        return _cache_command(args)
    check_device(args.device)  # with the arguments: before transformers is imported or a compile starts
    result = run(args)
    if args.stats:  # on stderr: stdout holds the generated text alone
        print(f"\n{result['new_tokens']} tokens in {result['seconds']:.2f} s "
              f"({result['new_tokens'] / result['seconds']:.1f} tokens/s), compiled model {result['path']}",
              file=sys.stderr)
        print(stats_table(result["stats"]), file=sys.stderr)
    return 0


def _cache_command(args: argparse.Namespace) -> int:
    from . import compile_cache

    if args.list_cache:
        print(compile_cache.render_entries(compile_cache.list_entries(args.cache_dir), args.cache_dir))
        return 0
    removed = compile_cache.clean(args.cache_dir)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} removed from {compile_cache.entries_dir(args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
