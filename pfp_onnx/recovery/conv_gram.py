"""Moments of a stride-1 conv's patch features without unfolding them (the lstsq recovery's Gram).

The unfolded features of a K-tap conv are K shifted copies of its padded input, so their Gram
Σ_p x[c, k, p] x[c', k', p] is a sum of products of the input with itself shifted by the taps' distance.
With the padded input laid out as rows Y [L, C] (L = samples × padded positions, flattened), tap k reads
the window W_k of flat positions (o + k·dilation for every output position o), and tap k' reads W_k
moved by the flat offset off = off(k') − off(k) ≥ 0 (taps in row-major order). Then

    G[(c, k), (c', k')] = Σ_{u ∈ W_k} Y[u, c] · Y[u + off, c']
                        = (Y[:L−off]ᵀ @ Y[off:])[c, c']  −  the same sum over the flat positions u < L − off
                          outside W_k (the padding rows and columns, and pairs that run into the next row
                          or sample),

one BLAS product per distinct offset (13 for a 3×3 kernel; all of them at once, chunk by chunk of rows)
shared by every tap pair at that offset, less a small product over the border per tap. Those sums are kept
over all of a layer's batches (PatchMoments), and the Gram is assembled from them once. For a 3×3 conv on
56×56 inputs that is ~2.4× fewer multiply-adds than the symmetric product of the 9× larger unfolded
features, and nothing is unfolded. Features are centred by a per-channel shift; the padding (whose centred
value is −shift) is added from sums over the few output positions that read it. Strided convs, convs whose
border is large next to their output, and small Grams keep the unfolded path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pfp_onnx.conv_geometry import padded_and_out

__all__ = ["PatchMoments", "patch_moments", "worth_it"]

# Below this many multiply-adds, a chunk's unfolded Gram costs a millisecond or two either way, and the
# fixed costs of shifted products (a few small BLAS calls and gathers per tap) take back their savings.
# Measured, with the index arrays cached per batch shape (_geometry), shifted ÷ unfolded time: 0.73 for
# 8×16×28×28, 0.75 for 26×16×28×28, 0.80 for 26×32×14×14, 0.5 for 26×128×28×28; 0.97 for 2×16×28×28
# (16M multiply-adds), 1.0 for 26×16×14×14 (53M).
MIN_GRAM_MACS = 2**25
# Rows of shifted copies built per BLAS product in _shifted_products (measured on 64×56×56 and 128×28×28
# batches: 4-16 MB chunks fastest, 25% faster than one product per offset over all rows).
SHIFTED_CHUNK_BYTES = 16 * 2**20
MIN_SHIFTED_ROWS = 512


def worth_it(activation_shape: Sequence[int], *, strides: Sequence[int], pads: Sequence[int],
             dilations: Sequence[int], kernel_shape: Sequence[int]) -> bool:
    """Whether shifted products of a chunk [N, C, *spatial] cost fewer multiply-adds than its unfolded
    Gram (per channel pair and sample: one pass over the padded positions per distinct offset plus, per
    tap, its border's data positions times the taps from it on, against K²/2 products per output
    position), and the Gram is large enough to matter."""
    samples, channels, *spatial = activation_shape
    if any(stride != 1 for stride in strides):
        return False
    taps = int(np.prod(kernel_shape, dtype=np.int64))
    if taps == 1:
        return False  # a 1×1 conv's features are its input: nothing to unfold in the first place
    padded, out = padded_and_out(spatial, pads, dilations, kernel_shape)
    if min(out) <= 0:
        return False
    geometry = _geometry(1, tuple(int(size) for size in spatial), tuple(int(pad) for pad in pads),
                         tuple(int(step) for step in dilations), tuple(int(size) for size in kernel_shape))
    shifted = (len(geometry.offsets) * int(np.prod(padded))
               + sum(len(border) * (taps - k) for k, border in enumerate(geometry.borders)))
    unfolded = taps * taps * int(np.prod(out)) / 2
    return shifted < unfolded and unfolded * channels * channels * samples >= MIN_GRAM_MACS


def patch_moments(activation: np.ndarray, shift: np.ndarray, *, pads: Sequence[int], dilations: Sequence[int],
                  kernel_shape: Sequence[int]) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, Σ(x − s) [C·K] and Σ(x − s)(x − s)ᵀ [C·K, C·K] (float64) of the stride-1 conv's patch
    features x (feature index c·K + k, zero padding giving zero features) of activation [N, C, *spatial],
    about the per-channel shift s [C] (the same for all K taps of a channel): PatchMoments of one chunk."""
    moments = PatchMoments(shift, np.shape(activation)[2:], pads=pads, dilations=dilations, kernel_shape=kernel_shape)
    moments.add(activation)
    return moments.moments()


