"""PFP sensitivities against a slow, literal transcription of docs/method.md §1 (explicit loops everywhere)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pfp_onnx.sensitivity import max_times
from pfp_onnx.sensitivity.grid_screen import inverse_at
from pfp_onnx.sensitivity.scorers import conv_sensitivity, conv_transpose_sensitivity, dense_sensitivity

EPS = np.finfo(np.float32).eps


@pytest.fixture(autouse=True, params=["cached", "blockwise"])
def weight_magnitudes(request, monkeypatch):
    """Every test runs with |W±| kept whole (ordinary layers) and cut from W block by block (huge ones)."""
    if request.param == "blockwise":
        monkeypatch.setattr(max_times, "STACKED_CACHE_BYTES", 0)
    return request.param


@pytest.fixture(autouse=True, params=["exact", "bounds", "screen"])
def scoring_path(request, monkeypatch):
    """Every test runs on each kernel alone: all products, bound-then-verify (forced on for small layers),
    and screen-then-verify (kept however many candidates it leaves)."""
    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 1.0 if request.param == "screen" else 0.0)
    monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", 0 if request.param == "bounds" else 10**9)
    return request.param


def reference_conv(activation, weight, strides, pads, dilations):
    """s[C] by loops over samples, sign of a, sign of W, f, c, k and p; z by loops too (float64)."""
    activation = np.asarray(activation, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    filters, channels, *kernel_shape = weight.shape
    rank = len(kernel_shape)
    spatial = activation.shape[2:]
    out_shape = [
        (spatial[d] + pads[d] + pads[d + rank] - dilations[d] * (kernel_shape[d] - 1) - 1) // strides[d] + 1
        for d in range(rank)
    ]
    kernel_offsets = list(itertools.product(*[range(n) for n in kernel_shape]))
    positions = list(itertools.product(*[range(n) for n in out_shape]))

    def patch_value(point, c, k, p):
        index = []
        for d in range(rank):
            i = p[d] * strides[d] + k[d] * dilations[d] - pads[d]
            if not 0 <= i < spatial[d]:
                return 0.0  # zero padding
            index.append(i)
        return point[(c, *index)]

    sensitivity = np.zeros(channels)
    for sample in activation:
        for point in (np.maximum(sample, 0), np.maximum(-sample, 0)):
            for signed in (np.maximum(weight, 0), np.minimum(weight, 0)):
                for f in range(filters):
                    for p in positions:
                        z = 0.0
                        for c in range(channels):
                            for k in kernel_offsets:
                                z += signed[(f, c, *k)] * patch_value(point, c, k, p)
                        if abs(z) <= EPS:
                            continue  # denominator counts as +infinity: ratio 0
                        for c in range(channels):
                            for k in kernel_offsets:
                                g = signed[(f, c, *k)] * patch_value(point, c, k, p) / z
                                assert g >= 0
                                sensitivity[c] = max(sensitivity[c], g)
    return sensitivity


def reference_dense(activation, weight):
    """Dense as a 1x1 conv whose patches are the rows of activation [..., C]."""
    rows = np.asarray(activation).reshape(-1, weight.shape[1])
    return reference_conv(rows[:, :, None], weight[:, :, None], [1], [0, 0], [1])


def assert_matches(actual, expected):
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def random_activation(rng, shape):
    """Mixed signs with exact zeros. Negatives come in blocks (every other sample, half of its axis 1),
    so that a⁻ is a dense data point: scattered negatives would make each a⁻ entry the lone term of its
    neuron, pinning every sensitivity at its maximum of 1 and hiding errors."""
    activation = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    activation[rng.random(shape) < 0.1] = 0.0
    activation[1::2, : shape[1] // 2] *= -1
    return activation


def assert_informative(expected):
    """Most reference values must be strictly between 0 and 1, or the comparison proves little."""
    assert ((expected > 0) & (expected < 0.99)).mean() >= 0.5, expected


# Enough channels that most neurons sum many products (see random_activation); all seed 0.
CONV_CASES = {
    "2d stride 2 pad 1 dilation 2 non-square kernel": dict(
        activation_shape=(2, 8, 7, 6), weight_shape=(4, 8, 2, 3), strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2]
    ),
    "2d asymmetric pads, strides and dilations": dict(
        activation_shape=(2, 6, 5, 8), weight_shape=(3, 6, 3, 2), strides=[1, 2], pads=[0, 2, 1, 0], dilations=[1, 3]
    ),
    "2d plain 3x3": dict(
        activation_shape=(2, 6, 5, 5), weight_shape=(3, 6, 3, 3), strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1]
    ),
    "1d stride 2 pad dilation": dict(
        activation_shape=(3, 8, 9), weight_shape=(4, 8, 3), strides=[2], pads=[2, 1], dilations=[2]
    ),
    "1d kernel 1": dict(activation_shape=(2, 12, 5), weight_shape=(3, 12, 1), strides=[1], pads=[0, 0], dilations=[1]),
    "3d": dict(
        activation_shape=(2, 6, 3, 4, 4), weight_shape=(2, 6, 2, 2, 3), strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 1],
        dilations=[1, 1, 2],
    ),
}


@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv_matches_reference(case):
    rng = np.random.default_rng(0)
    activation = random_activation(rng, case["activation_shape"])
    weight = rng.standard_normal(case["weight_shape"]).astype(np.float32)
    kwargs = dict(strides=case["strides"], pads=case["pads"], dilations=case["dilations"])
    expected = reference_conv(activation, weight, **kwargs)
    assert_informative(expected)
    assert_matches(conv_sensitivity(activation, weight, **kwargs), expected)


def test_conv_nonnegative_activation_matches_reference():
    rng = np.random.default_rng(1)
    activation = np.maximum(random_activation(rng, (2, 6, 6, 6)), 0)
    weight = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    expected = reference_conv(activation, weight, **kwargs)
    assert_informative(expected)
    assert_matches(conv_sensitivity(activation, weight, **kwargs), expected)


def test_conv_zero_denominators_and_all_negative_filters():
    """An all-zero input region, an all-zero filter and all-negative filters: z = 0 entries are skipped."""
    rng = np.random.default_rng(2)
    activation = random_activation(rng, (2, 6, 6, 5))
    activation[:, :, :3, :] = 0.0  # every channel zero in the top half: z = 0 at those positions
    activation[1] = np.abs(activation[1])  # second sample has no negatives
    weight = rng.standard_normal((4, 6, 2, 2)).astype(np.float32)
    weight[0] = 0.0  # z⁺ = z⁻ = 0 everywhere for this filter
    weight[1] = -np.abs(weight[1])  # all-negative: z⁺ = 0
    weight[2] = -np.abs(weight[2])
    kwargs = dict(strides=[1, 1], pads=[0, 0, 1, 1], dilations=[1, 1])
    expected = reference_conv(activation, weight, **kwargs)
    assert (expected > 0).all()
    assert_matches(conv_sensitivity(activation, weight, **kwargs), expected)


def test_conv_all_zero_activation_scores_zero():
    weight = np.random.default_rng(3).standard_normal((2, 3, 3, 3)).astype(np.float32)
    result = conv_sensitivity(np.zeros((2, 3, 4, 4)), weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    assert_matches(result, np.zeros(3))


def test_conv_dead_channel_scores_zero():
    rng = np.random.default_rng(4)
    activation = random_activation(rng, (2, 3, 5, 5))
    activation[:, 1] = 0.0
    weight = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    result = conv_sensitivity(activation, weight, **kwargs)
    assert result[1] == 0.0
    assert_matches(result, reference_conv(activation, weight, **kwargs))


def test_conv_single_contributor_scores_one():
    """A lone nonzero product is the whole of its neuron's z, so its relative contribution is exactly 1."""
    activation = np.zeros((1, 2, 3, 3), dtype=np.float32)
    activation[0, 0, 1, 1] = 2.5
    weight = np.random.default_rng(5).standard_normal((3, 2, 1, 1)).astype(np.float32)
    result = conv_sensitivity(activation, weight, strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1])
    assert_matches(result, np.array([1.0, 0.0]))


