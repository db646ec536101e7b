"""``expertflow-generate --prompts-file``: many prompts in one run, through ``model.generate_many``.

The file holds one prompt per line; in a ``.jsonl`` file each line is a JSON string or an object
with a ``"prompt"`` string, so prompts can hold newlines. Blank lines are skipped. Prompts are
batched by ``--schedule`` (route-aware or fifo) with continuous batching, and each result is
printed as one JSON line, in the file's order: ``{"index": i, "prompt": ..., "text": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..shell import UserError


def read_prompts(path: Path) -> list[str]:
    """The prompts in ``path``; UserError (one line) for an unreadable file or a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompts-file {path}: cannot read it ({type(exc).__name__}); give a UTF-8 text file")
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--prompts-file {path}, line {n}: not JSON ({exc.msg}); write a JSON string or "
                            '{"prompt": "..."} per line')
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text:
            raise UserError(f"--prompts-file {path}, line {n}: expected a non-empty JSON string or "
                            '{"prompt": "..."}')
        prompts.append(text)
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts: write one per line")
    return prompts


def generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], texts: list[str], args: Any,
                   sampling: dict[str, Any]) -> int:
    """Run ``prompts`` (token ids) and print one JSON line per prompt; the number of new tokens."""
    outputs = model.generate_many(prompts, batch_size=args.batch_size, schedule=args.schedule,
                                  max_new_tokens=args.max_new_tokens, **sampling)
    new = 0
    for i, (out, ids, text) in enumerate(zip(outputs, prompts, texts)):
        new += len(out) - len(ids)
        reply = tokenizer.decode(out[len(ids):], skip_special_tokens=True)
        print(json.dumps({"index": i, "prompt": text, "text": reply}, ensure_ascii=False), flush=True)
    return new
