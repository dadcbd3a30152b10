"""Bad input: exit status 2, one actionable paragraph, no traceback, no output file, input untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_cli import DATA, MODEL, run_cli_here


def calibration(**changes) -> dict[str, np.ndarray]:
    arrays = dict(np.load(DATA))
    arrays.update(changes)
    return {name: value for name, value in arrays.items() if value is not None}


def write_npz(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **arrays)
    return path


def nan_input() -> np.ndarray:
    values = np.load(DATA)["input"].copy()
    values[3, 0, 2, 2] = np.nan
    return values


CASES = {
    "missing model": (lambda tmp: ([tmp / "nope.onnx", "--data", DATA, "--budget", 0.5], "does not exist")),
    "not onnx": (lambda tmp: ([_write(tmp / "junk.onnx", b"this is not a model"), "--data", DATA, "--budget", 0.5],
                              "Could not read")),
    "missing data file": (lambda tmp: ([MODEL, "--data", tmp / "none.npz", "--budget", 0.5], "does not exist")),
    "npz missing input": (lambda tmp: ([MODEL, "--data", write_npz(tmp, {"image": np.load(DATA)["input"],
                                                                           "other": np.zeros(3)}),
                                        "--budget", 0.5], "no array for model input")),
    "wrong shape": (lambda tmp: ([MODEL, "--data", write_npz(tmp, calibration(input=np.zeros((10, 1, 9, 8), np.float32))),
                                  "--budget", 0.5], "size 9 on axis 2")),
    "wrong rank": (lambda tmp: ([MODEL, "--data", write_npz(tmp, calibration(input=np.zeros((10, 64), np.float32))),
                                 "--budget", 0.5], "rank 2")),
    "wrong dtype": (lambda tmp: ([MODEL, "--data", write_npz(tmp, calibration(input=np.zeros((10, 1, 8, 8)))),
                                  "--budget", 0.5], "dtype float64")),
    "nan": (lambda tmp: ([MODEL, "--data", write_npz(tmp, calibration(input=nan_input())), "--budget", 0.5], "NaN")),
    "npy file": (lambda tmp: ([MODEL, "--data", _npy(tmp), "--budget", 0.5], "single NumPy array (.npy)")),
    "labels out of range": (lambda tmp: ([MODEL, "--data", write_npz(tmp, calibration(labels=_shifted_labels())),
                                          "--budget", 0.5], "scores 10 classes (ids 0 to 9)")),
    "budget zero": (lambda tmp: ([MODEL, "--data", DATA, "--budget", 0], "budget")),
    "budget too large": (lambda tmp: ([MODEL, "--data", DATA, "--budget", 1.5], "budget")),
    "budget infeasible": (lambda tmp: ([MODEL, "--data", DATA, "--budget", 0.0001], "smallest feasible budget")),
}


def _shifted_labels() -> np.ndarray:
    """1-based class ids for a model that numbers its ten classes from 0."""
    return np.load(DATA)["labels"] + 1


def _npy(folder: Path) -> Path:
    path = folder / "calib.npy"
    np.save(path, np.load(DATA)["input"])
    return path


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(tmp_path, capfd, case):
    arguments, expected = CASES[case](tmp_path)
    output = tmp_path / "out" / "pruned.onnx"
    output.parent.mkdir()
    model_before = MODEL.read_bytes()
    done = run_cli_here(capfd, "compress", *arguments, "-o", output)  # the subprocess path: test_bad_input_matrix
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    assert expected in message
    assert list(output.parent.iterdir()) == []
    assert MODEL.read_bytes() == model_before