class PatchMoments:
    """The moments of patch_moments over every chunk of input it is fed, kept in the compact form the shifted
    products give them: a [C, C] sum per distinct tap distance, each tap's border products and window sums,
    and the padding's sums. moments() assembles the [C·K, C·K] Gram once per layer, where assembling it per
    chunk (K² float64 blocks, the padding's share, a transpose) cost 8% of a batch's time at 128 channels,
    19% at 256 and more than the products at 512 (3×3 kernels, 32 samples). The compact form also holds fewer
    numbers than the Gram ((13 + 45)·C² against 81·C² for a 3×3 kernel).

    Products are float32 BLAS and sums float64, as in FeatureStatistics' fast mode. The canvas holds a − s
    inside and 0 in the padding (Y); a padding feature's centred value is −s, so x − s = Y − s·pad, and the
    padding's share is added from small sums over the output positions that read padding — never as large
    products that the border correction would have to cancel."""

    def __init__(self, shift: np.ndarray, spatial: Sequence[int], *, pads: Sequence[int], dilations: Sequence[int],
                 kernel_shape: Sequence[int]) -> None:
        self.shift = np.asarray(shift, dtype=np.float32)
        self.spatial = tuple(int(size) for size in spatial)
        self._pads = tuple(int(pad) for pad in pads)
        self._dilations = tuple(int(step) for step in dilations)
        self._kernel_shape = tuple(int(size) for size in kernel_shape)
        # tap distances depend on the input size alone: one sample's cached geometry has them
        geometry = _geometry(1, self.spatial, self._pads, self._dilations, self._kernel_shape)
        self._tap_offsets, self._offsets = geometry.tap_offsets, geometry.offsets
        kernel_size, channels = len(self._tap_offsets), len(self.shift)
        self.count = 0
        self._window_sums = np.zeros((kernel_size, channels), dtype=np.float64)  # Σ Y over each tap's window
        self._offset_products = np.zeros((len(self._offsets), channels, channels), dtype=np.float64)
        # per tap k: Σ over its border of Y ⊗ Y at each later tap's distance, [C, K − k, C]
        self._border_products = [np.zeros((channels, kernel_size - k, channels), dtype=np.float64)
                                 for k in range(kernel_size)]
        self._padded_sums = np.zeros((kernel_size, kernel_size, channels), dtype=np.float64)
        self._edge_counts = np.zeros((kernel_size, kernel_size), dtype=np.float64)

    @property
    def feature_shift(self) -> np.ndarray:
        """The shift of every feature c·K + k (float64), as FeatureStatistics keeps it."""
        return np.repeat(self.shift.astype(np.float64), len(self._window_sums))

    def add(self, activation: np.ndarray) -> None:
        """Fold one chunk [N, C, *spatial]."""
        activation = np.asarray(activation, dtype=np.float32)
        if activation.shape[1:] != (len(self.shift), *self.spatial):
            raise ValueError(f"a chunk {activation.shape} does not fit moments of [N, {len(self.shift)}, "
                             f"{', '.join(map(str, self.spatial))}]")
        samples, channels = activation.shape[:2]
        if not samples:
            return
        geometry = _geometry(samples, self.spatial, self._pads, self._dilations, self._kernel_shape)
        tap_offsets, length, kernel_size = geometry.tap_offsets, geometry.length, len(geometry.tap_offsets)
        # Positions-major [N, *padded, C] (gathering positions copies whole rows), plus zero rows past the
        # end so that a border position shifted by any tap distance is still a row (a zero product).
        rows = np.zeros((length + int(tap_offsets[-1]), channels), dtype=np.float32)
        canvas = rows[:length].reshape(samples, *geometry.padded, channels)
        np.subtract(np.moveaxis(activation, 1, -1), self.shift, out=canvas[geometry.interior])

        self.count += samples * geometry.outputs
        self._window_sums += rows.sum(axis=0, dtype=np.float64)
        self._offset_products += _shifted_products(rows, length, self._offsets)
        for k, border in enumerate(geometry.borders):
            if not len(border):
                continue
            border_rows = rows[border]
            self._window_sums[k] -= border_rows.sum(axis=0, dtype=np.float64)
            # Every later tap's border products at once: [C, K − k, C].
            partners = rows[border[:, None] + (tap_offsets[k:] - tap_offsets[k])[None, :]]
            self._border_products[k] += (border_rows.T @ partners.reshape(len(border), -1)).reshape(
                channels, kernel_size - k, channels)
        # What each tap reads at the output positions where some tap reads padding (see moments()).
        read = rows[geometry.edge_reads].reshape(len(geometry.edge_indicator), kernel_size * channels)  # [E, K·C]
        self._padded_sums += (geometry.edge_indicator.T @ read).reshape(kernel_size, kernel_size, channels)
        self._edge_counts += geometry.edge_counts

    def moments(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Count, Σ(x − s) [C·K] and Σ(x − s)(x − s)ᵀ [C·K, C·K] (float64, feature index c·K + k)."""
        kernel_size, channels = self._window_sums.shape
        tap_offsets = self._tap_offsets
        index = {offset: position for position, offset in enumerate(self._offsets)}
        shift, padded_sums, counts = self.shift.astype(np.float64), self._padded_sums, self._edge_counts
        square = np.outer(shift, shift)
        padding = np.empty((channels, channels), dtype=np.float64)
        products = np.empty((kernel_size, kernel_size, channels, channels), dtype=np.float64)  # Σ (x − s)(x' − s')
        for k in range(kernel_size):
            for later, k2 in enumerate(range(k, kernel_size)):
                block = products[k, k2]
                np.subtract(self._offset_products[index[int(tap_offsets[k2] - tap_offsets[k])]],
                            self._border_products[k][:, later], out=block)
                # The padding's share of Σ (Y − s·pad)(Y' − s'·pad'), from the output positions where some tap
                # reads padding: with I[e, j] = "tap j reads padding at e" and Y[e, k] what tap k reads there,
                # the pair (k, j) loses Σ_e I[e, j] Y[e, k] ⊗ s and s ⊗ Σ_e I[e, k] Y[e, j], and gains
                # Σ_e I[e, k] I[e, j] · s ⊗ s (the two losses summed first, so a diagonal block stays symmetric).
                np.multiply.outer(padded_sums[k2, k], shift, out=padding)
                padding += np.multiply.outer(shift, padded_sums[k, k2])
                block -= padding
                block += counts[k, k2] * square
                if k2 != k:
                    products[k2, k] = block.T
        shifted_sum = self._window_sums - np.diag(counts)[:, None] * shift
        # [k, k2, c, c'] → feature order c·K + k
        gram = products.transpose(2, 0, 3, 1).reshape(channels * kernel_size, channels * kernel_size)
        return self.count, shifted_sum.T.reshape(-1), gram


class _Geometry(NamedTuple):
    """What patch_moments reads where, for one batch shape: it depends on the shape alone, and every batch
    of a layer (and layers of one shape) repeat it, so it is computed once."""

    padded: tuple[int, ...]
    interior: tuple[slice, ...]  # the data inside the canvas [N, *padded, C]
    outputs: int  # output positions per sample
    length: int  # flat positions of the padded batch
    tap_offsets: np.ndarray  # flat distance of each tap from the first, increasing
    offsets: list[int]  # the distinct tap distances ≥ 0
    borders: list[np.ndarray]  # per tap: flat data positions outside its window (padding rows are zeros)
    edge_indicator: np.ndarray  # [E, K] float32: tap k reads padding at edge output position e
    edge_counts: np.ndarray  # [K, K] float64: indicatorᵀ indicator
    edge_reads: np.ndarray  # [E, K]: the flat position tap k reads at edge output position e


@functools.lru_cache(maxsize=16)
def _geometry(samples: int, spatial: tuple[int, ...], pads: tuple[int, ...], dilations: tuple[int, ...],
              kernel_shape: tuple[int, ...]) -> _Geometry:
    padded, out = padded_and_out(spatial, pads, dilations, kernel_shape)
    tap_offsets = _tap_offsets(padded, dilations, kernel_shape)
    length = samples * int(np.prod(padded))
    interior = (slice(None), *(slice(pads[axis], pads[axis] + size) for axis, size in enumerate(spatial)))
    padding = np.ones((samples, *padded), dtype=bool)
    padding[interior] = False
    padding = padding.reshape(-1)
    # Tap k reads the flat positions of the first tap's window (the outputs' block at each sample's
    # origin) moved by tap_offsets[k].
    first_window = np.arange(length, dtype=np.int64).reshape(samples, *padded)[
        (slice(None), *(slice(0, size) for size in out))].reshape(-1)
    windows = np.stack([first_window + offset for offset in tap_offsets], axis=1)  # [N·P, K]
    kernel_size = len(tap_offsets)
    borders = []
    for k in range(kernel_size):
        inside = np.zeros(length, dtype=bool)
        inside[windows[:, k]] = True
        # For a 3×3 conv with 'same' padding, one data row and column per sample at most (none for the
        # centre tap).
        borders.append(np.flatnonzero(~(inside | padding)))
    reads_padding = padding[windows]  # [N·P, K]
    edge = np.flatnonzero(reads_padding.any(axis=1))
    indicator = reads_padding[edge].astype(np.float32)  # 0/1: float32 sums over it are BLAS products
    counts = (reads_padding[edge].T.astype(np.int64) @ reads_padding[edge].astype(np.int64)).astype(np.float64)
    offsets = sorted({int(later - earlier) for index, earlier in enumerate(tap_offsets)  # distances ≥ 0
                      for later in tap_offsets[index:]})
    geometry = _Geometry(padded, interior, int(np.prod(out)), length, tap_offsets, offsets, borders, indicator,
                         counts, windows[edge])
    for array in (tap_offsets, *borders, *geometry[-3:]):
        array.flags.writeable = False  # shared by every later call with this shape
    return geometry


def _shifted_products(rows: np.ndarray, length: int, offsets: Sequence[int]) -> np.ndarray:
    """Σ_{u < length} rows[u]ᵀ rows[u + offset] for each offset, [D, C, C] float64 (rows past `length` are
    zeros). Per chunk of rows, one BLAS product against the chunk's D shifted copies side by side: a product
    with D·C columns runs near BLAS's peak, where D products with C columns over all rows ran at a third
    of it for C = 64 (their output is too small to use both cores); chunks are summed in float64."""
    channels, count = rows.shape[1], len(offsets)
    step = max(MIN_SHIFTED_ROWS, SHIFTED_CHUNK_BYTES // (4 * count * channels))
    shifted = np.empty((min(step, length), count * channels), dtype=np.float32)
    part = np.empty((channels, count * channels), dtype=np.float32)
    total = np.zeros((channels, count * channels), dtype=np.float64)
    # Consecutive offsets (a kernel row's taps) are copied as one overlapping window of the rows: the row
    # u of offsets o, o + 1, … side by side is rows[u + o], rows[u + o + 1], …, contiguous in memory.
    runs, first = [], 0
    for index in range(1, count + 1):
        if index == count or offsets[index] != offsets[index - 1] + 1:
            runs.append((first, index))
            first = index
    flat = rows.reshape(-1)
    for start in range(0, length, step):
        stop = min(start + step, length)
        for first, last in runs:
            begin = (start + offsets[first]) * channels
            window = np.lib.stride_tricks.as_strided(flat[begin:], shape=(stop - start, (last - first) * channels),
                                                     strides=(rows.strides[0], rows.strides[1]), writeable=False)
            shifted[:stop - start, first * channels:last * channels] = window
        np.matmul(rows[start:stop].T, shifted[:stop - start], out=part)
        total += part
    return total.reshape(channels, count, channels).transpose(1, 0, 2)


def _tap_offsets(padded: Sequence[int], dilations: Sequence[int], kernel_shape: Sequence[int]) -> np.ndarray:
    """Flat distance of each tap (row-major) from the first in a padded sample: increasing, since a step
    along an axis spans more than the whole kernel along the later axes."""
    rank = len(kernel_shape)
    flat_strides = np.array([int(np.prod(padded[axis + 1:])) for axis in range(rank)], dtype=np.int64)
    taps = np.stack(np.meshgrid(*[np.arange(k) for k in kernel_shape], indexing="ij"), axis=-1).reshape(-1, rank)
    return taps @ (np.asarray(dilations, dtype=np.int64) * flat_strides)
