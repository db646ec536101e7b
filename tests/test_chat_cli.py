"""expertflow-generate --interactive, driven through a pseudo-terminal as a person would: two
turns (each answer exactly what the model gives that conversation), a Ctrl-C mid-answer that
stops the answer and not the chat, and an exit; plus the new generation controls."""

from __future__ import annotations

import os
import pty
import re
import select
import sys
import time

import pytest
import torch

from expertflow import runtime
from expertflow.runtime.store.chat import render_chat
from expertflow.tools.cli import generate as generate_cli

NAME = "tiny-trained-moe"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the pty as its terminal
            os.execv(sys.executable, [sys.executable, "-m", "expertflow.tools.cli.generate", *argv])
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """Everything printed up to ``marker`` (consumed), terminal codes removed."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} after {timeout} s; the terminal shows: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    assert marker in self.seen, f"the command ended before {marker!r}: {self.seen[-2000:]!r}"
                self.seen += ANSI.sub("", chunk.decode(errors="replace")).replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(marker)
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> None:
        """Kills the chat if it still runs (a failed assertion must not leave it behind)."""
        try:
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)

    def exit_status(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining: a child blocked writing to a full terminal never ends
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def _answer(model, tokenizer, messages: list[dict], n: int) -> str:
    text = render_chat(tokenizer, messages)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_chat_of_two_turns_a_ctrl_c_and_an_exit(compiled_dir):
    path = compiled_dir(NAME)
    model, tokenizer = runtime.load(path, expert_cache=8), runtime.load_tokenizer(path)
    system = {"role": "system", "content": "Answer in Python."}
    first, second = "Is flat better than nested?", "Why?"
    answer1 = _answer(model, tokenizer, [system, {"role": "user", "content": first}], 24)
    answer2 = _answer(model, tokenizer, [system, {"role": "user", "content": first},
                                         {"role": "assistant", "content": answer1.strip()},
                                         {"role": "user", "content": second}], 24)
    term = Terminal([str(path), "--interactive", "--system", system["content"], "--max-new-tokens", "24",
                     "--budget", "8", "--quiet"])
    try:
        term.read_until("> ")
        term.send(first + "\n")
        shown = term.read_until("> ")
        assert shown.startswith(first + "\n") and shown[len(first) + 1:].rstrip("\n") == answer1.rstrip("\n")
        term.send(second + "\n")
        shown = term.read_until("> ")
        assert shown[len(second) + 1:].rstrip("\n") == answer2.rstrip("\n")
        term.send("/exit\n")
        assert term.exit_status() == 0
    finally:
        term.close()


def test_ctrl_c_stops_an_answer_not_the_chat(compiled_dir):
    path = compiled_dir(NAME)
    term = Terminal([str(path), "--interactive", "--max-new-tokens", "480", "--budget", "8", "--quiet",
                     "--repetition-penalty", "1.0"])
    try:
        term.read_until("> ")
        term.send("Tell me everything.\n")
        term.read_until("Tell me everything.\n")
        time.sleep(0.5)  # it is writing its (long) answer: 480 tokens take seconds here
        term.send("\x03")  # Ctrl-C, as the terminal delivers it: SIGINT to the chat
        term.read_until("[stopped]")
        term.read_until("> ")  # the chat goes on
        term.send("Short?\n")
        term.read_until("Short?\n")
        term.send("\x03")
        term.read_until("> ")
        term.send("\x04")  # Ctrl-D at the prompt ends it
        assert term.exit_status() == 0
    finally:
        term.close()


def test_generation_controls(compiled_dir, capsys):
    path = str(compiled_dir(NAME))
    assert generate_cli.main([path, "def main():", "--max-new-tokens", "24", "--budget", "8", "--quiet"]) == 0
    full = capsys.readouterr().out[len("def main():"):].rstrip("\n")
    stop = full[8:11]
    assert generate_cli.main([path, "def main():", "--max-new-tokens", "24", "--budget", "8", "--quiet",
                              "--stop", stop]) == 0
    cut = capsys.readouterr().out[len("def main():"):].rstrip("\n")
    assert stop in cut and full.startswith(cut) and len(cut) < len(full)  # ended at the stop text
    assert generate_cli.main([path, "def main():", "--max-new-tokens", "24", "--budget", "8", "--quiet",
                              "--repetition-penalty", "1.5"]) == 0
    assert capsys.readouterr().out[len("def main():"):].rstrip("\n") != full
    with pytest.raises(SystemExit):
        generate_cli.main([path, "--prompts-file", "x.txt", "--stop", "a"])
    assert "--stop works with one PROMPT or --interactive" in capsys.readouterr().err
