"""The ε bisection: budgets are met tightly, n(ε) behaves monotonically, bad budgets raise BudgetError."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pfp_onnx.allocate import (
    GroupDemand,
    LayerSize,
    allocate,
    allocate_uniform,
    channels_for_epsilon,
    expected_distinct,
    kept_weights,
    rounded,
    sample_size,
)
from pfp_onnx.errors import BudgetError, PfpError


def _group(name: str, channels: int, patches: int, kernel: int, seed: int) -> GroupDemand:
    rng = np.random.default_rng(seed)
    # Heavy-tailed sensitivities, as real ones are: a few channels matter much more than the rest.
    return GroupDemand(name, rng.lognormal(0.0, 1.5, channels), patches, kernel)


def chain():
    """conv 3→8 (3x3), conv 8→16 (3x3), flatten 16x4x4 → dense 10."""
    groups = [_group("a", 8, 32 * 32, 9, 1), _group("b", 16, 1, 16, 2)]
    layers = [
        LayerSize("conv1", (), 3, 9, (("a", 8),), 8),
        LayerSize("conv2", (("a", 8),), 8, 9, (("b", 16),), 16),
        LayerSize("fc", (("b", 16),), 16, 16, (), 10),
    ]
    return groups, layers


def shared():
    """Group "a" feeds two branches (conv2 and conv3) whose outputs are groups of their own."""
    groups = [_group("a", 24, 16 * 16, 9, 3), _group("b", 32, 8 * 8, 9, 4), _group("c", 12, 8 * 8, 1, 5)]
    layers = [
        LayerSize("stem", (), 3, 9, (("a", 24),), 24),
        LayerSize("branch_b", (("a", 24),), 24, 9, (("b", 32),), 32),
        LayerSize("branch_c", (("a", 24),), 24, 1, (("c", 12),), 12),
        LayerSize("head_b", (("b", 32),), 32, 1, (), 10),
        LayerSize("head_c", (("c", 12),), 12, 1, (), 10),
    ]
    return groups, layers


def with_frozen():
    """A chain with a layer whose input and output widths are both fixed."""
    groups, layers = chain()
    return groups, layers + [LayerSize("frozen", (), 16, 9, (), 16)]


CONFIGURATIONS = {"chain": chain, "shared": shared, "frozen": with_frozen}
BUDGETS = [0.08, 0.15, 0.3, 0.5, 0.7, 0.9, 0.99]


def _one_more_channel_costs(groups, layers, kept) -> int:
    widths = {group.name: group.sensitivity.size for group in groups}
    base = kept_weights(layers, kept)
    return sum(kept_weights(layers, {**kept, name: kept[name] + 1}) - base
               for name in kept if kept[name] < widths[name])


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_met_and_tight(configuration, budget):
    groups, layers = CONFIGURATIONS[configuration]()
    everything = allocate(groups, layers, 1.0)
    if everything.weights_floor > budget * everything.weights_total:
        with pytest.raises(BudgetError, match="smallest feasible budget"):
            allocate(groups, layers, budget)
        return
    allocation = allocate(groups, layers, budget)
    assert allocation.weights_total == kept_weights(layers, {})
    assert allocation.weights_kept == kept_weights(layers, allocation.kept)
    assert allocation.weights_kept <= budget * allocation.weights_total
    # Within one channel per group of the budget ...
    slack = budget * allocation.weights_total - allocation.weights_kept
    assert slack <= _one_more_channel_costs(groups, layers, allocation.kept)
    # ... and on the step: any smaller ε keeps too much.
    smaller = {g.name: channels_for_epsilon(g, allocation.epsilon * (1 - 1e-9)) for g in groups}
    assert kept_weights(layers, smaller) > budget * allocation.weights_total
    for group in groups:
        assert 1 <= allocation.kept[group.name] <= group.sensitivity.size
        assert allocation.kept[group.name] == channels_for_epsilon(group, allocation.epsilon)


def test_kept_weights_counts_each_layer():
    _, layers = chain()
    assert kept_weights(layers, {}) == 3 * 9 * 8 + 8 * 9 * 16 + 16 * 16 * 10
    assert kept_weights(layers, {"a": 2, "b": 5}) == 3 * 9 * 2 + 2 * 9 * 5 + 5 * 16 * 10


def test_smaller_budget_keeps_no_more():
    groups, layers = shared()
    kept = [allocate(groups, layers, budget).kept for budget in BUDGETS]
    for looser, tighter in zip(kept[1:], kept[:-1]):
        assert all(tighter[name] <= looser[name] for name in looser)


def test_epsilon_monotone():
    groups, layers = shared()
    epsilons = np.logspace(-4, 8, 400)
    counts = np.array([[channels_for_epsilon(g, eps) for g in groups] for eps in epsilons])
    assert np.all(np.diff(counts, axis=0) <= 0)
    sizes = [kept_weights(layers, dict(zip([g.name for g in groups], row.tolist()))) for row in counts]
    assert np.all(np.diff(sizes) <= 0)
    assert counts[0].tolist() == [g.sensitivity.size for g in groups] and counts[-1].tolist() == [1, 1, 1]


def test_more_sensitivity_mass_keeps_more():
    light = _group("light", 64, 100, 9, 7)
    heavy = GroupDemand("heavy", light.sensitivity * 10, light.patches, light.kernel)
    epsilons = np.logspace(-2, 4, 200)
    light_counts = np.array([channels_for_epsilon(light, eps) for eps in epsilons])
    heavy_counts = np.array([channels_for_epsilon(heavy, eps) for eps in epsilons])
    assert np.all(heavy_counts >= light_counts) and np.any(heavy_counts > light_counts)


def test_budget_one_keeps_everything():
    groups, layers = chain()
    groups[0] = GroupDemand("a", np.array([1.0, 1e-30, 2.0, 0.0, 3.0, 1.0, 1.0, 1.0]), 1024, 9)
    allocation = allocate(groups, layers, 1.0)
    assert allocation.kept == {"a": 8, "b": 16}
    assert allocation.weights_kept == allocation.weights_total


@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.3, float("nan"), float("inf")])
def test_budget_out_of_range(budget):
    groups, layers = chain()
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        allocate(groups, layers, budget)


def test_budget_below_floor():
    groups, layers = with_frozen()
    allocation = allocate(groups, layers, 1.0)
    floor = allocation.weights_floor / allocation.weights_total
    with pytest.raises(BudgetError) as raised:
        allocate(groups, layers, floor * 0.9)
    message = str(raised.value)
    assert isinstance(raised.value, PfpError)
    assert f"{math.ceil(floor * 1000) / 1000:.3f}" in message
    assert "smallest feasible budget" in message and "frozen layers alone keep 2304" in message
    # The floor itself is feasible and keeps one channel per group.
    at_floor = allocate(groups, layers, floor)
    assert at_floor.kept == {"a": 1, "b": 1} and at_floor.weights_kept == allocation.weights_floor


@pytest.mark.parametrize("allocator", [allocate, allocate_uniform])
@pytest.mark.parametrize("budget", BUDGETS)
def test_auto_rounding_rounds_wide_groups_only(allocator, budget):
    """round_to="auto": groups of 16 or more channels keep a multiple of 8 (or all of them); narrower ones
    keep any count, as with round_to=1; the budget holds either way. Below the budget rounded widths can
    meet, "auto" gives way to 1 rather than fail where 1 succeeds."""
    groups, layers = shared()  # widths 24, 32 (rounded) and 12 (not)
    allocation = allocator(groups, layers, budget, round_to="auto")
    floor = allocator(groups, layers, 1.0, round_to="auto").weights_floor / allocation.weights_total
    if budget < floor:
        assert allocation == allocator(groups, layers, budget, round_to=1) and allocation.round_to == 1
        return
    assert allocation.round_to == "auto"
    assert allocation.kept["a"] % 8 == 0 and allocation.kept["b"] % 8 == 0, allocation.kept
    assert allocation.weights_kept <= budget * allocation.weights_total
    unrounded = allocator(groups, layers, budget, round_to=1)
    assert allocation.kept["a"] >= 8 and allocation.kept["b"] >= 8
    if budget < 0.99:
        assert any(unrounded.kept[name] % 8 for name in ("a", "b", "c")), unrounded.kept
    narrow = [allocator(groups, layers, b, round_to="auto").kept["c"] for b in BUDGETS[2:]]
    assert any(count % 8 for count in narrow), narrow


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
@pytest.mark.parametrize("budget", BUDGETS)
def test_rounded_allocation_spends_the_budget(configuration, budget):
    """Rounded steps are coarse, so one ε leaves budget unused; groups then step up in the order PFP's
    bound asks for them. The result: still within the budget, no group below what ε asks of it, and no
    group can take one more rounded step without breaking the budget."""
    groups, layers = CONFIGURATIONS[configuration]()
    widths = {group.name: group.sensitivity.size for group in groups}
    try:
        allocation = allocate(groups, layers, budget, round_to=8)
    except BudgetError:
        return
    target = budget * allocation.weights_total
    assert allocation.weights_kept == kept_weights(layers, allocation.kept) <= target
    for group in groups:
        kept = allocation.kept[group.name]
        assert kept == widths[group.name] or kept % 8 == 0
        assert kept >= rounded(channels_for_epsilon(group, allocation.epsilon), widths[group.name], 8)
        if kept < rounded(channels_for_epsilon(group, 1e-12), widths[group.name], 8):
            stepped = {**allocation.kept, group.name: rounded(kept + 1, widths[group.name], 8)}
            assert kept_weights(layers, stepped) > target, (group.name, allocation.kept)
    plain = allocate(groups, layers, budget, round_to=1)
    assert plain.kept == {g.name: channels_for_epsilon(g, plain.epsilon) for g in groups}  # 1: no top-up


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("round_to", [8, "auto"])
def test_rounded_uniform_allocation_spends_the_budget(configuration, budget, round_to):
    """One keep fraction on 8-channel steps can leave a wide gap to the budget (a 16-wide group keeps 8 or
    16), which made the baselines look worse than they are next to PFP's topped-up allocation. Groups
    step up, lowest fraction first: within the budget, on the steps, and no further step fits. round_to=1
    takes no top-up: its counts are still one fraction's."""
    groups, layers = CONFIGURATIONS[configuration]()
    widths = {group.name: group.sensitivity.size for group in groups}
    try:
        allocation = allocate_uniform(groups, layers, budget, round_to=round_to)
    except BudgetError:
        return
    if allocation.round_to == 1:
        return  # auto gave way to exact counts (covered by test_auto_rounding_rounds_wide_groups_only)
    target = budget * allocation.weights_total
    assert allocation.weights_kept == kept_weights(layers, allocation.kept) <= target
    steps = {name: 8 if round_to == 8 or widths[name] >= 16 else 1 for name in widths}
    for name, kept in allocation.kept.items():
        assert kept == widths[name] or kept % steps[name] == 0
        if kept < widths[name]:
            stepped = {**allocation.kept, name: rounded(kept + 1, widths[name], round_to)}
            assert kept_weights(layers, stepped) > target, (name, allocation.kept)
    plain = allocate_uniform(groups, layers, budget, round_to=1)
    fractions = [(plain.kept[name], widths[name]) for name in widths]  # one f: kept = ceil(f·w − 1e-9)
    assert all((kept_a - 1) / width_a <= kept_b / width_b + 1e-9
               for kept_a, width_a in fractions for kept_b, width_b in fractions)


