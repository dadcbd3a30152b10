"""The screen on a conv's input grid keeps exactly what the screen on unfolded patches keeps."""

from __future__ import annotations

import numpy as np
import pytest

from pfp_onnx.sensitivity import grid_screen
from pfp_onnx.sensitivity import scorers as sensitivity
from pfp_onnx.sensitivity.grid_screen import grid_candidates, inverse_at, largest_inverse_of_parts
from pfp_onnx.sensitivity.max_times import Z_EPS, inverse_of_parts
from pfp_onnx.sensitivity.scorers import ConvScorer, UnfoldBuffer

# (kernel, strides, pads in ONNX order, dilations, spatial)
GEOMETRIES = {
    "3x3": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (9, 8)),
    "3x3-stride2-uneven-pads": ((3, 3), (2, 2), (0, 1, 2, 0), (1, 1), (10, 9)),
    "5x5-dilated": ((5, 5), (1, 1), (4, 4, 4, 4), (2, 2), (8, 7)),
    "2x3-stride3-no-pads": ((2, 3), (3, 2), (0, 0, 0, 0), (1, 1), (11, 9)),
    "1x1-stride2": ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (9, 8)),
    "7x7-stride2-larger-than-pads": ((7, 7), (2, 2), (3, 3, 3, 3), (1, 1), (12, 12)),
    "1d": ((3,), (2,), (1, 2), (1,), (17,)),
    "3d": ((3, 2, 3), (1, 2, 1), (1, 0, 1, 1, 1, 0), (1, 1, 2), (5, 6, 5)),
}


def grid_path_taken(monkeypatch) -> list[bool]:
    """Keep every chunk on the grid (no give-up) and record, per grid screen, whether it answered."""
    taken = []
    found = grid_screen.grid_candidates

    def spied(*arguments, **keywords):
        result = found(*arguments, **keywords)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(sensitivity, "grid_candidates", spied)
    monkeypatch.setattr(grid_screen, "GRID_MAX_FRACTION", 1.0)
    return taken