@pytest.mark.parametrize("activation_shape", [(5, 12), (2, 3, 12)], ids=["2d", "3d"])
def test_dense_matches_reference(activation_shape):
    rng = np.random.default_rng(6)
    activation = random_activation(rng, activation_shape)
    weight = rng.standard_normal((3, 12)).astype(np.float32)
    weight[1] = -np.abs(weight[1])
    expected = reference_dense(activation, weight)
    assert_informative(expected)
    assert_matches(dense_sensitivity(activation, weight), expected)


def test_dense_zero_denominators():
    rng = np.random.default_rng(7)
    activation = random_activation(rng, (4, 5))
    activation[0] = 0.0  # a row with z = 0 for every filter
    activation[1, :3] = 0.0
    weight = rng.standard_normal((3, 5)).astype(np.float32)
    weight[0] = 0.0
    weight[2] = -np.abs(weight[2])
    weight[1, 3:] = 0.0  # filter 1 sees only channels 0-2, all zero in row 1
    assert_matches(dense_sensitivity(activation, weight), reference_dense(activation, weight))


def test_conv_batches_fold_with_maximum():
    rng = np.random.default_rng(8)
    activation = random_activation(rng, (5, 6, 6, 6))
    weight = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1])
    folded = np.maximum(
        conv_sensitivity(activation[:2], weight, **kwargs), conv_sensitivity(activation[2:], weight, **kwargs)
    )
    np.testing.assert_array_equal(folded, conv_sensitivity(activation, weight, **kwargs))


