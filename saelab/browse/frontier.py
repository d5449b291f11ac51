"""The sparsity–fidelity frontier of a run's SAEs: L0 against FVU and against CE loss recovered, the plot
people compare SAEs on. Only held-out numbers (`eval.json`, written by `saelab eval`) are used: training
numbers are measured on other tokens and would put an unevaluated SAE somewhere it does not belong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from saelab.browse.runs import SAEInfo
from saelab.sae.registry import registered

UNKNOWN_ARCHITECTURE = "unknown"


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated SAE on the frontier plot."""

    label: str
    architecture: str
    l0: float
    fvu: float | None
    ce_loss_recovered: float | None

    @property
    def is_transcoder(self) -> bool:
        """Transcoders reconstruct another hook's output, so their FVU and CE numbers measure a different task."""
        variant = registered(self.architecture)
        return variant is not None and variant.transcoder


@dataclass
class Frontier:
    """The points of each architecture sorted by L0 (the order a line joins them in), in the order the
    architectures first appear; and the SAEs left out because `saelab eval` has not measured them."""

    by_architecture: dict[str, list[FrontierPoint]] = field(default_factory=dict)
    not_evaluated: list[str] = field(default_factory=list)

    @property
    def has_transcoders(self) -> bool:
        return any(points[0].is_transcoder for points in self.by_architecture.values())


def sae_frontier(saes: Iterable[SAEInfo]) -> Frontier:
    """Group `saes` by their architecture, as frontier points from their `eval.json`; an SAE without one (or
    whose eval.json has no positive L0, which a log-scale axis cannot place) goes to `not_evaluated`."""
    frontier = Frontier()
    for sae in saes:
        point = frontier_point(sae)
        if point is None:
            frontier.not_evaluated.append(sae.label)
        else:
            frontier.by_architecture.setdefault(point.architecture, []).append(point)
    for points in frontier.by_architecture.values():
        points.sort(key=lambda point: point.l0)
    return frontier


def frontier_point(sae: SAEInfo) -> FrontierPoint | None:
    """`sae` as a point from its eval.json, or None when it has no held-out L0."""
    evaluation = sae.evaluation
    l0 = _number(evaluation.get("l0"))
    if l0 is None or l0 <= 0:
        return None
    architecture = evaluation.get("architecture") or sae.architecture or UNKNOWN_ARCHITECTURE
    return FrontierPoint(
        sae.label,
        str(architecture),
        l0,
        _number(evaluation.get("fvu")),
        _number(evaluation.get("ce_loss_recovered")),
    )


def _number(value: object) -> float | None:
    """`value` as a float; None when it is missing (CE loss recovered is null where zero-ablating the hook
    leaves the loss unchanged), not a number or not finite (a hand-edited eval.json)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