def _out_shape(spatial, kernel, strides, pads, dilations):
    rank = len(spatial)
    return tuple((n + pads[d] + pads[d + rank] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1
                 for d, n in enumerate(spatial))


def _unfolded(points, kernel, strides, pads, dilations, out_shape):
    rank = len(kernel)
    padded = np.pad(points, [(0, 0), (0, 0)] + [(pads[d], pads[d + rank]) for d in range(rank)])
    return sensitivity._unfold(padded, kernel, out_shape, strides, dilations, UnfoldBuffer()).copy()


def _case(name, seed, channels=5, samples=3):
    kernel, strides, pads, dilations, spatial = GEOMETRIES[name]
    rng = np.random.default_rng(seed)
    points = np.maximum(rng.standard_normal((samples, channels, *spatial)), 0).astype(np.float32)
    out_shape = _out_shape(spatial, kernel, strides, pads, dilations)
    largest = rng.exponential(size=samples * int(np.prod(out_shape))).astype(np.float32)
    largest[rng.random(largest.shape) < 0.2] = 0  # positions where every z is negligible
    geometry = dict(kernel_shape=kernel, out_shape=out_shape, strides=strides, pads=pads, dilations=dilations)
    return points, largest, geometry


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("share", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("table", [True, False])
def test_candidates_are_those_of_the_unfolded_screen(name, share, table, monkeypatch):
    """Every (row, position) whose a_unf · L passes T on the unfolded patches, and no other, with its patch
    value; thresholds differ per row (and some rows can never pass), so the coarse test's minimum over
    taps is exercised. Taps reach outputs through a cached table, or (huge inputs) per survivor."""
    monkeypatch.setattr(grid_screen, "GRID_MAX_FRACTION", 1.0)
    if not table:
        monkeypatch.setattr(grid_screen, "TAP_TABLE_ENTRIES", 0)
    points, largest, geometry = _case(name, seed=len(name))
    flat = _unfolded(points, geometry["kernel_shape"], geometry["strides"], geometry["pads"],
                     geometry["dilations"], geometry["out_shape"])
    bound = flat * largest
    rng = np.random.default_rng(3)
    threshold = (np.quantile(bound, 1 - share) * rng.uniform(0.5, 2.0, len(flat))).astype(np.float32)
    threshold[rng.random(len(flat)) < 0.1] = np.inf  # rows whose max_f |W| is zero
    expected_row, expected_position = np.nonzero(bound > threshold[:, None])
    row, position, value = grid_candidates(points, largest, threshold, **geometry)
    order = np.lexsort((position, row))
    np.testing.assert_array_equal(row[order], expected_row)
    np.testing.assert_array_equal(position[order], expected_position)
    np.testing.assert_array_equal(value[order], flat[expected_row, expected_position])
    if share == 0.2:
        assert len(row)


def test_too_many_coarse_survivors_give_up(monkeypatch):
    points, largest, geometry = _case("3x3", seed=1)
    zero = np.zeros(9 * points.shape[1], dtype=np.float32)
    assert grid_candidates(points, largest, zero, **geometry) is None  # every positive value survives
    monkeypatch.setattr(grid_screen, "GRID_MAX_FRACTION", 1.0)
    assert grid_candidates(points, largest, zero, **geometry) is not None


def test_an_overflowing_bound_is_a_candidate(monkeypatch):
    """A huge activation times a large L overflows to inf: the most promising value, never lost."""
    monkeypatch.setattr(grid_screen, "GRID_MAX_FRACTION", 1.0)
    points = np.zeros((1, 1, 3, 3), dtype=np.float32)
    points[0, 0, 1, 1] = 3e38
    largest = np.full(9, 10.0, dtype=np.float32)
    threshold = np.full(9, 1e30, dtype=np.float32)
    row, position, value = grid_candidates(points, largest, threshold, kernel_shape=(3, 3), out_shape=(3, 3),
                                           strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
    assert len(row) == 9 and np.all(value == np.float32(3e38))  # all nine taps read the centre


def _parts(seed, samples=4, filters=6, positions=10):
    rng = np.random.default_rng(seed)
    plus, minus = (np.maximum(rng.standard_normal((samples, filters, positions)), 0).astype(np.float32)
                   for _ in range(2))
    plus[:, :, 0] = 0  # every filter negligible at position 0
    minus[:, :, 0] = Z_EPS  # at the cut-off: negligible too
    plus[:, 1, 1] = np.float32(Z_EPS) * 1.5  # just above it: counts
    minus[1] = 0
    return plus, minus


def test_largest_inverse_is_the_max_of_the_inverse():
    plus, minus = _parts(5)
    expected = inverse_of_parts(plus, minus).max(axis=0)
    largest = largest_inverse_of_parts(plus, minus)
    np.testing.assert_array_equal(largest, expected)
    assert largest[0] == 0 and largest[1] > 1e6


def test_largest_inverse_on_the_bits_handles_every_special_value():
    """L is read off the parts' bits: values at and around eps, zeros of both signs, subnormals, inf and
    NaN (none of which a sum of nonnegative products should give, bar 0 and an overflow) must still give
    what the float definition gives."""
    eps = np.float32(Z_EPS)
    special = np.array([0.0, -0.0, eps, np.nextafter(eps, np.float32(1)), np.nextafter(eps, np.float32(0)),
                        1e-44, 1e-30, 1.0, 3e38, np.inf, np.nan, -1.0, -np.inf], dtype=np.float32)
    rng = np.random.default_rng(7)
    plus, minus = (rng.choice(special, size=(3, 4, 200)).astype(np.float32) for _ in range(2))
    plus[0, :, 0] = minus[0, :, 0] = 0  # nothing above eps anywhere: L = 0
    with np.errstate(invalid="ignore"):
        expected = inverse_of_parts(plus, minus).max(axis=0)
    np.testing.assert_array_equal(largest_inverse_of_parts(plus, minus), expected)
    assert expected[0] == 0 and np.any(expected > 0)


@pytest.mark.parametrize("chunks", [1, 3])
def test_inverse_at_reads_the_inverse_at_columns(chunks, monkeypatch):
    """Read in one go, or in chunks of 2 columns on threads."""
    if chunks > 1:
        monkeypatch.setattr(grid_screen, "INVERSE_AT_MIN_COLUMNS", 1)
        monkeypatch.setattr(grid_screen, "MAX_THREADS", chunks)
    plus, minus = _parts(6)
    columns = np.array([0, 1, 7, 13, 39])
    np.testing.assert_array_equal(inverse_at(plus, minus, columns), inverse_of_parts(plus, minus)[:, columns].T)


@pytest.mark.parametrize("name", ["3x3", "3x3-stride2-uneven-pads", "5x5-dilated", "1x1-stride2", "1d"])
def test_scorer_on_the_grid_scores_as_on_unfolded_patches(name, monkeypatch):
    """A ConvScorer fed parts over several batches scores bit for bit what it scores when every chunk is
    unfolded, and does take the grid path after its first chunk."""
    kernel, strides, pads, dilations, spatial = GEOMETRIES[name]
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((7, 4, *kernel)).astype(np.float32)
    out_shape = _out_shape(spatial, kernel, strides, pads, dilations)
    batches = []
    for _ in range(4):
        points = np.maximum(rng.standard_normal((3, 4, *spatial)), 0).astype(np.float32)
        flat = _unfolded(points, kernel, strides, pads, dilations, out_shape)  # [K·C, N·P]
        by_kc = np.ascontiguousarray(weight.reshape(7, 4, -1).transpose(0, 2, 1)).reshape(7, -1)
        parts = tuple((np.maximum(sign * by_kc, 0) @ flat).reshape(7, 3, -1).transpose(1, 0, 2)
                      .reshape(3, 7, *out_shape) for sign in (1, -1))
        batches.append((points, parts))
    geometry = dict(strides=list(strides), pads=list(pads), dilations=list(dilations))

    def run():
        scorer = ConvScorer(weight, **geometry)
        for points, parts in batches:
            scorer.update(points, parts)
        return scorer.sensitivity

    taken = grid_path_taken(monkeypatch)
    on_grid = run()
    assert any(taken)
    monkeypatch.setattr(grid_screen, "GRID_MAX_FRACTION", -1.0)  # never: every chunk is unfolded
    np.testing.assert_array_equal(on_grid, run())
    assert np.all(on_grid > 0)


def _reads(geometry, spatial):
    """Per (tap index, output position): the input position its patch value reads (None in padding)."""
    kernel, strides, pads, dilations = (geometry[key] for key in ("kernel_shape", "strides", "pads", "dilations"))
    rank = len(kernel)
    reads = {}
    for index, tap in enumerate(np.ndindex(*kernel)):
        for p, out in enumerate(np.ndindex(*geometry["out_shape"])):
            q = [o * s + k * d - b for o, s, k, d, b in zip(out, strides, tap, dilations, pads[:rank])]
            inside = all(0 <= x < n for x, n in zip(q, spatial))
            reads[index, p] = int(np.ravel_multi_index(q, spatial)) if inside else None
    return reads


@pytest.mark.parametrize("name", ["3x3", "3x3-stride2-uneven-pads", "1d", "3d"])
def test_seed_takes_every_product_of_each_channels_most_promising_value(name):
    """Per channel, the input value with the largest a · M (M: the largest L among the outputs reading it),
    and every (tap, output) product that reads it, found by brute force over all taps and outputs."""
    points, largest, geometry = _case(name, seed=2)
    samples, channels, *spatial = points.shape
    positions = int(np.prod(geometry["out_shape"]))
    reads = _reads(geometry, spatial)
    covering = np.zeros((samples, int(np.prod(spatial))), dtype=np.float32)
    for (index, p), q in reads.items():
        if q is not None:
            covering[:, q] = np.maximum(covering[:, q], largest.reshape(samples, positions)[:, p])
    values = points.reshape(samples, channels, -1)
    expected = set()
    for c in range(channels):
        bound = values[:, c] * covering
        n, q = np.unravel_index(np.argmax(bound), bound.shape)
        if bound[n, q] > 0:
            expected |= {(index * channels + c, n * positions + p, values[n, c, q])
                         for (index, p), read in reads.items() if read == q}
    row, position, value = grid_screen.grid_seed(points, largest, **geometry)
    assert set(zip(row.tolist(), position.tolist(), value.tolist())) == {(r, p, float(v)) for r, p, v in expected}
    assert len(row) == len(expected)


def test_no_screening_means_no_grid(monkeypatch):
    """SCREEN_MAX_FRACTION = 0 turns every screen off: parts are then scored on unfolded patches."""
    from pfp_onnx.sensitivity import max_times

    monkeypatch.setattr(max_times, "SCREEN_MAX_FRACTION", 0.0)
    monkeypatch.setattr(sensitivity, "grid_candidates", lambda *arguments, **keywords: pytest.fail("screened"))
    monkeypatch.setattr(sensitivity, "grid_seed", lambda *arguments, **keywords: pytest.fail("seeded"))
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    points = np.maximum(rng.standard_normal((2, 2, 5, 5)), 0).astype(np.float32)
    parts = (np.ones((2, 3, 5, 5), np.float32), np.ones((2, 3, 5, 5), np.float32))
    scorer = ConvScorer(weight, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    scorer.update(points, parts)
    scorer.update(points, parts)
    assert np.all(scorer.sensitivity > 0)