def test_dense_batches_fold_with_maximum():
    """Up to the rounding of one 12-term float32 dot product (12 · 2⁻²⁴): the OpenBLAS 0.3.31 of numpy 2.4's
    wheel computes a column of W⁺ @ points (z⁺) differently in a 6-, 8- or 14-column product, an ulp apart."""
    rng = np.random.default_rng(9)
    activation = random_activation(rng, (7, 2, 12))
    weight = rng.standard_normal((5, 12)).astype(np.float32)
    folded = np.maximum(dense_sensitivity(activation[:3], weight), dense_sensitivity(activation[3:], weight))
    np.testing.assert_allclose(folded, dense_sensitivity(activation, weight), rtol=12 * 2.0 ** -24, atol=0)


def test_invariant_to_per_filter_scaling():
    rng = np.random.default_rng(10)
    activation = random_activation(rng, (2, 6, 6, 6))
    weight = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    scaled = weight.copy()
    scaled[1] *= 3
    scaled[3] *= 0.5
    kwargs = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    np.testing.assert_allclose(
        conv_sensitivity(activation, scaled, **kwargs), conv_sensitivity(activation, weight, **kwargs), rtol=1e-5
    )
    dense_activation = random_activation(rng, (6, 6))
    np.testing.assert_allclose(
        dense_sensitivity(dense_activation, scaled[:, :, 0, 0]),
        dense_sensitivity(dense_activation, weight[:, :, 0, 0]),
        rtol=1e-5,
    )


