"""Compile a built-in tiny model, generate with a quarter of its experts resident, show the stats.

    python examples/generate.py [MODEL] [--device cuda] [--budget 8]

MODEL is a preset (default tiny-mixtral), a save_pretrained directory, or a cached hub id such
as mistralai/Mixtral-8x7B-v0.1 (fetched beforehand with `hf download`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.compile import compile_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="tiny-mixtral", help="preset, model directory or cached hub id")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--budget", default=None, help="expert slots or a size like 4GiB (default: 25%% of experts)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens to generate")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="expertflow-example-")) / "compiled"
    compile_model(args.model, out, CompileOptions(), quiet=False)
    plan = json.loads((out / "manifest.json").read_text())["memory_plan"]
    budget = args.budget or max(1, plan["all_resident_slots"] // 4)
    model = runtime.load(out, device=args.device, expert_cache=int(budget) if str(budget).isdigit() else budget)
    prompts = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    tokens = model.generate(prompts, attention_mask=mask, max_new_tokens=args.tokens)
    print("tokens:", tokens.tolist())
    print("stats:", json.dumps(model.stats()["total"], indent=2))


if __name__ == "__main__":
    main()
