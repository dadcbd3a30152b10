"""PFP sensitivities of a layer's input channels over one calibration batch (PFP.md §1).

s_c is the largest *relative contribution* any single weight·activation product of channel c makes to
the positive or negative part of any output neuron, over the batch:

    g±[f, c, k, p] = |W±[f, c, k]| · a_unf[c, k, p] / |z±[f, p]|,      s_c = max over points, f, k, p

where W⁺ = max(W, 0), W⁻ = min(W, 0), a ≥ 0 is a data point (a⁺ and a⁻ of every sample count as two
points), a_unf its patches and z± = layer(a; W±) without bias; |z| ≤ float32 eps counts as +∞ (ratio 0).

Why it is fast: with inv_z[f, p] = 1/|z[f, p]| the quantity factorises as
    s_c = max_k max_p a_unf[c, k, p] · max_f |W[f, c, k]| · inv_z±[f, p],
a "max-times" matrix product costing C·K·F·P per point (BLAS cannot do it), with z itself from one BLAS
matmul. Almost none of it is evaluated: a running max is kept, and the bound a_unf · max_f |W| · max_f inv_z
(one pass over the patches) shows that nearly every (c, k, p) cannot raise it; only the rest are evaluated
exactly (see _MaxTimesScorer). The points of a batch are concatenated along p (each keeps its own z).
The *Scorer classes keep a running max over the batches they are fed; the *_sensitivity functions score a
single batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")

__all__ = ["ConvScorer", "ConvTransposeScorer", "DenseScorer", "conv_sensitivity", "conv_transpose_sensitivity",
           "dense_sensitivity"]

# Denominators at or below this are treated as +infinity (the reference's float32 eps cut-off).
Z_EPS = float(np.finfo(np.float32).eps)
# Upper bound on the bytes of any large temporary (a chunk's unfolded patches or its inverse z's).
CHUNK_BYTES = 64 * 2**20
# Size of one thread's max-times temporary: large enough to amortise Python overhead, small enough to
# stay near cache (8 MB measured fastest for a 64x64x3x3 conv; 0.25 MB was 8x slower, 64 MB 1.5x).
MAX_TIMES_BYTES = 8 * 2**20
# Size of the products of one step of exact evaluation at gathered candidates (measured fastest near 512 KB).
VERIFY_BYTES = 2**19
MAX_THREADS = min(8, os.cpu_count() or 1)
# The power of the p-norm that bounds a max over filters from above (see _MaxTimesScorer.update): 2^4,
# so that powers and roots are four squarings and four square roots.
BOUND_SQUARINGS = 4
BOUND_POWER = 2**BOUND_SQUARINGS
# With fewer stacked filters (2F) than this, evaluating every product is cheaper than bounding.
BOUND_MIN_FILTERS = 32
# A screen leaving more than this fraction of a block's products for exact evaluation is abandoned for the
# dense paths (gathering candidates one by one costs several times a dense product).
SCREEN_MAX_FRACTION = 1 / 8
# The bound path keeps its float64 weight powers ([K·C, 2F]) for a whole batch up to this size.
BOUND_CACHE_BYTES = 64 * 2**20
# Weights up to this size also keep [|W⁺|; |W⁻|] whole (2× their size); larger ones are cut per block.
STACKED_CACHE_BYTES = 32 * 2**20
# A batch's positions are screened in about this many waves (more waves tighten later thresholds sooner;
# each costs a little Python).
SCREEN_WAVES = 4
# Fewest positions in one screened block (smaller blocks cost more in Python than they save).
MIN_SCREEN_BLOCK = 256
SMALLEST_POSITIVE = float(np.nextafter(np.float32(0), np.float32(1)))
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConvScorer:
    """Running sensitivities of a group=1 Conv's input channels, fed batch by batch.

    weight is [F, C, *kernel]; pads follow ONNX order (x1_begin, x2_begin, …, x1_end, x2_end, …). Zero
    padding contributes zero products. Any number of spatial axes works. The weight is prepared once, so a
    capture pass builds one scorer per layer and feeds it every batch.
    """

    def __init__(self, weight: np.ndarray, *, strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int]) -> None:
        weight = np.asarray(weight, dtype=np.float32)
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
        self._scorer = _MaxTimesScorer(weight.reshape(self.filters, self.channels, -1))

    @property
    def sensitivity(self) -> np.ndarray:
        return self._scorer.sensitivity

    def update(self, activation: np.ndarray) -> None:
        """Fold one batch [N, C, *spatial]."""
        activation = np.asarray(activation, dtype=np.float32)
        if activation.ndim != self.spatial_rank + 2 or activation.shape[1] != self.channels:
            raise ValueError(
                f"activation {activation.shape} does not fit a conv weight with C={self.channels} and "
                f"{self.spatial_rank} spatial axes (expected [N, C, *spatial])"
            )
        rank = self.spatial_rank
        padded = np.pad(activation, [(0, 0), (0, 0)] + [(self.pads[d], self.pads[d + rank]) for d in range(rank)])
        out_shape = tuple(
            (padded.shape[2 + d] - self.dilations[d] * (self.kernel_shape[d] - 1) - 1) // self.strides[d] + 1
            for d in range(rank)
        )
        if min(out_shape, default=1) <= 0:
            return
        positions = int(np.prod(out_shape))
        kernel_size = int(np.prod(self.kernel_shape))
        # Unfold a chunk of samples at a time; per position it holds C·K patch values and 2F inverse z's.
        bytes_per_sample = 4 * positions * max(self.channels * kernel_size, 2 * self.filters)
        samples_per_chunk = max(1, CHUNK_BYTES // bytes_per_sample)
        for start in range(0, padded.shape[0], samples_per_chunk):
            for point in _sign_split(padded[start : start + samples_per_chunk]):
                self._scorer.update(_unfold(point, self.kernel_shape, out_shape, self.strides, self.dilations))


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
                 dilations: Sequence[int], output_padding: Sequence[int] | None = None) -> None:
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
                                strides=[1] * rank, pads=[0] * (2 * rank), dilations=self.dilations)

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
        self._scorer = _MaxTimesScorer(weight[:, :, None])

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
    """im2col of padded [N, C, *spatial] into one contiguous [K·C, N·P] array, rows ordered (k, c) like
    the stacked weights (one copy; the patches of all N samples side by side)."""
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
    order = (*range(2, 2 + rank), 1, 0, *range(2 + rank, 2 + 2 * rank))
    return view.transpose(order).reshape(int(np.prod(kernel_shape)) * channels, -1)


def _parallel_map(function: Callable[[int], T], items: Sequence[int]) -> list[T]:
    """function over items, on the pool's threads when there are several (numpy releases the GIL inside
    its loops, so blocks of one array run in parallel). Never called from a pool thread."""
    if len(items) <= 1 or MAX_THREADS <= 1:
        return [function(item) for item in items]
    return list(_pool().map(function, items))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """One pool for the whole run: a pool per batch starts new threads, each with fresh malloc arenas,
    and resident memory then creeps up with the number of batches."""
    return ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="pfp-sensitivity")


class _MaxTimesScorer:
    """Running max of g over patch blocks of nonnegative data points, for one weight [F, C, K].

    Per block, z± come from one BLAS product; then the cheapest sufficient path runs:
    - screen, then verify: g ≤ a_unf · max_f |W[f, c, k]| · max_f inv_z[f, p] costs one pass over the
      patches and, once the running max is established, rules out nearly every (c, k, p) (97–99.9% on a
      trained ResNet after its first batch); the rest are evaluated exactly. Before its first screen, a
      layer seeds its running max with the exact g at each row's most promising position.
    - when the screen leaves too many products (over SCREEN_MAX_FRACTION, or for many filters, over the
      point where the BLAS bound is cheaper): every product (few filters) or bound-then-verify (many).
    Every path evaluates a product with the same float32 operations, so they agree bit for bit.
    """

    def __init__(self, weight: np.ndarray) -> None:
        filters, channels, kernel_size = weight.shape
        # [F, K·C], columns ordered (k, c) like the patches. The signed weight is the only copy kept (a view
        # of the caller's for dense layers): |W⁺| and |W⁻| are cut from it block by block when needed,
        # stacked along f ([2F, …]) so that one max over the stacked filters covers both signs, paired
        # with inverse z's stacked the same way ([2F, P]).
        self.weight = weight[:, :, 0] if kernel_size == 1 else \
            np.ascontiguousarray(weight.transpose(0, 2, 1)).reshape(filters, kernel_size * channels)
        self.filters = filters
        self.sensitivity = np.zeros(channels, dtype=np.float32)
        # max_f |W[f, k, c]| for the screen, without a weight-sized temporary
        self._largest_magnitude = np.maximum(self.weight.max(axis=0), -self.weight.min(axis=0))
        # Layers of ordinary size keep [|W⁺|; |W⁻|] whole (one GEMM for z, plain gathers): only weights
        # above STACKED_CACHE_BYTES, such as a huge dense layer, are cut block by block.
        self._stacked = _stacked(self.weight) if self.weight.nbytes <= STACKED_CACHE_BYTES else None
        self._seeded = False

    def update(self, flat: np.ndarray) -> None:
        """Fold the data points whose patches are flat[K·C, P], rows ordered (k, c), P spanning all
        their positions."""
        positions = flat.shape[1]
        inverse_z = _inverse(self._z(flat))  # [2F, P]
        largest_inverse = inverse_z.max(axis=0)  # [P]
        if not self._seeded and SCREEN_MAX_FRACTION > 0:
            self._seed(flat, inverse_z, largest_inverse)
            self._seeded = True
        dense = self._update_exactly if 2 * self.filters < BOUND_MIN_FILTERS else self._update_by_bounds
        for first, last in self._screen_and_verify(flat, inverse_z, largest_inverse):
            dense(flat, inverse_z, first, last)

    def _z(self, flat: np.ndarray) -> np.ndarray:
        """z⁺ and |z⁻| [2F, P] for every position by BLAS, [F, K·C] @ [K·C, P] per sign: nonnegative
        factors, so no cancellation and no sign to strip. Filters go in blocks of about MAX_TIMES_BYTES
        of weights, so |W±| never exist whole."""
        if self._stacked is not None:
            return self._stacked @ flat
        z = np.empty((2 * self.filters, flat.shape[1]), dtype=np.float32)
        step = max(1, MAX_TIMES_BYTES // (4 * self.weight.shape[1]))
        for first in range(0, self.filters, step):
            last = min(first + step, self.filters)
            part = self.weight[first:last]
            np.matmul(np.maximum(part, 0), flat, out=z[first:last])
            np.matmul(np.maximum(-part, 0), flat, out=z[self.filters + first:self.filters + last])
        return z

    def _magnitudes(self, columns: slice | np.ndarray) -> np.ndarray:
        """[|W⁺|; |W⁻|] [2F, n] of some weight columns (a slice, or an index array to gather)."""
        if isinstance(columns, slice):
            return self._stacked[:, columns] if self._stacked is not None else _stacked(self.weight[:, columns])
        if self._stacked is not None:
            return np.take(self._stacked, columns, axis=1)
        return _stacked(np.take(self.weight, columns, axis=1))

    def _seed(self, flat: np.ndarray, inverse_z: np.ndarray, largest_inverse: np.ndarray) -> None:
        """Before a layer's first screen, raise its running max from zero to the exact g at each row's most
        promising position (the largest a_unf · max_f inv_z): a few products per channel, and usually
        close enough to the final max for the screen to rule out nearly everything."""
        block = max(1, MAX_TIMES_BYTES // (4 * len(flat)))
        best_value = np.zeros(len(flat), dtype=np.float32)
        best_position = np.zeros(len(flat), dtype=np.intp)
        for start in range(0, flat.shape[1], block):
            with np.errstate(over="ignore"):  # an infinite bound is simply the most promising
                bound = flat[:, start:start + block] * largest_inverse[start:start + block]
            position = bound.argmax(axis=1)
            value = bound[np.arange(len(flat)), position]
            better = value > best_value
            best_value[better] = value[better]
            best_position[better] = position[better] + start
        row = np.flatnonzero(best_value > 0)
        self._verify(inverse_z, flat, row, best_position[row])

    def _screen_and_verify(self, flat: np.ndarray, inverse_z: np.ndarray,
                           largest_inverse: np.ndarray) -> list[tuple[int, int]]:
        """Screen every position, block by block on threads, and evaluate the survivors exactly; return
        the position ranges whose blocks left too many of their products (those need a dense path). The screen's bound a_unf · max_f |W| · max_f inv_z carries a 1e-4 margin, far above
        the float32 rounding of either side, so no product above the running max is ever screened out."""
        rows, positions = flat.shape
        limit = SCREEN_MAX_FRACTION
        if 2 * self.filters >= BOUND_MIN_FILTERS:
            # An exact check costs ~2F gathers; the bound path ~2F BLAS multiply-adds (tens of times
            # cheaper each) plus a few passes: measured break-even near 2% + 3/(2F) of the products.
            limit = min(limit, 0.02 + 3 / (2 * self.filters))
        if limit <= 0:
            return [(0, positions)] if positions else []
        # Several waves per batch: each wave's thresholds include what the waves before it found.
        block = max(MIN_SCREEN_BLOCK, min(MAX_TIMES_BYTES // (4 * rows),
                                          -(-positions // (MAX_THREADS * SCREEN_WAVES))))
        starts = range(0, positions, block)
        row_threshold = None

        def screen_block(start: int) -> tuple[np.ndarray, np.ndarray] | None:
            stop = min(start + block, positions)
            with np.errstate(over="ignore"):  # an infinite bound is simply a candidate
                bound = flat[:, start:stop] * largest_inverse[start:stop]
            row, position = _nonzero(bound > row_threshold)
            if len(row) > limit * bound.size:
                return None
            return row, position + start

        dense = []
        for wave in range(0, len(starts), MAX_THREADS):  # a wave's candidates are all that is held at once
            row_threshold = self._row_threshold()
            found = []
            for start, candidates in zip(starts[wave:wave + MAX_THREADS],
                                         _parallel_map(screen_block, starts[wave:wave + MAX_THREADS])):
                if candidates is not None:
                    found.append(candidates)
                elif dense and dense[-1][1] == start:
                    dense[-1] = (dense[-1][0], min(start + block, positions))
                else:
                    dense.append((start, min(start + block, positions)))
            if found:
                self._verify(inverse_z, flat, np.concatenate([row for row, _ in found]),
                             np.concatenate([position for _, position in found]))
        return dense

    def _row_threshold(self) -> np.ndarray:
        """Per patch row (k, c), the value of a_unf · max_f inv_z above which a product of that row might
        beat the running max of c: s_c / max_f |W[f, c, k]|, less a 1e-4 margin ([K·C, 1], float32)."""
        running = np.tile(self.sensitivity, len(self._largest_magnitude) // len(self.sensitivity))
        with np.errstate(divide="ignore"):
            threshold = np.where(self._largest_magnitude > 0,
                                 running.astype(np.float64) / (1 + 1e-4) / self._largest_magnitude, np.inf)
        # A finite threshold beyond float32 stays finite, so an overflowing bound (inf) is still a candidate.
        threshold = np.where(np.isinf(threshold), np.inf, np.minimum(threshold, FLOAT32_MAX))
        return threshold.astype(np.float32)[:, None]

    def _update_exactly(self, flat: np.ndarray, inverse_z: np.ndarray, first: int, last: int) -> None:
        """Every product of positions [first, last), block by block: cheaper than bounding when there
        are few filters."""
        channels = len(self.sensitivity)
        kernel_size = len(flat) // channels
        block = max(1, MAX_TIMES_BYTES // (4 * channels * len(inverse_z)))
        starts = range(first, last, block)

        def score_block(start: int) -> np.ndarray:
            stop = min(start + block, last)
            inverse_block = inverse_z[:, start:stop]
            products = np.empty((channels, len(inverse_z), stop - start), dtype=np.float32)
            block_max = np.zeros(channels, dtype=np.float32)
            for k in range(kernel_size):
                rows = slice(k * channels, (k + 1) * channels)
                # best[c, p] = max_f |W[f, c, k]| / |z[f, p]|, then times a_unf[c, k, p].
                np.multiply(self._magnitudes(rows).T[:, :, None], inverse_block[None], out=products)
                best = products.max(axis=1)
                best *= flat[rows, start:stop]
                np.maximum(block_max, best.max(axis=1), out=block_max)
            return block_max

        block_maxima = _parallel_map(score_block, starts)
        if block_maxima:
            np.maximum(self.sensitivity, np.max(block_maxima, axis=0), out=self.sensitivity)

    def _update_by_bounds(self, flat: np.ndarray, inverse_z: np.ndarray, first: int, last: int) -> None:
        """Bound, then verify. With x_f = |W[f, c, k]| · inv_z[f, p] ≥ 0, max_f x_f ≤ (Σ_f x_f^Q)^(1/Q) ≤
        (2F)^(1/Q) · max_f x_f, and the middle term is a BLAS matrix product. It bounds every (c, k, p)
        from above; a channel's max is at least its largest bound over (2F)^(1/Q); only the (c, k, p)
        whose bound reaches that (or the running max) are evaluated exactly, with the same float32
        products as before. Q-th powers are taken of values scaled to [0, 1] in float64 (exact unless a
        term lies 1e-38 below its row's and column's maxima, far below float32 resolution).
        """
        channels = len(self.sensitivity)
        rows, filters = len(flat), len(inverse_z)
        column_max = inverse_z.max(axis=1)  # [2F]
        # Weight rows are scaled and raised to the power in blocks, so temporaries stay near
        # MAX_TIMES_BYTES even for a dense layer of a billion weights; one block is computed once.
        rows_per_block = max(1, MAX_TIMES_BYTES // (8 * filters))
        row_blocks = [(r, min(r + rows_per_block, rows)) for r in range(0, rows, rows_per_block)]

        def weight_power(first_row: int, last_row: int) -> tuple[np.ndarray, np.ndarray]:
            scaled = self._magnitudes(slice(first_row, last_row)).T.astype(np.float64) * column_max[None, :]
            row_max = scaled.max(axis=1)  # [rows of the block]
            np.divide(scaled, row_max[:, None], out=scaled, where=row_max[:, None] > 0)
            scaled[row_max <= 0] = 0
            return _power(scaled), row_max

        # Kept for all position blocks unless the layer is huge (then recomputed per position block).
        cached = [weight_power(*block_rows) for block_rows in row_blocks] if 8 * rows * filters <= BOUND_CACHE_BYTES else None
        slack = filters ** (1.0 / BOUND_POWER) * (1 + 1e-4)
        block = max(1, MAX_TIMES_BYTES // (8 * max(min(rows, rows_per_block), filters)))
        for start in range(first, last, block):
            stop = min(start + block, last)
            scaled_z = np.zeros((filters, stop - start), dtype=np.float64)
            np.divide(inverse_z[:, start:stop], column_max[:, None], out=scaled_z, where=column_max[:, None] > 0)
            z_power = _power(scaled_z)
            bound = np.empty((rows, stop - start), dtype=np.float32)  # a_unf · bound ≥ every g of (k, c, p)
            for index, (first_row, last_row) in enumerate(row_blocks):
                power, row_max = cached[index] if cached else weight_power(first_row, last_row)
                part = bound[first_row:last_row]
                part[...] = _root((power @ z_power).astype(np.float32))
                part *= row_max[:, None]
            bound *= flat[:, start:stop]
            floor = np.maximum(bound.reshape(-1, channels, stop - start).max(axis=(0, 2)) / slack,
                               self.sensitivity)  # [C]
            # float32 roots carry ~1e-6 relative error: the margin only admits a few more candidates;
            # a zero bound means a zero contribution, never a candidate.
            threshold = np.maximum(floor / (1 + 1e-4), SMALLEST_POSITIVE).astype(np.float32)
            row, position = _nonzero(bound >= np.tile(threshold, rows // channels)[:, None])
            self._verify(inverse_z, flat, row, position + start)

    def _verify(self, inverse_z: np.ndarray, flat: np.ndarray, row: np.ndarray, position: np.ndarray) -> None:
        """The exact g of the candidates (row = k·C + c, p): max over the 2F stacked filters, times the
        patch value; candidates are split across threads."""
        channels = len(self.sensitivity)
        step = max(1, VERIFY_BYTES // (4 * len(inverse_z)))  # [2F, step] products stay in cache
        share = max(step, -(-len(row) // MAX_THREADS))

        def verify_share(begin: int) -> np.ndarray:
            best_by_channel = np.zeros(channels, dtype=np.float32)
            for first in range(begin, min(begin + share, len(row)), step):
                last = min(first + step, begin + share, len(row))
                r, p = row[first:last], position[first:last]
                products = self._magnitudes(r)
                products *= np.take(inverse_z, p, axis=1)
                best = products.max(axis=0)
                best *= flat[r, p]
                np.maximum.at(best_by_channel, r % channels, best)
            return best_by_channel

        for best_by_channel in _parallel_map(verify_share, range(0, len(row), share)):
            np.maximum(self.sensitivity, best_by_channel, out=self.sensitivity)


def _stacked(weight: np.ndarray) -> np.ndarray:
    """[|W⁺|; |W⁻|] of a block of signed weights [F, n]: the 2F stacked filters, as a new [2F, n] array."""
    stacked = np.empty((2 * len(weight), weight.shape[1]), dtype=np.float32)
    np.maximum(weight, 0, out=stacked[:len(weight)])
    np.maximum(np.negative(weight, out=stacked[len(weight):]), 0, out=stacked[len(weight):])
    return stacked


def _power(values: np.ndarray) -> np.ndarray:
    """values ** BOUND_POWER by repeated squaring, in place (values is a float64 array of the caller's)."""
    result = values
    for _ in range(BOUND_SQUARINGS):
        np.multiply(result, result, out=result)
    return result


def _root(values: np.ndarray) -> np.ndarray:
    """values ** (1 / BOUND_POWER) by repeated square roots (in place, float32 is plenty for a bound)."""
    for _ in range(BOUND_SQUARINGS):
        np.sqrt(values, out=values)
    return values


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a contiguous 2-D mask, several times faster when few entries are set: eight flags at
    a time are read as one 64-bit word, and only the nonzero words are unpacked."""
    columns = mask.shape[1]
    flags = mask.reshape(-1)
    tail = (-len(flags)) % 8
    if tail:
        flags = np.concatenate([flags, np.zeros(tail, dtype=np.bool_)])
    words = np.flatnonzero(flags.view(np.uint64))
    word, bit = np.nonzero(flags.reshape(-1, 8)[words])
    return np.divmod(words[word] * 8 + bit, columns)


def _inverse(z: np.ndarray) -> np.ndarray:
    """1/z of nonnegative z, in place, with 0 where z ≤ eps (such denominators count as +infinity)."""
    negligible = z <= Z_EPS
    np.divide(1.0, z, out=z, where=~negligible)
    z[negligible] = 0
    return z
