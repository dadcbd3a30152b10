"""Models above protobuf's 2 GB limit: read, run and written with external data.

Every step that treats a large model differently decides by a size threshold in pfp_onnx (PROTOBUF_LIMIT,
SKELETON_MODEL_BYTES and SKELETON_TENSOR_BYTES in model.py, SESSION_BYTES_LIMIT in runtime.py and
capture.py). test_large_model_path_at_lowered_thresholds lowers them all below a 2 MB model, so the CLI
takes each branch a 2.6 GB model takes: checked through its skeleton, run from temporary files with
external data, written with external data without being asked. It runs everywhere, CI included, in seconds.

What lowering thresholds cannot show is protobuf itself refusing a message above 2 GB, nor the memory a
real one needs. test_model_above_two_gigabytes builds a 2.6 GB model (2.44 GiB) and asserts the README's
bound: compress holds about 3.5× the model in memory (measured: 8.8 GiB at its peak, 3.6× with the
interpreter's own 0.13 GiB; about 5 minutes on 2 cores). It needs ~8 GB of free disk and ~10 GB of memory,
beyond the lean suite's 4 GB, so it runs only when asked with PFP_ONNX_LARGE_TESTS=1; asked on a machine
that cannot hold it, it fails rather than skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from pfp_onnx import capture, model as model_io, runtime
from pfp_onnx_cli.main import main

SMALL = (256, 1024)  # weights of 1 MB: 2 MB in all
LARGE = (8192, 40000)  # weights of 1.3 GB: 2.6 GB in all
# README: "A model above 2 GB is processed with about 3.5× its size in memory"; the allowance covers the
# interpreter and its libraries (0.13 GiB compressing the 2 MB model), which do not grow with the model.
MEMORY_FACTOR = 3.5
MEMORY_ALLOWANCE = 2**29
NEEDED_DISK = 8 * 2**30
LARGE_TESTS = "PFP_ONNX_LARGE_TESTS"


def build(folder: Path, wide: int, wider: int) -> int:
    """x [N, 32] → four Gemms (32 → wide → wider → wide → 10) with Relus between, every weight written
    straight to big.onnx.data, so that no >2 GB message is ever formed in memory; returns the weight bytes."""
    rng = np.random.default_rng(0)
    shapes = [("w1", (wide, 32)), ("b1", (wide,)), ("w2", (wider, wide)), ("b2", (wider,)),
              ("w3", (wide, wider)), ("b3", (wide,)), ("w4", (10, wide)), ("b4", (10,))]
    initializers = []
    with open(folder / "big.onnx.data", "wb") as data:
        for name, shape in shapes:
            offset = data.tell()
            array = rng.standard_normal(shape, dtype=np.float32) * 0.05
            data.write(array.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
        weight_bytes = data.tell()
    nodes = []
    previous = "x"
    for index in range(1, 5):
        nodes.append(helper.make_node("Gemm", [previous, f"w{index}", f"b{index}"], [f"h{index}"],
                                      name=f"fc{index}", transB=1))
        if index < 4:
            nodes.append(helper.make_node("Relu", [f"h{index}"], [f"r{index}"], name=f"relu{index}"))
            previous = f"r{index}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("h4", TensorProto.FLOAT, ["N", 10])], initializers)
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]),
              folder / "big.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((8, 32)).astype(np.float32))
    return weight_bytes


def compress_arguments(folder: Path, output: Path, *extra: str) -> list[str]:
    return ["compress", str(folder / "big.onnx"), "--data", str(folder / "calib.npz"), "--budget", "0.5",
            "-o", str(output), "--recovery", "none", "--holdout", "0.25", "--device", "cpu", *extra]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def test_large_model_path_at_lowered_thresholds(tmp_path, monkeypatch):
    """With every threshold below the model, compress (not told --external-data) writes the same pruned
    model as with the thresholds as shipped, with its weights in a .data file beside it; every session
    was created from a temporary file, and the temporary folder is left empty."""
    inputs = tmp_path / "inputs"
    small_output, large_output = (tmp_path / kind / "pruned.onnx" for kind in ("small", "large"))
    for folder in (inputs, small_output.parent, large_output.parent):
        folder.mkdir()
    build(inputs, *SMALL)
    runner = CliRunner()
    done = runner.invoke(main, compress_arguments(inputs, small_output))
    assert done.exit_code == 0, done.output
    assert sorted(path.name for path in small_output.parent.iterdir()) == ["pruned.onnx"]

    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    for module, name, value in ((model_io, "PROTOBUF_LIMIT", 0), (model_io, "SKELETON_MODEL_BYTES", 0),
                                (model_io, "SKELETON_TENSOR_BYTES", 2**10), (runtime, "SESSION_BYTES_LIMIT", 0),
                                (capture, "SESSION_BYTES_LIMIT", 0)):
        monkeypatch.setattr(module, name, value)
    session_files, skeletons = [], []
    monkeypatch.setattr(runtime, "externalized", _recorded(runtime.externalized, session_files))
    monkeypatch.setattr(model_io, "skeleton", _recorded(model_io.skeleton, skeletons))
    monkeypatch.setattr(ort, "InferenceSession", _from_files_only(ort.InferenceSession))
    done = runner.invoke(main, compress_arguments(inputs, large_output))
    assert done.exit_code == 0, done.output

    assert sorted(path.name for path in large_output.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    assert large_output.stat().st_size < 2**14  # the graph only; the weights are in the .data file
    assert session_files and any(skeleton is not model for model, skeleton in skeletons)
    assert list(temporary.iterdir()) == []
    onnx.checker.check_model(str(large_output))
    pruned, reference = weights(large_output), weights(small_output)
    assert pruned.keys() == reference.keys()
    for name, values in pruned.items():
        np.testing.assert_array_equal(values, reference[name], err_msg=name)
    assert pruned["w2"].shape[0] < SMALL[1]  # something was pruned
    session = ort.InferenceSession(str(large_output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 32), np.float32)})[0].shape == (2, 10)


def _recorded(function, calls: list):
    """`function`, appending (its first argument, its result) to `calls` on every call."""
    def call(model, *args, **kwargs):
        result = function(model, *args, **kwargs)
        calls.append((model, result))
        return result
    return call


def _from_files_only(session_type):
    """onnxruntime sessions may only be created from a path: a large model's bytes cannot be serialised."""
    def create(model, *args, **kwargs):
        assert isinstance(model, (str, os.PathLike)), "a session was created from serialised bytes"
        return session_type(model, *args, **kwargs)
    return create


