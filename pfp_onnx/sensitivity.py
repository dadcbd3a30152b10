"""PFP sensitivities of a layer's input channels over one calibration batch (PFP.md §1).

s_c is the largest *relative contribution* any single weight·activation product of channel c makes to
the positive or negative part of any output neuron, over the batch:

    g±[f, c, k, p] = |W±[f, c, k]| · a_unf[c, k, p] / |z±[f, p]|,      s_c = max over points, f, k, p

where W⁺ = max(W, 0), W⁻ = min(W, 0), a ≥ 0 is a data point (a⁺ and a⁻ of every sample count as two
points), a_unf its patches and z± = layer(a; W±) without bias; |z| ≤ float32 eps counts as +∞ (ratio 0).

Why it is fast: with inv_z[f, p] = 1/|z[f, p]| the quantity factorises as
    s_c = max_k max_p a_unf[c, k, p] · max_f |W[f, c, k]| · inv_z±[f, p],
a "max-times" matrix product costing C·K·F·P per point, with z itself from one BLAS matmul. The points of a
batch are concatenated along p (each keeps its own z). Everything is pure per-batch: callers fold
successive batches with np.maximum.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["conv_sensitivity", "conv_transpose_sensitivity", "dense_sensitivity"]

# Denominators at or below this are treated as +infinity (the reference's float32 eps cut-off).
Z_EPS = float(np.finfo(np.float32).eps)
# Upper bound on the bytes of any large temporary (a chunk's unfolded patches or its inverse z's).
CHUNK_BYTES = 64 * 2**20
# Size of one thread's max-times temporary: large enough to amortise Python overhead, small enough to
# stay near cache (8 MB measured fastest for a 64x64x3x3 conv; 0.25 MB was 8x slower, 64 MB 1.5x).
MAX_TIMES_BYTES = 8 * 2**20
MAX_THREADS = min(8, os.cpu_count() or 1)


def conv_sensitivity(
    activation: np.ndarray,
    weight: np.ndarray,
    *,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
) -> np.ndarray:
    """Sensitivities s[C] (float32) of a group=1 Conv's input channels over one calibration batch.

    activation is [N, C, *spatial], weight [F, C, *kernel]; pads follow ONNX order (x1_begin, x2_begin, …,
    x1_end, x2_end, …). Zero padding contributes zero products. Any number of spatial axes works.
    """
    activation = np.asarray(activation, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    spatial_rank = weight.ndim - 2
    if activation.ndim != weight.ndim or activation.shape[1] != weight.shape[1]:
        raise ValueError(
            f"activation {activation.shape} and weight {weight.shape} do not form a group=1 conv "
            "(expected [N, C, *spatial] and [F, C, *kernel] with the same C)"
        )
    if not (len(strides) == len(dilations) == spatial_rank and len(pads) == 2 * spatial_rank):
        raise ValueError(
            f"need {spatial_rank} strides/dilations and {2 * spatial_rank} pads, "
            f"got {len(strides)}, {len(dilations)} and {len(pads)}"
        )
    channels = weight.shape[1]
    kernel_shape = weight.shape[2:]
    kernel_size = int(np.prod(kernel_shape))
    padded = np.pad(
        activation,
        [(0, 0), (0, 0)] + [(pads[d], pads[d + spatial_rank]) for d in range(spatial_rank)],
    )
    out_shape = tuple(
        (padded.shape[2 + d] - dilations[d] * (kernel_shape[d] - 1) - 1) // strides[d] + 1
        for d in range(spatial_rank)
    )
    if min(out_shape, default=1) <= 0:
        return np.zeros(channels, dtype=np.float32)
    positions = int(np.prod(out_shape))

    scorer = _MaxTimesScorer(weight.reshape(weight.shape[0], channels, kernel_size))
    # Unfold a chunk of samples at a time; per position it holds C·K patch values and 2F inverse z's.
    bytes_per_sample = 4 * positions * max(channels * kernel_size, 2 * weight.shape[0])
    samples_per_chunk = max(1, CHUNK_BYTES // bytes_per_sample)
    for start in range(0, padded.shape[0], samples_per_chunk):
        for point in _sign_split(padded[start : start + samples_per_chunk]):
            scorer.update(_unfold(point, kernel_shape, out_shape, strides, dilations))
    return scorer.sensitivity


def conv_transpose_sensitivity(
    activation: np.ndarray,
    weight: np.ndarray,
    *,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    output_padding: Sequence[int] | None = None,
) -> np.ndarray:
    """Sensitivities s[C_in] (float32) of a group=1 ConvTranspose's input channels over one calibration batch.

    activation is [N, C_in, *spatial], weight is in ONNX ConvTranspose layout [C_in, C_out, *kernel]; pads
    follow ONNX order (x1_begin, …, x1_end, …). The definition is conv_sensitivity's, for the scatter form of
    the layer: input position q and kernel offset k land (per spatial axis) on output position
    o = q·stride + k·dilation − pad_begin when 0 ≤ o < out_size, with
    out_size = stride·(in − 1) + output_padding + (kernel − 1)·dilation + 1 − pad_begin − pad_end, and
    g±[c, f, k, o] = W±[c, f, k] · a[c, q] / z±[f, o], maximised over everything.

    It is computed as the equivalent stride-1 Conv: insert stride − 1 zeros between input pixels, pad each
    axis by dilation·(kernel − 1) − pad_begin at the start and dilation·(kernel − 1) − pad_end +
    output_padding at the end (cropping where that is negative: the cropped inputs land on no valid output),
    flip the kernel spatially and swap its first two axes to [C_out, C_in, *kernel], then call
    conv_sensitivity with stride 1, the same dilation and no further padding. Every (q, k) → o pair of the
    transposed conv is exactly one nonzero-able product of that conv, with the same z; the inserted and
    padded zeros only add zero products, which do not change z or the max.
    """
    activation = np.asarray(activation, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    spatial_rank = weight.ndim - 2
    if spatial_rank < 0 or activation.ndim != weight.ndim or activation.shape[1] != weight.shape[0]:
        raise ValueError(
            f"activation {activation.shape} and weight {weight.shape} do not form a group=1 ConvTranspose "
            "(expected [N, C_in, *spatial] and [C_in, C_out, *kernel] with the same C_in)"
        )
    if output_padding is None:
        output_padding = [0] * spatial_rank
    if not (
        len(strides) == len(dilations) == len(output_padding) == spatial_rank and len(pads) == 2 * spatial_rank
    ):
        raise ValueError(
            f"need {spatial_rank} strides/dilations/output_padding and {2 * spatial_rank} pads, got "
            f"{len(strides)}, {len(dilations)}, {len(output_padding)} and {len(pads)}"
        )
    kernel_shape = weight.shape[2:]
    samples, channels = activation.shape[:2]
    spatial = activation.shape[2:]
    if min(spatial, default=1) <= 0:
        return np.zeros(channels, dtype=np.float32)

    # Zero insertion: input pixel q sits at q·stride.
    upsampled = np.zeros(
        (samples, channels, *((n - 1) * s + 1 for n, s in zip(spatial, strides))), dtype=np.float32
    )
    upsampled[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = activation

    # Pad (or crop, where negative) each side so that the equivalent conv needs no padding of its own.
    crops, extra_pads = [], []
    for d in range(spatial_rank):
        reach = dilations[d] * (kernel_shape[d] - 1)
        begin = reach - pads[d]
        end = reach - pads[d + spatial_rank] + output_padding[d]
        length = upsampled.shape[2 + d]
        crops.append(slice(max(0, -begin), max(max(0, -begin), length - max(0, -end))))
        extra_pads.append((max(0, begin), max(0, end)))
    equivalent_input = np.pad(upsampled[(slice(None), slice(None), *crops)], [(0, 0), (0, 0), *extra_pads])

    flipped = weight[(slice(None), slice(None), *([slice(None, None, -1)] * spatial_rank))]
    equivalent_weight = np.ascontiguousarray(np.swapaxes(flipped, 0, 1))  # [C_out, C_in, *kernel]
    return conv_sensitivity(
        equivalent_input,
        equivalent_weight,
        strides=[1] * spatial_rank,
        pads=[0] * (2 * spatial_rank),
        dilations=list(dilations),
    )


def dense_sensitivity(activation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sensitivities s[C] (float32) of a dense layer's input channels over one calibration batch.

    activation is [..., C] (every leading index is one point/patch with its own z), weight is [F, C]
    (out, in; transpose an ONNX MatMul weight first). It is the conv case with one kernel offset.
    """
    activation = np.asarray(activation, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or activation.ndim < 1 or activation.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"activation {activation.shape} and weight {weight.shape} do not form a dense layer "
            "(expected [..., C] and [F, C] with the same C)"
        )
    channels = weight.shape[1]
    rows = activation.reshape(-1, channels)
    scorer = _MaxTimesScorer(weight[:, :, None])
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(channels, 2 * weight.shape[0])))
    for start in range(0, rows.shape[0], rows_per_chunk):
        for point in _sign_split(rows[start : start + rows_per_chunk]):
            scorer.update(np.ascontiguousarray(point.T)[:, None, :])
    return scorer.sensitivity


