"""PFP sensitivities of a layer's input channels over one calibration batch (docs/method.md §1).

s_c is the largest *relative contribution* any single weight·activation product of channel c makes to
the positive or negative part of any output neuron, over the batch:

    g±[f, c, k, p] = |W±[f, c, k]| · a_unf[c, k, p] / |z±[f, p]|,      s_c = max over points, f, k, p

where W⁺ = max(W, 0), W⁻ = min(W, 0), a ≥ 0 is a data point (a⁺ and a⁻ of every sample count as two
points), a_unf its patches and z± = layer(a; W±) without bias; |z| ≤ float32 eps counts as +∞ (ratio 0).

Why it is fast: with inv_z[f, p] = 1/|z[f, p]| the quantity factorises as
    s_c = max_k max_p a_unf[c, k, p] · max_f |W[f, c, k]| · inv_z±[f, p],
a "max-times" matrix product costing C·K·F·P per point (BLAS cannot do it), with z itself from one BLAS
matmul — or, for most convs, from the capture model, which computes it in place of the conv
(pfp_onnx.sensitivity.conv_parts). Almost none of the max-times product is evaluated: a running max is kept, and the
bound a_unf · max_f |W| · max_f inv_z (one pass over the patches) shows that nearly every (c, k, p)
cannot raise it; only the rest are evaluated exactly (see pfp_onnx.sensitivity.max_times). Convs whose parts come from
the capture model are screened on their input values instead, never unfolding their patches
(pfp_onnx.sensitivity.grid_screen). The points of a batch are concatenated along p (each keeps its own z). The
*Scorer classes keep a running max over the batches they are fed; the *_sensitivity functions score a
single batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pfp_onnx.sensitivity import max_times
from pfp_onnx.conv_geometry import padded_and_out, zero_padded
from pfp_onnx.sensitivity.grid_screen import grid_candidates, grid_seed, inverse_at, largest_inverse_of_parts
from pfp_onnx.sensitivity.max_times import MaxTimesScorer, inverse_of_parts, touched_positions

__all__ = ["ConvScorer", "ConvTransposeScorer", "DenseScorer", "UnfoldBuffer", "conv_sensitivity",
           "conv_transpose_sensitivity", "dense_sensitivity"]

# Upper bound on the bytes of any large temporary (a chunk's unfolded patches or its inverse z's).
CHUNK_BYTES = 64 * 2**20


class UnfoldBuffer:
    """Memory for unfolded patches, reused chunk after chunk and, when shared, layer after layer: malloc
    maps a chunk of tens of MB afresh each time, and faulting its pages in cost 2-3× the copy itself."""

    def __init__(self) -> None:
        self._memory = np.empty(0, dtype=np.float32)

    def take(self, shape: Sequence[int]) -> np.ndarray:
        """A float32 array of `shape` over the buffer (valid until the next take)."""
        size = int(np.prod(shape))
        if self._memory.size < size:
            self._memory = np.empty(size, dtype=np.float32)
        return self._memory[:size].reshape(shape)


class ConvScorer:
    """Running sensitivities of a group=1 Conv's input channels, fed batch by batch.

    weight is [F, C, *kernel]; pads follow ONNX order (x1_begin, x2_begin, …, x1_end, x2_end, …). Zero
    padding contributes zero products. Any number of spatial axes works. The weight is prepared once, so a
    capture pass builds one scorer per layer and feeds it every batch.
    """

    def __init__(self, weight: np.ndarray, *, strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int], buffer: UnfoldBuffer | None = None) -> None:
        weight = np.asarray(weight, dtype=np.float32)
        self._buffer = buffer if buffer is not None else UnfoldBuffer()
        self.spatial_rank = weight.ndim - 2
        if self.spatial_rank < 0:
            raise ValueError(f"a conv weight is [F, C, *kernel], got {weight.shape}")
        if not (len(strides) == len(dilations) == self.spatial_rank and len(pads) == 2 * self.spatial_rank):
            raise ValueError(
                f"need {self.spatial_rank} strides/dilations and {2 * self.spatial_rank} pads, "
                f"got {len(strides)}, {len(dilations)} and {len(pads)}"
            )
        self.filters, self.channels = weight.shape[:2]
        self.kernel_shape = weight.shape[2:]
        self.strides, self.pads, self.dilations = list(strides), list(pads), list(dilations)
        self._scorer = MaxTimesScorer(weight.reshape(self.filters, self.channels, -1))

    @property
    def sensitivity(self) -> np.ndarray:
        return self._scorer.sensitivity

    def update(self, activation: np.ndarray, parts: Sequence[np.ndarray] | None = None) -> None:
        """Fold one batch [N, C, *spatial]. parts [N, F, *out] each, when the capture model computed them
        (pfp_onnx.sensitivity.conv_parts): z⁺ and |z⁻| of the batch, used where it is nonnegative (as it is
        there); or z⁺ and |z⁻| of its positive half a⁺ followed by those of its negative half a⁻, the two
        points the batch is split into, used whatever its signs."""
        activation = np.asarray(activation, dtype=np.float32)
        if activation.ndim != self.spatial_rank + 2 or activation.shape[1] != self.channels:
            raise ValueError(
                f"activation {activation.shape} does not fit a conv weight with C={self.channels} and "
                f"{self.spatial_rank} spatial axes (expected [N, C, *spatial])"
            )
        _, out_shape = padded_and_out(activation.shape[2:], self.pads, self.dilations, self.kernel_shape,
                                      self.strides)
        if min(out_shape, default=1) <= 0:
            return
        positions = int(np.prod(out_shape))
        kernel_size = int(np.prod(self.kernel_shape))
        # Unfold a chunk of samples at a time; per position it holds C·K patch values and 2F inverse z's.
        bytes_per_sample = 4 * positions * max(self.channels * kernel_size, 2 * self.filters)
        samples_per_chunk = max(1, CHUNK_BYTES // bytes_per_sample)
        expected = (len(activation), self.filters, *out_shape)
        if parts is not None and (len(parts) not in (2, 4) or any(tuple(np.shape(part)) != expected
                                                                   for part in parts)):
            raise ValueError(f"z parts {[np.shape(part) for part in parts]} do not fit the outputs {expected} "
                             "(two parts of a nonnegative batch, or two of each of its halves)")
        for start in range(0, len(activation), samples_per_chunk):
            chunk = activation[start : start + samples_per_chunk]
            points = _sign_split(chunk)
            if parts is not None and (len(parts) == 4 or len(points) == 1):
                # The parts of a⁺ and a⁻ in turn; a nonnegative chunk is its own a⁺ (its a⁻ would score 0).
                for point, pair in zip(points, (parts[:2], parts[2:])):
                    self._update_from_parts(point, *(
                        np.asarray(part[start : start + samples_per_chunk], dtype=np.float32)
                        .reshape(len(chunk), self.filters, positions) for part in pair), out_shape=out_shape)
            else:
                for point in points:
                    self._scorer.update(self._unfold(point, out_shape))

    def _update_from_parts(self, points: np.ndarray, plus: np.ndarray, minus: np.ndarray, *,
                           out_shape: tuple[int, ...]) -> None:
        """Nonnegative points whose z⁺ and |z⁻| [N, F, P] came from the capture model: screened on the input
        grid without unfolding (pfp_onnx.sensitivity.grid_screen), or on unfolded patches when that screen leaves too
        much (or screening is off)."""
        if max_times.SCREEN_MAX_FRACTION > 0:
            geometry = dict(kernel_shape=self.kernel_shape, out_shape=out_shape, strides=self.strides,
                            pads=self.pads, dilations=self.dilations)
            largest = largest_inverse_of_parts(plus, minus)
            if not self._scorer.seeded:
                self._scorer.seed_from(*_compact(plus, minus, *grid_seed(points, largest, **geometry)))
            found = grid_candidates(points, largest, self._scorer.row_threshold()[:, 0], **geometry)
            if found is not None:
                self._scorer.fold_candidates(*_compact(plus, minus, *found), by_row=True, loose=True)
                return
        self._scorer.update(self._unfold(points, out_shape), inverse_of_parts(plus, minus))

    def _unfold(self, points: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        return _unfold(zero_padded(points, self.pads), self.kernel_shape, out_shape, self.strides, self.dilations,
                       self._buffer)


class ConvTransposeScorer:
    """Running sensitivities of a group=1 ConvTranspose's input channels, fed batch by batch.

    weight is in ONNX ConvTranspose layout [C_in, C_out, *kernel]; pads follow ONNX order. The definition
    is conv_sensitivity's, for the scatter form of the layer: input position q and kernel offset k land
    (per spatial axis) on output position o = q·stride + k·dilation − pad_begin when 0 ≤ o < out_size, with
    out_size = stride·(in − 1) + output_padding + (kernel − 1)·dilation + 1 − pad_begin − pad_end, and
    g±[c, f, k, o] = W±[c, f, k] · a[c, q] / z±[f, o], maximised over everything.

    It is computed as the equivalent stride-1 Conv: insert stride − 1 zeros between input pixels, pad each
    axis by dilation·(kernel − 1) − pad_begin at the start and dilation·(kernel − 1) − pad_end +
    output_padding at the end (cropping where that is negative: the cropped inputs land on no valid output),
    flip the kernel spatially and swap its first two axes to [C_out, C_in, *kernel], then score that conv
    with stride 1, the same dilation and no further padding. Every (q, k) → o pair of the transposed conv is
    exactly one nonzero-able product of that conv, with the same z; the inserted and padded zeros only add
    zero products, which do not change z or the max.
    """

    def __init__(self, weight: np.ndarray, *, strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int], output_padding: Sequence[int] | None = None,
                 buffer: UnfoldBuffer | None = None) -> None:
        weight = np.asarray(weight, dtype=np.float32)
        rank = weight.ndim - 2
        if rank < 0:
            raise ValueError(f"a ConvTranspose weight is [C_in, C_out, *kernel], got {weight.shape}")
        output_padding = [0] * rank if output_padding is None else list(output_padding)
        if not (len(strides) == len(dilations) == len(output_padding) == rank and len(pads) == 2 * rank):
            raise ValueError(
                f"need {rank} strides/dilations/output_padding and {2 * rank} pads, got "
                f"{len(strides)}, {len(dilations)}, {len(output_padding)} and {len(pads)}"
            )
        self.rank, self.channels, self.kernel_shape = rank, weight.shape[0], weight.shape[2:]
        self.strides, self.pads, self.dilations = list(strides), list(pads), list(dilations)
        self.output_padding = output_padding
        flipped = weight[(slice(None), slice(None), *([slice(None, None, -1)] * rank))]
        self._conv = ConvScorer(np.ascontiguousarray(np.swapaxes(flipped, 0, 1)),  # [C_out, C_in, *kernel]
                                strides=[1] * rank, pads=[0] * (2 * rank), dilations=self.dilations,
                                buffer=buffer)

    @property
    def sensitivity(self) -> np.ndarray:
        return self._conv.sensitivity

    def update(self, activation: np.ndarray) -> None:
        activation = np.asarray(activation, dtype=np.float32)
        if activation.ndim != self.rank + 2 or activation.shape[1] != self.channels:
            raise ValueError(
                f"activation {activation.shape} does not fit a ConvTranspose weight with C_in={self.channels} "
                "(expected [N, C_in, *spatial])"
            )
        samples, channels = activation.shape[:2]
        spatial = activation.shape[2:]
        if min(spatial, default=1) <= 0:
            return
        # Zero insertion: input pixel q sits at q·stride.
        upsampled = np.zeros(
            (samples, channels, *((n - 1) * s + 1 for n, s in zip(spatial, self.strides))), dtype=np.float32
        )
        upsampled[(slice(None), slice(None), *(slice(None, None, s) for s in self.strides))] = activation
        # Pad (or crop, where negative) each side so that the equivalent conv needs no padding of its own.
        crops, extra_pads = [], []
        for d in range(self.rank):
            reach = self.dilations[d] * (self.kernel_shape[d] - 1)
            begin = reach - self.pads[d]
            end = reach - self.pads[d + self.rank] + self.output_padding[d]
            length = upsampled.shape[2 + d]
            crops.append(slice(max(0, -begin), max(max(0, -begin), length - max(0, -end))))
            extra_pads.append((max(0, begin), max(0, end)))
        self._conv.update(np.pad(upsampled[(slice(None), slice(None), *crops)], [(0, 0), (0, 0), *extra_pads]))


class DenseScorer:
    """Running sensitivities of a dense layer's input channels, fed batch by batch.

    weight is [F, C] (out, in; transpose an ONNX MatMul weight first); every leading index of an
    activation [..., C] is one point/patch with its own z. It is the conv case with one kernel offset.
    """

    def __init__(self, weight: np.ndarray) -> None:
        weight = np.asarray(weight, dtype=np.float32)
        if weight.ndim != 2:
            raise ValueError(f"a dense weight is [F, C], got {weight.shape}")
        self.filters, self.channels = weight.shape
        self._scorer = MaxTimesScorer(weight[:, :, None])

    @property
    def sensitivity(self) -> np.ndarray:
        return self._scorer.sensitivity

    def update(self, activation: np.ndarray) -> None:
        activation = np.asarray(activation, dtype=np.float32)
        if activation.ndim < 1 or activation.shape[-1] != self.channels:
            raise ValueError(f"activation {activation.shape} does not fit a dense weight with C={self.channels}")
        rows = activation.reshape(-1, self.channels)
        rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(self.channels, 2 * self.filters)))
        for start in range(0, rows.shape[0], rows_per_chunk):
            for point in _sign_split(rows[start : start + rows_per_chunk]):
                self._scorer.update(np.ascontiguousarray(point.T))


def conv_sensitivity(activation: np.ndarray, weight: np.ndarray, *, strides: Sequence[int],
                     pads: Sequence[int], dilations: Sequence[int]) -> np.ndarray:
    """Sensitivities s[C] (float32) of a group=1 Conv's input channels over one batch [N, C, *spatial]."""
    weight = np.asarray(weight)
    if np.ndim(activation) != weight.ndim or np.shape(activation)[1] != weight.shape[1]:
        raise ValueError(
            f"activation {np.shape(activation)} and weight {weight.shape} do not form a group=1 conv "
            "(expected [N, C, *spatial] and [F, C, *kernel] with the same C)"
        )
    scorer = ConvScorer(weight, strides=strides, pads=pads, dilations=dilations)
    scorer.update(activation)
    return scorer.sensitivity