def test_chunking_does_not_change_the_result(monkeypatch):
    """Tiny chunk budgets force many point chunks and position blocks (on threads); the max must not notice."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    rng = np.random.default_rng(11)
    activation = random_activation(rng, (4, 6, 7, 7))
    weight = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    whole = conv_sensitivity(activation, weight, **kwargs)
    dense_activation = random_activation(rng, (9, 6))
    dense_whole = dense_sensitivity(dense_activation, weight[:, :, 0, 0])
    monkeypatch.setattr(sensitivity, "CHUNK_BYTES", 1)
    monkeypatch.setattr(max_times, "MAX_TIMES_BYTES", 200)
    monkeypatch.setattr(max_times, "MAX_THREADS", 4)
    np.testing.assert_array_equal(conv_sensitivity(activation, weight, **kwargs), whole)
    np.testing.assert_array_equal(dense_sensitivity(dense_activation, weight[:, :, 0, 0]), dense_whole)


@pytest.mark.parametrize("screen_fraction, bound_min_filters, tile_min_products", [
    (0.0, 10**9, 10**18), (0.0, 0, 10**18), (1.0, 10**9, 10**18), (1 / 8, 0, 10**18), (1 / 8, 10**9, 10**18),
    (0.002, 0, 10**18), (0.0, 0, 0), (0.002, 0, 0)])
def test_kernels_agree_bit_for_bit_over_streamed_batches(monkeypatch, screen_fraction, bound_min_filters,
                                                         tile_min_products):
    """Sparse ReLU-like activations fed in batches, as a capture does: whichever path each batch takes
    (a screen kept, a screen abandoned for the dense paths, every product, bounds), the running maxima
    are the same floats."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    rng = np.random.default_rng(12)
    weight = rng.standard_normal((40, 8, 3, 3)).astype(np.float32)
    batches = [np.maximum(rng.standard_normal((3, 8, 9, 9)), 0.8).astype(np.float32) - 0.8 for _ in range(4)]
    batches.append(rng.standard_normal((2, 8, 9, 9)).astype(np.float32))  # signed: a⁺ and a⁻

    def run(fraction, min_filters, tiles):
        monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", fraction)
        monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", min_filters)
        monkeypatch.setattr(max_times, "TILE_MIN_PRODUCTS", tiles)
        scorer = sensitivity.ConvScorer(weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
        for batch in batches:
            scorer.update(batch)
        return scorer.sensitivity

    result = run(screen_fraction, bound_min_filters, tile_min_products)
    assert result.min() > 0
    np.testing.assert_array_equal(result, run(0.0, 10**9, 10**18))  # every product, checked against loops above


@pytest.mark.parametrize("screen_fraction", [1.0, 0.2, 0.1])
def test_many_screen_blocks_and_waves_match_one_block(monkeypatch, screen_fraction):
    """Blocks of a few positions, screened in waves on threads, some abandoned for the dense paths and
    merged into ranges: the same floats as every product in one go."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    rng = np.random.default_rng(13)
    weight = rng.standard_normal((20, 5, 3, 3)).astype(np.float32)
    batches = [np.maximum(rng.standard_normal((2, 5, 8, 8)), 0).astype(np.float32) for _ in range(3)]

    def run():
        scorer = sensitivity.ConvScorer(weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
        for batch in batches:
            scorer.update(batch)
        return scorer.sensitivity

    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 0.0)
    monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", 10**9)
    expected = run()
    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", screen_fraction)
    monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", 0)
    monkeypatch.setattr(max_times, "MAX_TIMES_BYTES", 4 * 45 * 7)  # 7 positions of 45 rows per block
    monkeypatch.setattr(max_times, "MIN_SCREEN_BLOCK", 1)
    monkeypatch.setattr(max_times, "VERIFY_BYTES", 4 * 40 * 3)  # 3 candidates per step
    monkeypatch.setattr(max_times, "MAX_THREADS", 3)
    np.testing.assert_array_equal(run(), expected)


def test_a_wave_that_gives_up_sends_the_rest_of_the_batch_to_the_dense_path(monkeypatch):
    """When every block of a wave leaves too many products (and so finds nothing to raise the thresholds),
    the later waves are not screened at all: their positions go straight to the dense path, and the
    result is still every product's."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    rng = np.random.default_rng(14)
    weight = rng.standard_normal((20, 5, 3, 3)).astype(np.float32)
    batch = np.maximum(rng.standard_normal((2, 5, 8, 8)), 0).astype(np.float32)

    def run():
        scorer = sensitivity.ConvScorer(weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
        scorer.update(batch)
        return scorer.sensitivity

    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 0.0)
    monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", 10**9)
    expected = run()
    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 1e-9)  # any survivor abandons a block
    monkeypatch.setattr(max_times, "MAX_TIMES_BYTES", 4 * 45 * 7)  # 7 positions of 45 rows per block
    monkeypatch.setattr(max_times, "MIN_SCREEN_BLOCK", 1)
    monkeypatch.setattr(max_times, "MAX_THREADS", 2)
    screened, dense = [], []
    screen_bound, screen_and_verify = max_times._screen_bound, max_times.MaxTimesScorer._screen_and_verify

    def spied_screen_bound(flat, largest_inverse, start, stop):
        screened.append((start, stop))
        return screen_bound(flat, largest_inverse, start, stop)

    def spied_screen_and_verify(self, *arguments):
        screened.clear()  # the seed's passes before it do not count
        dense.extend(screen_and_verify(self, *arguments))
        return dense

    monkeypatch.setattr(max_times, "_screen_bound", spied_screen_bound)
    monkeypatch.setattr(max_times.MaxTimesScorer, "_screen_and_verify", spied_screen_and_verify)
    np.testing.assert_array_equal(run(), expected)
    assert screened == [(0, 7), (7, 14)]  # one wave of two blocks, of 128 positions
    assert dense == [(0, 128)]