def _sign_split(points: np.ndarray) -> list[np.ndarray]:
    """a⁺ and a⁻ as separate nonnegative data points; a⁻ is skipped when empty (it would score 0)."""
    positive = np.maximum(points, 0)
    if not (points < 0).any():
        return [positive]
    return [positive, np.maximum(-points, 0)]


def _unfold(
    padded: np.ndarray,
    kernel_shape: Sequence[int],
    out_shape: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> np.ndarray:
    """im2col of padded [N, C, *spatial] into a contiguous [C, K, N·P] array (patches of all N samples)."""
    samples, channels = padded.shape[:2]
    spatial_strides = padded.strides[2:]
    view = np.lib.stride_tricks.as_strided(
        padded,
        shape=(samples, channels, *kernel_shape, *out_shape),
        strides=(
            *padded.strides[:2],
            *(s * d for s, d in zip(spatial_strides, dilations)),
            *(s * t for s, t in zip(spatial_strides, strides)),
        ),
        writeable=False,
    )
    rank = len(kernel_shape)
    # [N, C, *kernel, *out] -> [C, *kernel, N, *out]
    order = (1, *range(2, 2 + rank), 0, *range(2 + rank, 2 + 2 * rank))
    return view.transpose(order).reshape(channels, int(np.prod(kernel_shape)), -1)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """One pool for the whole run: a pool per batch starts new threads, each with fresh malloc arenas,
    and resident memory then creeps up with the number of batches."""
    return ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="pfp-sensitivity")


