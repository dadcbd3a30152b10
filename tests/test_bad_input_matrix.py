"""Every kind of bad input, one case each, against the CLI's contract for user errors.

The contract: exit status 2; exactly one paragraph on stderr starting with "Error: " (no newline in it, no
traceback) that names the problem; no output file nor temporary file left in the output folder; the input
model byte-identical afterwards. Cases run `pfp-onnx compress` on a 40-point slice of the digits fixture, so
that the few cases that get past validation stay fast.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_cli import DATA, MODEL, run_cli, run_cli_here

POINTS = 40
# Cases run in this interpreter (test_cli.run_cli_here), except the permission cases and this one, which run
# the console script as a user does: a second of start-up each would otherwise be most of this file's time.
SUBPROCESS_CASE = "custom operator"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Root reads and writes regardless of permission bits: for root the CLI runs with this folder's
# sitecustomize, which gives the chmod'ed path the answers an ordinary user gets.
PERMISSION_DENIED = Path(__file__).resolve().parent / "permission_denied"


def fixture_arrays(**changes) -> dict[str, np.ndarray]:
    """The first POINTS calibration points of the fixture; a change of None drops that array."""
    with np.load(DATA) as archive:
        arrays = {name: archive[name][:POINTS] for name in archive.files}
    arrays.update(changes)
    return {name: value for name, value in arrays.items() if value is not None}


def fixture_input() -> np.ndarray:
    return fixture_arrays()["input"].copy()


def write_npz(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **arrays)
    return path


def with_value(index: tuple[int, ...], value: float) -> np.ndarray:
    values = fixture_input()
    values[index] = value
    return values


def relu_only_model() -> onnx.ModelProto:
    """A valid model with the fixture's signature but no Conv/Gemm/MatMul: nothing to prune."""
    shape = ["N", 1, 8, 8]
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"], name="relu")], "relu_only",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _invalid_utf8_name(everywhere: bool) -> bytes:
    """The fixture with '/stem/stem.0/Conv_output_0' made invalid UTF-8 (0x80 for its '/'), at every use
    (a consistent, checker-clean model) or only where the BatchNorm reads it (a dangling input)."""
    content = MODEL.read_bytes()
    name = b"/stem/stem.0/Conv_output_0"
    if everywhere:
        return content.replace(name, b"\x80" + name[1:])
    at = content.rindex(name)
    return content[:at] + b"\x80" + content[at + 1:]


def checker_failing_model() -> onnx.ModelProto:
    """A node reads a tensor that nothing defines; saved without running the checker."""
    shape = ["N", 1, 8, 8]
    nodes = [helper.make_node("Add", ["input", "undefined_tensor"], ["logits"], name="add")]
    graph = helper.make_graph(nodes, "broken", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def fixture_changed(change: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    model = onnx.load(str(MODEL))
    change(model)
    return model


def _custom_operator(model: onnx.ModelProto) -> None:
    """The last Relu becomes an operator of a domain onnxruntime does not know."""
    relu = [node for node in model.graph.node if node.op_type == "Relu"][-1]
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def _reshape_for_one_batch_size(model: onnx.ModelProto) -> None:
    """Flatten written as Reshape to [8, 64]: runs only on batches of 8 though the input says any."""
    flatten = next(node for node in model.graph.node if node.op_type == "Flatten")
    flatten.op_type = "Reshape"
    flatten.input.append("fixed_shape")
    del flatten.attribute[:]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([8, -1], np.int64), "fixed_shape"))


@dataclass
class Case:
    """Builds the CLI arguments in a temporary folder; `output` overrides the default -o path."""

    arguments: Callable[[Path], list]
    expected: str  # a substring of the error that shows the problem was named
    model: Callable[[Path], Path] = lambda tmp: MODEL
    output: Callable[[Path, Path], Path] | None = None
    report: Callable[[Path, Path], Path] | None = None  # from (tmp, output); default out/report.json
    click_usage_error: bool = False  # click's own usage errors print "Usage: ..." lines before "Error: "
    denied: str | None = None  # "model": the model is unreadable; "output": the output folder is read-only
    xfail: str | None = None
    marks: list = field(default_factory=list)


