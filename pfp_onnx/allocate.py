"""How many channels each group keeps: one error bound ε for the whole model, solved for the budget (docs/method.md §2–3).

Every group's keep count n(ε) follows from its sensitivities through PFP's sample complexity: a group whose
sensitivity mass is spread over many channels, or whose consumer sees many patches, needs more channels for
the same ε. Using one ε everywhere is the allocation that minimises the largest per-layer error bound, and
since size(ε) — the prunable-layer weights kept — falls as ε grows, ε is found by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pfp_onnx.errors import BudgetError
from pfp_onnx.options import ROUND_TO_AUTO

__all__ = [
    "Allocation",
    "GroupDemand",
    "LayerSize",
    "allocate",
    "allocate_uniform",
    "channels_for_epsilon",
    "expected_distinct",
    "kept_weights",
    "multiple",
    "rounded",
    "sample_size",
    "smallest_budget",
]

# Bisection bracket for ε. At the top every group keeps one channel (m(ε) = 1); the reference starts at
# 1e-300, but m(ε) ~ 1/ε² overflows float64 below about 1e-150, and 1e-12 already keeps every channel with
# any noticeable sensitivity.
EPSILON_MIN = 1e-12
EPSILON_MAX = 1e150
# Float noise in Σ 1−(1−p)^m must not push ceil() up by a whole channel.
DISTINCT_TOLERANCE = 1e-9
# Halvings of log ε when locating a group's next rounded step: only their order matters.
STEP_SEARCH_ITERATIONS = 80
# round_to="auto": onnxruntime's NCHWc CPU kernels and GPU tensor cores run widths that are multiples of 8 at
# full speed, odd widths on slower paths (a pruned ResNet-18 ran at 0.78× the original's speed unrounded,
# 1.22× rounded; benchmarks/results/baseline.txt). Groups narrower than 16 keep any count: rounding would
# leave them almost no choice, and they cost little.
AUTO_MULTIPLE = 8
AUTO_MIN_WIDTH = 16


@dataclass(frozen=True)
class GroupDemand:
    """What a prunable channel group needs to be allocated: its sensitivities and its hardest consumer.

    patches (P) and kernel (K, elements per channel) are those of the consuming layer with the largest
    ln(8(P+1)K/δ), the term of PFP's bound that grows with the consumer's size.
    """

    name: str
    sensitivity: np.ndarray
    patches: int
    kernel: int


@dataclass(frozen=True)
class LayerSize:
    """A Conv/Gemm/MatMul weight seen as in_units · in_block · out_units elements, each used `positions`
    times per point when the budget counts multiply-accumulates (its output positions), once when it counts
    weights.

    in_groups/out_groups list the prunable groups among its input/output units as (group, channels);
    the remaining units of a side keep their full width (frozen or not prunable). After a Concat several
    groups share one side.
    """

    name: str
    in_groups: tuple[tuple[str, int], ...]
    in_units: int
    in_block: int
    out_groups: tuple[tuple[str, int], ...]
    out_units: int
    positions: int = 1


@dataclass(frozen=True)
class Allocation:
    """The solved error bound, the channels each group keeps, and the weights (or MACs, when the layers
    carry positions; or the cost function's unit, milliseconds for latency) that leaves."""

    epsilon: float
    kept: dict[str, int]
    weights_total: float
    weights_kept: float
    weights_floor: float
    round_to: int | str = 1  # the rounding used: "auto" becomes 1 below the budget it can meet


def sample_size(epsilon: float, sensitivity_sum_tilde: float) -> int:
    """m(ε) = ceil(3(6+2ε)·S̃/ε²), at least 1: draws with replacement that give error ≤ ε (docs/method.md §2)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    # (6+2ε)/ε² written as (6/ε + 2)/ε so that a tiny ε does not underflow ε² to zero first.
    samples = 3.0 * (6.0 / epsilon + 2.0) / epsilon * float(sensitivity_sum_tilde)
    if not math.isfinite(samples):
        raise ValueError(f"sample size overflows for epsilon={epsilon} and S̃={sensitivity_sum_tilde}")
    return max(1, math.ceil(samples))


def expected_distinct(probabilities: np.ndarray, samples: int | float) -> float:
    """Σ_c 1−(1−p_c)^m: the expected number of distinct channels among m draws with replacement from p.

    Computed as −expm1(m·log1p(−p)), which stays accurate when p is tiny and m is huge.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    m = float(samples)
    positive = p > 0
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-p[positive])  # −inf where p == 1: that channel is always drawn
    return float(np.sum(-np.expm1(m * log_miss)))


