"""A timeline of the copy and compute streams, written as a Chrome/Perfetto trace.

Spans are marked where the work is queued: on the CPU path with host timestamps (the copy worker
thread stamps its own copies), on CUDA with events recorded on the stream that does the work, so
the trace shows when the GPU copied and computed, not when the host asked. Open the JSON in
https://ui.perfetto.dev or chrome://tracing: one track per stream, a span per copy and per layer's
wait and expert compute, so a user sees where compute waits for bytes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Track ids, in the order the viewer shows them.
TRACKS = {"model": 1, "compute": 2, "copy": 3, "disk": 4}


@dataclass
class Span:
    track: str
    name: str
    start: Any  # host nanoseconds, or a recorded torch.cuda.Event
    end: Any
    args: dict[str, Any] = field(default_factory=dict)


class Timeline:
    """Spans on the model, compute and copy tracks of one loaded model."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spans: list[Span] = []
        self._lock = threading.Lock()  # the copy thread adds spans too
        self._origin_ns = time.perf_counter_ns()
        self._origin_event = self._event() if device.type == "cuda" else None

    def _event(self, stream: Any = None) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device):
            event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def mark(self, stream: Any = None) -> Any:
        """Now, on ``stream`` (CUDA: an event recorded there; CPU: a host timestamp)."""
        return self._event(stream) if self.device.type == "cuda" else time.perf_counter_ns()

    def add(self, track: str, name: str, start: Any, end: Any, **args: Any) -> None:
        with self._lock:
            self.spans.append(Span(track, name, start, end, args))

    def _microseconds(self, mark: Any) -> float:
        if isinstance(mark, int):
            return (mark - self._origin_ns) / 1000
        return self._origin_event.elapsed_time(mark) * 1000

    def chrome_trace(self) -> dict[str, Any]:
        """The spans as Chrome trace events (``ph: X``), with the tracks named."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # event times are readable once recorded
        with self._lock:
            spans = list(self.spans)
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": f"ExpertFlow on {self.device}"}}]
        events += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": "disk reads" if track == "disk" else f"{track} stream"}}
                   for track, tid in TRACKS.items()]
        for span in spans:
            start = self._microseconds(span.start)
            events.append({"ph": "X", "pid": 1, "tid": TRACKS[span.track], "name": span.name, "ts": start,
                           "dur": max(0.0, self._microseconds(span.end) - start), "args": span.args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> Path:
        """Writes the trace JSON atomically (a partial file never appears under ``path``)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.chrome_trace()))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
