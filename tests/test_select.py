"""Channel selection: top-k, importance sampling that is reproducible and unbiased, and the hybrid."""

import numpy as np
import pytest

from pfp_onnx import select
from pfp_onnx.allocate import expected_distinct
from pfp_onnx.errors import OptionError
from pfp_onnx.select import Selection, sample_count_for, select_channels


def _sensitivity(channels: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 1.0, channels)


def test_deterministic_picks_top_k_with_stable_ties():
    sensitivity = np.array([0.1, 0.5, 0.5, 0.2, 0.9])
    selection = select_channels(sensitivity, 3, "deterministic", np.random.default_rng(0))
    assert selection.kept.tolist() == [1, 2, 4] and selection.kept.dtype == np.int64
    assert selection.scale.tolist() == [1.0, 1.0, 1.0] and selection.scale.dtype == np.float32
    assert select_channels(sensitivity, 2, "deterministic", np.random.default_rng(0)).kept.tolist() == [1, 4]


@pytest.mark.parametrize("mode", ["deterministic", "randomized", "hybrid"])
def test_edge_counts(mode):
    rng = np.random.default_rng(0)
    sensitivity = _sensitivity(6)
    everything = select_channels(sensitivity, 9, mode, rng)
    assert everything.kept.tolist() == list(range(6)) and np.all(everything.scale == 1)
    assert len(select_channels(sensitivity, 0, mode, rng).kept) >= 1
    zero = select_channels(np.zeros(5), 2, mode, rng)
    assert zero.kept.tolist() == [0, 1] and np.all(zero.scale == 1)
    # Sampling could never reach 2 distinct channels when only 2 matter: keep both, unscaled.
    few = select_channels(np.array([0.0, 3.0, 0.0, 1.0]), 2, mode, rng)
    assert few.kept.tolist() == [1, 3] and np.all(few.scale == 1)


def test_unknown_mode():
    with pytest.raises(OptionError, match="deterministic, randomized, hybrid"):
        select_channels(_sensitivity(), 3, "greedy", np.random.default_rng(0))


def test_sample_count_is_smallest_reaching_count():
    probabilities = _sensitivity(30) / _sensitivity(30).sum()
    for count in [1, 5, 12, 29]:
        samples = sample_count_for(probabilities, count)
        assert expected_distinct(probabilities, samples) >= count
        assert samples == 1 or expected_distinct(probabilities, samples - 1) < count
    # Where the expected count reaches `count` exactly (1 − 0.5^m rounds to 1 from m = 54 on), the
    # smallest such m, not the first that passes it.
    flat = np.array([0.5, 0.5])
    assert sample_count_for(flat, 2) == next(m for m in range(1, 200) if expected_distinct(flat, m) >= 2)


def test_randomized_reproducible_per_seed():
    sensitivity = _sensitivity(50)
    first = select_channels(sensitivity, 20, "randomized", np.random.default_rng(7))
    again = select_channels(sensitivity, 20, "randomized", np.random.default_rng(7))
    assert np.array_equal(first.kept, again.kept) and np.array_equal(first.scale, again.scale)
    others = [select_channels(sensitivity, 20, "randomized", np.random.default_rng(seed)) for seed in range(8, 12)]
    assert any(not np.array_equal(first.kept, other.kept) for other in others)
    assert np.all(np.diff(first.kept) > 0)


def _draw_many(sensitivity, count, mode, draws=10000):
    rng = np.random.default_rng(123)
    kept_counts = np.empty(draws)
    estimates = np.empty(draws)
    weight = np.zeros((draws, sensitivity.size))
    for index in range(draws):
        selection = select_channels(sensitivity, count, mode, rng)
        kept_counts[index] = selection.kept.size
        weight[index, selection.kept] = selection.scale
        estimates[index] = float(np.sum(selection.scale * sensitivity[selection.kept]))
    return kept_counts, estimates, weight


