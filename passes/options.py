"""Options shared by the compile pipeline's passes and the runtime that runs their graph."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Routing predictors the passes can insert (``insert_prefetch``).
PREDICTORS = ("cross_layer_gate", "routing_path", "transition", "frequency", "none")
#: What a prediction does (``insert_prefetch``): copy the experts early, or only hint the policy.
PREFETCH = ("copy", "hint")


@dataclass(frozen=True)
class CompileOptions:
    #: Cross-layer gate: the prefetch for MoE layer j+lookahead is issued while MoE layer j computes.
    lookahead: int = 1
    #: The routing predictor: "cross_layer_gate" (layer j+d's router on layer j's hidden state),
    #: "routing_path" (a network trained at compile time on calibration traces that predicts every
    #: layer's experts from the token embedding, so all prefetches start before the first layer),
    #: "transition" (layer j's likeliest experts given layer j-1's true route, from calibration
    #: counts), "frequency" (each layer's most popular experts: the static baseline), or "none"
    #: (no prefetch; every expert loads on demand at its wait).
    predictor: str = "cross_layer_gate"
    #: Which resident expert the runtime's cache evicts (not a graph rewrite: the runtime reads it).
    #: Its names are the runtime's registry (``runtime.policy.POLICIES``), which passes cannot
    #: import: whoever makes options from input checks it there (``known_policy``).
    policy: str = "layer_cycle"
    #: What a prediction does: "copy" (start copying the predicted experts into slots early) or
    #: "hint" (only tell the cache policy what the layer will need, so it keeps those and evicts
    #: others; nothing moves before the wait). Where copies are the bottleneck and the cache is
    #: small, a wrong copy costs more than a late one saves (docs/benchmarks.md).
    prefetch: str = "copy"
    #: Token-permutation nodes around every expert compute (``insert_permute``): a layer computed in
    #: waves then runs each wave on one contiguous range of rows.
    permute: bool = True

    def __post_init__(self) -> None:
        if type(self.lookahead) is not int or self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 (an integer), got {self.lookahead!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; choose one of {', '.join(PREDICTORS)}")
        if type(self.permute) is not bool:
            raise ValueError(f"permute must be true or false, got {self.permute!r}")
        if self.prefetch not in PREFETCH:
            raise ValueError(f"unknown prefetch mode {self.prefetch!r}; choose one of {', '.join(PREFETCH)}")

    def known_policy(self, policies: Collection[str]) -> "CompileOptions":
        """These options, if ``policies`` (the runtime's registry) names their cache policy; else
        ValueError. Checked after the other fields, as when construction checked it."""
        if self.policy not in policies:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(policies)}")
        return self

    def to_json(self) -> dict[str, Any]:
        """What a manifest stores as ``options``: every field, so a new option is never dropped."""
        return asdict(self)

    @classmethod
    def from_json(cls, stored: dict[str, Any], **overrides: Any) -> "CompileOptions":
        """The options a manifest stored (a field an older manifest lacks takes its default), with
        the ``overrides`` that are not None applied; ValueError names anything else."""
        unknown = sorted(set(stored) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown compile option {', '.join(map(str, unknown))}")
        return cls(**{**stored, **{k: v for k, v in overrides.items() if v is not None}})