def conv_transpose_sensitivity(activation: np.ndarray, weight: np.ndarray, *, strides: Sequence[int],
                               pads: Sequence[int], dilations: Sequence[int],
                               output_padding: Sequence[int] | None = None) -> np.ndarray:
    """Sensitivities s[C_in] (float32) of a group=1 ConvTranspose's input channels over one batch
    (see ConvTransposeScorer for the definition and how it is computed)."""
    weight = np.asarray(weight)
    if weight.ndim < 2 or np.ndim(activation) != weight.ndim or np.shape(activation)[1] != weight.shape[0]:
        raise ValueError(
            f"activation {np.shape(activation)} and weight {weight.shape} do not form a group=1 ConvTranspose "
            "(expected [N, C_in, *spatial] and [C_in, C_out, *kernel] with the same C_in)"
        )
    scorer = ConvTransposeScorer(weight, strides=strides, pads=pads, dilations=dilations,
                                 output_padding=output_padding)
    scorer.update(activation)
    return scorer.sensitivity


def dense_sensitivity(activation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sensitivities s[C] (float32) of a dense layer's input channels over one batch [..., C]."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or np.ndim(activation) < 1 or np.shape(activation)[-1] != weight.shape[1]:
        raise ValueError(
            f"activation {np.shape(activation)} and weight {weight.shape} do not form a dense layer "
            "(expected [..., C] and [F, C] with the same C)"
        )
    scorer = DenseScorer(weight)
    scorer.update(activation)
    return scorer.sensitivity


def _compact(plus: np.ndarray, minus: np.ndarray, row: np.ndarray, position: np.ndarray,
             value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MaxTimesScorer.fold_candidates' arguments for products at (row, position): the inverse z's of each
    position they touch, read once (by row: [positions, 2F]), and the products' indices into them."""
    columns, index = touched_positions(position, plus.shape[0] * plus.shape[2])
    return inverse_at(plus, minus, columns), row, index, value


def _sign_split(points: np.ndarray) -> list[np.ndarray]:
    """a⁺ and a⁻ as separate nonnegative data points; a⁻ is skipped when empty (it would score 0).
    Activations after a ReLU are already a⁺ and are used as they are (one pass, no copy)."""
    if not points.size or points.min() >= 0:
        return [points]
    return [np.maximum(points, 0), np.maximum(-points, 0)]


def _unfold(
    padded: np.ndarray,
    kernel_shape: Sequence[int],
    out_shape: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    buffer: UnfoldBuffer,
) -> np.ndarray:
    """im2col of padded [N, C, *spatial] into one contiguous [K·C, N·P] array over `buffer`, rows ordered
    (k, c) like the stacked weights (one copy; the patches of all N samples side by side)."""
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
    # [N, C, *kernel, *out] -> [*kernel, C, N, *out]; one copy (threads do not speed it up)
    transposed = view.transpose((*range(2, 2 + rank), 1, 0, *range(2 + rank, 2 + 2 * rank)))
    flat = buffer.take(transposed.shape)
    np.copyto(flat, transposed)
    return flat.reshape(int(np.prod(kernel_shape)) * channels, -1)