@pytest.mark.parametrize("allocator", [allocate, allocate_uniform])
def test_positions_weight_each_layer_for_a_mac_budget(allocator):
    """With positions (output pixels) a budget counts multiply-accumulates: the convs on the large image
    cost 1024× per weight, the allocation changes, and the MACs meet the budget."""
    groups, layers = chain()
    big = [LayerSize(layer.name, layer.in_groups, layer.in_units, layer.in_block, layer.out_groups,
                     layer.out_units, positions={"conv1": 1024, "conv2": 1024, "fc": 1}[layer.name])
           for layer in layers]
    assert kept_weights(big, {}) == 3 * 9 * 8 * 1024 + 8 * 9 * 16 * 1024 + 16 * 16 * 10
    by_weights, by_macs = allocator(groups, layers, 0.4), allocator(groups, big, 0.4, unit="MACs")
    assert by_macs.weights_kept == kept_weights(big, by_macs.kept) <= 0.4 * kept_weights(big, {})
    assert by_macs.weights_total == kept_weights(big, {})
    assert by_macs.kept != by_weights.kept
    with pytest.raises(BudgetError, match="prunable-layer MACs"):
        allocator(groups, big, 1e-4, unit="MACs")


def test_zero_sensitivity_group_keeps_one_channel():
    groups, layers = chain()
    groups[0] = GroupDemand("a", np.zeros(8), 1024, 9)
    assert channels_for_epsilon(groups[0], 1e-9) == 1
    allocation = allocate(groups, layers, 0.5)
    assert allocation.kept["a"] == 1
    assert allocation.weights_kept <= 0.5 * allocation.weights_total


