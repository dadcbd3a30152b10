"""Every product of a block of patch rows, tile by tile of positions, compiled (numba): the dense path.

Where the screens leave too many of a layer's products (ResNet-50's 1×1 convs: 10–50%), the exact max over
filters is cheaper to compute for whole tiles of positions than to bound and verify. Per patch row r = (k, c)
and tile of positions p, with a running max s_c:
- exact screen: if fl(fl(max_f |W±[f, r]| · max_f inv_z[f, p]) · a[r, p]) ≤ s_c for every p of the tile,
  nothing of the row can raise s_c there (float32 products are monotonic in each factor), and the row is
  skipped;
- otherwise acc[p] = max_f fl(|W±[f, r]| · inv_z[f, p]) over the filters whose weight is nonzero (each weight
  is nonzero in at most one of |W⁺|, |W⁻|), vectorised along the tile's positions, and g = fl(acc[p] · a[r, p]):
  the same float32 operations as every numpy path of pfp_onnx.sensitivity.max_times, so the results agree bit for bit.
Tiles are spread over numba's threads, each with its own copy of the running maxima.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["TILE", "compiled", "fold_tiles"]

# Positions of one tile: the tile's 1/z ([2F, TILE]) stay in cache while every row of the block reads them.
# Measured in nonzero products a second on 2 cores, rows × 2F = 256 × 2048: TILE 128 → 13.7 G, 256 → 15-16 G,
# 512 → 10.9 G; 64 × 512: 13.2, 16, 17.9 G (rows of 4 without skipping zeros did no better).
TILE = 256


def compiled(**options):
    """numba.njit that keeps its machine code in numba's cache (next to this file, else the user's cache
    folder), or compiles in every process where neither can be written (numba refuses cache=True there)."""
    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:
            return numba.njit(**options)(function)
    return decorate


@compiled(nogil=True)
def _raise(acc, weight, inverse_row):
    """acc = max(acc, fl(weight · inverse_row)), elementwise: a plain loop over contiguous rows vectorises."""
    for j in range(acc.shape[0]):
        product = weight * inverse_row[j]
        acc[j] = product if product > acc[j] else acc[j]


@compiled(nogil=True)
def _promising(magnitude, largest_inverse, patches, best):
    for j in range(patches.shape[0]):
        if (magnitude * largest_inverse[j]) * patches[j] > best:
            return True
    return False


@compiled(parallel=True, nogil=True)
def _fold(stacked, inverse, flat, largest_magnitude, largest_inverse, running, channel_of_first_row, first, last,
          tile, chunks):
    rows, filters = stacked.shape
    channels = running.shape[0]
    tiles = (last - first + tile - 1) // tile
    out = np.empty((chunks, channels), dtype=np.float32)
    for chunk in numba.prange(chunks):
        local = running.copy()
        for index in range(chunk * tiles // chunks, (chunk + 1) * tiles // chunks):
            start = first + index * tile
            stop = min(start + tile, last)
            block = np.ascontiguousarray(inverse[:, start:stop])
            acc = np.empty(stop - start, dtype=np.float32)
            for row in range(rows):
                channel = (channel_of_first_row + row) % channels
                best = local[channel]
                patches = flat[row, start:stop]
                if not _promising(largest_magnitude[row], largest_inverse[start:stop], patches, best):
                    continue
                acc[:] = 0
                for f in range(filters):
                    if stacked[row, f] != 0:
                        _raise(acc, stacked[row, f], block[f])
                for j in range(acc.shape[0]):
                    g = acc[j] * patches[j]
                    best = g if g > best else best
                local[channel] = best
        out[chunk] = local
    return out


def fold_tiles(stacked: np.ndarray, inverse: np.ndarray, flat: np.ndarray, largest_magnitude: np.ndarray,
               largest_inverse: np.ndarray, running: np.ndarray, first_row: int, first: int, last: int) -> None:
    """Raise running [C] (in place) to the max g of patch rows first_row … first_row + len(stacked) − 1 over
    positions [first, last): stacked [n, 2F] their |W±|, flat [n, P] their patches, largest_magnitude [n]
    their max_f |W±|; inverse [2F, P] and largest_inverse [P] are 1/z± and their max over filters."""
    tiles = -(-(last - first) // TILE)
    if tiles <= 0 or not len(stacked):
        return
    chunks = max(1, min(tiles, 4 * numba.get_num_threads()))
    # Contiguous (a no-op for every caller today): each other layout would be compiled anew.
    stacked, inverse, flat, largest_magnitude, largest_inverse = (
        np.ascontiguousarray(array, dtype=np.float32)
        for array in (stacked, inverse, flat, largest_magnitude, largest_inverse))
    found = _fold(stacked, inverse, flat, largest_magnitude, largest_inverse, running,
                  first_row % len(running), first, last, TILE, chunks)
    np.maximum(running, found.max(axis=0), out=running)
