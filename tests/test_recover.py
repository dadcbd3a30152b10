"""Bias compensation and least-squares reconstruction against literal loops and closed-form facts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pfp_onnx.recovery.least_squares import (
    ConvPatches,
    FeatureStatistics,
    accumulate_features,
    compensate_bias,
    layer_features,
    reconstruct,
)

GEOMETRIES = {
    # 2-D: stride 2, pad 1 (and one asymmetric), dilation 2, 2×3 kernel
    "2d": (ConvPatches(strides=(2, 2), pads=(1, 1, 1, 1), dilations=(2, 2), kernel_shape=(2, 3)), (7, 9)),
    "2d-asymmetric": (ConvPatches(strides=(1, 2), pads=(0, 2, 1, 0), dilations=(1, 2), kernel_shape=(3, 2)), (6, 8)),
    "1d": (ConvPatches(strides=(2,), pads=(1, 2), dilations=(2,), kernel_shape=(3,)), (11,)),
}


def out_shape(patches, spatial):
    rank = len(spatial)
    return tuple(
        (spatial[d] + patches.pads[d] + patches.pads[d + rank] - patches.dilations[d] * (patches.kernel_shape[d] - 1)
         - 1) // patches.strides[d] + 1
        for d in range(rank)
    )


def patch_value(sample, patches, c, kernel_offset, position):
    """x[c, k] at one output position of one sample, with zero padding, by the ONNX index formula."""
    index = []
    for d, (p, k) in enumerate(zip(position, kernel_offset)):
        i = p * patches.strides[d] + k * patches.dilations[d] - patches.pads[d]
        if not 0 <= i < sample.shape[1 + d]:
            return 0.0
        index.append(i)
    return sample[(c, *index)]


def loop_unfold(activation, patches):
    rows = []
    channels = activation.shape[1]
    kernel_offsets = list(itertools.product(*[range(n) for n in patches.kernel_shape]))
    for sample in activation:
        for position in itertools.product(*[range(n) for n in out_shape(patches, activation.shape[2:])]):
            rows.append([patch_value(sample, patches, c, k, position)
                         for c in range(channels) for k in kernel_offsets])
    return np.array(rows)


def loop_conv(activation, weight, patches):
    """Direct convolution without bias: z[n, f, *p] = Σ_c Σ_k W[f, c, k] · x[n, c, p·s + k·d − pad]."""
    samples, channels = activation.shape[:2]
    filters = weight.shape[0]
    spatial_out = out_shape(patches, activation.shape[2:])
    output = np.zeros((samples, filters, *spatial_out))
    kernel_offsets = list(itertools.product(*[range(n) for n in patches.kernel_shape]))
    for n, f in itertools.product(range(samples), range(filters)):
        for position in itertools.product(*[range(n_) for n_ in spatial_out]):
            output[(n, f, *position)] = sum(
                weight[(f, c, *k)] * patch_value(activation[n], patches, c, k, position)
                for c in range(channels) for k in kernel_offsets
            )
    return output


def conv_output(features, weight_matrix, bias, samples, spatial_out):
    """The layer's pre-activation [N, F, *out] from features [N·P, C·K] and a [F, C·K] weight."""
    z = features @ weight_matrix.T + (0 if bias is None else bias)
    z = z.reshape(samples, *spatial_out, weight_matrix.shape[0])
    return np.moveaxis(z, -1, 1)


def channel_features(channels, per_channel):
    """Feature indices c·K + k of the given channels (K kernel offsets, or a Flatten block)."""
    channels = np.asarray(channels, dtype=np.int64)
    return (channels[:, None] * per_channel + np.arange(per_channel)).ravel()


def squared_error(features, weight, bias, target):
    return float(np.sum((features @ weight.T + bias - target) ** 2))


def statistics_of(features, gram=True):
    statistics = FeatureStatistics(features.shape[1], gram=gram)
    statistics.update(features)
    return statistics


# ---------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_features_equal_a_loop_unfold(name):
    patches, spatial = GEOMETRIES[name]
    activation = np.random.default_rng(0).normal(size=(2, 3, *spatial)).astype(np.float32)
    features = layer_features(activation, conv=patches)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, loop_unfold(activation, patches))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_features_times_weight_is_the_convolution(name):
    patches, spatial = GEOMETRIES[name]
    rng = np.random.default_rng(1)
    activation = rng.normal(size=(2, 3, *spatial))
    weight = rng.normal(size=(4, 3, *patches.kernel_shape))
    features = layer_features(activation, conv=patches)
    z = conv_output(features, weight.reshape(4, -1), None, 2, out_shape(patches, spatial))
    np.testing.assert_allclose(z, loop_conv(activation, weight, patches), rtol=1e-12, atol=1e-12)


