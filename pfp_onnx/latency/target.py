"""Land the measured speed-up on the one asked for.

The table predicts the latency of an allocation, but layers timed alone are not the model: onnxruntime fuses
and reorders across them, and a shared machine drifts. So the budget the allocation is given is corrected
from measurements of the pruned structure itself (rewritten without recovery, which changes weights, not
shapes): first in proportion to the miss, then by the secant through the two closest trials, until the
measured speed-up is within TOLERANCE of the target or TRIES structures were timed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SpeedTrial", "calibrate"]

TOLERANCE = 0.04  # relative miss of the speed-up accepted
TRIES = 4  # pruned structures timed at most
SMALLEST_MOVE = 0.002  # a corrected budget this close to one tried measures nothing new


@dataclass(frozen=True)
class SpeedTrial:
    budget: float  # the share of the predicted latency the allocation was given
    predicted: float  # the speed-up the table predicts for that allocation
    measured: float  # the speed-up measured against the original, side by side
    original_ms: float
    pruned_ms: float
    cost: str = "latency"  # what the allocation counted: the latency table's prediction, or macs
    epsilon: float | None = None  # PFP's error bound of the allocation (None for the uniform baseline)


def calibrate(target: float, trial: Callable[[float], SpeedTrial], *, floor: float,
              tolerance: float = TOLERANCE, tries: int = TRIES) -> tuple[SpeedTrial, tuple[SpeedTrial, ...]]:
    """The trial whose measured speed-up is closest to `target` (> 1), and every trial in order.

    trial(budget) allocates, rewrites and times at one budget in [floor, 1]; the first budget is 1/target,
    what the table alone asks for."""
    budget = min(1.0, max(floor, 1.0 / target))
    trials: list[SpeedTrial] = []
    for _ in range(tries):
        trials.append(trial(budget))
        best = min(trials, key=lambda item: abs(math.log(item.measured / target)))
        if abs(best.measured / target - 1) <= tolerance:
            break
        following = min(1.0, max(floor, _next_budget(trials, target)))
        if any(abs(following - item.budget) < SMALLEST_MOVE for item in trials):
            break
        budget = following
    return min(trials, key=lambda item: abs(math.log(item.measured / target))), tuple(trials)


def _next_budget(trials: list[SpeedTrial], target: float) -> float:
    """In log budget against log speed-up: the secant through the two trials closest to the target with
    different speed-ups, else a step in proportion to the miss (speed-up ∝ 1/budget)."""
    ranked = sorted(trials, key=lambda item: abs(math.log(item.measured / target)))
    last = ranked[0]
    for other in ranked[1:]:
        rise = math.log(other.measured) - math.log(last.measured)
        run = math.log(other.budget) - math.log(last.budget)
        if abs(rise) > 1e-3 and run != 0 and rise / run < 0:  # speed-up falls as the budget grows
            return math.exp(math.log(last.budget) + (math.log(target) - math.log(last.measured)) * run / rise)
    return last.budget * last.measured / target
