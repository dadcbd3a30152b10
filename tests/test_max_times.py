"""fold_candidates' shortcuts (the tiered bound, columns gathered into rows) change no float of the result."""

from __future__ import annotations

import numpy as np
import pytest

from pfp_onnx.sensitivity import max_times
from pfp_onnx.sensitivity.max_times import MaxTimesScorer
from pfp_onnx.sensitivity.scorers import ConvScorer

ON = dict(TIER_MIN_CANDIDATES=0, COMPACT_MIN_FILTERS=0, COMPACT_MIN_CANDIDATES=0)
OFF = dict(TIER_MIN_CANDIDATES=10**9, COMPACT_MIN_FILTERS=10**9, COMPACT_MIN_CANDIDATES=10**9)


def _set(monkeypatch, settings):
    for name, value in settings.items():
        monkeypatch.setattr(max_times, name, value)


def _awkward(rng, shape, zeros=0.3):
    """Nonnegative float32 values with exact zeros, repeats (ties) and a few huge ones."""
    values = rng.exponential(size=shape).astype(np.float32)
    values[rng.random(shape) < zeros] = 0
    values[rng.random(shape) < 0.05] = 1.5
    values[rng.random(shape) < 0.01] = 3e37
    return values


@pytest.mark.parametrize("columns", [3, 6, 40])
def test_tiers_are_the_largest_values_and_the_largest_of_the_rest(columns):
    rng = np.random.default_rng(1)
    values = _awkward(rng, (500, columns))
    tier_columns, largest = max_times._tiers(values)
    ordered = -np.sort(-values, axis=1)
    np.testing.assert_array_equal(largest, ordered[:, :max_times.TIERS + 1])
    rows = np.arange(len(values))[:, None]
    np.testing.assert_array_equal(values[rows, tier_columns], largest[:, :max_times.TIERS])
    assert np.all(tier_columns[:, 0] != tier_columns[:, 1])  # ties still name distinct filters


def test_tiered_bound_is_never_below_the_exact_max_and_exact_at_a_tier():
    rng = np.random.default_rng(2)
    filters, rows, positions = 12, 30, 50
    weight = rng.standard_normal((filters, rows, 1)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.2] = 0
    scorer = MaxTimesScorer(weight)
    inverse = _awkward(rng, (positions, 2 * filters))
    row, position = (a.ravel() for a in np.meshgrid(np.arange(rows), np.arange(positions)))
    bound = scorer._tiered_bound(inverse, scorer._row_tiers, max_times._tiers(inverse), row, position)
    products = scorer._magnitudes(row) * inverse[position]
    exact = products.max(axis=1)
    assert np.all(bound >= exact)
    # Where a row's largest weight meets its position's largest 1/z, nothing is loose.
    at_tier = products.argmax(axis=1) == scorer._stacked[row].argmax(axis=1)
    at_tier &= products.argmax(axis=1) == inverse[position].argmax(axis=1)
    assert at_tier.any()
    np.testing.assert_array_equal(bound[at_tier], exact[at_tier])