def every_product_then_bounds(monkeypatch, rows, weight):
    """dense_sensitivity from every product, then from bound-then-verify alone (no screen, no seed), then from
    the compiled tiles alone; the last two must be the first's floats."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    results = []
    for bound_min_filters, tile_min_products in ((10**9, 10**18), (0, 10**18), (0, 0)):
        monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 0.0)
        monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", bound_min_filters)
        monkeypatch.setattr(max_times, "TILE_MIN_PRODUCTS", tile_min_products)
        results.append(sensitivity.dense_sensitivity(rows, weight))
    np.testing.assert_array_equal(results[2], results[0])
    return results


def test_bounds_evaluate_products_whose_scaled_factors_are_dropped(monkeypatch):
    """Every product of channel 0 is far below the screen's bound a · max_f |W| · max_f inv_z (its largest
    weight sits on a filter with a large z, and the filter with the tiny z barely reads it), so all its
    scaled factors fall under BOUND_SMALLEST and drop out of the p-norm: its upper bound must still admit
    the product that holds its max."""
    weight = np.array([[1.0, 0.5], [1e-3, 1e-3]], dtype=np.float32)
    rows = np.ones((1, 2), dtype=np.float32)  # z⁺ = 1.5 and 0.002: max inv_z is 500
    results = every_product_then_bounds(monkeypatch, rows, weight)
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_allclose(results[1], [1 / 1.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("tile_min_products", [10**18, 0], ids=["bounds", "tiles"])
def test_bounds_ignore_an_overflowing_screen_as_a_lower_bound(monkeypatch, tile_min_products):
    """Row 0 gives channel 0 a screen bound of inf (a huge activation times the large inv_z of filter 1,
    which does not read channel 0) and a p-norm of 0: inf · 0 must not poison channel 0's threshold, so
    that row 1, where channel 0 scores 1, is still evaluated."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    weight = np.eye(2, dtype=np.float32)
    rows = np.array([[3e38, 1e-3], [1.0, 0.0]], dtype=np.float32)
    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 0.0)  # no seed: the bounds alone decide
    monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", 0)
    monkeypatch.setattr(max_times, "TILE_MIN_PRODUCTS", tile_min_products)
    np.testing.assert_array_equal(sensitivity.dense_sensitivity(rows, weight), [1.0, 1.0])


def test_bounds_handle_a_point_whose_every_z_is_the_float32_maximum(monkeypatch):
    """Every z of the point is float32's maximum: its largest 1/z is subnormal, and the reciprocal of that,
    which scales the p-norm bound, overflows to inf. The bound must still find the point's products."""
    weight = np.array([[1.0, 1.0], [1.0, 2.0]], dtype=np.float32)
    rows = np.array([[np.finfo(np.float32).max, 1.0]], dtype=np.float32)
    results = every_product_then_bounds(monkeypatch, rows, weight)
    np.testing.assert_array_equal(results[1], results[0])
    assert results[1][0] == pytest.approx(1.0) and results[1][1] > 0


@pytest.mark.parametrize("fraction, min_filters, tile_min_products", [
    (1.0, 10**9, 10**18), (0.0, 0, 10**18), (0.0, 0, 0)], ids=["screen", "bounds", "tiles"])
