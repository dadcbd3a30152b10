"""Fuzzing the two readers of user files: whatever bytes arrive, the result is a value or a project error.

`load_model` must return a ModelProto or raise ModelError; `read_npz` + `validate` must return calibration
data or raise DataError. Anything else escaping (DecodeError, KeyError, zlib.error, MemoryError...) would
reach the user as a traceback. Bounded so that the whole file runs in a few seconds.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zoo
import pfp_onnx.npz as npz
from pfp_onnx.data import CalibrationData, read_npz, validate
from pfp_onnx.errors import DataError, ModelError
from pfp_onnx.model import load_model
from test_cli import DATA, MODEL

MODEL_BYTES = MODEL.read_bytes()
# Where the BatchNorm reads the first Conv's output: 0x80 there makes that input name invalid UTF-8 (and
# dangling) without changing any length, so protobuf still parses the file and the checker must complain.
DANGLING_INPUT_AT = MODEL_BYTES.rindex(b"/stem/stem.0/Conv_output_0")
# Derandomized like the other property tests: a failure reproduces on every run and every machine.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _written(content: bytes, name: str, check) -> None:
    """Write `content` to a fresh temporary folder per example (hypothesis runs many per test call), check it."""
    with tempfile.TemporaryDirectory(prefix="pfp_fuzz_") as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        check(path)


def _load_written(content: bytes) -> None:
    def check(path: Path) -> None:
        try:
            model = load_model(path)
        except ModelError:
            return
        assert isinstance(model, onnx.ModelProto)

    _written(content, "model.onnx", check)


# ---- (a) model files ---------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096))
def test_load_model_random_bytes(content):
    _load_written(content)


@FUZZ
@given(st.integers(min_value=0, max_value=len(MODEL_BYTES) - 1))
def test_load_model_truncated_fixture(length):
    _load_written(MODEL_BYTES[:length])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(MODEL_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
@example(flips=[(DANGLING_INPUT_AT, 0x80)], in_header=False)
def test_load_model_byte_flips(flips, in_header):
    """Flips anywhere, or (half the time) in the first 2 KB where the graph structure, not weights, lives."""
    content = bytearray(MODEL_BYTES)
    for position, value in flips:
        content[position % 2048 if in_header else position] = value
    _load_written(bytes(content))


def test_load_model_invalid_utf8_input_name_is_a_model_error(tmp_path):
    """Reproducer of the byte-flip finding: one byte, same length, so protobuf still parses the file."""
    path = tmp_path / "model.onnx"
    content = bytearray(MODEL_BYTES)
    content[DANGLING_INPUT_AT] = 0x80
    path.write_bytes(bytes(content))
    with pytest.raises(ModelError):
        load_model(path)


def test_load_model_garbage_after_valid_model():
    """Protobuf parses trailing bytes as more fields: whatever it decides, the contract holds."""
    _load_written(MODEL_BYTES + b"\x00\xff" * 64)


# ---- (b) calibration archives ------------------------------------------------------------------------
FIXTURE_MODEL = onnx.load(str(MODEL))  # one input 'input' [N, 1, 8, 8] float32
TWO_INPUT_MODEL = zoo.frozen_cases()  # inputs 'x' [N, 4, 8, 8] and 'y' [N, 6, 8, 8]
MODELS = {"fixture": FIXTURE_MODEL, "two inputs": TWO_INPUT_MODEL}

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.complex64,
          "<U3", "S2", "datetime64[s]", [("a", np.float32), ("b", np.int16)]]
NAMES = ["input", "labels", "x", "y", "other", "arr_0"]


@st.composite
def arrays(draw) -> np.ndarray:
    """Mostly near-valid shapes (so that the later checks run too), any object-free dtype, NaN/Inf sprinkled."""
    points = draw(st.integers(0, 5))
    shape = draw(st.one_of(
        st.sampled_from([(points, 1, 8, 8), (points, 4, 8, 8), (points, 6, 8, 8), (points,)]),
        st.lists(st.integers(0, 4), max_size=4).map(tuple)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    size = int(np.prod(shape))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=size) * 10
    if dtype.kind in "US":
        array = np.array([str(v)[:2] for v in values], dtype=dtype)
    elif dtype.kind == "V":
        array = np.zeros(size, dtype)
    elif dtype.kind == "M":
        array = values.astype(np.int64).astype(dtype)
    else:
        array = values.astype(dtype) if dtype.kind != "b" else values > 0
    array = array.reshape(shape)
    if dtype.kind in "fc" and size and draw(st.booleans()):
        flat = array.reshape(-1)
        flat[draw(st.integers(0, size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return array


@FUZZ
@given(st.dictionaries(st.sampled_from(NAMES), arrays(), max_size=3), st.sampled_from(sorted(MODELS)))
def test_read_and_validate_random_arrays(named_arrays, model_name):
    buffer = io.BytesIO()
    np.savez(buffer, **named_arrays)
    _written(buffer.getvalue(), "calib.npz", lambda path: _read_and_validate(path, MODELS[model_name]))


@FUZZ
@given(st.binary(max_size=2048))
def test_read_npz_random_bytes(content):
    _written(content, "calib.npz", lambda path: _read_and_validate(path, FIXTURE_MODEL))


def _valid_archive(compressed: bool) -> bytes:
    with np.load(DATA) as archive:
        arrays_ = {name: archive[name][:6] for name in archive.files}
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays_)
    return buffer.getvalue()


ARCHIVES = {compressed: _valid_archive(compressed) for compressed in (False, True)}


@FUZZ
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**6), st.booleans(), st.booleans())
@example(compressed=True, flips=[(28, 0)], cut=0, truncate=False, lazy=False)  # extra length: zlib.error
@example(compressed=True, flips=[(28, 0)], cut=0, truncate=False, lazy=True)
def test_read_npz_damaged_archive(compressed, flips, cut, truncate, lazy):
    """Byte flips (headers, CRCs, deflate streams) and truncations of a real, valid calibration archive, read
    whole or row by row (pfp_onnx.npz: the damage must show when the archive is opened, not later)."""
    content = bytearray(ARCHIVES[compressed])
    for position, value in flips:
        content[position % len(content)] = value
    if truncate:
        content = content[:cut % len(content)]
    previous = npz.LAZY_BYTES
    npz.LAZY_BYTES = 0 if lazy else previous
    try:
        _written(bytes(content), "calib.npz", lambda path: _read_and_validate(path, FIXTURE_MODEL))
    finally:
        npz.LAZY_BYTES = previous


def _read_and_validate(path: Path, model: onnx.ModelProto) -> None:
    try:
        result = validate(read_npz(path), model)
    except DataError:
        return
    assert isinstance(result, CalibrationData)
    assert result.count > 0
    for batch in result.batches(4):  # an archive that opened reads back in full
        assert len(batch["input"]) > 0


def _damaged(compressed: bool, where: str, offset: int, value: int) -> bytes:
    """Set one byte at `offset` into the first local ('local') or central-directory ('central') file header."""
    content = bytearray(ARCHIVES[compressed])
    start = content.index(b"PK\x03\x04" if where == "local" else b"PK\x01\x02")
    content[start + offset] = value
    return bytes(content)


DAMAGE = {
    "deflate stream corrupt": (True, "local", 28, 0),  # extra-field length 0: reading starts mid-header
    "zip version 9.9": (False, "central", 6, 99),  # NotImplementedError
    "encryption flag": (False, "central", 8, 1),  # RuntimeError: password required
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_archive_is_a_data_error(tmp_path, damage):
    path = tmp_path / "calib.npz"
    path.write_bytes(_damaged(*DAMAGE[damage]))
    with pytest.raises(DataError):
        read_npz(path)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_valid_archive_reads_back(tmp_path, compressed):
    """The damaged-archive fuzz starts from a valid archive: make sure it really is one."""
    path = tmp_path / "calib.npz"
    path.write_bytes(ARCHIVES[compressed])
    assert validate(read_npz(path), FIXTURE_MODEL).count == 6