class _MaxTimesScorer:
    """Running max of g over patch blocks [C, K, P] of nonnegative data points, for one weight [F, C, K]."""

    def __init__(self, weight: np.ndarray) -> None:
        filters, channels, kernel_size = weight.shape
        positive = np.maximum(weight, 0)
        negative = np.minimum(weight, 0)
        self.positive_matrix = positive.reshape(filters, -1)
        self.negative_matrix = negative.reshape(filters, -1)
        # [K, C, 2F]: |W⁺| then |W⁻| along f, so that one max over the stacked filters covers both signs;
        # it pairs with inverse z's stacked the same way ([2F, P]).
        self.stacked_magnitude = np.ascontiguousarray(
            np.concatenate([positive, -negative], axis=0).transpose(2, 1, 0)
        )
        self.sensitivity = np.zeros(channels, dtype=np.float32)

    def update(self, patches: np.ndarray) -> None:
        """Fold the data points whose patches are patches[C, K, P] (P spans all their positions)."""
        channels, kernel_size, positions = patches.shape
        flat = patches.reshape(channels * kernel_size, positions)
        inverse_z = np.concatenate(
            [_inverse_magnitude(self.positive_matrix @ flat), _inverse_magnitude(self.negative_matrix @ flat)]
        )  # [2F, P]
        block = max(1, MAX_TIMES_BYTES // (4 * channels * inverse_z.shape[0]))
        starts = range(0, positions, block)

        def score_block(start: int) -> np.ndarray:
            stop = min(start + block, positions)
            inverse_block = inverse_z[:, start:stop]
            products = np.empty((channels, inverse_z.shape[0], stop - start), dtype=np.float32)
            block_max = np.zeros(channels, dtype=np.float32)
            for k in range(kernel_size):
                # best[c, p] = max_f |W[f, c, k]| / |z[f, p]|, then times a_unf[c, k, p].
                np.multiply(self.stacked_magnitude[k][:, :, None], inverse_block[None], out=products)
                best = products.max(axis=1)
                best *= patches[:, k, start:stop]
                np.maximum(block_max, best.max(axis=1), out=block_max)
            return block_max

        # numpy releases the GIL inside these loops, so position blocks run in parallel on threads.
        workers = min(len(starts), MAX_THREADS)
        if workers <= 1:
            block_maxima = [score_block(start) for start in starts]
        else:
            block_maxima = list(_pool().map(score_block, starts))
        np.maximum(self.sensitivity, np.max(block_maxima, axis=0), out=self.sensitivity)


def _inverse_magnitude(z: np.ndarray) -> np.ndarray:
    """1/|z|, with 0 where |z| ≤ eps (such denominators count as +infinity)."""
    magnitude = np.abs(z)
    inverse = np.zeros_like(magnitude)
    np.divide(1.0, magnitude, out=inverse, where=magnitude > Z_EPS)
    return inverse
