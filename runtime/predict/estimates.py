"""What the predictors hand the cache policy, in the forms it reads: the routing prior's tables
and the reuse estimates' integers. Pure Python (no torch), so that the policy registry, which
``expertflow-compile`` reads for its ``--policy`` choices, loads without torch."""

from __future__ import annotations

from dataclasses import dataclass

#: Past the reuse predictor's last horizon, a use is CAP tokens away.
CAP = 64
#: Expected distances reach the host as integers in the wait's read: this many per token.
SCALE = 256


@dataclass(frozen=True)
class RoutingPrior:
    """Per (layer, expert): P(chosen by the next step | chosen by this one), and P(chosen by the
    next step | not chosen by this one); fitted on calibration traces (``tools/make/train_predictor``)."""

    reuse: dict[tuple[int, int], float]
    fresh: dict[tuple[int, int], float]


def decode(values: list[int]) -> list[float]:
    """The reuse estimates (tokens to each expert's next use) from the integers a wait read."""
    return [min(max(v / SCALE, 1.0), float(CAP)) for v in values]
