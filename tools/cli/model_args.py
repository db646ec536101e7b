"""What every command that turns text into text shares (expertflow-generate, expertflow-serve):
the options that say where the experts live and how much memory they get, and opening the
model with its tokenizer from them.

``resolve`` checks the budgets (before any compile), compiles MODEL into the cache when it is
not a compiled directory, and loads the tokenizer; ``load`` then loads the model for the
context the command knows by then, printing the split an ``auto`` or ``--memory`` budget chose.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..shell import UserError, cli_terms

DEFAULT_CONTEXT = 4096  # tokens a chat or a served request may hold when the model's context is longer

def add_arguments(p: argparse.ArgumentParser, kv: str) -> None:
    """--budget, --host-memory, --memory, --device, --cache-dir; ``kv`` says what the KV cache an
    'auto' budget keeps room for holds (\"this prompt and --max-new-tokens\")."""
    p.add_argument("--budget", default=None, help="expert cache on the device: slots (8), a size (4GiB), a "
                   "fraction of all experts (25%%), 'auto' (the most that fits the device's free memory after "
                   f"the dense weights, a KV cache for {kv}, and a margin), or 'all' (default 25%%)")
    p.add_argument("--host-memory", metavar="BUDGET", help="keep the experts on disk (cpu): the expert slots hold "
                   "this much (slots, a size, a fraction of all experts, or 'auto': the host's free memory less "
                   "the dense weights, a KV cache and a margin) and every other expert is read from the compiled "
                   "directory when a prediction or a miss asks for it, checked as read; instead of --budget")
    p.add_argument("--memory", metavar="SIZE", help="one total for the host instead of --budget or --host-memory "
                   f"(cpu): a size (12GiB) or 'auto' (the host's free memory); the dense weights, a KV cache for "
                   f"{kv} and a margin come first, the expert slots get the rest, and the other experts stay on "
                   "disk; the split is printed")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "expertflow",
                   help="where models given by name or directory are compiled once and reused "
                        "(default ~/.cache/expertflow)")


@dataclass(frozen=True)
class Source:
    path: Path
    manifest: dict[str, Any]
    tokenizer: Any
    budget: Any        # runtime.budget_argument of --budget (25% when none is given)
    host: Any          # of --host-memory, or None
    tiered: bool       # the experts stay on disk (--host-memory or --memory)


def resolve(args: argparse.Namespace) -> Source:
    """Budgets checked, MODEL compiled if it must be, its manifest read and tokenizer loaded."""
    import torch

    from ... import runtime
    from ...runtime.assemble.memory import host_tier
    from ...runtime.store.manifest import TOKENIZER_VOCAB, read_manifest
    from ..presets import catalog as presets
    from .compile_cache import compiled_path

    given = [flag for flag, v in (("--budget", args.budget), ("--host-memory", args.host_memory),
                                  ("--memory", args.memory)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{given[1]} and {given[0]} both size the expert slots: give one of them, not both")
    budget = runtime.budget_argument(args.budget if args.budget is not None else "25%")
    host = runtime.budget_argument(args.host_memory) if args.host_memory is not None else None
    runtime.Budget.read(budget)  # a bad budget fails now, not after a compile
    tier = host_tier(host, args.memory, None, torch.device(args.device)) if given[-1:] != ["--budget"] else None
    path = compiled_path(args.model, args.cache_dir, args.quiet, needs_tokenizer=True)
    manifest = read_manifest(path)  # checked as runtime.load checks it: the directory may be a stranger's
    if not any(name in manifest["files"] for name in TOKENIZER_VOCAB):
        raise UserError(f"{path} has no tokenizer: its source model shipped none, so text cannot become tokens; "
                        "compile it from a directory that holds the model's tokenizer (tokenizer.save_pretrained)")
    if not args.quiet and presets.is_random(manifest.get("source") or ""):
        print(f"note: {manifest['source']} is a preset with seeded random weights: its text is gibberish, "
              "but exactly the text transformers would give", file=sys.stderr)
    return Source(path, manifest, runtime.load_tokenizer(path), budget, host, tier is not None)


def load(src: Source, args: argparse.Namespace, context: int, batch_size: int, **kwargs: Any) -> Any:
    """The model, its KV cache sized for ``batch_size`` rows of ``context`` tokens."""
    from ... import runtime

    model = runtime.load(src.path, device=args.device, expert_cache=None if src.tiered else src.budget,
                         host_memory=src.host, memory=args.memory, max_context=context, batch_size=batch_size,
                         **kwargs)
    if model.budget is not None and not args.quiet:
        print(cli_terms(model.budget.describe()), file=sys.stderr)
    return model