def _saved(model: onnx.ModelProto, name: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "inputs" / name
        onnx.save(model, str(path))
        return path

    return write


def _bytes(content: Callable[[], bytes], name: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "inputs" / name
        path.write_bytes(content())
        return path

    return write


def _unreadable(tmp: Path) -> Path:
    path = tmp / "inputs" / "locked.onnx"
    shutil.copyfile(MODEL, path)
    path.chmod(0)
    return path


def _copied_model(tmp: Path) -> Path:
    path = tmp / "out" / "model.onnx"
    shutil.copyfile(MODEL, path)
    return path


def _calib(**changes) -> Callable[[Path], list]:
    return lambda tmp: ["--data", write_npz(tmp / "inputs", fixture_arrays(**changes)), "--budget", 0.7]


def _options(*options) -> Callable[[Path], list]:
    return lambda tmp: ["--data", write_npz(tmp / "inputs", fixture_arrays()), *options]


CASES = {
    "missing model": Case(_options("--budget", 0.7), "does not exist", model=lambda tmp: tmp / "inputs" / "nope.onnx"),
    "unreadable model": Case(
        _options("--budget", 0.7), "locked.onnx", model=_unreadable, denied="model"),
    "truncated onnx": Case(_options("--budget", 0.7), "Could not read",
                           model=_bytes(lambda: MODEL.read_bytes()[:len(MODEL.read_bytes()) // 2], "half.onnx")),
    "non-onnx bytes": Case(_options("--budget", 0.7), "Could not read",
                           model=_bytes(lambda: b"\x89PNG\r\n\x1a\n not a model at all" * 10, "junk.onnx")),
    "fails onnx checker": Case(_options("--budget", 0.7), "fails the ONNX checker",
                               model=_saved(checker_failing_model(), "broken.onnx")),
    "nothing prunable": Case(_options("--budget", 0.7), "nothing to prune",
                             model=_saved(relu_only_model(), "relu.onnx")),
    "npz missing input": Case(lambda tmp: ["--data", write_npz(tmp / "inputs", {"image": fixture_input(),
                                                                                  "other": np.zeros(3)}),
                                           "--budget", 0.7], "no array for model input"),
    "npz extra array": Case(_calib(extra=np.zeros((POINTS, 3), np.float32)), "'extra'"),
    "wrong rank": Case(_calib(input=np.zeros((POINTS, 64), np.float32)), "rank 2"),
    "wrong fixed dim": Case(_calib(input=np.zeros((POINTS, 1, 9, 8), np.float32)), "size 9 on axis 2"),
    "wrong dtype": Case(_calib(input=fixture_input().astype(np.float64)), "dtype float64"),
    "nan": Case(_calib(input=with_value((3, 0, 2, 2), np.nan)), "NaN"),
    "inf": Case(_calib(input=with_value((5, 0, 1, 7), -np.inf)), "infinite"),
    "zero points": Case(_calib(input=np.zeros((0, 1, 8, 8), np.float32), labels=np.zeros(0, np.int64)),
                        "zero points"),
    "too few points for holdout": Case(
        lambda tmp: ["--data", write_npz(tmp / "inputs", {"input": fixture_input()[:1]}), "--budget", 0.7,
                     "--holdout", 0.5], "too few"),
    "labels wrong length": Case(_calib(labels=np.zeros(POINTS - 3, np.int64)), "'labels'"),
    "budget zero": Case(_options("--budget", 0), "budget"),
    "budget negative": Case(_options("--budget", -0.5), "budget"),
    "budget above one": Case(_options("--budget", 1.5), "budget"),
    "budget not a number": Case(_options("--budget", "abc"), "Invalid value for '--budget'", click_usage_error=True),
    "budget infeasible": Case(_options("--budget", 1e-5), "smallest feasible budget"),
    "output is the input model": Case(_options("--budget", 0.7), "input model itself", model=_copied_model,
                                      output=lambda tmp, model: model),
    "output folder missing": Case(_options("--budget", 0.7), "does not exist",
                                  output=lambda tmp, model: tmp / "out" / "missing" / "pruned.onnx"),
    "output folder read-only": Case(_options("--budget", 0.7), "not writable", denied="output",
                                    output=lambda tmp, model: _read_only(tmp / "out") / "pruned.onnx"),
    "exclude unknown node": Case(_options("--budget", 0.7, "--exclude", "/no/such/Conv"), "/no/such/Conv"),
    # Beyond the brief's list: more options and paths a user can get wrong.
    "fails onnx checker, whole reason": Case(
        _options("--budget", 0.7), "is not output of any previous nodes", model=_saved(checker_failing_model(),
                                                                                          "broken.onnx")),
    "invalid utf-8 tensor name, dangling": Case(
        _options("--budget", 0.7), "UTF-8", model=_bytes(lambda: _invalid_utf8_name(False), "utf8.onnx")),
    "invalid utf-8 tensor name, consistent": Case(
        _options("--budget", 0.7), "UTF-8", model=_bytes(lambda: _invalid_utf8_name(True), "utf8.onnx")),
    "holdout one": Case(_options("--budget", 0.7, "--holdout", 1), "--holdout"),
    "batch size zero": Case(_options("--budget", 0.7, "--batch-size", 0), "--batch-size"),
    "round-to zero": Case(_options("--budget", 0.7, "--round-to", 0), "--round-to"),
    "round-to a word": Case(_options("--budget", 0.7, "--round-to", "eight"), "'auto' or a whole number"),
    "round-to a fraction": Case(_options("--budget", 0.7, "--round-to", 2.5), "'auto' or a whole number"),
    "round-to 8 with sampling": Case(_options("--budget", 0.7, "--round-to", 8, "--mode", "hybrid"),
                                     "needs --mode deterministic"),
    "output is a folder": Case(_options("--budget", 0.7), "is a directory", click_usage_error=True,
                               output=lambda tmp, model: tmp / "out"),
    "report is the output": Case(
        _options("--budget", 0.7), "--report", report=lambda tmp, output: output),
    "output is the calibration file": Case(
        _options("--budget", 0.7), "calib.npz", output=lambda tmp, model: tmp / "inputs" / "calib.npz"),
    "report is the calibration file": Case(
        _options("--budget", 0.7), "calib.npz", report=lambda tmp, output: tmp / "inputs" / "calib.npz"),
    "exclude-op unknown type": Case(
        _options("--budget", 0.7, "--exclude-op", "Gemmm"), "Gemmm"),
    # Checker-valid models that onnxruntime cannot load or run: the model's fault, said as such.
    "custom operator": Case(_options("--budget", 0.7), "com.example",
                            model=_saved(fixture_changed(_custom_operator), "custom.onnx")),
    # the Reshape to [8, 64] also freezes most groups (it splits the channels at batch 1): a budget they allow
    "runs at one batch size only": Case(_options("--budget", 0.95), "cannot run",
                                        model=_saved(fixture_changed(_reshape_for_one_batch_size), "fixed.onnx")),
}


def _read_only(folder: Path) -> Path:
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return folder


def _params():
    for name in sorted(CASES):
        case = CASES[name]
        marks = list(case.marks)
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        yield pytest.param(name, id=name.replace(" ", "-"), marks=marks)


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("name", _params())
def test_bad_input_meets_the_error_contract(tmp_path, monkeypatch, capfd, name):
    case = CASES[name]
    (tmp_path / "inputs").mkdir()
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    model = case.model(tmp_path)
    arguments = case.arguments(tmp_path)
    output = case.output(tmp_path, model) if case.output else out_folder / "pruned.onnx"
    report = case.report(tmp_path, output) if case.report else out_folder / "report.json"
    model_before = model.read_bytes() if model.is_file() and os.access(model, os.R_OK) else None
    if model_before is None and model.exists():  # unreadable: compare as root would, through a copy
        model_before = MODEL.read_bytes()
    out_before = _folder_state(out_folder) if os.access(out_folder, os.R_OK) else {}
    inputs_before = _folder_state(tmp_path / "inputs") if os.access(tmp_path / "inputs", os.R_OK) else {}
    if case.denied and IS_ROOT:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PERMISSION_DENIED),
                                                                        os.environ.get("PYTHONPATH")])))
        if case.denied == "model":
            monkeypatch.setenv("PFP_TEST_UNREADABLE", str(model))
        else:
            monkeypatch.setenv("PFP_TEST_UNWRITABLE", str(output.parent))

    try:
        command = ("compress", model, *arguments, "-o", output, "--report", report)
        # the permission cases need the subprocess's sitecustomize; one more runs as the console script does
        done = run_cli(*command) if case.denied or name == SUBPROCESS_CASE else run_cli_here(capfd, *command)
    finally:
        for path in (out_folder, model):  # let the checks (and pytest's cleanup) read everything again
            if path.exists() and path.is_relative_to(tmp_path):
                path.chmod(0o755 if path.is_dir() else 0o644)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip()
    if case.click_usage_error:
        assert message.splitlines()[-1].startswith("Error: "), message
    else:
        assert message.startswith("Error: ") and "\n" not in message, message
    assert case.expected in message, message
    assert _folder_state(out_folder) == out_before, "output folder changed: " + ", ".join(
        sorted(set(_folder_state(out_folder)) ^ set(out_before)))
    assert not (out_folder / "missing").exists()
    if inputs_before:
        assert _folder_state(tmp_path / "inputs") == inputs_before, "an input file (model or data) changed"
    if model_before is not None:
        assert model.read_bytes() == model_before