def channels_for_epsilon(group: GroupDemand, epsilon: float, *, delta: float = 1e-16,
                         c_constant: float = 3.0) -> int:
    """n(ε) = min(C, max(1, ceil(expected distinct channels among m(ε) draws))) (docs/method.md §2).

    A group with no sensitivity at all cannot influence any output, so it keeps one channel.
    """
    sensitivity = np.asarray(group.sensitivity, dtype=np.float64)
    channels = int(sensitivity.size)
    total = float(sensitivity.sum())
    if total <= 0:
        return 1
    alpha = 2.0 * c_constant * math.log(8.0 * (group.patches + 1) * group.kernel / delta)
    samples = sample_size(epsilon, alpha * total)
    distinct = expected_distinct(sensitivity / total, samples)
    return min(channels, max(1, math.ceil(distinct - DISTINCT_TOLERANCE)))


def kept_weights(layers: Sequence[LayerSize], kept: Mapping[str, int]) -> int:
    """Σ_layers kept_in · in_block · kept_out · positions; a group missing from `kept` is full width."""
    total = 0
    for layer in layers:
        in_units = layer.in_units - sum(width - kept.get(name, width) for name, width in layer.in_groups)
        out_units = layer.out_units - sum(width - kept.get(name, width) for name, width in layer.out_groups)
        total += in_units * layer.in_block * out_units * layer.positions
    return total


Cost = Callable[[Mapping[str, int]], float]  # kept channels per group → what the budget counts


def multiple(width: int, round_to: int | str, auto_step: int = AUTO_MULTIPLE) -> int:
    """The step a group of `width` channels keeps: round_to itself, or under "auto" `auto_step` (8, or the
    staircase a latency table measured) for groups of at least twice that many channels and 1 for narrower
    ones."""
    if round_to == ROUND_TO_AUTO:
        return auto_step if width >= max(AUTO_MIN_WIDTH, 2 * auto_step) else 1
    return int(round_to)