def test_conv_features_are_chunk_friendly():
    patches, spatial = GEOMETRIES["2d"]
    activation = np.random.default_rng(2).normal(size=(5, 3, *spatial))
    pieces = [layer_features(activation[start:start + 2], conv=patches) for start in range(0, 5, 2)]
    np.testing.assert_array_equal(np.concatenate(pieces), layer_features(activation, conv=patches))


def test_dense_features_are_rows_over_all_leading_axes():
    activation = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    np.testing.assert_array_equal(layer_features(activation, conv=None), activation.reshape(6, 5))


def test_conv_with_no_output_position_has_no_rows():
    patches = ConvPatches(strides=(1,), pads=(0, 0), dilations=(1,), kernel_shape=(5,))
    assert layer_features(np.ones((2, 3, 4)), conv=patches).shape == (0, 15)


# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("pieces", [1, 3, 7])
def test_statistics_do_not_depend_on_how_the_data_is_split(pieces):
    rng = np.random.default_rng(3)
    features = (rng.normal(size=(50, 6)) * 3 + 100).astype(np.float32)  # a large mean, too
    expected_mean = features.astype(np.float64).mean(axis=0)
    augmented = np.hstack([features.astype(np.float64), np.ones((50, 1))])
    statistics = FeatureStatistics(6, gram=True)
    for piece in np.array_split(features, pieces):
        statistics.update(piece)
    assert statistics.count == 50
    np.testing.assert_allclose(statistics.mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(statistics.gram, augmented.T @ augmented, rtol=1e-12)
    centred = features - expected_mean
    np.testing.assert_allclose(statistics.scatter, centred.T @ centred, rtol=1e-9, atol=1e-9)


def test_accumulate_features_in_small_chunks_equals_one_pass():
    patches, spatial = GEOMETRIES["2d"]
    activation = np.random.default_rng(4).normal(size=(6, 3, *spatial)).astype(np.float32)
    one_pass = statistics_of(layer_features(activation, conv=patches))
    chunked = FeatureStatistics(18, gram=True)
    accumulate_features(chunked, activation, conv=patches, chunk_bytes=1)  # one sample at a time
    assert chunked.count == one_pass.count
    np.testing.assert_allclose(chunked.mean, one_pass.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.gram, one_pass.gram, rtol=1e-12)
    dense_rows = np.random.default_rng(5).normal(size=(4, 5, 7))
    dense = FeatureStatistics(7, gram=True)
    accumulate_features(dense, dense_rows, conv=None, chunk_bytes=100)
    np.testing.assert_allclose(dense.gram, statistics_of(dense_rows.reshape(20, 7)).gram, rtol=1e-12)


def test_fast_statistics_stay_close_to_exact_ones():
    patches, spatial = GEOMETRIES["2d"]
    activation = (np.random.default_rng(6).normal(size=(6, 3, *spatial)) * 2 + 50).astype(np.float32)
    exact, fast = FeatureStatistics(18, gram=True), FeatureStatistics(18, gram=True, fast=True)
    for statistics in (exact, fast):
        accumulate_features(statistics, activation, conv=patches, chunk_bytes=4096)
    np.testing.assert_allclose(fast.mean, exact.mean, rtol=1e-12)
    np.testing.assert_allclose(fast.scatter, exact.scatter, rtol=1e-5, atol=1e-5 * np.abs(exact.scatter).max())


def test_statistics_without_gram_refuse_reconstruction():
    statistics = statistics_of(np.ones((3, 2)), gram=False)
    np.testing.assert_array_equal(statistics.mean, [1, 1])
    with pytest.raises(ValueError, match="gram=True"):
        reconstruct(np.ones((1, 2)), None, statistics, np.array([0]))


# ---------------------------------------------------------------------------------------------- (a) bias


def test_compensated_bias_is_exact_when_removed_channels_are_constant_conv():
    # No padding: a constant channel is constant in every patch (zero padding would break that).
    patches = ConvPatches(strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), kernel_shape=(3, 3))
    rng = np.random.default_rng(6)
    activation = rng.normal(size=(3, 4, 6, 6))
    activation[:, 1] = 0.7   # e.g. relu of a BatchNorm bias
    activation[:, 3] = -2.0
    weight = rng.normal(size=(5, 4, 3, 3)).reshape(5, 36)
    bias = rng.normal(size=5)
    features = layer_features(activation, conv=patches)
    removed = channel_features([1, 3], 9)
    pruned = weight.copy()
    pruned[:, removed] = 0
    new_bias = compensate_bias(weight, bias, statistics_of(features, gram=False).mean, removed)
    np.testing.assert_allclose(features @ pruned.T + new_bias, features @ weight.T + bias, rtol=1e-12, atol=1e-12)