def test_expected_distinct_matches_direct_formula():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(30))
    for samples in [1, 2, 7, 50, 400]:
        direct = np.sum(1 - (1 - probabilities) ** samples)
        assert expected_distinct(probabilities, samples) == pytest.approx(direct, rel=1e-12)
    assert expected_distinct(probabilities, 1) == pytest.approx(1.0)
    # Where the direct formula loses everything to rounding, the stable one still gives ≈ m·p.
    assert expected_distinct(np.array([1e-20, 1 - 1e-20]), 1e10) == pytest.approx(1 + 1e-10, rel=1e-12)
    assert expected_distinct(np.array([0.0, 1.0]), 5) == 1.0


def test_sample_size_and_channels_formula():
    assert sample_size(1.0, 1.0) == 24  # ceil(3 · 8 · 1 / 1)
    assert sample_size(0.5, 2.0) == math.ceil(3 * 7 * 2 / 0.25)
    assert sample_size(1e150, 1e6) == 1
    group = GroupDemand("g", np.array([4.0, 2.0, 1.0, 1.0]), 9, 1)
    alpha = 2 * 3.0 * math.log(8 * 10 * 1 / 1e-16)
    samples = math.ceil(3 * (6 + 2 * 50.0) * alpha * 8.0 / 50.0**2)
    expected = sum(1 - (1 - p) ** samples for p in [0.5, 0.25, 0.125, 0.125])
    assert channels_for_epsilon(group, 50.0) == min(4, max(1, math.ceil(expected)))