@pytest.mark.skipif(os.environ.get(LARGE_TESTS) != "1",
                    reason=f"2.6 GB model: set {LARGE_TESTS}=1 (needs ~10 GB of memory and ~8 GB of disk); "
                           "test_large_model_path_at_lowered_thresholds covers its code paths")
def test_model_above_two_gigabytes(tmp_path):
    free_disk = shutil.disk_usage(tmp_path).free
    assert free_disk >= NEEDED_DISK, f"{free_disk / 2**30:.1f} GB of free disk; the model, its copy and the " \
                                     f"output need {NEEDED_DISK / 2**30:.0f} GB"
    try:
        model_bytes = build(tmp_path, *LARGE)
        output = tmp_path / "out" / "pruned.onnx"
        output.parent.mkdir()
        peak = _peak_memory_of_cli(compress_arguments(tmp_path, output, "--external-data"))
        assert sorted(path.name for path in output.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
        onnx.checker.check_model(str(output))
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": np.zeros((2, 32), np.float32)})[0].shape == (2, 10)
        del session
        assert peak <= MEMORY_FACTOR * model_bytes + MEMORY_ALLOWANCE, (
            f"compress peaked at {peak / 2**30:.2f} GB, {peak / model_bytes:.2f}× the {model_bytes / 2**30:.2f} GB "
            f"model; the README promises about {MEMORY_FACTOR}×")
    finally:  # pytest keeps the last runs' temporary folders: do not leave gigabytes in them
        for path in tmp_path.rglob("*"):
            if path.is_file():
                path.unlink()


def _peak_memory_of_cli(arguments: list[str]) -> int:
    """Run the CLI in a fresh process and return its peak resident memory in bytes."""
    script = ("import resource, sys\n"
              "from pfp_onnx_cli.main import main\n"
              "try:\n"
              "    main(sys.argv[1:])\n"
              "except SystemExit as exit:\n"
              "    code = exit.code\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