def test_compensated_bias_is_exact_when_removed_channels_are_constant_dense_after_flatten():
    rng = np.random.default_rng(7)
    activation = rng.normal(size=(10, 4, 2, 3))  # C=4 channels of 6 features each, then Flatten
    activation[:, 2] = rng.normal(size=(2, 3))    # constant over points, varying over the block
    features = layer_features(activation.reshape(10, 24), conv=None)
    weight = rng.normal(size=(3, 24))
    removed = channel_features([2], 6)
    pruned = weight.copy()
    pruned[:, removed] = 0
    new_bias = compensate_bias(weight, None, features.mean(axis=0), removed)
    np.testing.assert_allclose(features @ pruned.T + new_bias, features @ weight.T, rtol=1e-12, atol=1e-12)


def test_compensated_bias_reproduces_the_mean_output():
    patches, spatial = GEOMETRIES["2d"]  # with zero padding
    rng = np.random.default_rng(8)
    activation = rng.normal(size=(4, 3, *spatial)) + 1
    weight = rng.normal(size=(5, 18)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    features = layer_features(activation, conv=patches)
    removed = channel_features([0, 2], 6)
    pruned = weight.copy()
    pruned[:, removed] = 0
    new_bias = compensate_bias(weight, bias, statistics_of(features).mean, removed)
    assert new_bias.dtype == np.float32
    np.testing.assert_allclose((features @ pruned.T + new_bias).mean(axis=0),
                               (features @ weight.T + bias).mean(axis=0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(new_bias, bias)


# ---------------------------------------------------------------------------------------------- (b) re-fit


def test_reconstruction_is_exact_when_removed_features_are_linear_in_kept_ones_dense():
    rng = np.random.default_rng(9)
    kept_part = rng.normal(size=(200, 6))
    removed_part = kept_part @ rng.normal(size=(6, 3)) + np.array([1.0, -2.0, 0.5])
    features = np.hstack([kept_part[:, :3], removed_part[:, :2], kept_part[:, 3:], removed_part[:, 2:]])
    kept = np.array([0, 1, 2, 5, 6, 7])
    weight = rng.normal(size=(4, 9))
    bias = rng.normal(size=4)
    new_weight, new_bias = reconstruct(weight, bias, statistics_of(features), kept, ridge=1e-12)
    assert new_weight.shape == weight.shape
    np.testing.assert_array_equal(new_weight[:, [3, 4, 8]], 0)
    np.testing.assert_allclose(features @ new_weight.T + new_bias, features @ weight.T + bias, atol=1e-8)


def test_reconstruction_is_exact_when_removed_channels_are_linear_in_kept_ones_conv():
    patches = ConvPatches(strides=(1, 2), pads=(0, 0, 0, 0), dilations=(2, 1), kernel_shape=(2, 2))
    rng = np.random.default_rng(10)
    activation = rng.normal(size=(6, 4, 7, 8))
    activation[:, 1] = 2 * activation[:, 0] - activation[:, 3] + 0.3  # same pixel, so same kernel offset
    activation[:, 2] = -activation[:, 3] + 1.5
    weight = rng.normal(size=(5, 4, 2, 2)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    features = layer_features(activation, conv=patches)
    statistics = FeatureStatistics(16, gram=True)
    accumulate_features(statistics, activation, conv=patches, chunk_bytes=1)
    new_weight, new_bias = reconstruct(weight.reshape(5, 16), bias, statistics, channel_features([0, 3], 4),
                                       ridge=1e-12)
    assert new_weight.dtype == np.float32 and new_bias.dtype == np.float32
    spatial_out = out_shape(patches, (7, 8))
    original = loop_conv(activation, weight, patches) + bias[:, None, None]
    recovered = conv_output(features, new_weight.astype(np.float64), new_bias, 6, spatial_out)
    np.testing.assert_allclose(recovered, original, atol=1e-4)


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 1.0, 100.0])
def test_reconstruction_error_is_at_most_that_of_bias_compensation_and_of_pruning(ridge):
    rng = np.random.default_rng(11)
    # Correlated, offset features, so every recovery has something to gain.
    features = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12) * 3
    weight = rng.normal(size=(6, 12))
    bias = rng.normal(size=6)
    target = features @ weight.T + bias
    kept = np.array([0, 2, 3, 7, 8, 10])
    removed = np.setdiff1d(np.arange(12), kept)
    statistics = statistics_of(features)
    pruned = weight.copy()
    pruned[:, removed] = 0
    pruning_error = squared_error(features, pruned, bias, target)
    compensated_error = squared_error(features, pruned, compensate_bias(weight, bias, statistics.mean, removed),
                                      target)
    refit_error = squared_error(features, *reconstruct(weight, bias, statistics, kept, ridge=ridge), target)
    assert compensated_error <= pruning_error
    assert refit_error <= compensated_error * (1 + 1e-12)
    if ridge <= 1e-3:
        assert refit_error < 0.9 * compensated_error


def test_infinite_ridge_gives_the_original_kept_weights_and_the_compensated_bias():
    """As ridge → ∞ the change to the kept weights vanishes and the (unpenalised) bias becomes the optimal
    intercept for the unchanged kept weights, which is exactly bias compensation (a)."""
    rng = np.random.default_rng(12)
    features = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 2
    weight = rng.normal(size=(3, 8))
    bias = rng.normal(size=3)
    kept = np.array([1, 2, 4, 6])
    removed = np.setdiff1d(np.arange(8), kept)
    statistics = statistics_of(features)
    expected_bias = compensate_bias(weight, bias, statistics.mean, removed)
    previous_gap = np.inf
    for ridge in [1e2, 1e4, 1e6]:
        new_weight, new_bias = reconstruct(weight, bias, statistics, kept, ridge=ridge)
        gap = np.abs(new_weight[:, kept] - weight[:, kept]).max()
        assert gap < previous_gap
        previous_gap = gap
    assert previous_gap < 1e-5
    np.testing.assert_allclose(new_bias, expected_bias, atol=1e-5)
    np.testing.assert_array_equal(new_weight[:, removed], 0)


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_keeping_every_feature_returns_the_original_layer(ridge):
    rng = np.random.default_rng(13)
    features = rng.normal(size=(100, 5))
    weight = rng.normal(size=(4, 5)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    new_weight, new_bias = reconstruct(weight, bias, statistics_of(features), np.arange(5), ridge=ridge)
    np.testing.assert_allclose(new_weight, weight, rtol=1e-6)
    np.testing.assert_allclose(new_bias, bias, rtol=1e-6)


def test_removing_every_feature_leaves_the_mean_output_as_bias():
    rng = np.random.default_rng(14)
    features = rng.normal(size=(100, 5)) + 1
    weight = rng.normal(size=(4, 5))
    new_weight, new_bias = reconstruct(weight, None, statistics_of(features), np.array([], dtype=np.int64))
    np.testing.assert_array_equal(new_weight, 0)
    np.testing.assert_allclose(new_bias, (features @ weight.T).mean(axis=0), rtol=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_constant_kept_features_do_not_break_the_solve(ridge):
    rng = np.random.default_rng(15)
    features = rng.normal(size=(100, 6))
    features[:, [0, 1]] = 0.0  # dead (relu) channels among the kept ones
    weight = rng.normal(size=(3, 6))
    new_weight, new_bias = reconstruct(weight, None, statistics_of(features), np.array([0, 1]), ridge=ridge)
    assert np.isfinite(new_weight).all() and np.isfinite(new_bias).all()
    np.testing.assert_allclose(new_weight[:, [0, 1]], weight[:, [0, 1]])


@pytest.mark.parametrize("indices, message", [
    (np.array([0, 0]), "repeats"),
    (np.array([7]), r"\[0, 6\)"),
    (np.array([True, False, True, False, True, False]), "mask"),
    (np.array([0.0, 1.0]), "integer"),
])
def test_bad_feature_indices_are_refused(indices, message):
    statistics = statistics_of(np.random.default_rng(16).normal(size=(10, 6)))
    with pytest.raises(ValueError, match=message):
        reconstruct(np.ones((2, 6)), None, statistics, indices)
    with pytest.raises(ValueError, match=message):
        compensate_bias(np.ones((2, 6)), None, statistics.mean, indices)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_mean_only_conv_statistics_are_the_unfolded_means(name):
    """Without a Gram, a conv's feature means come from one strided window sum per tap (never unfolded):
    the same count and means as the loop-unfolded patches, over several batches."""
    patches, spatial = GEOMETRIES[name]
    rng = np.random.default_rng(6)
    batches = [(rng.normal(size=(3, 3, *spatial)) * 2 + 5).astype(np.float32) for _ in range(2)]
    statistics = FeatureStatistics(3 * int(np.prod(patches.kernel_shape)), gram=False)
    for batch in batches:
        accumulate_features(statistics, batch, conv=patches)
    features = np.concatenate([loop_unfold(batch, patches) for batch in batches]).astype(np.float64)
    assert statistics.count == len(features)
    np.testing.assert_allclose(statistics.mean, features.mean(axis=0), rtol=1e-12)
