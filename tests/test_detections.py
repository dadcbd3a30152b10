"""Detections of a YOLOv8-style head (pfp_onnx.detections): thresholds and per-class suppression on a
hand-built output, matching against the original's, and the detections fidelity a detector's user asks for."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pfp_onnx
from pfp_onnx.detections import Matches, detect, f1_interval, is_yolo_layout, match_points, yolo_heads
from pfp_onnx.fidelity import measure, warnings
from pfp_onnx.report import render_verification
from pfp_onnx.verify import verify
from test_fidelity import CLASSES, CPU, _detector
from test_cli import DATA, MODEL

# anchor: centre x, centre y, width, height, score of class 0, score of class 1
ANCHORS = [(50, 50, 20, 20, 0.9, 0.0),      # kept
           (51, 50, 20, 20, 0.8, 0.0),      # class 0 again, IoU 0.9 with the first: suppressed
           (51, 50, 20, 20, 0.0, 0.7),      # the same box in class 1: kept
           (150, 150, 10, 10, 0.3, 0.1),    # kept, above 0.25
           (200, 200, 10, 10, 0.2, 0.0),    # below 0.25
           (0, 0, 0, 0, 0.0, 0.0)]


def match(original: np.ndarray, pruned: np.ndarray) -> Matches:
    """A batch's matches, point by point, added up."""
    return sum(match_points(original, pruned), Matches(0, 0, 0))


def head(anchors) -> np.ndarray:
    return np.asarray(anchors, np.float64).T  # [4 + classes, anchors]


def test_detect_thresholds_and_suppresses_per_class():
    boxes, classes = detect(head(ANCHORS))
    np.testing.assert_allclose(boxes, [[40, 40, 60, 60], [41, 40, 61, 60], [145, 145, 155, 155]])
    assert classes.tolist() == [0, 1, 0]
    assert is_yolo_layout((2, 6, 8400)) and not is_yolo_layout((2, 10)) and not is_yolo_layout((2, 84, 80))


def test_match_counts_what_the_pruned_model_kept_missed_and_added():
    pruned = [list(anchor) for anchor in ANCHORS]
    pruned[3][4] = 0.1  # the small class-0 box falls below the threshold: missed
    pruned[4][4] = 0.5  # a box the original did not report: extra
    pruned[2][0] += 3  # the class-1 box moves 3 px: still IoU 0.74, matched
    found = match(head(ANCHORS)[None], head(pruned)[None])
    assert found == Matches(matched=2, extra=1, missed=1) and found.f1 == pytest.approx(4 / 6)
    assert match(head(ANCHORS)[None], head(ANCHORS)[None]) == Matches(3, 0, 0)
    assert Matches(0, 0, 0).f1 == 1.0
    wrong_class = [list(anchor) for anchor in ANCHORS]
    wrong_class[0][4:] = [0.0, 0.9]  # the box now scores class 1 (suppressing the other class-1 box) ...
    wrong_class[1][4] = 0.0  # ... and nothing else scores class 0 there: that detection is missed
    assert match(head(ANCHORS)[None], head(wrong_class)[None]) == Matches(2, 0, 1)


def test_detections_fidelity_is_the_f1_of_the_verified_outputs():
    """verify matches every [N, 4 + classes, anchors] output batch by batch; --fidelity detections reads the
    F1 of the judged one, equal to matching the two models' outputs whole. Damping the class-score row that
    wins every anchor loses its detections (and another class takes over); an untouched model keeps them all."""
    original = _detector(np.ones(CLASSES))
    damaged = _detector(np.array([1.0, 1.0, 0.3]))
    inputs = np.random.default_rng(6).uniform(0.5, 2.0, size=(40, 1, 50)).astype(np.float32)
    batches = [{"x": inputs[:32]}, {"x": inputs[32:]}]
    result = verify(original, damaged, batches, CPU)
    outputs = [ort.InferenceSession(model.SerializeToString()).run(None, {"x": inputs})[0].astype(np.float64)
               for model in (original, damaged)]
    whole = match(*outputs)
    assert result.detections["output0"] == whole and whole.missed > 0 and whole.extra > 0
    fidelity = measure(result, "detections")
    assert (fidelity.metric, fidelity.output, fidelity.value) == ("detections", "output0", whole.f1)
    assert "F1 of the original's detections" in fidelity.describe()
    assert (fidelity.low, fidelity.high) == result.detections_interval["output0"]
    assert fidelity.low <= fidelity.value <= fidelity.high and "95% interval" in fidelity.describe()
    assert measure(verify(original, original, batches, CPU), "detections").value == 1.0
    # judged by the default channel error, the warning gives the detections' figure beside it
    alerts = warnings(result, measure(result))
    assert any(f"it keeps {whole.f1:.1%} of the original's detections" in alert for alert in alerts), alerts


def test_f1_interval_is_a_bootstrap_over_points():
    """Points are resampled whole: equal points leave no doubt, and the same mix of good and bad pages is
    less certain on 6 pages than on 60; the interval holds the F1 of the points pooled."""
    good, bad = Matches(10, 0, 0), Matches(4, 3, 6)
    assert f1_interval([good] * 6) == (1.0, 1.0)
    few, many = f1_interval([good] * 4 + [bad] * 2), f1_interval([good] * 40 + [bad] * 20)
    pooled = sum([good] * 4 + [bad] * 2, Matches(0, 0, 0)).f1
    assert few[0] < many[0] <= pooled <= many[1] < few[1]
    assert f1_interval([]) == (0.0, 1.0)


