"""The running max of PFP's relative contributions g over patch blocks: the kernel behind the scorers.

For one consuming layer with weight W [F, K·C] (columns ordered (k, c) like the patches) and blocks of
nonnegative patches a_unf [K·C, P], it keeps s_c = max g[f, c, k, p] = max |W±[f, (k, c)]| · a_unf[(k, c), p]
/ z±[f, p] (see pfp_onnx.sensitivity.scorers for the definition). z± come from BLAS or from the capture model
(pfp_onnx.sensitivity.conv_parts); the max-times part, which BLAS cannot do, is mostly ruled out by bounds and
evaluated exactly only where a bound says it might matter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

__all__ = ["MaxTimesScorer", "inverse_in_place", "inverse_of_parts", "nonzero_2d", "parallel_map",
           "touched_positions"]

T = TypeVar("T")

# Denominators at or below this are treated as +infinity (the reference's float32 eps cut-off).
Z_EPS = float(np.finfo(np.float32).eps)
# Size of one thread's max-times temporary: large enough to amortise Python overhead, small enough to
# stay near cache (8 MB measured fastest for a 64x64x3x3 conv; 0.25 MB was 8x slower, 64 MB 1.5x).
MAX_TIMES_BYTES = 8 * 2**20
# Size of the products of one step of exact evaluation at gathered candidates: about one core's L2 (2 MB was
# 10-12% faster than 512 KB in fold_candidates on ResNet-56, ResNet-50 and a trained ResNet-18; 8 MB slower).
VERIFY_BYTES = 2 * 2**20
MAX_THREADS = min(8, os.cpu_count() or 1)
# Dense work (patch rows × stacked filters × positions) from which the compiled tiles (pfp_onnx.sensitivity.max_tiles) take
# over from numpy's dense paths. Measured with every dense block on tiles: the same time on ResNet-56 and the
# MNIST ResNet-20 once numba is loaded, and loading it costs ~1 s a process (~5 s the first time, while it
# compiles into its cache), so small blocks stay in numpy; on a trained ResNet-50 (0.1–3 G products a block)
# the sensitivity stage took 18% less (33.7 → 27.5 s over 64 points).
TILE_MIN_PRODUCTS = 2**28
# The power of the p-norm that bounds a max over filters from above (MaxTimesScorer._update_by_bounds):
# 2^4, so that powers and roots are four squarings and four square roots.
BOUND_SQUARINGS = 4
BOUND_POWER = 2**BOUND_SQUARINGS
# Scaled factors below this are dropped from the p-norm bound, so that every term left is a normal float32
# (BOUND_SMALLEST^(2·BOUND_POWER) > float32's smallest normal, 1.2e-38) and a dropped term is below it.
BOUND_SMALLEST = 0.07
# Relative slack of the float32 bounds: far above their rounding (at most ~2F·eps/BOUND_POWER ≈ 2e-5).
BOUND_MARGIN = 1e-3
# With fewer stacked filters (2F) than this, evaluating every product is cheaper than bounding.
BOUND_MIN_FILTERS = 32
# A screen leaving more than this fraction of a block's products for exact evaluation is abandoned for the
# dense paths (gathering candidates one by one costs several times a dense product).
SCREEN_MAX_FRACTION = 1 / 8
# The bound path keeps its weight powers ([K·C, 2F]) for a whole batch up to this size.
BOUND_CACHE_BYTES = 64 * 2**20
# Weights up to this size also keep [|W⁺|; |W⁻|] whole (2× their size); larger ones are cut per block.
STACKED_CACHE_BYTES = 32 * 2**20
# The tiered bound of fold_candidates evaluates exactly this many filters on each side: the largest weights of
# a candidate's row and the largest 1/z of its position (of a trained ResNet-18's grid candidates in its
# 64-channel convs, 1 left 44-48%, 2 left 23-26%, 3 left 14-16% but took as long in all).
TIERS = 2
# It runs when there are at least this many candidates per position they touch (finding each position's
# largest 1/z costs a few passes over its 2F values, about what an exact check of one candidate costs).
TIER_MIN_CANDIDATES = 4
# fold_candidates gathers the columns its candidates touch into rows for at least this many stacked filters,
# or this many candidates a position (measured per candidate on a trained ResNet-50: 2F = 512–2048 took 2.5–5×
# less time, 2F = 128 with 5–60 candidates a position 1.5–4× less; 2F = 128 or 32 with 1–2.5 a position up to
# 1.6× more).
COMPACT_MIN_FILTERS = 256
COMPACT_MIN_CANDIDATES = 4
# Candidates bounded at once (long numpy calls: the threads' many short ones queued on the GIL).
TIER_STEP = 2**16
# A batch's positions are screened in about this many waves (more waves tighten later thresholds sooner;
# each costs a little Python).
SCREEN_WAVES = 4
# Fewest positions in one screened block (smaller blocks cost more in Python than they save).
MIN_SCREEN_BLOCK = 256
SMALLEST_POSITIVE = float(np.nextafter(np.float32(0), np.float32(1)))
FLOAT32_MAX = float(np.finfo(np.float32).max)


def parallel_map(function: Callable[[int], T], items: Sequence[int]) -> list[T]:
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


class MaxTimesScorer:
    """Running max of g over patch blocks of nonnegative data points, for one weight [F, C, K] (the
    *Scorer classes of pfp_onnx.sensitivity.scorers feed it unfolded, sign-split batches).

    Per block, z± come from one BLAS product (or, for convs of the capture model's sign parts, from
    pfp_onnx.sensitivity.conv_parts); then the cheapest sufficient path runs:
    - screen, then verify: g ≤ a_unf · max_f |W[f, c, k]| · max_f inv_z[f, p] costs one pass over the
      patches and, once the running max is established, rules out nearly every (c, k, p) (97–99.9% on a
      trained ResNet after its first batch); the rest are evaluated exactly. Before its first screen, a
      layer seeds its running max with the exact g at each row's most promising position.
    - when the screen leaves too many products (over SCREEN_MAX_FRACTION, or for many filters, over the
      point where the BLAS bound is cheaper): every product, compiled tile by tile (pfp_onnx.sensitivity.max_tiles) for
      large blocks, else in numpy (few filters) or bound-then-verify (many).
    A screen's survivors meet a tighter, tiered bound before their exact evaluation (fold_candidates): on a
    trained ResNet it rules out three quarters of them for a few gathers each.
    A caller that screens elsewhere (pfp_onnx.sensitivity.grid_screen, on a conv's input values) uses row_threshold,
    seed_from and fold_candidates instead of update.
    Every path evaluates a product with the same float32 operations, so they agree bit for bit.
    """

    def __init__(self, weight: np.ndarray) -> None:
        filters, channels, kernel_size = weight.shape
        # [F, K·C], columns ordered (k, c) like the patches. The signed weight is the only copy kept (a view
        # of the caller's for dense layers): |W⁺| and |W⁻| are cut from it block by block when needed,
        # stacked along f ([…, 2F], a row per patch row) so that one max over the stacked filters covers
        # both signs, paired with inverse z's stacked the same way ([2F, P]).
        self.weight = weight[:, :, 0] if kernel_size == 1 else \
            np.ascontiguousarray(weight.transpose(0, 2, 1)).reshape(filters, kernel_size * channels)
        self.filters = filters
        self.sensitivity = np.zeros(channels, dtype=np.float32)
        # max_f |W[f, k, c]| for the screen, without a weight-sized temporary
        self._largest_magnitude = np.maximum(self.weight.max(axis=0), -self.weight.min(axis=0))
        # Layers of ordinary size keep [|W⁺|, |W⁻|] whole (one GEMM for z, gathers of contiguous rows): only
        # weights above STACKED_CACHE_BYTES, such as a huge dense layer, are cut block by block.
        self._stacked = _stacked(self.weight) if self.weight.nbytes <= STACKED_CACHE_BYTES else None
        self._seeded = False

    @functools.cached_property
    def _row_tiers(self) -> tuple[np.ndarray, np.ndarray]:
        """The largest stacked weights of each row, for fold_candidates' tiered bound (read on first use)."""
        return _tiers(self._stacked)

    @property
    def seeded(self) -> bool:
        """Whether the running max has been seeded, so that row_threshold() can rule products out."""
        return self._seeded

    def update(self, flat: np.ndarray, inverse_z: np.ndarray | None = None) -> None:
        """Fold the data points whose patches are flat[K·C, P], rows ordered (k, c), P spanning all
        their positions. inverse_z, when given, are their 1/z± [2F, P] from z± computed elsewhere
        (inverse_of_parts of pfp_onnx.sensitivity.conv_parts' outputs); otherwise z± come from BLAS."""
        if inverse_z is None:
            inverse_z = inverse_in_place(self._z(flat))  # [2F, P]
        largest_inverse = inverse_z.max(axis=0)  # [P]
        if not self._seeded and SCREEN_MAX_FRACTION > 0:
            self._seed(flat, inverse_z, largest_inverse)
            self._seeded = True
        for first, last in self._screen_and_verify(flat, inverse_z, largest_inverse):
            if len(flat) * len(inverse_z) * (last - first) >= TILE_MIN_PRODUCTS:
                self._update_by_tiles(flat, inverse_z, largest_inverse, first, last)
            elif 2 * self.filters < BOUND_MIN_FILTERS:
                self._update_exactly(flat, inverse_z, first, last)
            else:
                self._update_by_bounds(flat, inverse_z, largest_inverse, first, last)

    def _update_by_tiles(self, flat: np.ndarray, inverse_z: np.ndarray, largest_inverse: np.ndarray,
                         first: int, last: int) -> None:
        """Every product of positions [first, last), compiled (pfp_onnx.sensitivity.max_tiles), rows in blocks of about
        MAX_TIMES_BYTES of |W±| when the layer does not keep them whole."""
        from pfp_onnx.sensitivity.max_tiles import fold_tiles  # numba takes ~1 s to load: only layers this large need it

        rows = len(flat)
        step = rows if self._stacked is not None else max(1, MAX_TIMES_BYTES // (8 * self.filters))
        for first_row in range(0, rows, step):
            last_row = min(first_row + step, rows)
            fold_tiles(self._magnitudes(slice(first_row, last_row)), inverse_z, flat[first_row:last_row],
                       self._largest_magnitude[first_row:last_row], largest_inverse, self.sensitivity, first_row,
                       first, last)

    def _z(self, flat: np.ndarray) -> np.ndarray:
        """z⁺ and |z⁻| [2F, P] for every position by BLAS, [F, K·C] @ [K·C, P] per sign: nonnegative
        factors, so no cancellation and no sign to strip. Filters go in blocks of about MAX_TIMES_BYTES
        of weights, so |W±| never exist whole."""
        if self._stacked is not None:
            return self._stacked.T @ flat
        z = np.empty((2 * self.filters, flat.shape[1]), dtype=np.float32)
        step = max(1, MAX_TIMES_BYTES // (4 * self.weight.shape[1]))
        for first in range(0, self.filters, step):
            last = min(first + step, self.filters)
            part = self.weight[first:last]
            np.matmul(np.maximum(part, 0), flat, out=z[first:last])
            np.matmul(np.maximum(-part, 0), flat, out=z[self.filters + first:self.filters + last])
        return z

    def _magnitudes(self, rows: slice | np.ndarray) -> np.ndarray:
        """[|W⁺|, |W⁻|] [n, 2F] of some patch rows (weight columns; a slice, or an index array to gather)."""
        if isinstance(rows, slice):
            return self._stacked[rows] if self._stacked is not None else _stacked(self.weight[:, rows])
        if self._stacked is not None:
            return np.take(self._stacked, rows, axis=0)
        return _stacked(np.take(self.weight, rows, axis=1))

    def _seed(self, flat: np.ndarray, inverse_z: np.ndarray, largest_inverse: np.ndarray) -> None:
        """Before a layer's first screen, raise its running max from zero to the exact g at each row's most
        promising position (the largest a_unf · max_f inv_z): a few products per channel, and usually
        close enough to the final max for the screen to rule out nearly everything."""
        block = max(1, MAX_TIMES_BYTES // (4 * len(flat)))
        best_value = np.zeros(len(flat), dtype=np.float32)
        best_position = np.zeros(len(flat), dtype=np.intp)
        for start in range(0, flat.shape[1], block):
            bound = _screen_bound(flat, largest_inverse, start, start + block)
            position = bound.argmax(axis=1)
            value = bound[np.arange(len(flat)), position]
            better = value > best_value
            best_value[better] = value[better]
            best_position[better] = position[better] + start
        row = np.flatnonzero(best_value > 0)
        self.fold_candidates(inverse_z, row, best_position[row], flat[row, best_position[row]])

    def _screen_and_verify(self, flat: np.ndarray, inverse_z: np.ndarray,
                           largest_inverse: np.ndarray) -> list[tuple[int, int]]:
        """Screen every position, block by block on threads, and evaluate the survivors exactly; return
        the position ranges whose blocks left too many of their products (those need a dense path). The
        screen's bound a_unf · max_f |W| · max_f inv_z carries a 1e-4 margin, far above the float32
        rounding of either side, so no product above the running max is ever screened out."""
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

        def screen_block(start: int, row_threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
            bound = _screen_bound(flat, largest_inverse, start, start + block)
            mask = bound > row_threshold
            if np.count_nonzero(mask) > limit * bound.size:  # counted first: extracting many costs more
                return None
            row, position = nonzero_2d(mask)
            return row, position + start

        dense = []
        for wave in range(0, len(starts), MAX_THREADS):  # a wave's candidates are all that is held at once
            row_threshold = self.row_threshold()
            wave_starts = starts[wave:wave + MAX_THREADS]
            found = []
            for start, candidates in zip(wave_starts, parallel_map(
                    lambda start: screen_block(start, row_threshold), wave_starts)):
                if candidates is not None:
                    found.append(candidates)
                elif dense and dense[-1][1] == start:
                    dense[-1] = (dense[-1][0], min(start + block, positions))
                else:
                    dense.append((start, min(start + block, positions)))
            if not found:
                # Every block of the wave gave up and nothing raised the thresholds, so the next waves
                # would give up too: the rest of the batch goes to the dense path without a screen.
                dense[-1] = (dense[-1][0], positions)
                break
            row = np.concatenate([row for row, _ in found])
            position = np.concatenate([position for _, position in found])
            self.fold_candidates(inverse_z, row, position, flat[row, position], loose=True)
        return dense

    def row_threshold(self) -> np.ndarray:
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
                np.multiply(self._magnitudes(rows)[:, :, None], inverse_block[None], out=products)
                best = products.max(axis=1)
                best *= flat[rows, start:stop]
                np.maximum(block_max, best.max(axis=1), out=block_max)
            return block_max

        block_maxima = parallel_map(score_block, starts)
        if block_maxima:
            np.maximum(self.sensitivity, np.max(block_maxima, axis=0), out=self.sensitivity)

    def _update_by_bounds(self, flat: np.ndarray, inverse_z: np.ndarray, largest_inverse: np.ndarray,
                          first: int, last: int) -> None:
        """Bound, then verify. The screen's bound B = a_unf · max_f |W[f, c, k]| · max_f inv_z[f, p] is
        factored out of every product, leaving x_f = |W[f, c, k]| / max_f |W| · inv_z[f, p] / max_f inv_z in
        [0, 1], and R = (Σ_f x_f^Q)^(1/Q), a float32 BLAS product, lies between max_f x_f and (2F)^(1/Q) times
        it. Factors below BOUND_SMALLEST are dropped (so every term is a normal float), which can only lower
        R: B · max(R, BOUND_SMALLEST) bounds every g of (c, k, p) from above, and a channel's max is at least
        its largest B · R over (2F)^(1/Q). Only the (c, k, p) whose upper bound reaches that (or the running
        max) are evaluated exactly, with the same float32 products as every other path. A B that overflows
        is no lower bound and always a candidate.
        """
        channels = len(self.sensitivity)
        rows, filters = len(flat), len(inverse_z)
        # Weight rows are scaled and raised to the power in blocks, so temporaries stay near
        # MAX_TIMES_BYTES even for a dense layer of a billion weights; one block is computed once.
        rows_per_block = max(1, MAX_TIMES_BYTES // (4 * filters))
        row_blocks = [(r, min(r + rows_per_block, rows)) for r in range(0, rows, rows_per_block)]

        def weight_power(first_row: int, last_row: int) -> np.ndarray:
            largest = self._largest_magnitude[first_row:last_row, None]
            scaled = np.zeros((last_row - first_row, filters), dtype=np.float32)
            np.divide(self._magnitudes(slice(first_row, last_row)), largest, out=scaled, where=largest > 0)
            return _power(scaled)

        # Kept for all position blocks unless the layer is huge (then recomputed per position block).
        cached = [weight_power(*span) for span in row_blocks] if 4 * rows * filters <= BOUND_CACHE_BYTES else None
        slack = filters ** (1.0 / BOUND_POWER) * (1 + BOUND_MARGIN)
        block = max(1, MAX_TIMES_BYTES // (4 * max(min(rows, rows_per_block), filters)))
        for start in range(first, last, block):
            stop = min(start + block, last)
            # Times the reciprocal of each position's largest (0 for an all-zero column): a masked division
            # per element cost 1.5× as much, and the ulp it may differ by is far inside BOUND_MARGIN.
            largest = largest_inverse[start:stop]
            reciprocal = np.zeros(stop - start, dtype=np.float32)
            with np.errstate(over="ignore", invalid="ignore"):  # inf and 0 · inf, redone just below
                np.divide(1.0, largest, out=reciprocal, where=largest > 0)
                scaled_z = np.multiply(inverse_z[:, start:stop], reciprocal)
            huge = np.flatnonzero(np.isinf(reciprocal))  # a subnormal largest (every z near float32's maximum)
            scaled_z[:, huge] = inverse_z[:, start + huge] / largest[huge]
            z_power = _power(scaled_z)
            root = np.empty((rows, stop - start), dtype=np.float32)
            for index, (first_row, last_row) in enumerate(row_blocks):
                np.matmul(cached[index] if cached else weight_power(first_row, last_row), z_power,
                          out=root[first_row:last_row])
            _root(root)
            screen = _screen_bound(flat, largest_inverse, start, stop)
            with np.errstate(over="ignore", invalid="ignore"):  # inf · 0 (a dead row): NaN, never a candidate
                screen *= self._largest_magnitude[:, None]
                best = np.multiply(root, screen).reshape(-1, channels, stop - start).max(axis=(0, 2))  # [C]
            if not np.isfinite(best).all():  # rare: a screen that overflowed is no lower bound, so mask it
                lower = np.zeros_like(root)
                np.multiply(root, screen, out=lower, where=np.isfinite(screen))
                best = lower.reshape(-1, channels, stop - start).max(axis=(0, 2))
            floor = np.maximum(best / slack, self.sensitivity)
            # A zero bound means a zero contribution, never a candidate.
            threshold = np.maximum(floor / (1 + BOUND_MARGIN), SMALLEST_POSITIVE).astype(np.float32)
            np.maximum(root, BOUND_SMALLEST, out=root)
            with np.errstate(over="ignore", invalid="ignore"):  # the upper bound
                root *= screen
                root *= 1 + BOUND_MARGIN
            row, position = nonzero_2d(root >= np.tile(threshold, rows // channels)[:, None])
            position += start
            self.fold_candidates(inverse_z, row, position, flat[row, position])

    def _tiered_bound(self, inverse: np.ndarray, row_tiers: tuple[np.ndarray, np.ndarray],
                      position_tiers: tuple[np.ndarray, np.ndarray], row: np.ndarray, position: np.ndarray
                      ) -> np.ndarray:
        """An upper bound of max_f |W±[f, row]| · inverse[position, f] that is the same float32 product for
        the TIERS largest weights of the row and the TIERS largest 1/z of the position, and for every other
        filter the product of the largest weight and the largest 1/z left over (float32 rounding is monotonic,
        so no filter's product exceeds it)."""
        filters = inverse.shape[1]
        row_columns, row_largest = row_tiers
        position_columns, position_largest = position_tiers
        flat_inverse, flat_weight = inverse.reshape(-1), self._stacked.reshape(-1)
        bound = row_largest[row, TIERS] * position_largest[position, TIERS]
        for tier in range(TIERS):
            at_row_tier = np.take(flat_inverse, position * filters + row_columns[row, tier])
            np.maximum(bound, row_largest[row, tier] * at_row_tier, out=bound)
            at_position_tier = np.take(flat_weight, row * filters + position_columns[position, tier])
            np.maximum(bound, position_largest[position, tier] * at_position_tier, out=bound)
        return bound

    def seed_from(self, inverse_rows: np.ndarray, row: np.ndarray, position: np.ndarray, value: np.ndarray) -> None:
        """Seed the running max from products a caller chose (as fold_candidates takes them by row) instead
        of from unfolded patches (see _seed)."""
        self.fold_candidates(inverse_rows, row, position, value, by_row=True)
        self._seeded = True

    def fold_candidates(self, inverse: np.ndarray, row: np.ndarray, position: np.ndarray, value: np.ndarray, *,
                        by_row: bool = False, loose: bool = False) -> None:
        """Fold the exact g of candidate products (patch row = k·C + c, position, patch value): the max
        over the 2F stacked filters of |W±| times the position's 1/z± — a column of inverse [2F, P], or
        with by_row a row of inverse [P, 2F] — times the patch value; candidates are split across threads.

        A column's 2F values lie a cache line apart each, so the columns the candidates touch are first
        gathered into rows, once per position, wherever that pays (see COMPACT_MIN_FILTERS). loose says the
        candidates passed only the screen's bound max_f |W| · max_f inv_z, not the p-norm one: the tiered
        bound (_tiered_bound) then rules out most of them for a few gathers each."""
        if not by_row:
            columns, index = touched_positions(position, inverse.shape[1])
            if 2 * len(columns) <= inverse.shape[1] and (2 * self.filters >= COMPACT_MIN_FILTERS
                                                         or len(row) >= COMPACT_MIN_CANDIDATES * len(columns)):
                inverse, position, by_row = np.ascontiguousarray(np.take(inverse, columns, axis=1).T), index, True
        channels = len(self.sensitivity)
        step = max(1, VERIFY_BYTES // (8 * self.filters))  # [step, 2F] products stay in cache
        share = max(step, -(-len(row) // MAX_THREADS))
        tiered = (loose and by_row and self._stacked is not None and self.filters > TIERS
                  and len(row) >= TIER_MIN_CANDIDATES * len(inverse))
        if tiered:  # both read here, not on the threads
            tiers = self._row_tiers, _tiers(inverse)
        chunk = TIER_STEP if tiered else share

        def verify_share(begin: int) -> np.ndarray:
            best_by_channel = np.zeros(channels, dtype=np.float32)
            end = min(begin + share, len(row))
            for outer in range(begin, end, chunk):
                stop = min(outer + chunk, end)
                r, at, v = row[outer:stop], position[outer:stop], value[outer:stop]
                if tiered:
                    with np.errstate(over="ignore"):  # an infinite bound is simply kept
                        keep = self._tiered_bound(inverse, *tiers, r, at) * v > np.maximum(
                            self.sensitivity, best_by_channel)[r % channels]
                    r, at, v = r[keep], at[keep], v[keep]
                for first in range(0, len(r), step):
                    last = first + step
                    # Each layout is reduced along its own rows: [step, 2F] by row, else [2F, step] (a max over
                    # few long rows: measured 2-3x faster for 2F ≤ 64 than over many short ones).
                    if by_row:
                        products = self._magnitudes(r[first:last])
                        products *= np.take(inverse, at[first:last], axis=0)
                        best = products.max(axis=1)
                    else:
                        products = np.take(inverse, at[first:last], axis=1)
                        products *= self._magnitudes(r[first:last]).T
                        best = products.max(axis=0)
                    with np.errstate(over="ignore"):  # an infinite g is a valid running max
                        best *= v[first:last]
                    np.maximum.at(best_by_channel, r[first:last] % channels, best)
            return best_by_channel

        for best_by_channel in parallel_map(verify_share, range(0, len(row), share)):
            np.maximum(self.sensitivity, best_by_channel, out=self.sensitivity)


def touched_positions(position: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct positions (of `count`) that candidates touch, ascending, and each candidate's index
    among them (a mark per position: no sort)."""
    touched = np.zeros(count, dtype=bool)
    touched[position] = True
    columns = np.flatnonzero(touched)
    index = np.empty(count, dtype=np.intp)
    index[columns] = np.arange(len(columns))
    return columns, index[position]


def _tiers(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of nonnegative values [n, 2F]: the TIERS largest (their columns [n, TIERS] and values) and the
    largest of the rest, as values [n, TIERS + 1]."""
    rows = len(values)
    columns = np.empty((rows, TIERS), dtype=np.intp)
    largest = np.empty((rows, TIERS + 1), dtype=np.float32)
    step = max(1, VERIFY_BYTES // (4 * values.shape[1]))

    def rank(first: int) -> None:
        block = np.array(values[first:first + step])
        at = np.arange(len(block))
        for tier in range(TIERS):
            column = block.argmax(axis=1)
            columns[first:first + step, tier] = column
            largest[first:first + step, tier] = block[at, column]
            block[at, column] = -1
        largest[first:first + step, TIERS] = block.max(axis=1)

    parallel_map(rank, range(0, rows, step))
    return columns, largest


def _screen_bound(flat: np.ndarray, largest_inverse: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The screen's bound a_unf · max_f inv_z of positions [start, stop) (times max_f |W| it bounds g);
    an overflow to inf is simply the most promising value."""
    with np.errstate(over="ignore"):
        return flat[:, start:stop] * largest_inverse[start:stop]


def _stacked(weight: np.ndarray) -> np.ndarray:
    """[|W⁺|, |W⁻|] of a block of signed weights [F, n]: the 2F stacked filters, as a new [n, 2F] array."""
    filters = len(weight)
    stacked = np.empty((weight.shape[1], 2 * filters), dtype=np.float32)
    np.maximum(weight.T, 0, out=stacked[:, :filters])
    np.maximum(np.negative(weight.T, out=stacked[:, filters:]), 0, out=stacked[:, filters:])
    return stacked


def _power(values: np.ndarray) -> np.ndarray:
    """values ** BOUND_POWER of float32 values in [0, 1], in place, by repeated squaring; values below
    BOUND_SMALLEST become 0 (their powers would be subnormal or vanish, and are slow to multiply)."""
    np.multiply(values, values >= BOUND_SMALLEST, out=values)  # a masked store was ~10x slower
    for _ in range(BOUND_SQUARINGS):
        np.multiply(values, values, out=values)
    return values


def _root(values: np.ndarray) -> np.ndarray:
    """values ** (1 / BOUND_POWER) by repeated square roots, in place."""
    for _ in range(BOUND_SQUARINGS):
        np.sqrt(values, out=values)
    return values


def nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def inverse_of_parts(plus: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """inverse_in_place of z⁺ and |z⁻| [N, F, P'] stacked as [2F, N·P'] (one pass; the transposes are read in place)."""
    samples, filters, positions = plus.shape
    inverse = np.empty((2, filters, samples, positions), dtype=np.float32)
    for part, out in zip((plus, minus), inverse):
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            np.divide(1.0, part.transpose(1, 0, 2), out=out)
    return _drop_negligible(inverse).reshape(2 * filters, -1)


def inverse_in_place(z: np.ndarray) -> np.ndarray:
    """1/z of nonnegative z (a contiguous array), in place, with 0 where z ≤ eps (such denominators count
    as +infinity).

    Divided first, sorted out after: eps is 2⁻²³, so 1/z ≥ 2²³ exactly when z ≤ eps (1/z of the next float
    above eps rounds to 2²³ − 1), and −0 or a negative z gives a value ≤ 0 (a masked division was ~4.5×
    slower)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        np.divide(1.0, z, out=z)
    return _drop_negligible(z)


def _drop_negligible(inverse: np.ndarray) -> np.ndarray:
    """Zero, in place, every 1/z that is not in (0, 2²³) (see inverse_in_place): through the bits, since
    inf · 0 would be NaN (~5× faster than a masked store)."""
    bits = inverse.view(np.uint32)
    np.multiply(bits, (inverse < INVERSE_LIMIT) & (inverse > 0), out=bits)
    return inverse


INVERSE_LIMIT = np.float32(1 / Z_EPS)  # 2²³
