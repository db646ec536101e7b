"""The routing-trace file format: JSONL, one record per token and MoE layer, in execution order.

A record is ``{"seq": 0, "token": 5, "layer": 3, "experts": [6, 2]}``: the experts one token
chose in one layer, the unit ``expertflow-simulate --trace FILE`` replays (so routing recorded
by other tools, vLLM or llama.cpp, can be replayed). Records come in execution order by (seq,
token, layer), each once; a malformed or out-of-order line is refused with its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TRACE_KEYS = ("seq", "token", "layer")


@dataclass(frozen=True, slots=True)
class Access:
    """One trace record: the distinct experts, ascending, that one token needs in one layer."""

    seq: int
    token: int
    layer: int
    experts: tuple[int, ...]


def _field(record: dict, name: str) -> int:
    if name not in record:
        raise ValueError(f"missing key {name!r}")
    value = record[name]
    if type(value) is not int or value < 0:  # bool is an int subclass: rejected by the exact type check
        raise ValueError(f"{name!r} must be a non-negative integer, got {json.dumps(value)}")
    return value


def _record(raw: bytes | str, experts_per_layer: int | None) -> Access | None:
    """The access one line holds (None for a blank line); ValueError says what is wrong."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json's decoder recurses once per bracket: a line of "[[[[..." ends here
        raise ValueError("bad JSON: nested too deeply for a trace record (one flat object a line)") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    seq, token, layer = (_field(record, name) for name in TRACE_KEYS)
    experts = record.get("experts")
    if not isinstance(experts, list):
        raise ValueError("missing key 'experts'" if "experts" not in record
                         else f"'experts' must be a list of expert ids, got {json.dumps(experts)}")
    for e in experts:
        if type(e) is not int or e < 0:
            raise ValueError(f"expert id {json.dumps(e)} is not a non-negative integer")
        if experts_per_layer is not None and e >= experts_per_layer:
            raise ValueError(f"expert id {e} is out of range: the layers have {experts_per_layer} experts")
    # Duplicates collapse: a step needs an expert once, however many of its rows chose it.
    return Access(seq, token, layer, tuple(sorted(set(experts))))


def parse_lines(lines: Iterable[bytes | str], experts_per_layer: int | None = None) -> list[Access]:
    """The accesses of a JSONL trace, one record a line, in execution order by (seq, token, layer).

    Raises ValueError("line N: ...") at the first malformed or out-of-order line.
    """
    accesses: list[Access] = []
    previous: tuple[int, int, int] | None = None
    for number, raw in enumerate(lines, 1):
        try:
            access = _record(raw, experts_per_layer)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if access is None:
            continue
        where = (access.seq, access.token, access.layer)
        if previous is not None and where <= previous:
            raise ValueError(f"line {number}: record (seq, token, layer) = {where} does not come after {previous}; "
                             "records must be in execution order, each (seq, token, layer) once")
        previous = where
        accesses.append(access)
    return accesses


def parse_trace(path: Path, experts_per_layer: int | None = None) -> list[Access]:
    """``parse_lines`` of a file (read as bytes, so a bad encoding is a line's error too)."""
    with open(path, "rb") as f:
        return parse_lines(f, experts_per_layer)