def test_detections_fidelity_needs_a_detector_output():
    with pytest.raises(pfp_onnx.OptionError, match="--fidelity detections needs"):
        pfp_onnx.compress(str(MODEL), str(DATA), budget=0.6, recovery="none", fidelity="detections")


def _yolo_head(*, sigmoid: bool = True, axis: int = 1) -> onnx.ModelProto:
    """A small prunable YOLOv8-style detector, exported as Ultralytics does: a stem, a box conv and a class
    conv per scale, each flattened to [N, rows, anchors], the scales' class rows joined and then squashed by
    a Sigmoid, and the boxes (offsets from each anchor's own box on a grid) beside the scores along the rows."""
    rng = np.random.default_rng(3)
    weights = {"w_stem": (16, 3, 3, 3), "w_box0": (4, 16, 1, 1), "w_cls0": (2, 16, 1, 1),
               "w_box1": (4, 16, 1, 1), "w_cls1": (2, 16, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["stem"], ["feature"], name="act"),
             helper.make_node("MaxPool", ["feature"], ["coarse"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    for scale, source in enumerate(["feature", "coarse"]):
        for part in ("box", "cls"):
            nodes += [helper.make_node("Conv", [source, f"w_{part}{scale}"], [f"{part}{scale}"], name=f"{part}{scale}"),
                      helper.make_node("Reshape", [f"{part}{scale}", f"shape_{part}"], [f"{part}{scale}_flat"])]
    nodes += [helper.make_node("Concat", ["box0_flat", "box1_flat"], ["offsets"], axis=-1),
              helper.make_node("Add", ["offsets", "grid"], ["boxes"]),
              helper.make_node("Concat", ["cls0_flat", "cls1_flat"], ["logits"], axis=-1)]
    nodes += [helper.make_node("Sigmoid", ["logits"], ["scores"])] if sigmoid else [
        helper.make_node("Identity", ["logits"], ["scores"])]
    nodes += [helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=axis)]
    initializers = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    grid = np.stack([np.arange(80) % 10 * 64 + 32, np.arange(80) // 10 * 64 + 32, np.full(80, 48), np.full(80, 48)])
    initializers += [numpy_helper.from_array(grid[None].astype(np.float32), "grid"),  # each anchor's own box
                     numpy_helper.from_array(np.array([0, 4, -1], np.int64), "shape_box"),
                     numpy_helper.from_array(np.array([0, 2, -1], np.int64), "shape_cls")]
    graph = helper.make_graph(nodes, "yolo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 6, 80])], initializers)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_yolo_heads_are_found_by_the_graph_not_the_shape():
    """The boxes beside Sigmoid-squashed class rows make a YOLOv8 head; the same shape without the Sigmoid,
    or joined along the anchors, does not (nor does any model the fixtures ship)."""
    assert yolo_heads(_yolo_head()) == {"output0"}
    assert yolo_heads(_yolo_head(sigmoid=False)) == frozenset()
    assert yolo_heads(_yolo_head(axis=2)) == frozenset()
    assert yolo_heads(onnx.load(MODEL)) == frozenset()


def test_auto_fidelity_judges_a_yolo_head_by_its_detections():
    """compress with the default fidelity on a YOLOv8 head reports, and gates on, the F1 of its detections:
    the number its user judges it by, where the channel error would read 0 for a model that keeps most."""
    model = _yolo_head()
    inputs = np.random.default_rng(4).uniform(0, 1, size=(40, 3, 8, 8)).astype(np.float32)
    result = pfp_onnx.compress(model, {"x": inputs}, budget=0.7, recovery="none", holdout=0.2)
    fidelity = result.report.fidelity
    verification = result.report.verification
    assert fidelity.metric == "detections" and fidelity.output == "output0"
    assert fidelity.value == verification.detections["output0"].f1
    assert verification.detections["output0"].matched > 0
    assert pfp_onnx.compress(model, {"x": inputs}, budget=0.7, recovery="none", holdout=0.2,
                             fidelity="error").report.fidelity.metric == "error"
    assert fidelity.value > 0.9 and not result.report.warnings
    crushed = pfp_onnx.compress(model, {"x": inputs}, budget=0.2, recovery="none", holdout=0.2).report
    assert crushed.fidelity.value < 0.9, "a budget this small loses detections"
    assert any(f"keeps only {crushed.fidelity.value:.1%} of the original's detections" in alert
               for alert in crushed.warnings), crushed.warnings
    shown = render_verification(pfp_onnx.evaluate(model, result.model, {"x": inputs}))
    found = pfp_onnx.evaluate(model, result.model, {"x": inputs}).detections["output0"]
    assert (f"detections on 'output0' (read as YOLOv8's): F1 {found.f1:.1%}" in shown
            and f"{found.matched} of the original's {found.matched + found.missed} found, {found.extra} extra" in shown)
    plain = pfp_onnx.compress(_yolo_head(sigmoid=False), {"x": inputs}, budget=0.7, recovery="none", holdout=0.2)
    assert plain.report.fidelity.metric == "error"
