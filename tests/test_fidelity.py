"""Fidelity a pipeline can rely on: per-channel error that damage cannot hide from, the target search, the
gate's exit status, and loud warnings without a target."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pfp_onnx
from pfp_onnx.fidelity import measure, wilson_interval
from pfp_onnx.runtime import choose_device
from pfp_onnx.verify import verify
from test_cli import DATA, MODEL, run_cli

CPU = choose_device("cpu")
ANCHORS, CLASSES = 50, 3


def _detector(score_scale: np.ndarray) -> onnx.ModelProto:
    """A YOLOv8-style head [N, 4 + classes, anchors]: box rows of 0–320 pixels and class-score rows of 0–1,
    each row an affine map of the input; `score_scale` multiplies the class-score rows."""
    rng = np.random.default_rng(5)
    weight = np.concatenate([rng.uniform(20, 160, size=(4, 1)), rng.uniform(0.05, 0.3, size=(CLASSES, 1))])
    weight[4:] *= score_scale.reshape(-1, 1)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["output0"])], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, ANCHORS])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + CLASSES, ANCHORS])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32).reshape(1, 4 + CLASSES, 1), "w")])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_channel_error_catches_a_damaged_score_row_the_tensor_error_misses():
    """One class-score row scaled by 0.3 (67% off): the whole-tensor relative error stays near 0.1% because
    box coordinates dominate its norm, while that channel's own error is many times its spread's size."""
    original = _detector(np.ones(CLASSES))
    damaged = _detector(np.array([1.0, 0.3, 1.0]))
    inputs = np.random.default_rng(6).uniform(0.5, 2.0, size=(40, 1, ANCHORS)).astype(np.float32)
    result = verify(original, damaged, [{"x": inputs[:32]}, {"x": inputs[32:]}], CPU)
    assert result.max_relative_error < 0.01
    worst = result.worst_channels[0]
    assert (worst.output, worst.channel) == ("output0", 4 + 1)
    values = inputs[:, 0, :].astype(np.float64)
    row = numpy_helper.to_array(original.graph.initializer[0]).reshape(-1)[5] * values
    expected = np.sqrt(np.mean((0.3 * row - row) ** 2)) / row.std()
    assert worst.error == pytest.approx(expected, rel=1e-5)
    assert all(item.error < 1e-6 for item in result.worst_channels[1:])
    fidelity = measure(result)
    assert fidelity.metric == "error" and fidelity.value == pytest.approx(max(0.0, 1 - expected), abs=1e-6)
    assert fidelity.value < 0.5 < 1 - result.max_relative_error


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(0.99, 100)
    assert (round(low, 4), round(high, 4)) == (0.9455, 0.9982)
    assert wilson_interval(1.0, 20)[1] == 1.0 and wilson_interval(1.0, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_measure_picks_top1_for_a_classifier_and_checks_the_output():
    result = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.4, recovery="none")
    fidelity = result.report.fidelity
    assert fidelity.metric == "top1" and fidelity.output == "logits"
    assert fidelity.value == result.report.verification.top1_agreement
    assert fidelity.low < fidelity.value <= fidelity.high and fidelity.met is None
    error = measure(result.report.verification, "error")
    assert error.value == pytest.approx(max(0.0, 1 - result.report.verification.worst_channels[0].error))
    with pytest.raises(pfp_onnx.OptionError, match="--fidelity-output 'scores'"):
        pfp_onnx.compress(str(MODEL), str(DATA), budget=0.4, fidelity_output="scores")
    with pytest.raises(pfp_onnx.OptionError, match="--fidelity takes"):
        pfp_onnx.compress(str(MODEL), str(DATA), budget=0.4, fidelity="f1")


def test_min_fidelity_finds_the_smallest_budget_within_one_step():
    """The search's budget meets the target and the budget one step (0.01) below it does not, measured the
    same way on the same held-out points."""
    target = 0.97
    result = pfp_onnx.compress(str(MODEL), str(DATA), min_fidelity=target, recovery="none")
    chosen = result.report.budget
    assert result.report.fidelity.met and result.report.fidelity.value >= target
    trials = {trial.budget: trial for trial in result.report.search}
    assert trials[chosen].met and all(trial.met == (trial.fidelity >= target) for trial in trials.values())
    below = pfp_onnx.compress(str(MODEL), str(DATA), budget=round(chosen - 0.01, 2), min_fidelity=target,
                              recovery="none")
    assert below.report.fidelity.met is False
    assert any("chosen" in note for note in result.notes)
    assert result.report.totals.layer_weights_after <= chosen * result.report.totals.layer_weights_before


def test_min_fidelity_needs_held_out_points():
    with pytest.raises(pfp_onnx.OptionError, match="--holdout"):
        pfp_onnx.compress(str(MODEL), str(DATA), min_fidelity=0.9, holdout=0)
    with pytest.raises(pfp_onnx.OptionError, match="--budget"):
        pfp_onnx.compress(str(MODEL), str(DATA))


def test_the_gate_exits_3_and_writes_no_model(tmp_path):
    output, report = tmp_path / "gated.onnx", tmp_path / "report.json"
    done = run_cli("compress", MODEL, "--data", DATA, "--budget", 0.05, "--min-fidelity", 0.99,
                   "--recovery", "none", "-o", output, "--report", report)
    assert done.returncode == 3, done.stderr
    assert not output.exists()
    assert "no model was written" in done.stderr and "target 0.99: NOT met" in done.stderr
    assert "fidelity" in done.stdout  # the report is still printed
    written = json.loads(report.read_text())
    assert written["fidelity"]["target"] == 0.99 and written["fidelity"]["value"] < 0.99
    passed = run_cli("compress", MODEL, "--data", DATA, "--budget", 0.8, "--min-fidelity", 0.9, "-o", output)
    assert passed.returncode == 0 and output.exists()


def test_poor_fidelity_warns_without_a_target(tmp_path):
    done = run_cli("compress", MODEL, "--data", DATA, "--budget", 0.05, "--recovery", "none", "-q",
                   "-o", tmp_path / "poor.onnx")
    assert done.returncode == 0 and (tmp_path / "poor.onnx").exists()
    assert "warning: top-1 agreement with the original is only" in done.stderr
    assert "warning: labelled accuracy fell" in done.stderr
