"""Detections of a YOLOv8-style head, matched between the original and the pruned model.

A detector's fidelity is whether it still finds what the original found: an output channel's RMS error
overstates the damage on sparse score rows (nearly every anchor scores about 0, so a few shifted peaks are
a whole spread). The layout is the one Ultralytics exports: [N, 4 + classes, anchors], each anchor's box as
centre x, centre y, width, height, then its class scores (already in [0, 1]). A detection is an anchor whose
best class scores at least SCORE, kept by per-class non-maximum suppression; a pruned detection matches an
original one of the same class with IoU ≥ MATCH_IOU, each at most once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from pfp_onnx.model import LAYOUT_OPS

SCORE = 0.25  # Ultralytics' default confidence threshold
NMS_IOU = 0.7  # and its default NMS IoU
MATCH_IOU = 0.5


@dataclass(frozen=True)
class Matches:
    matched: int  # the original's detections the pruned model also finds
    extra: int  # the pruned model's detections the original does not have
    missed: int  # the original's detections the pruned model does not find

    def __add__(self, other: Matches) -> Matches:
        return Matches(self.matched + other.matched, self.extra + other.extra, self.missed + other.missed)

    @property
    def f1(self) -> float:
        """F1 of the pruned model's detections against the original's (1 where neither detects anything)."""
        found = 2 * self.matched + self.extra + self.missed
        return 1.0 if found == 0 else 2 * self.matched / found


def is_yolo_layout(shape: tuple[int, ...]) -> bool:
    """[N, 4 + classes, anchors] with at least one class and more anchors than rows."""
    return len(shape) == 3 and shape[1] > 4 and shape[2] > shape[1]


def yolo_heads(model: onnx.ModelProto) -> frozenset[str]:
    """The outputs that are a YOLOv8 head by construction, not only by shape: a Concat along the rows
    (axis 1) of whose inputs one is a Sigmoid's result, seen through layout ops only (the class scores
    beside the boxes, as Ultralytics exports them). Judging such an output by its detections is safe; an
    output that merely has the [N, rows, anchors] shape may be anything."""
    producers = {name: node for node in model.graph.node for name in node.output}

    def scores(name: str) -> bool:
        node = producers.get(name)
        while node is not None and node.op_type in LAYOUT_OPS - {"Concat"} and node.input:
            node = producers.get(node.input[0])
        if node is None:
            return False
        if node.op_type == "Concat":  # the scales' scores joined along the anchors
            return bool(node.input) and all(scores(part) for part in node.input)
        return node.op_type == "Sigmoid"

    heads = set()
    for output in model.graph.output:
        node = producers.get(output.name)
        if node is None or node.op_type != "Concat" or len(node.input) < 2:
            continue
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
        rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else 3
        if axis in (1, 1 - rank) and scores(node.input[-1]) and not scores(node.input[0]):
            heads.add(output.name)
    return frozenset(heads)


def detect(point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One point's [4 + classes, anchors] output: boxes [D, 4] (x1, y1, x2, y2) and classes [D]."""
    scores = point[4:]
    classes = scores.argmax(axis=0)
    best = scores[classes, np.arange(scores.shape[1])]
    keep = np.flatnonzero(best >= SCORE)
    keep = keep[np.argsort(-best[keep], kind="stable")]
    centre, size = point[:2, keep].T, point[2:4, keep].T
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    chosen = []
    for label in np.unique(classes[keep]):
        members = np.flatnonzero(classes[keep] == label)
        while members.size:
            chosen.append(members[0])
            members = members[1:][iou(boxes[members[0]], boxes[members[1:]]) < NMS_IOU]
    chosen = np.sort(np.asarray(chosen, int))  # best score first
    return boxes[chosen], classes[keep][chosen]


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    low = np.maximum(box[:2], boxes[:, :2])
    high = np.minimum(box[2:], boxes[:, 2:])
    overlap = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda items: np.prod(np.clip(items[..., 2:] - items[..., :2], 0, None), axis=-1)  # noqa: E731
    return overlap / np.maximum(area(box) + area(boxes) - overlap, 1e-12)


def f1_interval(points: list[Matches], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the F1 over points (images): a page's detections stand or fall
    together, so the points, not the detections, are the independent draws; a few held-out pages make it wide."""
    if not points:
        return 0.0, 1.0
    counts = np.array([(item.matched, item.extra, item.missed) for item in points], np.float64)
    drawn = np.random.default_rng(seed).integers(0, len(points), size=(resamples, len(points)))
    matched, extra, missed = counts[drawn].sum(axis=1).T
    found = 2 * matched + extra + missed
    f1 = np.where(found > 0, 2 * matched / np.maximum(found, 1), 1.0)
    low, high = np.percentile(f1, [2.5, 97.5])
    return float(low), float(high)


def match_points(original: np.ndarray, pruned: np.ndarray) -> list[Matches]:
    """Each point's matches in a batch of [N, 4 + classes, anchors] outputs."""
    found = []
    for want, got in zip(original, pruned):
        (want_boxes, want_classes), (got_boxes, got_classes) = detect(want), detect(got)
        free = np.ones(len(got_boxes), bool)
        matched = 0
        for box, label in zip(want_boxes, want_classes):
            candidates = np.flatnonzero(free & (got_classes == label))
            if candidates.size:
                overlaps = iou(box, got_boxes[candidates])
                if overlaps.max() >= MATCH_IOU:
                    free[candidates[overlaps.argmax()]] = False
                    matched += 1
        found.append(Matches(matched, len(got_boxes) - matched, len(want_boxes) - matched))
    return found