@pytest.mark.parametrize("kernel, patches, delta, c_constant", [(9, 63, 1e-16, 3.0), (9, 1, 1e-6, 1.0),
                                                                (25, 195, 1e-16, 3.0)])
def test_channels_formula_carries_every_term_of_the_log(kernel, patches, delta, c_constant):
    """α = 2C·ln(8(P+1)K/δ) with a real kernel: n(ε) follows the formula written out here, and at some ε
    differs from what K = 1 (or the default δ and C) would give, so each term is seen."""
    sensitivity = np.random.default_rng(11).lognormal(0.0, 1.0, 40)
    group = GroupDemand("g", sensitivity, patches, kernel)
    probabilities = sensitivity / sensitivity.sum()

    def by_hand(epsilon: float, kernel: int, delta: float, c_constant: float) -> int:
        alpha = 2 * c_constant * math.log(8 * (patches + 1) * kernel / delta)
        samples = math.ceil(3 * (6 + 2 * epsilon) * alpha * sensitivity.sum() / epsilon**2)
        distinct = np.sum(1 - (1 - probabilities) ** samples)
        return min(40, max(1, math.ceil(distinct - 1e-9)))

    epsilons = np.logspace(0, 3, 60)
    counts = [channels_for_epsilon(group, eps, delta=delta, c_constant=c_constant) for eps in epsilons]
    assert counts == [by_hand(eps, kernel, delta, c_constant) for eps in epsilons]
    assert counts != [by_hand(eps, 1, delta, c_constant) for eps in epsilons]
    if (delta, c_constant) != (1e-16, 3.0):
        assert counts != [channels_for_epsilon(group, eps) for eps in epsilons]


def test_top_up_goes_to_the_step_the_bound_asks_for_first():
    """Three groups of 16 channels (round_to 8) with the same flat sensitivities, but masses 4 : 2 : 1, so at
    every ε a heavier group asks for at least as many channels and its next step comes at a larger ε:
    a, then b, then c. Each is produced by its own layer (a's channels cost 3 weights each, b's and c's 1)
    beside a frozen layer of 100 weights. Total 48 + 16 + 16 + 100 = 180; the budget keeps 154.

    At the solved ε every group keeps 8 (24 + 8 + 8 + 100 = 140; a's step to 16 would cost 164). The 14
    weights left fit one 8-channel step of b or c, not a's 24 and not both: PFP's order gives it to b."""
    flat = np.ones(16)
    groups = [GroupDemand("a", 4 * flat, 100, 9), GroupDemand("b", 2 * flat, 100, 9), GroupDemand("c", flat, 100, 9)]
    layers = [LayerSize("make_a", (), 1, 3, (("a", 16),), 16), LayerSize("make_b", (), 1, 1, (("b", 16),), 16),
              LayerSize("make_c", (), 1, 1, (("c", 16),), 16), LayerSize("frozen", (), 100, 1, (), 1)]
    allocation = allocate(groups, layers, 154 / 180, round_to=8)
    assert {name: rounded(channels_for_epsilon(group, allocation.epsilon), 16, 8)
            for name, group in zip("abc", groups)} == {"a": 8, "b": 8, "c": 8}
    assert allocation.kept == {"a": 8, "b": 16, "c": 8}
    assert allocation.weights_kept == 148


