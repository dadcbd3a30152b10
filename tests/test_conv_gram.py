"""The conv Gram from shifted products of the padded input, against float64 moments of unfolded patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pfp_onnx.recovery import conv_gram
from pfp_onnx.recovery import least_squares as recover
from pfp_onnx.recovery.least_squares import ConvPatches, FeatureStatistics, accumulate_features, layer_features

# (activation shape, pads, dilations, kernel): every one stride 1, as the shifted products require.
CASES = {
    "3x3-same": ((3, 4, 9, 9), (1, 1, 1, 1), (1, 1), (3, 3)),
    "3x3-valid": ((2, 3, 9, 11), (0, 0, 0, 0), (1, 1), (3, 3)),
    "asymmetric-dilated": ((3, 2, 10, 8), (2, 0, 1, 3), (2, 1), (3, 2)),
    "wide-padding": ((2, 2, 5, 6), (4, 3, 2, 5), (1, 2), (2, 3)),
    "1d": ((2, 4, 12), (2, 1), (1,), (5,)),
    "3d": ((1, 2, 6, 5, 7), (1, 0, 1, 1, 2, 0), (1, 1, 2), (3, 2, 2)),
}


def exact_moments(activation, pads, dilations, kernel_shape, shift):
    """Count, Σ(x − s) and Σ(x − s)(x − s)ᵀ of the unfolded features in float64 (s repeated over taps)."""
    rank = len(kernel_shape)
    features = layer_features(activation.astype(np.float64),
                              conv=ConvPatches((1,) * rank, pads, dilations, kernel_shape))
    centred = features - np.repeat(shift.astype(np.float64), int(np.prod(kernel_shape)))
    return len(features), centred.sum(axis=0), centred.T @ centred


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("offset", [0.0, 5.0])  # a large mean: the padding's centred value −s is large too
@pytest.mark.parametrize("chunked", [False, True])  # True: chunks of 7 rows, the last one shorter
def test_shifted_products_equal_the_moments_of_unfolded_patches(name, offset, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(conv_gram, "SHIFTED_CHUNK_BYTES", 1)
        monkeypatch.setattr(conv_gram, "MIN_SHIFTED_ROWS", 7)
    shape, pads, dilations, kernel_shape = CASES[name]
    rng = np.random.default_rng(len(name))
    activation = (np.maximum(rng.standard_normal(shape), 0) + offset).astype(np.float32)
    shift = activation.mean(axis=(0, *range(2, activation.ndim))).astype(np.float32)
    count, shifted_sum, gram = conv_gram.patch_moments(activation, shift, pads=pads, dilations=dilations,
                                                       kernel_shape=kernel_shape)
    expected_count, expected_sum, expected_gram = exact_moments(activation, pads, dilations, kernel_shape, shift)
    assert count == expected_count
    scale = np.abs(expected_gram).max()
    np.testing.assert_allclose(gram, expected_gram, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(shifted_sum, expected_sum, rtol=0, atol=1e-5 * np.abs(expected_sum).max())
    np.testing.assert_array_equal(gram, gram.T)


def test_shift_need_not_be_the_mean():
    shape, pads, dilations, kernel_shape = CASES["3x3-same"]
    activation = np.random.default_rng(3).random(shape, dtype=np.float32)
    shift = np.array([0.0, -2.0, 7.5, 0.25], dtype=np.float32)
    count, shifted_sum, gram = conv_gram.patch_moments(activation, shift, pads=pads, dilations=dilations,
                                                       kernel_shape=kernel_shape)
    _, expected_sum, expected_gram = exact_moments(activation, pads, dilations, kernel_shape, shift)
    np.testing.assert_allclose(gram, expected_gram, rtol=0, atol=1e-5 * np.abs(expected_gram).max())
    np.testing.assert_allclose(shifted_sum, expected_sum, rtol=0, atol=1e-5 * np.abs(expected_sum).max())


@pytest.mark.parametrize("shape, strides, pads, kernel, expected", [
    ((32, 64, 56, 56), (1, 1), (1, 1, 1, 1), (3, 3), True),
    ((32, 128, 28, 28), (1, 1), (1, 1, 1, 1), (3, 3), True),
    ((32, 16, 28, 28), (1, 1), (1, 1, 1, 1), (3, 3), True),
    ((2, 16, 14, 14), (1, 1), (1, 1, 1, 1), (3, 3), False),  # too little work for the fixed costs
    ((32, 512, 7, 7), (1, 1), (1, 1, 1, 1), (3, 3), True),  # 339 against 374 ms a batch, measured
    ((32, 64, 8, 8), (1, 1), (1, 1, 1, 1), (3, 3), True),  # 6.2 against 7.8 ms
    ((32, 64, 4, 4), (1, 1), (1, 1, 1, 1), (3, 3), False),  # the border is most of the image (4.6 against 4.1 ms)
    ((32, 64, 56, 56), (2, 2), (1, 1, 1, 1), (3, 3), False),  # strided: taps do not read shifted copies
    ((32, 64, 56, 56), (1, 1), (0, 0, 0, 0), (1, 1), False),  # 1×1: the features are the input already
    ((32, 64, 2, 2), (1, 1), (0, 0, 0, 0), (3, 3), False),  # no output position
])
def test_worth_it(shape, strides, pads, kernel, expected):
    assert conv_gram.worth_it(shape, strides=strides, pads=pads, dilations=(1, 1), kernel_shape=kernel) is expected


def accumulated(batches, patches, *, shifted: bool, monkeypatch, chunk_bytes=recover.CHUNK_BYTES):
    monkeypatch.setattr(conv_gram, "worth_it", lambda *args, **kwargs: shifted)
    statistics = FeatureStatistics(batches[0].shape[1] * int(np.prod(patches.kernel_shape)), gram=True, fast=True)
    for batch in batches:
        accumulate_features(statistics, batch, conv=patches, chunk_bytes=chunk_bytes)
    return statistics


@pytest.mark.parametrize("chunk_bytes", [recover.CHUNK_BYTES, 1])  # 1: one sample per chunk
def test_statistics_by_shifted_products_equal_unfolded_ones_over_streamed_batches(monkeypatch, chunk_bytes):
    shape, pads, dilations, kernel_shape = CASES["asymmetric-dilated"]
    patches = ConvPatches((1, 1), pads, dilations, kernel_shape)
    rng = np.random.default_rng(7)
    batches = [(np.maximum(rng.standard_normal(shape), 0) + 2).astype(np.float32) for _ in range(3)]
    unfolded = accumulated(batches, patches, shifted=False, monkeypatch=monkeypatch)
    shifted = accumulated(batches, patches, shifted=True, monkeypatch=monkeypatch, chunk_bytes=chunk_bytes)
    assert shifted.count == unfolded.count
    np.testing.assert_allclose(shifted.mean, unfolded.mean, rtol=1e-6)
    scale = np.abs(unfolded.scatter).max()
    np.testing.assert_allclose(shifted.scatter, unfolded.scatter, rtol=0, atol=1e-5 * scale)
    # the shift is each channel's mean over the first batch, the same for all its taps
    taps = int(np.prod(kernel_shape))
    per_channel = shifted.shift.reshape(-1, taps)
    assert (per_channel == per_channel[:, :1]).all()


def test_deferred_moments_are_added_when_read_and_later_batches_carry_on(monkeypatch):
    """Shifted moments stay in PatchMoments' compact form until the statistics are read; a read in between
    batches adds them, later batches start new ones about the same shift, and a smaller last batch (which
    on its own would be judged not worth shifting) joins the moments the first batch began."""
    shape, pads, dilations, kernel_shape = CASES["3x3-same"]
    patches = ConvPatches((1, 1), pads, dilations, kernel_shape)
    rng = np.random.default_rng(9)
    batches = [(np.maximum(rng.standard_normal(shape), 0) + 1).astype(np.float32) for _ in range(3)]
    batches.append(batches[0][:1] * 2)
    expected = accumulated(batches, patches, shifted=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(conv_gram, "worth_it", lambda shape, **kwargs: shape[0] > 1)
    added = []
    add = conv_gram.PatchMoments.add
    monkeypatch.setattr(conv_gram.PatchMoments, "add", lambda self, activation: (
        added.append(len(activation)), add(self, activation))[1])
    statistics = FeatureStatistics(expected.features, gram=True, fast=True)
    accumulate_features(statistics, batches[0], conv=patches)
    assert statistics.pending is not None
    first = statistics.pending
    assert statistics.count == len(batches[0]) * 81  # a read adds the pending moments
    assert statistics.pending is None
    for batch in batches[1:]:
        accumulate_features(statistics, batch, conv=patches)
    assert statistics.pending is not first and added == [3, 3, 3, 1]
    assert statistics.count == expected.count
    np.testing.assert_allclose(statistics.mean, expected.mean, rtol=1e-6)
    scale = np.abs(expected.scatter).max()
    np.testing.assert_allclose(statistics.scatter, expected.scatter, rtol=0, atol=1e-5 * scale)


def test_moments_of_another_input_size_are_kept_apart():
    """A batch of another spatial size cannot join the pending moments (their tap distances differ): those
    are added first, and the new size gathers its own."""
    pads, dilations, kernel_shape = (1, 1, 1, 1), (1, 1), (3, 3)
    patches = ConvPatches((1, 1), pads, dilations, kernel_shape)
    rng = np.random.default_rng(10)
    small, large = (np.maximum(rng.standard_normal(shape), 0).astype(np.float32) for shape in ((2, 3, 6, 6),
                                                                                           (2, 3, 8, 7)))
    statistics = FeatureStatistics(27, gram=True, fast=True)
    statistics.defer(conv_gram.PatchMoments(small.mean(axis=(0, 2, 3)), small.shape[2:], pads=pads,
                                            dilations=dilations, kernel_shape=kernel_shape))
    statistics.pending.add(small)
    statistics.defer(conv_gram.PatchMoments(small.mean(axis=(0, 2, 3)), large.shape[2:], pads=pads,
                                            dilations=dilations, kernel_shape=kernel_shape))
    statistics.pending.add(large)
    shift = np.repeat(small.mean(axis=(0, 2, 3)).astype(np.float32), 9)
    features = np.concatenate([layer_features(batch.astype(np.float64), conv=patches) for batch in (small, large)])
    centred = features - shift
    assert statistics.count == len(features)
    np.testing.assert_allclose(statistics.mean, features.mean(axis=0), rtol=1e-6)
    expected = centred.T @ centred - len(features) * np.outer(centred.mean(axis=0), centred.mean(axis=0))
    np.testing.assert_allclose(statistics.scatter, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="different shift"):
        statistics.defer(conv_gram.PatchMoments(np.zeros(3), small.shape[2:], pads=pads, dilations=dilations,
                                                kernel_shape=kernel_shape))
    with pytest.raises(ValueError, match="does not fit"):
        conv_gram.PatchMoments(np.zeros(3), small.shape[2:], pads=pads, dilations=dilations,
                               kernel_shape=kernel_shape).add(large)


def test_statistics_begun_unfolded_stay_unfolded(monkeypatch):
    """A statistics whose shift differs between the taps of a channel (begun by the unfolded path) cannot
    take shifted products about it: the unfolded path carries on, and the moments stay right."""
    shape, pads, dilations, kernel_shape = CASES["3x3-same"]
    patches = ConvPatches((1, 1), pads, dilations, kernel_shape)
    rng = np.random.default_rng(8)
    batches = [np.maximum(rng.standard_normal(shape), 0).astype(np.float32) for _ in range(2)]
    expected = accumulated(batches, patches, shifted=False, monkeypatch=monkeypatch)
    statistics = accumulated(batches[:1], patches, shifted=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(conv_gram.PatchMoments, "add", lambda *args, **kwargs: pytest.fail("shift differs by tap"))
    monkeypatch.setattr(conv_gram, "worth_it", lambda *args, **kwargs: True)
    accumulate_features(statistics, batches[1], conv=patches)
    np.testing.assert_array_equal(statistics.scatter, expected.scatter)


def test_moments_about_another_shift_are_refused():
    statistics = FeatureStatistics(2, gram=True, fast=True)
    statistics.add_shifted(1, np.zeros(2), np.zeros(2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="different shift"):
        statistics.add_shifted(1, np.ones(2), np.zeros(2), np.zeros((2, 2)))


def test_compress_recovers_the_exact_weights_with_shifted_products(monkeypatch):
    """The MNIST fixture's 3×3 convs (at 28×28, 14×14 and 7×7) take the shifted path: the re-fitted
    weights and biases match a re-fit from float64 statistics of unfolded patches at least as closely as
    the float32 unfolded path does (on this fixture at most 2.6e-4 of a layer's largest value unfolded,
    5.5e-5 shifted)."""
    import pfp_onnx
    from pfp_onnx.recovery import refit

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model = str(fixtures / "mnist_resnet.onnx")
    with np.load(fixtures / "mnist_calib.npz") as calibration:
        data = {name: values[:96] for name, values in calibration.items()}
    calls = []
    add = conv_gram.PatchMoments.add
    monkeypatch.setattr(conv_gram.PatchMoments, "add", lambda self, activation: (
        calls.append(activation.shape), add(self, activation))[1])
    monkeypatch.setattr(conv_gram, "MIN_GRAM_MACS", 2**62)  # float32 products of unfolded patches
    unfolded = pfp_onnx.compress(model, data, budget=0.5, recovery="lstsq")
    assert not calls
    monkeypatch.setattr(conv_gram, "MIN_GRAM_MACS", 0)  # the fixture's layers are small
    shifted = pfp_onnx.compress(model, data, budget=0.5, recovery="lstsq")
    assert {shape[2] for shape in calls} == {28, 14, 7}
    monkeypatch.setattr(refit, "FeatureStatistics", lambda features, *, gram, fast: FeatureStatistics(
        features, gram=gram, fast=False))  # float64 throughout, so never the shifted path
    calls.clear()
    exact = pfp_onnx.compress(model, data, budget=0.5, recovery="lstsq")
    assert not calls
    for result in (unfolded, shifted):
        assert result.replacements.keys() == exact.replacements.keys()
        for group, selection in result.selections.items():
            np.testing.assert_array_equal(selection.kept, exact.selections[group].kept)

    def worst_error(result) -> float:
        """The largest error of any re-fitted tensor, as a share of that tensor's largest value."""
        return max(float(np.abs(values - exact.replacements[key]).max() / np.abs(exact.replacements[key]).max())
                   for key, values in result.replacements.items())

    assert 0 < worst_error(shifted) <= worst_error(unfolded) < 1e-3
