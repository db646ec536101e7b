"""Recording the routes a model takes: what ``expertflow-simulate --trace`` replays.

Each MoE layer's ``route`` op hands the router's top-k ids of every token in the step to the
runtime; with recording on, they are kept per step and written as the simulator's JSONL, one
record per (sequence, token, layer): ``{"seq": 0, "token": 5, "layer": 3, "experts": [6, 2]}``.
A forward with an empty cache starts new sequences (numbered after the previous ones); later
steps continue the latest. ``token`` is the position in the sequence, padding included: padded
positions are routed and loaded like any other.

Beside the routes, ``log`` keeps the cache's requests in the order the runtime made them: each
prefetch's predicted experts and each wait's needed experts, per layer. Replayed by
``tools/sim/prefetch_sim.replay_log``, it gives the simulator the runtime's exact issue order, so the
two can be compared count for count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Step:
    first_seq: int
    batch: int
    length: int
    past: int
    routes: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch * length, k) ids


@dataclass(frozen=True)
class Request:
    kind: str                 # "prefetch", "wait", or "reuse" (the reuse estimates a wait read)
    layer: int
    experts: tuple[int, ...]  # predicted (prefetch) or needed (wait) expert ids; reuse: runtime/predict/reuse.encode'd


@dataclass
class RoutingTrace:
    steps: list[Step] = field(default_factory=list)
    sequences: int = 0
    log: list[Request] = field(default_factory=list)

    def request(self, kind: str, layer: int, experts: list[int]) -> None:
        self.log.append(Request(kind, layer, tuple(experts)))

    def begin(self, batch: int, length: int, past: int) -> None:
        if past == 0 or not self.steps:
            self.sequences += batch
        self.steps.append(Step(self.sequences - batch, batch, length, past))

    def add(self, layer: int, top_k_index: torch.Tensor) -> None:
        if self.steps:
            self.steps[-1].routes[layer] = top_k_index.detach().to("cpu", copy=True)

    def records(self) -> list[dict[str, object]]:
        """Every (seq, token, layer) record, ordered by them, as the simulator reads them."""
        out = []
        for step in self.steps:
            for layer, ids in step.routes.items():
                rows = ids.reshape(step.batch, step.length, -1).tolist()
                for b, row in enumerate(rows):
                    for i, experts in enumerate(row):
                        out.append({"seq": step.first_seq + b, "token": step.past + i, "layer": layer,
                                    "experts": experts})
        out.sort(key=lambda r: (r["seq"], r["token"], r["layer"]))
        return out

    def write_jsonl(self, path: str | Path) -> Path:
        """Writes the records atomically (a partial file never appears under ``path``)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records()))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
