"""Detections of a YOLOv8-style head (pfp_onnx.detections): thresholds and per-class suppression on a
hand-built output, matching against the original's, and the detections fidelity a detector's user asks for."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import pfp_onnx
from pfp_onnx.detections import Matches, detect, is_yolo_layout, match
from pfp_onnx.fidelity import measure, warnings
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
    assert measure(verify(original, original, batches, CPU), "detections").value == 1.0
    # judged by the default channel error, the warning gives the detections' figure beside it
    alerts = warnings(result, measure(result))
    assert any(f"it keeps {whole.f1:.1%} of the original's detections" in alert for alert in alerts), alerts


def test_detections_fidelity_needs_a_detector_output():
    with pytest.raises(pfp_onnx.OptionError, match="--fidelity detections needs"):
        pfp_onnx.compress(str(MODEL), str(DATA), budget=0.6, recovery="none", fidelity="detections")