@pytest.mark.parametrize("by_row", [False, True])
@pytest.mark.parametrize("filters", [3, 8, 64])
def test_fold_candidates_with_and_without_shortcuts_agree_bit_for_bit(monkeypatch, by_row, filters):
    """Random candidates over a few positions, with sensitivities already running (so the tiered bound drops
    some), zero and huge factors, one or several threads and steps."""
    rng = np.random.default_rng(3 + filters)
    rows, positions = 45, 70
    weight = rng.standard_normal((filters, rows, 1)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.1] = 0
    inverse = _awkward(rng, (2 * filters, positions))
    count = 3000
    row = rng.integers(0, rows, count)
    position = rng.integers(0, positions // 3, count)  # a third of the positions: worth gathering
    value = _awkward(rng, count, zeros=0.0)
    value[value > 1e30] = 2.0  # an inf product times a zero value would be NaN on either path
    table = np.ascontiguousarray(inverse.T) if by_row else inverse

    def fold(settings, threads):
        _set(monkeypatch, {**settings, "MAX_THREADS": threads, "VERIFY_BYTES": 8 * filters * 7,
                           "TIER_STEP": 500})
        scorer = MaxTimesScorer(weight)
        half = count // 2
        scorer.fold_candidates(table, row[:half], position[:half], value[:half], by_row=by_row, loose=True)
        scorer.fold_candidates(table, row[half:], position[half:], value[half:], by_row=by_row, loose=True)
        return scorer.sensitivity

    tiered = []
    original = max_times.MaxTimesScorer._tiered_bound
    monkeypatch.setattr(max_times.MaxTimesScorer, "_tiered_bound",
                        lambda self, *args: tiered.append(1) or original(self, *args))
    expected = fold(OFF, 1)
    assert not tiered
    for threads in (1, 3):
        np.testing.assert_array_equal(fold(ON, threads), expected)
    assert bool(tiered) == (filters > max_times.TIERS)
    assert expected.max() > 0


@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 0, 0, 0]])
def test_conv_scorer_scores_the_same_with_and_without_shortcuts(monkeypatch, pads):
    """Streamed ReLU-like batches through both screens (unfolded and, given the parts, the input grid)."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((24, 6, 3, 3)).astype(np.float32)
    batches = [np.maximum(rng.standard_normal((3, 6, 10, 10)), 0.5).astype(np.float32) - 0.5 for _ in range(4)]
    by_kc = np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(24, -1)

    def parts(points):
        padded = np.pad(points, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
        size = padded.shape[2] - 2
        patches = np.stack([padded[:, :, i:i + size, j:j + size] for i in range(3) for j in range(3)], axis=1)
        flat = patches.transpose(1, 2, 0, 3, 4).reshape(9 * 6, -1)  # [(k, c), N·P]
        return tuple((np.maximum(sign * by_kc, 0) @ flat).reshape(24, len(points), size, size)
                     .transpose(1, 0, 2, 3) for sign in (1, -1))

    def run(settings, with_parts):
        _set(monkeypatch, settings)
        scorer = ConvScorer(weight, strides=[1, 1], pads=pads, dilations=[1, 1])
        for batch in batches:
            scorer.update(batch, parts(batch) if with_parts else None)
        return scorer.sensitivity

    for with_parts in (False, True):
        expected = run(OFF, with_parts)
        assert expected.min() > 0
        np.testing.assert_array_equal(run(ON, with_parts), expected)


@pytest.mark.parametrize("stacked_whole", [True, False], ids=["stacked whole", "rows in blocks"])
@pytest.mark.parametrize("screen_fraction", [0.0, 1 / 8])
def test_compiled_tiles_change_no_float(monkeypatch, stacked_whole, screen_fraction):
    """The compiled tiles (pfp_onnx.sensitivity.max_tiles) over partial tiles, chunks of tiles on threads and blocks of
    rows: the same floats as every product in numpy, with zeros, ties and overflowing values."""
    from pfp_onnx.sensitivity import max_tiles

    rng = np.random.default_rng(11)
    weight = rng.standard_normal((20, 6, 3, 3)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.2] = 0
    batches = [_awkward(rng, (2, 6, 7, 7)) for _ in range(3)]

    def run(**settings):
        _set(monkeypatch, {"SCREEN_MAX_FRACTION": screen_fraction, **settings})
        scorer = ConvScorer(weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
        for batch in batches:
            scorer.update(batch)
        return scorer.sensitivity

    every_product = run(BOUND_MIN_FILTERS=10**9, TILE_MIN_PRODUCTS=10**18)
    monkeypatch.setattr(max_tiles, "TILE", 5)  # 98 positions a batch: 19 full tiles and one of 3
    blocks = {} if stacked_whole else dict(STACKED_CACHE_BYTES=0, MAX_TIMES_BYTES=8 * 20 * 7)  # rows by 7
    tiles = run(TILE_MIN_PRODUCTS=0, **blocks)
    assert every_product.min() > 0
    np.testing.assert_array_equal(tiles.view(np.uint32), every_product.view(np.uint32))


def test_compiled_tiles_skip_rows_that_cannot_raise_the_running_max():
    """A row whose every screen bound is at most its channel's running max leaves it as it is, and a row with a
    product above it raises it to that product exactly."""
    from pfp_onnx.sensitivity.max_tiles import fold_tiles

    stacked = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)  # rows (channels) × stacked filters
    inverse = np.array([[0.5, 0.25, 1.0], [1.0, 0.5, 0.125]], dtype=np.float32)  # [2F, P]
    flat = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    running = np.array([10.0, 0.0], dtype=np.float32)
    fold_tiles(stacked, inverse, flat, stacked.max(axis=1), inverse.max(axis=0), running, 0, 0, 3)
    assert running.tolist() == [10.0, 2.0]  # channel 1: max of 2 · [1, 0.5, 0.125] · 1
    running = np.zeros(2, dtype=np.float32)
    fold_tiles(stacked, inverse, flat, stacked.max(axis=1), inverse.max(axis=0), running, 0, 1, 3)
    assert running.tolist() == [3.0, 1.0]  # positions 1 and 2 only


def test_compiled_kernels_work_without_a_cache(monkeypatch):
    """Where numba can write no cache it refuses cache=True (RuntimeError): the kernel is then compiled without."""
    import numba

    from pfp_onnx.sensitivity import max_tiles

    njit, options = numba.njit, []

    def refusing(*arguments, **keywords):
        options.append(keywords)
        if keywords.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*arguments, **keywords)

    monkeypatch.setattr(numba, "njit", refusing)
    square = max_tiles.compiled(nogil=True)(lambda x: x * x)
    assert square(3.0) == 9.0
    assert options == [{"cache": True, "nogil": True}, {"nogil": True}]