def rounded(count: int, width: int, round_to: int | str, auto_step: int = AUTO_MULTIPLE) -> int:
    """Round a keep count up to the group's multiple (fast kernel widths), at most the width."""
    step = multiple(width, round_to, auto_step)
    return min(width, -(-count // step) * step)


def allocate(groups: Sequence[GroupDemand], layers: Sequence[LayerSize], budget: float, *,
             delta: float = 1e-16, c_constant: float = 3.0, round_to: int | str = 1,
             unit: str = "weights", cost: Cost | None = None, auto_step: int = AUTO_MULTIPLE) -> Allocation:
    """The PFP allocation that keeps as many weights as possible while keeping ≤ budget · all of them.

    budget is the fraction of the prunable layers' weights (Σ in_units·in_block·out_units, times positions
    for a MAC budget; `unit` names them in errors) to keep. The
    result is the smallest ε in [1e-12, 1e150] with size(ε) ≤ budget · total, found by bisection on log ε down
    to adjacent floats, so it sits on the step of n(ε) where one more channel anywhere would break the
    budget. With round_to 1 no top-up follows: the gap to the budget is whatever PFP's steps leave. Rounded
    steps (8 channels) leave more, so then groups take further steps in the order PFP's bound asks for them
    while the budget allows (_step_up_in_bound_order); ε stays the worst per-group bound. budget == 1 keeps
    every channel (ε reported as 1e-12). `cost` replaces the layers' weight count as what the budget counts
    (a latency table's prediction); it must not fall when a group keeps more channels.

    Raises BudgetError when budget is outside (0, 1] or below the floor (every group keeping one channel).
    """
    demands = _check_inputs(groups, layers)
    size = _size_function(layers, cost)
    budget, full, weights_total, weights_floor, round_to = _check_budget(demands, layers, budget, round_to, unit,
                                                                         size, auto_step)
    target = budget * weights_total
    if budget >= 1:
        return Allocation(EPSILON_MIN, full, weights_total, weights_total, weights_floor, round_to)

    def count_at(name: str, epsilon: float) -> int:
        return rounded(channels_for_epsilon(demands[name], epsilon, delta=delta, c_constant=c_constant),
                       full[name], round_to, auto_step)

    def kept_at(epsilon: float) -> dict[str, int]:
        return {name: count_at(name, epsilon) for name in demands}

    kept_low = kept_at(EPSILON_MIN)
    if size(kept_low) <= target:
        return Allocation(EPSILON_MIN, kept_low, weights_total, size(kept_low), weights_floor, round_to)
    # size(low) > target >= size(high), down to adjacent floats.
    _, high = _log_bisect(EPSILON_MIN, EPSILON_MAX, lambda epsilon: size(kept_at(epsilon)) <= target,
                          iterations=2000)
    kept_high = kept_at(high)
    if size(kept_high) > target:
        # Only reachable with astronomically large sensitivities; the floor itself meets the budget.
        kept_high = {name: rounded(1, full[name], round_to, auto_step) for name in demands}
    if any(multiple(width, round_to, auto_step) > 1 for width in full.values()):
        kept_high = _step_up_in_bound_order(kept_high, high, count_at, lambda kept: size(kept) <= target)
    return Allocation(high, kept_high, weights_total, size(kept_high), weights_floor, round_to)


def _size_function(layers: Sequence[LayerSize], cost: Cost | None) -> Cost:
    """What the budget counts, for a choice of kept channels: `cost`, else the layers' weights (or MACs)."""
    return cost if cost is not None else (lambda kept: kept_weights(layers, kept))


def _step_up_in_bound_order(kept: dict[str, int], epsilon: float, count_at, fits) -> dict[str, int]:
    """Spend what one ε leaves of the budget: each group's next rounded step comes at some ε' < ε (where
    count_at(group, ε') first exceeds its count); the step with the largest ε' — the channels PFP's bound
    asks for first — is taken if the budget still fits, else that group stops where it is. Steps only add
    channels, so no group's error bound rises above ε."""

    def next_step(name: str, count: int) -> tuple[float, int] | None:
        if count_at(name, EPSILON_MIN) <= count:
            return None
        # count_at(low) > count ≥ count_at(ε): steps only add channels
        low, _ = _log_bisect(EPSILON_MIN, epsilon, lambda at: count_at(name, at) <= count,
                             iterations=STEP_SEARCH_ITERATIONS)
        return low, count_at(name, low)

    return _step_up(kept, next_step, fits)


def _log_bisect(low: float, high: float, is_high, *, iterations: int) -> tuple[float, float]:
    """Halve [low, high] in log scale, keeping is_high false at low and true at high (a monotone predicate),
    until the two are adjacent floats or `iterations` run out."""
    for _ in range(iterations):
        middle = math.sqrt(low) * math.sqrt(high)
        if not low < middle < high:
            break
        if is_high(middle):
            high = middle
        else:
            low = middle
    return low, high


def _step_up(kept: dict[str, int], next_step, fits) -> dict[str, int]:
    """The greedy top-up of both allocations: next_step(group, count) gives (priority, the group's next
    count) or None; the step of highest priority is taken if fits(kept) still holds with it, else its
    group stops where it is."""
    kept = dict(kept)
    steps = {name: step for name in kept if (step := next_step(name, kept[name])) is not None}
    while steps:
        name = max(steps, key=lambda candidate: steps[candidate][0])
        _, count = steps.pop(name)
        if fits({**kept, name: count}):
            kept[name] = count
            if (step := next_step(name, count)) is not None:
                steps[name] = step
    return kept


def allocate_uniform(groups: Sequence[GroupDemand], layers: Sequence[LayerSize], budget: float, *,
                     round_to: int | str = 1, unit: str = "weights", cost: Cost | None = None,
                     auto_step: int = AUTO_MULTIPLE) -> Allocation:
    """The baseline allocation: the same keep fraction in every prunable group (sensitivities unused).

    The largest fraction whose rounded-up channel counts meet the budget is found by bisection; epsilon
    is NaN because no error bound is involved. Rounded steps (8 channels) can leave one fraction far under
    the budget (a 16-wide group keeps 8 or 16), so then groups step up, the one whose fraction stays lowest
    after its step first, while the budget allows: as uniform as the steps permit, and the same size as
    PFP's allocation to compare against. round_to 1 takes no top-up, as in allocate().
    """
    demands = _check_inputs(groups, layers)
    size = _size_function(layers, cost)
    budget, full, weights_total, weights_floor, round_to = _check_budget(demands, layers, budget, round_to, unit,
                                                                         size, auto_step)

    def kept_at(fraction: float) -> dict[str, int]:
        return {name: rounded(max(1, min(width, math.ceil(fraction * width - 1e-9))), width, round_to, auto_step)
                for name, width in full.items()}

    low, high = 0.0, 1.0
    if size(kept_at(high)) > budget * weights_total:
        for _ in range(60):
            middle = (low + high) / 2
            if size(kept_at(middle)) <= budget * weights_total:
                low = middle
            else:
                high = middle
        high = low
    kept = kept_at(high)
    if any(multiple(width, round_to, auto_step) > 1 for width in full.values()):

        def next_step(name: str, count: int) -> tuple[float, int] | None:
            step = rounded(count + 1, full[name], round_to, auto_step)
            return None if count >= full[name] else (-step / full[name], step)  # lowest fraction after it first

        kept = _step_up(kept, next_step, lambda candidate: size(candidate) <= budget * weights_total)
    return Allocation(math.nan, kept, weights_total, size(kept), weights_floor, round_to)


def _check_budget(demands: Mapping[str, GroupDemand], layers: Sequence[LayerSize],
                  budget: float, round_to: int | str = 1, unit: str = "weights", size: Cost | None = None,
                  auto_step: int = AUTO_MULTIPLE) -> tuple[float, dict[str, int], float, float, int | str]:
    """The budget as a float, full widths, total and floor weights, and the rounding to use ("auto" gives way
    to 1 when its floor is above the budget); BudgetError when the budget cannot be met."""
    given = budget
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        budget = math.nan
    if not 0 < budget <= 1:
        raise BudgetError(
            f"The budget must be a fraction in (0, 1] of the prunable layers' {unit} to keep "
            f"(e.g. 0.5 keeps half of them), but {given!r} was given; pass a value such as --budget 0.5."
        )
    full = {name: int(np.asarray(group.sensitivity).size) for name, group in demands.items()}
    size = size or _size_function(layers, None)
    weights_total = size(full)
    weights_floor = size({name: rounded(1, width, round_to, auto_step) for name, width in full.items()})
    if round_to == ROUND_TO_AUTO and weights_floor > budget * weights_total:
        round_to = 1
        weights_floor = size({name: 1 for name in full})
    if weights_floor > budget * weights_total:
        smallest = smallest_budget(weights_floor, weights_total)
        if unit == "latency":
            raise BudgetError(
                f"A latency budget of {budget:g} (a {1 / budget:.2f}× speed-up) cannot be met: with every prunable "
                f"channel group down to one channel the model is predicted to keep {smallest:.3f} of its latency "
                f"(a {1 / smallest:.2f}× speed-up at most), the rest being spent in layers and operators pruning "
                "cannot shrink; ask for less (--budget of at least "
                f"{smallest:.3f}, or --target-speedup below {1 / smallest:.2f}) or unfreeze more channel groups "
                "(`pfp-onnx analyze` shows why each group is frozen).")
        frozen = kept_weights([layer for layer in layers if not layer.in_groups and not layer.out_groups], {})
        raise BudgetError(
            f"A budget of {budget:g} cannot be met: the smallest feasible budget for this model is {smallest:.3f} "
            f"(frozen layers alone keep {frozen} of {weights_total} prunable-layer {unit}, "
            f"{frozen / weights_total:.1%}, and every prunable channel group keeps at least "
            f"{'one channel' if round_to == 1 else f'{round_to} channels (--round-to)'}, "
            f"{weights_floor} {unit} in all); raise --budget to at least "
            f"{smallest:.3f}{'' if round_to == 1 else ', pass --round-to 1'} or unfreeze more channel groups "
            f"(`pfp-onnx analyze` shows why each group is frozen)."
        )
    return budget, full, weights_total, weights_floor, round_to


def smallest_budget(weights_floor: float, weights_total: float) -> float:
    """The floor as a budget to print: rounded up to 0.001, since a budget printed below it would still fail."""
    return math.ceil(weights_floor / weights_total * 1000 - 1e-9) / 1000


def _check_inputs(groups: Sequence[GroupDemand], layers: Sequence[LayerSize]) -> dict[str, GroupDemand]:
    """Inconsistent groups and layers are a bug in the caller, not a user error."""
    demands: dict[str, GroupDemand] = {}
    for group in groups:
        if group.name in demands:
            raise ValueError(f"channel group {group.name!r} is listed twice")
        sensitivity = np.asarray(group.sensitivity)
        if sensitivity.ndim != 1 or sensitivity.size == 0:
            raise ValueError(f"group {group.name!r}: sensitivity must be a non-empty vector, got {sensitivity.shape}")
        if not np.all(np.isfinite(sensitivity)) or np.any(sensitivity < 0):
            raise ValueError(f"group {group.name!r}: sensitivities must be finite and non-negative")
        if group.patches < 0 or group.kernel < 1:
            raise ValueError(f"group {group.name!r}: need patches >= 0 and kernel >= 1")
        demands[group.name] = group
    for layer in layers:
        for side, units in ((layer.in_groups, layer.in_units), (layer.out_groups, layer.out_units)):
            for name, width in side:
                if name not in demands:
                    raise ValueError(f"layer {layer.name!r} refers to unknown channel group {name!r}")
                if np.asarray(demands[name].sensitivity).size != width:
                    raise ValueError(f"layer {layer.name!r} has {width} units of group {name!r}, "
                                     f"which has {np.asarray(demands[name].sensitivity).size} channels")
            if sum(width for _, width in side) > units:
                raise ValueError(f"layer {layer.name!r} lists more group channels than it has units")
    if kept_weights(layers, {}) == 0:
        raise ValueError("there are no prunable-layer weights to allocate")
    return demands
