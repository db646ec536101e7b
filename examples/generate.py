"""Compile a MoE model, generate text with a quarter of its experts on the device, show the cache.

    python examples/generate.py [MODEL] [--out DIR] [--device cuda] [--budget 25%] [--tokens 32]

MODEL is a preset (default tiny-trained-moe, trained on the Python stdlib: Python-like text; the
tiny-* random-weight presets give gibberish, but the very text transformers gives), a
save_pretrained directory, or a hub id in the local Hugging Face cache (fetched beforehand with
`hf download`). It is compiled into --out (default compiled/MODEL) once; later runs reuse that
directory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.cli.compile import compile_model
from expertflow.tools.shell import one_line
from expertflow.tools.cli.generate import stats_table
from expertflow.tools.presets.catalog import PRESETS
from expertflow.tools.shell import UserError

PROMPTS = ["def __init__(self", "class Parser:\n    \"\"\""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="tiny-trained-moe", help="preset, model directory or cached hub id")
    p.add_argument("--out", type=Path, help="compiled directory to write or reuse (default compiled/MODEL)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--budget", default="25%", help="expert slots (8), a size (4GiB) or a fraction (default 25%%)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    args = p.parse_args()
    try:
        budget = runtime.budget_argument(args.budget)
        runtime.Budget.read(budget)  # bad options fail before the compile, not after
        runtime.check_device(args.device)
        out = args.out or Path("compiled") / re.sub(r"[^A-Za-z0-9._-]+", "_", args.model.strip("/"))
        if (out / "manifest.json").is_file():
            print(f"using {out}, compiled before (delete it to recompile)")
        else:
            compile_model(args.model, out, CompileOptions(), quiet=False)
            print(f"compiled {args.model} into {out}")
        if args.model in PRESETS:
            print(f"note: {args.model} has seeded random weights: the text is gibberish, but exactly transformers'")
        model = runtime.load(out, device=args.device, expert_cache=budget)
        tokenizer = runtime.load_tokenizer(out)
    except (UserError, runtime.LoadError, ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # pads on the left, as generation needs
    tokens = model.generate(**batch, max_new_tokens=args.tokens, do_sample=False)
    for prompt, row in zip(PROMPTS, tokens):
        new = row[batch["input_ids"].shape[1]:]
        print(f"\nprompt:   {prompt!r}\nnew text: {tokenizer.decode(new, skip_special_tokens=True)!r}")
    print()
    print(stats_table(model.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