def test_bounds_keep_products_whose_bound_overflows(monkeypatch, fraction, min_filters, tile_min_products):
    """A subnormal weight beside a huge activation: the running max over a tiny weight needs a threshold
    beyond float32, and the next point's bound a · max inv_z overflows to inf. The screen and the p-norm
    bound must still evaluate that point (its g is 1), as every-product scoring does."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    weight = np.array([[1.0, 1.4e-45]], dtype=np.float32)
    first = np.array([[1e-7, 3.4e38]], dtype=np.float32)  # z ≈ 5.8e-7: channel 1 scores ≈ 0.83
    second = np.array([[0.0, 3.4e38]], dtype=np.float32)  # channel 1 alone: it scores 1
    results = []
    for screen_fraction, bound_min_filters, tiles in ((0.0, 10**9, 10**18), (fraction, min_filters, tile_min_products)):
        monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", screen_fraction)
        monkeypatch.setattr(max_times, "BOUND_MIN_FILTERS", bound_min_filters)
        monkeypatch.setattr(max_times, "TILE_MIN_PRODUCTS", tiles)
        scorer = sensitivity.DenseScorer(weight)
        scorer.update(first)
        assert 0.8 < scorer.sensitivity[1] < 0.9
        scorer.update(second)
        results.append(scorer.sensitivity)
    np.testing.assert_array_equal(results[1], results[0])
    assert results[1][1] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 9), (16, 64), (5, 0)])
def test_word_wise_nonzero_equals_numpy(shape):

    rng = np.random.default_rng(14)
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = rng.random(shape) < density
        for ours, numpys in zip(max_times.nonzero_2d(mask), np.nonzero(mask)):
            np.testing.assert_array_equal(ours, numpys)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        conv_sensitivity(np.zeros((1, 3, 4, 4)), np.zeros((2, 4, 3, 3)), strides=[1, 1], pads=[0] * 4, dilations=[1, 1])
    with pytest.raises(ValueError):
        conv_sensitivity(np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 3, 3)), strides=[1], pads=[0] * 4, dilations=[1, 1])
    with pytest.raises(ValueError):
        dense_sensitivity(np.zeros((2, 3)), np.zeros((4, 5)))


def test_eps_cutoff_is_absolute():
    """Scaling the data keeps every ratio while |z| > float32 eps; below it every z counts as infinite."""
    rng = np.random.default_rng(12)
    activation = random_activation(rng, (2, 6, 5, 5))
    weight = rng.standard_normal((3, 6, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    unscaled = conv_sensitivity(activation, weight, **kwargs)
    np.testing.assert_allclose(conv_sensitivity(activation * 1e-4, weight, **kwargs), unscaled, rtol=1e-5)
    assert_matches(conv_sensitivity(activation * 1e-9, weight, **kwargs), np.zeros(6))


# ---------------------------------------------------------------------------------------------------------
# ConvTranspose: a reference written from the scatter definition (no zero insertion, no kernel flip).


def conv_transpose_output_shape(spatial, kernel_shape, strides, pads, dilations, output_padding):
    rank = len(kernel_shape)
    return [
        strides[d] * (spatial[d] - 1) + output_padding[d] + (kernel_shape[d] - 1) * dilations[d] + 1
        - pads[d] - pads[d + rank]
        for d in range(rank)
    ]


def conv_transpose_scatter(point, weight, strides, pads, dilations, output_padding):
    """z[F_out, *out] of one data point point[C_in, *spatial] by scattering every a[c, q]·W[c, f, k] (float64).

    Also returns the list of (c, f, q, k, o) landings, the pairs that make up z."""
    channels, filters, *kernel_shape = weight.shape
    rank = len(kernel_shape)
    spatial = point.shape[1:]
    out_shape = conv_transpose_output_shape(spatial, kernel_shape, strides, pads, dilations, output_padding)
    z = np.zeros([filters, *out_shape])
    landings = []
    for c in range(channels):
        for f in range(filters):
            for q in itertools.product(*[range(n) for n in spatial]):
                for k in itertools.product(*[range(n) for n in kernel_shape]):
                    o = tuple(q[d] * strides[d] + k[d] * dilations[d] - pads[d] for d in range(rank))
                    if all(0 <= o[d] < out_shape[d] for d in range(rank)):
                        z[(f, *o)] += weight[(c, f, *k)] * point[(c, *q)]
                        landings.append((c, f, q, k, o))
    return z, landings


def reference_conv_transpose(activation, weight, strides, pads, dilations, output_padding):
    """s[C_in] by loops over samples, sign of a, sign of W, then every landing (c, f, q, k) -> o."""
    activation = np.asarray(activation, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    sensitivity = np.zeros(weight.shape[0])
    for sample in activation:
        for point in (np.maximum(sample, 0), np.maximum(-sample, 0)):
            for signed in (np.maximum(weight, 0), np.minimum(weight, 0)):
                z, landings = conv_transpose_scatter(point, signed, strides, pads, dilations, output_padding)
                for c, f, q, k, o in landings:
                    if abs(z[(f, *o)]) <= EPS:
                        continue  # denominator counts as +infinity: ratio 0
                    g = signed[(c, f, *k)] * point[(c, *q)] / z[(f, *o)]
                    assert g >= 0
                    sensitivity[c] = max(sensitivity[c], g)
    return sensitivity


CONV_TRANSPOSE_CASES = {
    "1d stride 2 pads dilation 2 output_padding 1": dict(
        activation_shape=(2, 8, 5), weight_shape=(8, 3, 3), strides=[2], pads=[1, 2], dilations=[2],
        output_padding=[1],
    ),
    # stride 3 > kernel 2 leaves output positions no input reaches (z = 0); pads exceed the kernel reach.
    "1d stride 3 pads beyond the kernel reach (crop)": dict(
        activation_shape=(3, 16, 6), weight_shape=(16, 4, 2), strides=[3], pads=[3, 4], dilations=[1],
        output_padding=[2],
    ),
    "2d stride 2 dilation 2 output_padding 1 non-square kernel": dict(
        activation_shape=(2, 8, 4, 5), weight_shape=(8, 3, 2, 3), strides=[2, 2], pads=[1, 0, 2, 1],
        dilations=[2, 2], output_padding=[1, 1],
    ),
    "2d mixed strides and dilations": dict(
        activation_shape=(2, 16, 4, 4), weight_shape=(16, 3, 3, 3), strides=[1, 2], pads=[2, 1, 2, 1],
        dilations=[2, 1], output_padding=[0, 1],
    ),
    "2d stride 1": dict(
        activation_shape=(2, 12, 4, 4), weight_shape=(12, 2, 2, 2), strides=[1, 1], pads=[1, 1, 1, 1],
        dilations=[1, 1], output_padding=[0, 0],
    ),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES.values()), ids=list(CONV_TRANSPOSE_CASES))
def test_conv_transpose_matches_reference(case):
    rng = np.random.default_rng(20)
    activation = random_activation(rng, case["activation_shape"])
    weight = rng.standard_normal(case["weight_shape"]).astype(np.float32)
    kwargs = dict(
        strides=case["strides"], pads=case["pads"], dilations=case["dilations"], output_padding=case["output_padding"]
    )
    expected = reference_conv_transpose(activation, weight, **kwargs)
    assert_informative(expected)
    assert_matches(conv_transpose_sensitivity(activation, weight, **kwargs), expected)


def test_conv_transpose_zero_denominators():
    """An all-zero input region, an all-zero filter and all-negative filters: z = 0 entries are skipped."""
    rng = np.random.default_rng(21)
    activation = random_activation(rng, (2, 6, 4, 5))
    activation[:, :, :2, :] = 0.0  # output rows fed only by these inputs have z = 0
    activation[1] = np.abs(activation[1])
    weight = rng.standard_normal((6, 4, 2, 3)).astype(np.float32)
    weight[:, 0] = 0.0  # z⁺ = z⁻ = 0 everywhere for output channel 0
    weight[:, 1] = -np.abs(weight[:, 1])  # all-negative: z⁺ = 0
    weight[:, 3] = np.abs(weight[:, 3])  # all-positive: z⁻ = 0
    kwargs = dict(strides=[2, 2], pads=[1, 1, 0, 2], dilations=[1, 2], output_padding=[1, 0])
    expected = reference_conv_transpose(activation, weight, **kwargs)
    assert (expected > 0).all()
    assert_informative(expected)
    assert_matches(conv_transpose_sensitivity(activation, weight, **kwargs), expected)


def test_conv_transpose_default_output_padding_and_dead_channel():
    rng = np.random.default_rng(22)
    activation = random_activation(rng, (2, 6, 5))
    activation[:, 2] = 0.0
    weight = rng.standard_normal((6, 3, 3)).astype(np.float32)
    kwargs = dict(strides=[2], pads=[1, 1], dilations=[1])
    result = conv_transpose_sensitivity(activation, weight, **kwargs)
    assert result[2] == 0.0
    assert_matches(result, reference_conv_transpose(activation, weight, output_padding=[0], **kwargs))


def test_conv_transpose_empty_output_scores_zero():
    """Pads that swallow the whole output leave no neuron: every sensitivity is 0."""
    weight = np.random.default_rng(23).standard_normal((3, 2, 2)).astype(np.float32)
    activation = np.ones((1, 3, 2), dtype=np.float32)
    # out_size = 2·1 + 0 + 2 − 2 − 2 = 0
    result = conv_transpose_sensitivity(activation, weight, strides=[2], pads=[2, 2], dilations=[1])
    assert_matches(result, np.zeros(3))


def test_conv_transpose_rejects_mismatched_shapes():
    with pytest.raises(ValueError):  # ConvTranspose weight is [C_in, C_out, ...]: C_in must match axis 0
        conv_transpose_sensitivity(
            np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 3, 3)), strides=[1, 1], pads=[0] * 4, dilations=[1, 1]
        )
    with pytest.raises(ValueError):
        conv_transpose_sensitivity(
            np.zeros((1, 3, 4, 4)), np.zeros((3, 2, 3, 3)), strides=[1, 1], pads=[0] * 4, dilations=[1, 1],
            output_padding=[0],
        )


def test_conv_transpose_scatter_matches_onnxruntime():
    """The reference's z (scatter definition) is ONNX ConvTranspose without bias: pins down the semantics."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(24)
    activation = random_activation(rng, (2, 3, 4, 5))
    weight = rng.standard_normal((3, 2, 2, 3)).astype(np.float32)
    attributes = dict(strides=[2, 3], pads=[1, 0, 2, 1], dilations=[2, 1], output_padding=[1, 2])
    out_shape = conv_transpose_output_shape(activation.shape[2:], weight.shape[2:], **attributes)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attributes)
    graph = helper.make_graph(
        [node],
        "conv_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(activation.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, *out_shape])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"x": activation})
    expected = np.stack(
        [conv_transpose_scatter(sample.astype(np.float64), weight.astype(np.float64), **attributes)[0]
         for sample in activation]
    )
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_scorers_sharing_an_unfold_buffer_score_as_alone():
    """Two convs fed in turn through one UnfoldBuffer (as a capture does) score what they score alone,
    and the buffer's memory is taken once and reused."""
    import pfp_onnx.sensitivity.scorers as sensitivity

    rng = np.random.default_rng(31)
    weights = [rng.standard_normal((6, 4, 3, 3)).astype(np.float32), rng.standard_normal((5, 4, 1, 1)).astype(np.float32)]
    batches = [np.maximum(rng.standard_normal((3, 4, 7, 7)), 0).astype(np.float32) for _ in range(3)]
    geometry = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    buffer = sensitivity.UnfoldBuffer()
    shared = [sensitivity.ConvScorer(weight, **geometry, buffer=buffer) for weight in weights]
    alone = [sensitivity.ConvScorer(weight, **geometry) for weight in weights]
    memory = None
    for batch in batches:
        for scorer in (*shared, *alone):
            scorer.update(batch)
        memory = memory if memory is not None else buffer._memory
        assert buffer._memory is memory
    for together, single in zip(shared, alone):
        np.testing.assert_array_equal(together.sensitivity, single.sensitivity)


def test_inverse_is_zero_exactly_where_z_is_negligible():
    """1/z is divided first and sorted out after: every z ≤ eps (zeros of both signs, eps itself,
    subnormals) and every non-finite result must end as 0, every z above eps as the plain float32 1/z."""
    eps = np.float32(max_times.Z_EPS)
    above = np.nextafter(eps, np.float32(1))
    z = np.array([0.0, -0.0, eps, np.nextafter(eps, np.float32(0)), 1e-44, 1e-30, above, 1.0, 3e38, np.inf, -1.0,
                  np.nan], dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        plain = np.float32(1) / z
        expected = np.where(z > eps, plain, np.float32(0))
    np.testing.assert_array_equal(max_times.inverse_in_place(z.copy()).view(np.uint32), expected.view(np.uint32))
    assert max_times.inverse_in_place(np.array([above]))[0] == np.float32(1) / above > 0
    # The parts' inverse (whole, and read at some columns) follows the same rule: z⁺ [1, 12, 1], |z⁻| reversed.
    plus, minus = z.reshape(1, -1, 1), z[::-1].reshape(1, -1, 1)
    both = np.concatenate([expected, expected[::-1]])
    np.testing.assert_array_equal(max_times.inverse_of_parts(plus, minus)[:, 0].view(np.uint32), both.view(np.uint32))
    np.testing.assert_array_equal(inverse_at(plus, minus, np.array([0]))[0].view(np.uint32), both.view(np.uint32))
