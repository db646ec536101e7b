"""``expertflow-generate MODEL --interactive``: a multi-turn chat in the terminal.

Each turn renders the whole conversation (``--system`` first) with the model's chat template,
bounded as everywhere (``runtime/store/chat.py``), and streams the answer as it is generated.
Ctrl-C stops the answer being written (what was written stays in the conversation) and the chat
goes on; Ctrl-C at the prompt clears the line; Ctrl-D, ``/exit`` or ``/quit`` ends it;
``/reset`` forgets the conversation. When the conversation outgrows the context the oldest
turns are left out of what the model sees, and the chat says so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from transformers import TextStreamer

from ...runtime.store.chat import render_chat
from ...runtime.store.tokenizer import encode_text
from ..shell import UserError

HELP = "Enter sends; Ctrl-C stops an answer; /reset forgets the conversation; Ctrl-D or /exit quits"


class _Answer(TextStreamer):
    """transformers' streamer (prints the answer as it comes), keeping what it printed."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.parts: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.parts.append(text)
        super().on_finalized_text(text, stream_end)


def run_chat(model: Any, tokenizer: Any, args: argparse.Namespace, sampling: dict[str, Any], context: int) -> int:
    """The chat loop; the tokens generated over every answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--interactive: this model's tokenizer has no chat template; give a PROMPT without "
                        "--interactive to continue plain text")
    system = [{"role": "system", "content": args.system}] if args.system else []
    state = _Chat(model, tokenizer, args, sampling, context, system)
    print(f"chat: {HELP}", file=sys.stderr, flush=True)
    while True:
        turn: list[dict[str, str]] = []
        answer = _Answer(tokenizer)
        try:  # one handler for the whole turn: a Ctrl-C anywhere in it is caught, at the prompt or not
            line = state.next_line()
            if line is None:
                return state.total
            if state.command(line) or not line.strip():
                continue
            turn = [{"role": "user", "content": line}]
            state.answer(turn, answer)
        except KeyboardInterrupt:
            if not turn:  # at the prompt: a fresh line, the chat goes on
                print()
                continue
            print("\n[stopped]", file=sys.stderr, flush=True)  # this answer stops; the conversation goes on
        if turn:
            state.history += turn + [{"role": "assistant", "content": "".join(answer.parts).strip()}]


class _Chat:
    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace, sampling: dict[str, Any],
                 context: int, system: list[dict[str, str]]):
        self.model, self.tokenizer, self.args, self.sampling = model, tokenizer, args, sampling
        self.room, self.system = context - args.max_new_tokens, system
        self.history: list[dict[str, str]] = []
        self.pending, self.total = args.prompt, 0

    def next_line(self) -> str | None:
        """The next message (PROMPT first, when given); None at Ctrl-D, /exit or /quit."""
        if self.pending is not None:
            line, self.pending = self.pending, None
            print(f"> {line}", flush=True)
        else:
            try:
                line = input("> ")
            except EOFError:
                print()
                return None
        return None if line.strip() in ("/exit", "/quit") else line

    def command(self, line: str) -> bool:
        if line.strip() != "/reset":
            return False
        self.history = []
        print("(the conversation is forgotten)", file=sys.stderr, flush=True)
        return True

    def answer(self, turn: list[dict[str, str]], answer: "_Answer") -> None:
        ids = _fit(self.tokenizer, self.system, self.history, turn, self.room)
        if ids is None:
            print(f"(this message alone is longer than the {self.room} tokens left for it; say it shorter)",
                  file=sys.stderr, flush=True)
            turn.clear()
            return
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.max_new_tokens,
                                  streamer=answer, **self.sampling)
        self.total += out.shape[1] - ids.shape[1]


def _fit(tokenizer: Any, system: list[dict[str, str]], history: list[dict[str, str]], turn: list[dict[str, str]],
         room: int) -> torch.Tensor | None:
    """The conversation's ids, its oldest turns left out until it fits ``room`` (None: even the
    new message alone does not)."""
    for start in range(0, len(history) + 1, 2):
        text = render_chat(tokenizer, system + history[start:] + turn)
        ids = encode_text(tokenizer, text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] <= room:
            if start:
                print(f"(the {start // 2} oldest turns no longer fit the context and are left out)", file=sys.stderr,
                      flush=True)
            return ids
    return None
