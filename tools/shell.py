"""The one shell every ExpertFlow command runs in: the user-error type, one-line messages, and the
runner that turns errors, interrupts and a closed pipe into the house's exit codes.

Bad input prints ``<command>: error: <one line>`` on stderr and exits 2; Ctrl-C and SIGTERM (a
timeout, CI cancelling) interrupt the same way and exit 130, after the command's own cleanup has
run (``finally`` blocks, temporary directories); a reader that closes the pipe early
(``expertflow-inspect --table | head``) is normal use and ends the command quietly with 0.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def one_line(exc: BaseException) -> str:
    """The first paragraph of an error message, on one line (library errors run to several)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    return " ".join(text.split("\n\n")[0].split())


#: The Python API's argument names in runtime errors, and the command-line flags that set them.
_CLI_TERMS = ((re.compile(r"\bexpert_cache=(['\"]?)([^'\"\s:;,]*)\1"), r"--budget \2"),
              (re.compile(r"\bhost_memory=(['\"]?)([^'\"\s:;,]*)\1"), r"--host-memory \2"),
              (re.compile(r"\bmemory=(['\"]?)([^'\"\s:;,]*)\1"), r"--memory \2"),
              (re.compile(r"\bdevice=(['\"]?)([^'\"\s:;,]*)\1"), r"--device \2"))


def cli_terms(message: str) -> str:
    """A runtime error as a command-line user reads it: ``expert_cache=0`` becomes ``--budget 0``."""
    for pattern, flag in _CLI_TERMS:
        message = pattern.sub(flag, message)
    return message


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up exactly as Ctrl-C does


def run_command(prog: str, body: Callable[[], int], errors: tuple[type[BaseException], ...] = (),
                interrupted: str = "interrupted") -> int:
    """Runs ``body`` (which returns the exit status) as the command ``prog``: :class:`UserError`
    and the exception types in ``errors`` (what the command's libraries raise for bad input) are
    one line and status 2, an interrupt prints ``prog: <interrupted>`` and is status 130."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return body()
    except BrokenPipeError:  # first: it is an OSError, which a command may list among its errors
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet
        return 0
    except (UserError, *errors) as exc:
        print(f"{prog}: error: {cli_terms(one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