@pytest.mark.parametrize("mode", ["randomized", "hybrid"])
def test_sampling_is_unbiased_and_near_target(mode):
    sensitivity = _sensitivity(20) ** 3  # skewed enough that the hybrid has heavy channels
    count = 8
    kept_counts, estimates, weight = _draw_many(sensitivity, count, mode)
    assert abs(kept_counts.mean() - count) < 1.0
    assert kept_counts.max() <= count  # the allocation is a hard limit, draw by draw
    draws = estimates.size
    # Since p ∝ s, every single draw estimates Σs exactly (up to float32 scales); per channel it is random.
    assert estimates.mean() == pytest.approx(sensitivity.sum(), rel=1e-5)
    per_channel_error = np.abs(weight.mean(axis=0) - 1)
    assert np.all(per_channel_error < 5 * weight.std(axis=0) / np.sqrt(draws) + 1e-6)


def test_hybrid_always_keeps_heavy_channels():
    sensitivity = np.concatenate([[10.0, 8.0], np.ones(20)])
    count = 6
    probabilities = sensitivity / sensitivity.sum()
    heavy = np.flatnonzero(probabilities >= 1 / sample_count_for(probabilities, count))
    assert heavy.tolist() == [0, 1]
    rng = np.random.default_rng(0)
    for _ in range(300):
        selection = select_channels(sensitivity, count, "hybrid", rng)
        assert isinstance(selection, Selection)
        assert selection.kept[:2].tolist() == [0, 1] and selection.scale[:2].tolist() == [1.0, 1.0]
    # Plain sampling sometimes misses the second-heaviest channel or rescales it.
    randomized = [select_channels(sensitivity, count, "randomized", rng) for _ in range(300)]
    assert any(not np.all(sel.scale[np.isin(sel.kept, heavy)] == 1) for sel in randomized)


@pytest.mark.parametrize("mode", ["randomized", "hybrid"])
@pytest.mark.parametrize("draw_at_once", [False, True], ids=["one_by_one", "at_once"])
def test_every_draw_keeps_at_most_its_count(monkeypatch, mode, draw_at_once):
    """The budget is a hard limit: no draw keeps more channels than allocated, on flat and skewed
    sensitivities, whether the draws are made one by one or (past SEQUENTIAL_LIMIT) all at once."""
    if draw_at_once:
        monkeypatch.setattr(select, "SEQUENTIAL_LIMIT", 0)
    rng = np.random.default_rng(5)
    for seed, power in [(0, 1), (1, 3), (2, 6)]:
        sensitivity = _sensitivity(24, seed) ** power
        for count in [1, 2, 5, 11, 23]:
            kept = [select_channels(sensitivity, count, mode, rng).kept.size for _ in range(200)]
            assert max(kept) <= count, (seed, power, count)
            assert max(kept) == count  # and the limit is reached, not undershot by construction


def test_scale_uses_the_draws_actually_made(monkeypatch):
    """Stopping early leaves m' < m draws: each kept channel's scale is count_c / (m' · p_c)."""
    sensitivity = _sensitivity(12, 3)
    probabilities = sensitivity / sensitivity.sum()
    draws = np.zeros(12, np.int64)
    draws[[2, 7, 9]] = [3, 1, 2]
    monkeypatch.setattr(select, "_draw_at_most", lambda p, samples, count, rng: (draws.copy(), 6))
    selection = select_channels(sensitivity, 3, "randomized", np.random.default_rng(0))
    assert selection.kept.tolist() == [2, 7, 9]
    np.testing.assert_allclose(selection.scale, np.array([3, 1, 2]) / (6 * probabilities[[2, 7, 9]]), rtol=1e-6)


def test_hybrid_keeps_a_channel_whose_share_is_exactly_one_over_m():
    """The heavy set is p_c ≥ 1/m (docs/method.md §4), ties included: s = [2, 2, 2, 3] for 2 channels needs m = 3
    draws, and the last channel's share 3/9 is exactly 1/3, so it is kept every time with scale 1."""
    sensitivity = np.array([2.0, 2.0, 2.0, 3.0])
    assert sample_count_for(sensitivity / sensitivity.sum(), 2) == 3
    rng = np.random.default_rng(0)
    for _ in range(50):
        selection = select_channels(sensitivity, 2, "hybrid", rng)
        assert selection.kept[-1] == 3 and selection.scale[-1] == 1.0
