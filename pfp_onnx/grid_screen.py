"""Screen a conv's products on its input grid, without unfolding its patches.

Once a layer's running max is set, the max-times screen a_unf[(k, c), p] · L[p] > T[(k, c)] (L = max_f
inv_z, T the row thresholds of pfp_onnx.max_times) leaves ~0.01% of a ResNet's products, but reading its
K·C·P unfolded values, and unfolding them first, cost more than onnxruntime's pass that computes z±. Each
patch value is an input value a[c, q] read by K taps, so a coarser test on the input itself,
a[c, q] · M[q] > min_k T[(k, c)] with M[q] the largest L over the outputs whose patches read q, holds for
every (k, p) that passes the fine one (float32 products are monotonic in each factor): one pass over C·Q
values instead of K·C·P, which left 0.04–1% of them on ResNet-18. Only those are expanded to their taps
and tested finely, with the same float32 product as the screen on unfolded patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pfp_onnx.max_times import MAX_THREADS, Z_EPS, _nonzero, _parallel_map

__all__ = ["GRID_MAX_FRACTION", "grid_candidates", "inverse_at", "largest_inverse_of_parts"]

# More coarse survivors than this fraction of a chunk's input values and the chunk is unfolded instead:
# expanding one survivor to its K taps costs a few gathers per tap, the unfolded screen ~2 passes per tap.
GRID_MAX_FRACTION = 1 / 32


def grid_candidates(points: np.ndarray, largest_inverse: np.ndarray, threshold: np.ndarray, *,
                    kernel_shape: Sequence[int], out_shape: Sequence[int], strides: Sequence[int],
                    pads: Sequence[int], dilations: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The products of nonnegative points [N, C, *spatial] (unpadded: padding reads zeros, never a
    candidate) that the screen on unfolded patches would keep, as (row k·C + c, position n·P + p, patch
    value), or None when too many survive the coarse test.

    largest_inverse is L [N·P], max_f inv_z per output position; threshold is T [K·C]."""
    samples, channels = points.shape[:2]
    spatial = points.shape[2:]
    rank = len(spatial)
    begin = pads[:rank]
    taps = list(np.ndindex(*kernel_shape))
    covering = _covering_maximum(largest_inverse.reshape(samples, *out_shape), spatial, begin, pads[rank:], taps,
                                 out_shape, strides, dilations)
    lowest = threshold.reshape(len(taps), channels).min(axis=0)[:, None]  # [C, 1]
    values = points.reshape(samples, channels, -1)
    covering = covering.reshape(samples, 1, -1)
    per_block = max(1, -(-samples // MAX_THREADS))
    limit = GRID_MAX_FRACTION * values[0].size * per_block

    def screen(first: int) -> tuple[np.ndarray, np.ndarray] | None:
        block = values[first:first + per_block]
        with np.errstate(over="ignore"):  # an overflow to inf is the most promising value
            bound = block * covering[first:first + per_block]
        point_channel, grid = _nonzero((bound > lowest).reshape(-1, bound.shape[-1]))
        return None if len(grid) > limit else (point_channel + first * channels, grid)

    found = _parallel_map(screen, range(0, samples, per_block))
    if any(item is None for item in found):
        return None
    point_channel = np.concatenate([item[0] for item in found])
    grid = np.concatenate([item[1] for item in found])
    point, channel = np.divmod(point_channel, channels)
    value = values[point, channel, grid]
    coordinates = np.unravel_index(grid, spatial)
    positions = int(np.prod(out_shape))
    rows, columns, kept = [], [], []
    for index, tap in enumerate(taps):
        valid = np.ones(len(grid), dtype=bool)
        output = []
        for axis, offset in enumerate(tap):
            shifted = coordinates[axis] + begin[axis] - offset * dilations[axis]  # in padded coordinates
            along, remainder = np.divmod(shifted, strides[axis])
            valid &= (shifted >= 0) & (remainder == 0) & (along < out_shape[axis])
            output.append(along)
        which = np.flatnonzero(valid)
        column = point[which] * positions + np.ravel_multi_index([along[which] for along in output], out_shape)
        row = index * channels + channel[which]
        with np.errstate(over="ignore"):
            passes = value[which] * largest_inverse[column] > threshold[row]
        rows.append(row[passes])
        columns.append(column[passes])
        kept.append(value[which][passes])
    return np.concatenate(rows), np.concatenate(columns), np.concatenate(kept)


def largest_inverse_of_parts(plus: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """L [N·P'] = max over both parts' filters of inverse_of_parts(plus, minus), without forming it: the
    reciprocal of the smallest z above eps (division rounds monotonically, so it is the same float)."""
    samples, _, positions = plus.shape
    smallest = np.full((samples, positions), np.inf, dtype=np.float32)

    def reduce(sample: int) -> None:
        for part in (plus[sample], minus[sample]):
            np.minimum(smallest[sample], np.where(part > Z_EPS, part, np.float32(np.inf)).min(axis=0),
                       out=smallest[sample])

    _parallel_map(reduce, range(samples))
    return np.divide(1.0, smallest, out=smallest).reshape(-1)  # 1/inf = 0: no filter counts


def inverse_at(plus: np.ndarray, minus: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """inverse_of_parts(plus, minus)[:, columns].T ([len(columns), 2F]), read at those columns only."""
    positions = plus.shape[2]
    point, position = np.divmod(columns, positions)
    z = np.concatenate([plus[point, :, position], minus[point, :, position]], axis=1)
    inverse = np.zeros_like(z)
    np.divide(1.0, z, out=inverse, where=z > Z_EPS)
    return inverse


def _covering_maximum(largest: np.ndarray, spatial: Sequence[int], begin: Sequence[int], end: Sequence[int],
                      taps: list[tuple[int, ...]], out_shape: Sequence[int], strides: Sequence[int],
                      dilations: Sequence[int]) -> np.ndarray:
    """M [N, *spatial]: per input position q, the largest L over the outputs p whose patches read q
    (0 where none does, such as cropped borders). Built on the padded grid, then cut to the input."""
    padded = [n + b + e for n, b, e in zip(spatial, begin, end)]
    covering = np.zeros((len(largest), *padded), dtype=np.float32)
    for tap in taps:
        window = covering[(slice(None), *(slice(k * d, k * d + s * (n - 1) + 1, s) for k, d, s, n
                                          in zip(tap, dilations, strides, out_shape)))]
        np.maximum(window, largest, out=window)
    return np.ascontiguousarray(covering[(slice(None), *(slice(b, b + n) for b, n in zip(begin, spatial)))])