def test_uniform_top_up_goes_to_the_lowest_fraction_after_its_step():
    """Groups a (16 channels), b (24) and c (40, 4 weights per channel) beside 40 frozen weights, round_to
    8: the fraction 1/5 keeps 8 of each (88 of 240 weights); any larger one takes c to 16 (+32), over the
    budget of 100. Of the 12 weights left c's next step does not fit; b's to 16 leaves b at 2/3 of its
    width, a's to 16 leaves a at all of it, so b takes the step and then nothing more fits."""
    groups = [GroupDemand("a", np.ones(16), 1, 1), GroupDemand("b", np.ones(24), 1, 1),
              GroupDemand("c", np.ones(40), 1, 1)]
    layers = [LayerSize("make_a", (), 1, 1, (("a", 16),), 16), LayerSize("make_b", (), 1, 1, (("b", 24),), 24),
              LayerSize("make_c", (), 1, 4, (("c", 40),), 40), LayerSize("frozen", (), 40, 1, (), 1)]
    allocation = allocate_uniform(groups, layers, 100 / 240, round_to=8)
    assert allocation.kept == {"a": 8, "b": 16, "c": 8} and allocation.weights_kept == 96


# ---- random chains (hypothesis) -----------------------------------------------------------------------

@settings(max_examples=150, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(2, 80), min_size=1, max_size=6), frozen=st.integers(0, 2000),
       budget=st.floats(0.02, 0.99), seed=st.integers(0, 2**16), round_to=st.sampled_from(["auto", 8, 16, 1]))
def test_random_chains_meet_the_budget_on_rounded_steps(widths, frozen, budget, seed, round_to):
    """A chain of convs whose outputs are the groups (plus an optional frozen layer): the allocation meets
    the budget or says it cannot, rounds as asked (auto: multiples of 8 from 16 channels, or exact counts when
    the budget is below what rounding can meet), keeps each group at least what ε asks, and — rounded — leaves
    no step that would still fit."""
    rng = np.random.default_rng(seed)
    groups = [GroupDemand(f"g{i}", rng.lognormal(0, 1.5, width), int(rng.integers(1, 500)), 9)
              for i, width in enumerate(widths)]
    layers, previous = [], ((), 3)
    for group, width in zip(groups, widths):
        layers.append(LayerSize(group.name, previous[0], previous[1], 9, ((group.name, width),), width))
        previous = (((group.name, width),), width)
    layers.append(LayerSize("head", previous[0], previous[1], 1, (), 10))
    if frozen:
        layers.append(LayerSize("frozen", (), frozen, 1, (), 1))
    try:
        allocation = allocate(groups, layers, budget, round_to=round_to)
    except BudgetError:
        floor_rounding = 1 if round_to == "auto" else round_to  # auto gives way to exact counts first
        assert allocate(groups, layers, 1.0, round_to=floor_rounding).weights_floor > budget * kept_weights(layers, {})
        return
    target = budget * allocation.weights_total
    assert allocation.weights_kept == kept_weights(layers, allocation.kept) <= target
    used = allocation.round_to
    assert used == round_to or (round_to == "auto" and used == 1)
    for group, width in zip(groups, widths):
        kept = allocation.kept[group.name]
        step = used if used != "auto" else (8 if width >= 16 else 1)
        assert kept == width or kept % step == 0, (kept, width, used)
        assert kept >= rounded(channels_for_epsilon(group, allocation.epsilon), width, used)
        if used != 1 and kept < rounded(channels_for_epsilon(group, 1e-12), width, used):
            assert kept_weights(layers, {**allocation.kept, group.name: rounded(kept + 1, width, used)}) > target
