"""Options shared by the compile pipeline's passes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompileOptions:
    #: Prefetch for MoE layer j+lookahead is issued while MoE layer j computes.
    lookahead: int = 1
    #: The routing predictor: "cross_layer_gate" (layer j+d's router on layer j's hidden state)
    #: or "none" (no prefetch; every expert loads on demand at its wait).
    predictor: str = "cross_layer_gate"

    def __post_init__(self) -> None:
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.predictor not in ("cross_layer_gate", "none"):
            raise ValueError(f"unknown predictor {self.predictor!r}; choose 'cross_layer_gate' or 'none'")
