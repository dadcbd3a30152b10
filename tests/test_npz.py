"""Large .npz members read a few rows at a time: the same points as loading them, in bounded memory, with
damage and non-finite values found when the archive is opened."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest

import pfp_onnx
import pfp_onnx.npz as npz
from pfp_onnx.data import read_npz, split, validate
from pfp_onnx.errors import DataError
from pfp_onnx.npz import NpzArray
from test_cli import DATA, MODEL


@pytest.fixture
def lazy(monkeypatch):
    """Every member is read row by row, whatever its size."""
    monkeypatch.setattr(npz, "LAZY_BYTES", 0)


def _archive(tmp_path, compressed: bool, **arrays):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"data{'_deflated' if compressed else ''}.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_rows_read_back_as_stored(lazy, tmp_path, compressed):
    points = np.random.default_rng(0).normal(size=(300, 2, 5, 3)).astype(np.float32)
    tokens = np.arange(300 * 7, dtype=np.int64).reshape(300, 7)
    arrays = read_npz(_archive(tmp_path, compressed, input=points, tokens=tokens, labels=np.arange(300) % 4))
    assert isinstance(arrays["input"], NpzArray) and isinstance(arrays["tokens"], NpzArray)
    assert isinstance(arrays["labels"], np.ndarray)  # labels are small: always loaded
    lazy_points = arrays["input"]
    assert (lazy_points.shape, lazy_points.dtype, lazy_points.ndim, len(lazy_points)) == \
        (points.shape, points.dtype, 4, 300)
    rng = np.random.default_rng(1)
    requests = [slice(None), slice(10, 40), slice(290, 400), np.sort(rng.choice(300, 50, replace=False)),
                rng.choice(300, 50), np.array([5, 5, 4]), np.array([], np.int64), np.array([299]), slice(0, 3)]
    for request in requests:  # in this order: forward, back to the start, repeated and unsorted rows
        np.testing.assert_array_equal(lazy_points[request], points[request])
        np.testing.assert_array_equal(arrays["tokens"][request], tokens[request])
    np.testing.assert_array_equal(np.asarray(lazy_points), points)
    with pytest.raises(IndexError):
        lazy_points[np.array([300])]


def _peak_of_passes(path, model) -> int:
    """Peak traced memory of opening the archive, splitting it, and one pass over each part in batches of
    64 points; checks that the parts cover every point once."""
    tracemalloc.start()
    sensitivity_part, held = split(validate(read_npz(path), model), 0.2, seed=0)
    counts = [sum(len(batch["input"]) for batch in part.batches(64)) for part in (sensitivity_part, held)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert counts == [sensitivity_part.count, held.count] and sum(counts) == len(read_npz(path)["input"])
    return peak


def test_memory_does_not_grow_with_the_points(lazy, tmp_path):
    """12 MB or 48 MB of points: the same peak, a few read buffers and batches (256 KiB each)."""
    model = onnx.load(str(MODEL))
    for axis in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 32
    peaks = []
    for count in (3000, 12000):
        points = np.random.default_rng(count).normal(size=(count, 1, 32, 32)).astype(np.float32)
        peaks.append(_peak_of_passes(_archive(tmp_path / str(count), False, input=points), model))
    assert peaks[1] < peaks[0] + 2**20 and peaks[0] < 4 * npz.READ_BYTES + 8 * 64 * 4096, peaks


def test_compress_reads_the_same_points(lazy):
    """The digits fixture read row by row prunes to exactly what loading it gives."""
    streamed = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5)
    npz.LAZY_BYTES = 2**62
    loaded = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5)
    assert streamed.report.groups == loaded.report.groups
    assert streamed.report.verification == loaded.report.verification
    assert streamed.model.graph.initializer == loaded.model.graph.initializer


def test_non_finite_values_are_counted_when_opened(lazy, tmp_path):
    points = np.ones((50, 1, 8, 8), np.float32)
    points[3, 0, 1, 1], points[40, 0, 2, 5] = np.nan, np.inf
    arrays = read_npz(_archive(tmp_path, True, input=points))
    assert arrays["input"].nonfinite == 2
    with pytest.raises(DataError, match="holds 2 NaN or infinite"):
        validate(arrays, onnx.load(str(MODEL)))


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_damage_is_found_when_opened(lazy, tmp_path, compressed):
    """A flipped byte in the member's data: the CRC (stored) or the deflate stream fails during the opening
    scan, as a DataError, not later in the middle of a pass."""
    path = _archive(tmp_path, compressed, input=np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32))
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match="Could not read"):
        read_npz(path)


def test_a_file_changed_under_a_pass_is_a_data_error(lazy, tmp_path):
    path = _archive(tmp_path, False, input=np.zeros((100, 16), np.float32))
    array = read_npz(path)["input"]
    array[np.arange(10)]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="must not change while pfp-onnx runs"):
        array[np.arange(5)]  # behind the open stream: the archive is opened again


def test_members_that_cannot_be_read_by_rows_are_loaded(lazy, tmp_path):
    fortran = np.asfortranarray(np.arange(60, dtype=np.float32).reshape(10, 6))
    path = _archive(tmp_path, False, input=fortran, scalar=np.float32(3))
    arrays = read_npz(path)
    assert isinstance(arrays["input"], np.ndarray) and isinstance(arrays["scalar"], np.ndarray)
    np.testing.assert_array_equal(arrays["input"], fortran)


def test_small_members_are_loaded(tmp_path):
    path = _archive(tmp_path, False, input=np.zeros((10, 4), np.float32))
    assert isinstance(read_npz(path)["input"], np.ndarray)
    with zipfile.ZipFile(path) as archive:
        assert not NpzArray.opens(archive, "input.npy")
