"""Training-free recovery of a consuming layer after some of its input channels were pruned.

A consuming layer computes a pre-activation z = W · x + b from input *features* x:
- dense (Gemm/MatMul): the C_in features of each row; every leading axis of the activation is a row;
- Conv (group 1, any rank, strides, pads, dilations): the unfolded patch x[c, k] (channel c, kernel offset
  k) at each output position, feature index c·K + k, which matches W.reshape(F, C·K).
Pruning removes features (all K of a conv channel, or the `block` consecutive features a channel owns after
a Flatten; the caller expands channels to feature indices). Two recoveries use calibration statistics:

(a) bias compensation: Δb = W[:, removed] · mean(x[removed]) — the removed features' mean contribution.
    Needs only the running mean (C·K float64 per layer).
(b) least-squares reconstruction: re-fit the kept weights V and the bias b to reproduce the original
    pre-activation over all calibration patches,
        min_{V, b}  Σ_patches ‖V x_kept + b − (W x + b0)‖²  +  λ ‖V − W_kept‖²_F,
    a ridge towards the original weights; the bias is not regularised. It needs the second moments of
    all features, kept and removed, which do not depend on the selection: one capture pass serves any
    later choice of channels.

Solving (b): the optimal bias for given V is b = b0 + W_removed μ_removed − (V − W_kept) μ_kept, so with
the centred scatter S = Σ (x − μ)(x − μ)ᵀ the change D = V − W_kept solves, for all F filters at once,
        (S_kept,kept + λ I) Dᵀ = S_kept,removed W_removedᵀ,        λ = ridge · mean(diag S_kept,kept).
This is the augmented-Gram normal equation ([x; 1] with an unpenalised constant) with the intercept
eliminated; the centred form is better conditioned when features have a large mean. Consequences used by
the tests: D = 0 (the original kept weights and the bias-compensated bias) when nothing is removed or as
ridge → ∞, and since D = 0 is always feasible the re-fit's error on the calibration data is never above
bias compensation's, which is never above plain pruning's.

Memory: FeatureStatistics with gram=True holds one (C·K + 1)² float64 matrix per consuming layer (4608
features, e.g. a 3×3 conv reading 512 channels, is 170 MB); updating adds one F×F temporary and the
float64 copy of the chunk of features; reconstruct() adds the kept sub-block and its factorisation. The
caller decides which layers are worth it (e.g. skip above a size limit, or use (a) there). Features of a
whole batch are K times the batch's activation; accumulate_features() unfolds it chunk by chunk, except
for stride-1 convs whose border is small next to their output: their Gram comes from shifted products of
the padded input (pfp_onnx.recovery.conv_gram), with nothing unfolded, and until the statistics are first read it is
held in the compact form of those products ((13 + 45)·C² numbers for a 3×3 conv over C channels, against
81·C² for the Gram, which is then assembled once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pfp_onnx.recovery import conv_gram
from pfp_onnx.conv_geometry import padded_and_out, tap_window, zero_padded

__all__ = [
    "ConvPatches",
    "FeatureStatistics",
    "accumulate_features",
    "compensate_bias",
    "layer_features",
    "reconstruct",
]

# Upper bound on the bytes of one chunk of float64 features built by accumulate_features().
CHUNK_BYTES = 64 * 2**20


class ConvPatches(NamedTuple):
    """Where a group=1 Conv reads its patches; pads in ONNX order (x1_begin, x2_begin, …, x1_end, …)."""

    strides: Sequence[int]
    pads: Sequence[int]
    dilations: Sequence[int]
    kernel_shape: Sequence[int]


class FeatureStatistics:
    """Running count, Σx and (optionally) Σxxᵀ of one consuming layer's input features, in float64.

    Fed batch by batch (or chunk by chunk) with update(); the result does not depend on how the data was
    split. Sums are kept about a fixed shift (the first chunk's mean), which keeps the centred scatter
    accurate when features have a large mean. gram=False keeps only the count and the sum (enough for
    bias compensation); gram=True also keeps an F×F float64 matrix — (F+1)² with the constant.
    fast=True centres each chunk and forms its product in float32 (about 3× faster on large layers,
    relative error ~1e-6 instead of ~1e-15), still summing in float64.
    """

    def __init__(self, features: int, *, gram: bool, fast: bool = False) -> None:
        if features < 0:
            raise ValueError(f"number of features must be nonnegative, got {features}")
        self.features = features
        self._fast = fast
        self._count = 0
        self._shift: np.ndarray | None = None
        self._shifted_sum = np.zeros(features, dtype=np.float64)
        self._shifted_gram = np.zeros((features, features), dtype=np.float64) if gram else None
        self._gram_written = False  # until then _shifted_gram is zeros (untouched pages: no memory yet)
        self._pending: conv_gram.PatchMoments | None = None

    @property
    def has_gram(self) -> bool:
        return self._shifted_gram is not None

    @property
    def count(self) -> int:
        """Number of feature rows (calibration patches) seen."""
        self._settle()
        return self._count

    def update(self, features: np.ndarray) -> None:
        """Fold a [rows, F] block of features into the running sums."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.features:
            raise ValueError(f"expected features [rows, {self.features}], got {features.shape}")
        if features.shape[0] == 0:
            return
        dtype = np.float32 if self._fast else np.float64
        if self._shift is None:
            # float32-representable in fast mode, so that centring there is one float32 subtraction
            self._shift = features.mean(axis=0, dtype=np.float64).astype(dtype).astype(np.float64)
        centred = np.subtract(features, self._shift.astype(dtype), dtype=dtype)  # a new array
        self._count += features.shape[0]
        self._shifted_sum += centred.sum(axis=0, dtype=np.float64)
        if self._shifted_gram is not None:
            # fast: float32 BLAS (a symmetric rank-k update), summed into float64; centring keeps it accurate
            self._shifted_gram += centred.T @ centred
            self._gram_written = True

    @property
    def fast(self) -> bool:
        return self._fast

    @property
    def shift(self) -> np.ndarray | None:
        """The fixed shift the sums are kept about (None before the first data)."""
        return self._shift

    def add_shifted(self, count: int, shift: np.ndarray, shifted_sum: np.ndarray,
                    shifted_gram: np.ndarray | None) -> None:
        """Fold count rows' Σ(x − shift) and Σ(x − shift)(x − shift)ᵀ taken elsewhere (the conv Gram of
        pfp_onnx.recovery.conv_gram; None for statistics without a Gram); shift must be this statistics' shift once
        it has one."""
        self._take_shift(np.asarray(shift, dtype=np.float64))
        self._count += count
        self._shifted_sum += shifted_sum
        if self._shifted_gram is not None:
            if self._gram_written:
                self._shifted_gram += shifted_gram
            else:  # the first Gram is taken as it is, not added to a matrix of zeros
                self._shifted_gram = np.array(shifted_gram, dtype=np.float64)
                self._gram_written = True

    @property
    def pending(self) -> conv_gram.PatchMoments | None:
        """The conv moments being gathered in compact form (see defer)."""
        return self._pending

    def defer(self, moments: conv_gram.PatchMoments) -> None:
        """Let `moments` (about this statistics' shift) gather a conv's patch moments chunk after chunk in
        its compact form; they are added the first time these statistics are read (count, mean, scatter, gram),
        so the [F, F] Gram is assembled once per layer, not once per chunk. Moments deferred earlier are
        added now."""
        self._settle()
        self._take_shift(moments.feature_shift)
        self._pending = moments

    def _take_shift(self, shift: np.ndarray) -> None:
        if self._shift is None:
            self._shift = shift.copy()
        elif not np.array_equal(shift, self._shift):
            raise ValueError("moments taken about a different shift than these statistics keep")

    def _settle(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            count, shifted_sum, shifted_gram = pending.moments()
            self.add_shifted(count, self._shift, shifted_sum, shifted_gram if self.has_gram else None)

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector [F] over all rows seen."""
        self._settle()
        self._require_data()
        return self._shift + self._shifted_sum / self._count

    @property
    def scatter(self) -> np.ndarray:
        """Centred scatter Σ (x − μ)(x − μ)ᵀ [F, F] (count × covariance)."""
        every = np.arange(self.features)
        return self.scatter_block(every, every)

    def scatter_block(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The [rows, columns] block of the centred scatter, without forming the whole matrix."""
        self._settle()
        self._require_data()
        shifted_gram = self._gram_or_raise()
        shifted_mean = self._shifted_sum / self._count
        return shifted_gram[np.ix_(rows, columns)] - self._count * np.outer(shifted_mean[rows], shifted_mean[columns])

    @property
    def gram(self) -> np.ndarray:
        """Augmented Gram Σ [x; 1][x; 1]ᵀ, [F+1, F+1], the constant feature last."""
        self._settle()
        self._require_data()
        mean = self.mean
        augmented = np.empty((self.features + 1, self.features + 1), dtype=np.float64)
        augmented[:-1, :-1] = self.scatter + self._count * np.outer(mean, mean)
        augmented[:-1, -1] = augmented[-1, :-1] = self._count * mean
        augmented[-1, -1] = self._count
        return augmented

    def _gram_or_raise(self) -> np.ndarray:
        if self._shifted_gram is None:
            raise ValueError("these statistics were collected with gram=False; reconstruction needs gram=True")
        return self._shifted_gram

    def _require_data(self) -> None:
        if self._count == 0:
            raise ValueError("no calibration rows were accumulated")


def layer_features(activation: np.ndarray, *, conv: ConvPatches | None) -> np.ndarray:
    """Features [rows, C·K] of one batch (or piece of a batch), in the activation's dtype (for a conv, a
    transposed view of a contiguous [C·K, rows] array).

    conv=None: a dense layer; activation [..., C] and every leading index is a row. Otherwise activation is
    [N, C, *spatial] and the rows are the patches, ordered (n, *output position), with feature index
    c·K + k (k the row-major kernel offset), so `features @ W.reshape(F, C·K).T` reshaped to
    [N, *out, F] is the convolution without bias. Zero padding gives zero features.
    """
    activation = np.asarray(activation)
    if conv is None:
        if activation.ndim < 1:
            raise ValueError("a dense layer's activation needs at least one axis")
        return activation.reshape(-1, activation.shape[-1])
    strides, pads, dilations, kernel_shape = (tuple(int(v) for v in field) for field in conv)
    rank = len(kernel_shape)
    if activation.ndim != rank + 2:
        raise ValueError(f"a {rank}-D conv reads [N, C, *spatial] with {rank} spatial axes, got {activation.shape}")
    if not (len(strides) == len(dilations) == rank and len(pads) == 2 * rank):
        raise ValueError(
            f"need {rank} strides/dilations and {2 * rank} pads, got {len(strides)}, {len(dilations)} and {len(pads)}"
        )
    samples, channels = activation.shape[:2]
    kernel_size = int(np.prod(kernel_shape, dtype=np.int64))
    padded = zero_padded(activation, pads)
    _, out_shape = padded_and_out(activation.shape[2:], pads, dilations, kernel_shape, strides)
    if min(out_shape, default=1) <= 0:
        return np.zeros((0, channels * kernel_size), dtype=activation.dtype)
    spatial_strides = padded.strides[2:]
    # A view [C, *kernel, N, *out] of the padded input, copied into [C·K, N·P] (reading along output
    # positions is several times faster than along features) and returned transposed.
    view = np.lib.stride_tricks.as_strided(
        padded,
        shape=(channels, *kernel_shape, samples, *out_shape),
        strides=(
            padded.strides[1],
            *(s * d for s, d in zip(spatial_strides, dilations)),
            padded.strides[0],
            *(s * t for s, t in zip(spatial_strides, strides)),
        ),
        writeable=False,
    )
    return view.reshape(channels * kernel_size, -1).T


def accumulate_features(statistics: FeatureStatistics, activation: np.ndarray, *, conv: ConvPatches | None,
                        chunk_bytes: int = CHUNK_BYTES) -> None:
    """Fold one batch of a layer's input activation into `statistics`, unfolding a few samples (conv) or
    rows (dense) at a time so the float64 features of a chunk stay near `chunk_bytes`."""
    activation = np.asarray(activation)
    if conv is None:
        rows = layer_features(activation, conv=None)
        per_chunk = max(1, chunk_bytes // (8 * max(1, rows.shape[1])))
        for start in range(0, rows.shape[0], per_chunk):
            statistics.update(rows[start:start + per_chunk])
        return
    if activation.shape[0] == 0:
        return
    if not statistics.has_gram:
        _window_sums(statistics, activation, conv)
        return
    if _shifted_products(statistics, activation, conv, chunk_bytes):
        return
    first = layer_features(activation[:1], conv=conv)  # one sample's patches tell the per-sample size
    statistics.update(first)
    per_chunk = max(1, chunk_bytes // max(1, 8 * first.size))
    for start in range(1, activation.shape[0], per_chunk):
        statistics.update(layer_features(activation[start:start + per_chunk], conv=conv))


def _window_sums(statistics: FeatureStatistics, activation: np.ndarray, conv: ConvPatches) -> None:
    """Fold a conv's batch into count-and-sum statistics without unfolding: feature (c, k) summed over
    every patch is the sum of the input window that tap k reads, one strided view per tap (padding reads
    zeros, which add nothing)."""
    strides, pads, dilations, kernel_shape = (tuple(int(v) for v in field) for field in conv)
    rank = len(kernel_shape)
    _, out_shape = padded_and_out(activation.shape[2:], pads, dilations, kernel_shape, strides)
    if min(out_shape, default=1) <= 0:
        return
    padded = zero_padded(activation, pads)
    taps = list(np.ndindex(*kernel_shape))
    sums = np.empty((activation.shape[1], len(taps)), dtype=np.float64)  # features ordered c·K + k
    for index, tap in enumerate(taps):
        window = padded[(slice(None), slice(None), *tap_window(tap, dilations, strides, out_shape))]
        sums[:, index] = window.sum(axis=(0, *range(2, 2 + rank)), dtype=np.float64)
    count = activation.shape[0] * int(np.prod(out_shape))
    shift = statistics.shift if statistics.shift is not None else np.zeros(sums.size)
    statistics.add_shifted(count, shift, sums.reshape(-1) - count * shift, None)


def _shifted_products(statistics: FeatureStatistics, activation: np.ndarray, conv: ConvPatches,
                      chunk_bytes: int) -> bool:
    """Fold a stride-1 conv's batch by shifted products of its padded input (pfp_onnx.recovery.conv_gram) where that
    is cheaper than unfolding; False where it is not (or the statistics' shift differs between taps). The
    first batch decides: later ones join the moments it began (a smaller last batch too)."""
    strides, pads, dilations, kernel_shape = (tuple(int(v) for v in field) for field in conv)
    spatial = activation.shape[2:]
    padded, _ = padded_and_out(spatial, pads, dilations, kernel_shape)
    padded_sample = 4 * activation.shape[1] * int(np.prod(padded))
    per_chunk = min(activation.shape[0], max(1, chunk_bytes // padded_sample))
    pending = statistics.pending
    if pending is None or pending.spatial != tuple(spatial):
        if not (statistics.has_gram and statistics.fast and len(spatial) == len(kernel_shape)
                and conv_gram.worth_it((per_chunk, *activation.shape[1:]), strides=strides, pads=pads,
                                       dilations=dilations, kernel_shape=kernel_shape)):
            return False
        kernel_size = int(np.prod(kernel_shape))
        shift = statistics.shift
        if shift is None:  # the first batch's channel means, the same for every tap, float32-representable
            means = activation.mean(axis=(0, *range(2, activation.ndim)), dtype=np.float64)
            shift = np.repeat(means.astype(np.float32), kernel_size).astype(np.float64)
        per_channel = shift.reshape(-1, kernel_size)
        if not (per_channel == per_channel[:, :1]).all():
            return False
        pending = conv_gram.PatchMoments(per_channel[:, 0], spatial, pads=pads, dilations=dilations,
                                         kernel_shape=kernel_shape)
        statistics.defer(pending)
    for start in range(0, activation.shape[0], per_chunk):
        pending.add(activation[start:start + per_chunk])
    return True


def compensate_bias(weight: np.ndarray, bias: np.ndarray | None, mean: np.ndarray,
                    removed_features: np.ndarray) -> np.ndarray:
    """New bias [F]: bias + W[:, removed] · mean[removed], the removed features' mean contribution.

    weight is [F, C·K] (conv weights reshaped, dense weights as [out, in]); a missing bias counts as zero.
    The pruned layer then reproduces the original layer's mean output over the calibration patches, and its
    output exactly wherever the removed features equal their mean. Returned in the bias's dtype (the
    weight's when there is no bias).
    """
    weight = _as_matrix(weight)
    removed = _feature_indices(removed_features, weight.shape[1], "removed_features")
    mean = np.asarray(mean, dtype=np.float64)
    if mean.shape != (weight.shape[1],):
        raise ValueError(f"mean has shape {mean.shape}, expected ({weight.shape[1]},)")
    original = _bias_or_zero(bias, weight)
    shift = weight[:, removed].astype(np.float64) @ mean[removed]
    return (original.astype(np.float64) + shift).astype(original.dtype)


def reconstruct(weight: np.ndarray, bias: np.ndarray | None, statistics: FeatureStatistics,
                kept_features: np.ndarray, *, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Re-fit the kept input weights and the bias to reproduce the original pre-activation (module docstring).

    Returns (new weight with the full shape [F, C·K] of `weight`, kept columns re-fitted and removed columns
    0; new bias [F]), both in the weight's dtype (the bias's for the bias). ridge is relative to the mean
    variance-sum of the kept features; ridge=0 is plain least squares (minimum-norm change when singular),
    large ridge tends to the original kept weights with the bias-compensated bias. `statistics` must have
    been collected with gram=True over this layer's features.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be nonnegative, got {ridge}")
    weight = _as_matrix(weight)
    features = weight.shape[1]
    if statistics.features != features:
        raise ValueError(f"statistics cover {statistics.features} features, the weight has {features}")
    kept = _feature_indices(kept_features, features, "kept_features")
    removed = np.setdiff1d(np.arange(features), kept)
    original_bias = _bias_or_zero(bias, weight)
    mean = statistics.mean
    weight64 = weight.astype(np.float64)
    kept_weight, removed_weight = weight64[:, kept], weight64[:, removed]

    change = np.zeros_like(kept_weight)  # D = V − W_kept, [F, kept]
    if removed.size and kept.size:
        kept_scatter = statistics.scatter_block(kept, kept)
        right_side = statistics.scatter_block(kept, removed) @ removed_weight.T  # [kept, F]
        penalty = ridge * float(np.mean(np.diag(kept_scatter)))
        if ridge > 0 and penalty <= 0:
            # Every kept feature is constant: it cannot explain anything (its cross-scatter is 0 too).
            penalty = 1.0
        kept_scatter[np.diag_indices_from(kept_scatter)] += penalty
        try:
            change = np.linalg.solve(kept_scatter, right_side).T
        except np.linalg.LinAlgError:  # only reachable with ridge=0 and a singular kept scatter
            change = np.linalg.lstsq(kept_scatter, right_side, rcond=None)[0].T

    new_weight = np.zeros_like(weight)
    new_weight[:, kept] = (kept_weight + change).astype(weight.dtype)
    new_bias = (original_bias.astype(np.float64) + removed_weight @ mean[removed] - change @ mean[kept])
    return new_weight, new_bias.astype(original_bias.dtype)


def _as_matrix(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [F, C·K] (reshape conv weights, transpose [in, out]), got {weight.shape}")
    return weight


def _bias_or_zero(bias: np.ndarray | None, weight: np.ndarray) -> np.ndarray:
    if bias is None:
        return np.zeros(weight.shape[0], dtype=weight.dtype)
    bias = np.asarray(bias)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    return bias


def _feature_indices(indices: np.ndarray, features: int, name: str) -> np.ndarray:
    """Validated integer feature indices, sorted and without repeats."""
    indices = np.asarray(indices)
    if indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    if indices.dtype == bool:
        raise ValueError(f"{name} must be feature indices, not a mask (use np.flatnonzero)")
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer feature indices, got {indices.dtype} {indices.shape}")
    if indices.min() < 0 or indices.max() >= features:
        raise ValueError(f"{name} must lie in [0, {features}), got {indices.min()}..{indices.max()}")
    unique = np.unique(indices)
    if unique.size != indices.size:
        raise ValueError(f"{name} repeats a feature index")
    return unique
