"""Screen a conv's products on its input grid, without unfolding its patches.

Once a layer's running max is set, the max-times screen a_unf[(k, c), p] · L[p] > T[(k, c)] (L = max_f
inv_z, T the row thresholds of pfp_onnx.sensitivity.max_times) leaves ~0.01% of a ResNet's products, but reading its
K·C·P unfolded values, and unfolding them first, cost more than onnxruntime's pass that computes z±. Each
patch value is an input value a[c, q] read by K taps, so a coarser test on the input itself,
a[c, q] · M[q] > min_k T[(k, c)] with M[q] the largest L over the outputs whose patches read q, holds for
every (k, p) that passes the fine one (float32 products are monotonic in each factor): one pass over C·Q
values instead of K·C·P, which left 0.04–1% of them on ResNet-18. Only those are expanded to their taps
and tested finely, with the same float32 product as the screen on unfolded patches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from pfp_onnx.conv_geometry import tap_window
from pfp_onnx.sensitivity.max_times import MAX_THREADS, Z_EPS, inverse_in_place, nonzero_2d, parallel_map

__all__ = ["GRID_MAX_FRACTION", "grid_candidates", "grid_seed", "inverse_at", "largest_inverse_of_parts"]

# More coarse survivors than this fraction of a chunk's input values and the chunk is unfolded instead:
# expanding one survivor to its K taps costs a few gathers per tap, the unfolded screen ~2 passes per tap.
# Measured: 1/8 let every chunk of MNIST's and ResNet-56's 64-channel convs through (3–6% survive; 1/32
# sent all of MNIST's and 80% of ResNet-56's to the unfolded path), and their scoring took 25–45% less.
GRID_MAX_FRACTION = 1 / 8
# inverse_at reads at least this many columns a thread.
INVERSE_AT_MIN_COLUMNS = 1024
# Temporaries of one block of largest_inverse_of_parts.
LARGEST_INVERSE_BYTES = 4 * 2**20
# Inputs with up to this many (position, tap) pairs keep a table of where each tap takes each position
# (4 bytes an entry); larger ones (3-D volumes) work it out for each chunk's survivors.
TAP_TABLE_ENTRIES = 2**21


def grid_candidates(points: np.ndarray, largest_inverse: np.ndarray, threshold: np.ndarray, *,
                    kernel_shape: Sequence[int], out_shape: Sequence[int], strides: Sequence[int],
                    pads: Sequence[int], dilations: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The products of nonnegative points [N, C, *spatial] (unpadded: padding reads zeros, never a
    candidate) that the screen on unfolded patches would keep, as (row k·C + c, position n·P + p, patch
    value), or None when too many survive the coarse test.

    largest_inverse is L [N·P], max_f inv_z per output position; threshold is T [K·C]."""
    grid = _Grid(points.shape, kernel_shape, out_shape, strides, pads, dilations)
    samples, channels = points.shape[:2]
    lowest = threshold.reshape(len(grid.taps), channels).min(axis=0)[:, None]  # [C, 1]
    values = points.reshape(samples, channels, -1)
    covering = grid.covering(largest_inverse)
    per_block = max(1, -(-samples // MAX_THREADS))
    limit = GRID_MAX_FRACTION * values[0].size * per_block

    def screen(first: int) -> tuple[np.ndarray, np.ndarray] | None:
        block = values[first:first + per_block]
        with np.errstate(over="ignore"):  # an overflow to inf is the most promising value
            bound = block * covering[first:first + per_block]
        point_channel, place = nonzero_2d((bound > lowest).reshape(-1, bound.shape[-1]))
        return None if len(place) > limit else (point_channel + first * channels, place)

    found = parallel_map(screen, range(0, samples, per_block))
    if any(item is None for item in found):
        return None

    def expand(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # each block's survivors on a thread
        point, channel = np.divmod(found[index][0], channels)
        place = found[index][1]
        return grid.expand(point, channel, place, values[point, channel, place], largest_inverse, threshold)

    return tuple(np.concatenate(parts) for parts in zip(*parallel_map(expand, range(len(found)))))


def grid_seed(points: np.ndarray, largest_inverse: np.ndarray, *, kernel_shape: Sequence[int],
              out_shape: Sequence[int], strides: Sequence[int], pads: Sequence[int],
              dilations: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, every product of the input value with the largest a · M (as grid_candidates returns
    them): a few exact products that give a layer thresholds before its first screen, as
    MaxTimesScorer's own seed does on unfolded patches."""
    grid = _Grid(points.shape, kernel_shape, out_shape, strides, pads, dilations)
    samples, channels = points.shape[:2]
    values = points.reshape(samples, channels, -1)
    with np.errstate(over="ignore"):
        bound = (values * grid.covering(largest_inverse)).transpose(1, 0, 2).reshape(channels, -1)
    best = bound.argmax(axis=1)
    channel = np.flatnonzero(bound[np.arange(channels), best] > 0)
    point, place = np.divmod(best[channel], values.shape[2])
    return grid.expand(point, channel, place, values[point, channel, place], largest_inverse)


def largest_inverse_of_parts(plus: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """L [N·P'] = max over both parts' filters of inverse_of_parts(plus, minus), without forming it: the
    reciprocal of the smallest z above eps (division rounds monotonically, so it is the same float).

    The smallest z above eps is found on the parts' bits: a float32 ≥ 0 orders like its bits as an
    unsigned integer, and subtracting the bits of the next float above eps (wrapping) moves every z ≤ eps,
    −0, NaN and negative value above every z > eps, inf included: one integer pass and one min, several
    times faster than masking the floats."""
    samples, filters, positions = plus.shape
    smallest = np.empty((samples, positions), dtype=np.uint32)
    # Blocks of whole samples, a few MB of temporaries each (per sample, small layers paid for the calls).
    per_block = max(1, min(-(-samples // MAX_THREADS), LARGEST_INVERSE_BYTES // (4 * filters * positions)))

    def reduce(first: int) -> None:
        block = slice(first, first + per_block)
        np.minimum((_bits(plus[block]) - _ABOVE_EPS).min(axis=1), (_bits(minus[block]) - _ABOVE_EPS).min(axis=1),
                   out=smallest[block])

    parallel_map(reduce, range(0, samples, per_block))
    some_above = smallest <= _INF - _ABOVE_EPS  # else no filter's z is above eps: L = 0
    smallest += _ABOVE_EPS
    inverse = np.zeros(smallest.shape, dtype=np.float32)
    np.divide(1.0, smallest.view(np.float32), out=inverse, where=some_above)
    return inverse.reshape(-1)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


_ABOVE_EPS = np.uint32(np.nextafter(np.float32(Z_EPS), np.float32(1)).view(np.uint32))
_INF = np.uint32(np.float32(np.inf).view(np.uint32))


def inverse_at(plus: np.ndarray, minus: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """inverse_of_parts(plus, minus)[:, columns].T ([len(columns), 2F]), read at those columns only."""
    filters, positions = plus.shape[1:]
    point, position = np.divmod(columns, positions)
    inverse = np.empty((len(columns), 2 * filters), dtype=np.float32)
    step = max(INVERSE_AT_MIN_COLUMNS, -(-len(columns) // MAX_THREADS))

    def read(first: int) -> None:  # gathers of scattered columns: both cores
        rows = slice(first, first + step)
        inverse[rows, :filters] = plus[point[rows], :, position[rows]]
        inverse[rows, filters:] = minus[point[rows], :, position[rows]]
        inverse_in_place(inverse[rows])

    parallel_map(read, range(0, len(columns), step))
    return inverse


class _Grid:
    """Where a conv's input positions meet its taps and output positions (ONNX pads, any rank)."""

    def __init__(self, shape: Sequence[int], kernel_shape: Sequence[int], out_shape: Sequence[int],
                 strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int]) -> None:
        self.samples, self.channels, *spatial = shape
        self.spatial = tuple(spatial)
        rank = len(spatial)
        self.begin, self.end = tuple(pads[:rank]), tuple(pads[rank:])
        self.taps = list(np.ndindex(*kernel_shape))
        self.out_shape, self.strides, self.dilations = tuple(out_shape), tuple(strides), tuple(dilations)

    def covering(self, largest_inverse: np.ndarray) -> np.ndarray:
        """M [N, 1, Q]: per input position q, the largest L over the outputs p whose patches read q (0
        where none does, such as cropped borders). Built on the padded grid, then cut to the input."""
        padded = [n + b + e for n, b, e in zip(self.spatial, self.begin, self.end)]
        covering = np.zeros((self.samples, *padded), dtype=np.float32)
        largest = largest_inverse.reshape(self.samples, *self.out_shape)
        for tap in self.taps:
            window = covering[(slice(None), *tap_window(tap, self.dilations, self.strides, self.out_shape))]
            np.maximum(window, largest, out=window)
        inside = covering[(slice(None), *(slice(b, b + n) for b, n in zip(self.begin, self.spatial)))]
        return np.ascontiguousarray(inside).reshape(self.samples, 1, -1)

    def expand(self, point: np.ndarray, channel: np.ndarray, place: np.ndarray, value: np.ndarray,
               largest_inverse: np.ndarray, threshold: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The products (row k·C + c, position n·P + p, value) that input values (point, channel, flat
        place) make through each tap reaching an output; with a threshold, those whose value · L passes
        it (the screen's fine test, the same float32 product). All taps at once, [survivors, K]: one
        call per tap cost more than the arithmetic for the many survivors of small layers."""
        geometry = (tuple(self.taps), self.out_shape, self.strides, self.begin, self.dilations)
        if int(np.prod(self.spatial)) * len(self.taps) <= TAP_TABLE_ENTRIES:
            output = _tap_table(self.spatial, *geometry)[place]  # [S, K], −1: the tap reaches no output
        else:  # a huge input (3-D volumes): only the survivors' places
            output = _tap_outputs(np.unravel_index(place, self.spatial), *geometry)
        reaches = output >= 0
        positions = int(np.prod(self.out_shape))
        if threshold is not None:
            column = point[:, None] * positions + np.where(reaches, output, 0)
            with np.errstate(over="ignore"):
                reaches &= (value[:, None] * largest_inverse[column]
                            > threshold.reshape(len(self.taps), self.channels).T[channel])
        survivor, tap = np.nonzero(reaches)
        return (tap * self.channels + channel[survivor], point[survivor] * positions + output[survivor, tap],
                value[survivor])


@functools.lru_cache(maxsize=16)
def _tap_table(spatial: tuple[int, ...], *geometry) -> np.ndarray:
    """_tap_outputs of every input position (a layer's geometry repeats batch after batch: built once)."""
    table = _tap_outputs(np.indices(spatial).reshape(len(spatial), -1), *geometry)
    table.flags.writeable = False
    return table


def _tap_outputs(coordinates: Sequence[np.ndarray], taps: tuple[tuple[int, ...], ...], out_shape: tuple[int, ...],
                 strides: tuple[int, ...], begin: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """[Q, K]: the flat output position that the input position at `coordinates` (one array per axis)
    reaches through tap k, or −1."""
    table = np.empty((len(coordinates[0]), len(taps)), dtype=np.int32)
    for index, tap in enumerate(taps):
        valid = np.ones(len(coordinates[0]), dtype=bool)
        output = []
        for axis, offset in enumerate(tap):
            shifted = coordinates[axis] + begin[axis] - offset * dilations[axis]  # on the padded grid
            along, remainder = np.divmod(shifted, strides[axis])
            valid &= (shifted >= 0) & (remainder == 0) & (along < out_shape[axis])
            output.append(np.where(valid, along, 0))
        table[:, index] = np.where(valid, np.ravel_multi_index(output, out_shape), -1)
    return table
