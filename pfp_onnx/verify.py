"""Compare the original and the pruned model on held-out points, the way Polygraphy compares runners.

Both models stream over the same batches; only per-point statistics are kept, so memory stays bounded
by one batch — and by REFERENCE_BYTES of the original's outputs, which a sweep keeps between the rows it
verifies against them.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx

from pfp_onnx.data import LABELS, model_feeds, points_in
from pfp_onnx.detections import Matches, f1_interval, is_yolo_layout, match_points
from pfp_onnx.errors import ModelError
from pfp_onnx.model import first_line
from pfp_onnx.runtime import ONNXRUNTIME_ERRORS, Device, create_session

TINY = 1e-12
WORST_CHANNELS = 5  # channels listed in Verification.worst_channels
# The original's outputs on the held-out points are kept for later verifications up to this size (a
# classifier's logits are a few KB; a segmentation map of every point is not kept).
REFERENCE_BYTES = 64 * 2**20


class ReferenceOutputs:
    """The original model's outputs on the held-out batches, kept by the first verification that runs it
    over all of them while they stay under REFERENCE_BYTES: later verifications against the same batches
    (a sweep's rows) neither build the original's session nor run it again."""

    def __init__(self) -> None:
        self._kept: list[list[np.ndarray]] = []
        self._bytes = 0
        self._too_large = False
        self._complete = False

    @property
    def batches(self) -> list[list[np.ndarray]] | None:
        """Per batch, the outputs in graph order; None until a verification has kept them all."""
        return self._kept if self._complete else None

    def start(self) -> None:
        """A verification runs the original over the batches from the first (an earlier one may have
        stopped half-way)."""
        self._kept, self._bytes = [], 0

    def keep(self, outputs: list[np.ndarray]) -> None:
        """Keep one more batch's outputs, in order."""
        if self._too_large:
            return
        self._bytes += sum(np.asarray(output).nbytes for output in outputs)
        self._too_large = self._bytes > REFERENCE_BYTES
        if self._too_large:
            self._kept = []
        else:
            self._kept.append(outputs)

    def finish(self) -> None:
        """The batches are over: what was kept is all of them, unless it grew too large (then every
        verification runs the original)."""
        self._complete = not self._too_large


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs_error: float
    max_relative_error: float
    mean_relative_error: float


@dataclass(frozen=True)
class ChannelError:
    """One output channel's RMS error over every held-out point and position, in units of that channel's
    own spread in the original's outputs (its standard deviation): a YOLO head's class-score rows are judged
    on their own scale, not drowned by box coordinates a hundred times larger."""

    output: str
    channel: int
    error: float  # sqrt(mean((y' − y)²)) / std(y) over the channel's values (mean |y| where std is 0)
    spread: float  # the channel's standard deviation in the original


@dataclass(frozen=True)
class Verification:
    points: int
    max_relative_error: float
    mean_relative_error: float
    epsilon: float | None
    within_epsilon: float | None  # fraction of points whose relative error is ≤ ε
    top1_agreement: float | None  # for a first output shaped [N, classes]
    accuracy_original: float | None
    accuracy_pruned: float | None
    outputs: tuple[OutputComparison, ...]
    percentiles: dict[str, float]  # of the per-point relative error: p50, p90, p99
    outside: dict[str, float]  # empirical δ: fraction of points whose error exceeds each requested ε
    worst_channels: tuple[ChannelError, ...] = ()  # the largest per-channel errors over all outputs, worst first
    channel_error: dict[str, float] = field(default_factory=dict)  # per output: its worst channel's error
    agreement: dict[str, float] = field(default_factory=dict)  # top-1 agreement of every [N, classes] output
    # the original's detections matched by the pruned model's, for every [N, 4 + classes, anchors] output
    detections: dict[str, Matches] = field(default_factory=dict)
    detections_interval: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95%, of each one's F1


def check_runs(model: onnx.ModelProto, batch: Mapping[str, np.ndarray], device: Device, *,
               original: onnx.ModelProto, name: str) -> None:
    """Run the pruned model once: onnx.checker does not catch every inconsistency (a conv's group count)."""
    try:
        create_session(model, device).run(None, model_feeds(batch))
    except ONNXRUNTIME_ERRORS as exc:
        raise blame(exc, original, name, [batch], device) from exc


def _reason(exc: BaseException) -> str:
    """onnxruntime's message without its '[ONNXRuntimeError] : 1 : FAIL : ' prefix."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc)).rstrip(". ")


def runtime_failure(model: onnx.ModelProto, name: str, batches: Iterable[Mapping[str, np.ndarray]],
                    device: Device) -> ModelError | None:
    """Why onnxruntime cannot load `model` or run it on one of `batches`, as a user error; None if it can.

    Checker-valid models can still fail there: custom operators, two nodes of one name, a Reshape written
    for one batch size."""
    try:
        session = create_session(model, device)
    except ONNXRUNTIME_ERRORS as exc:
        return ModelError(
            f"onnxruntime cannot load {name} ({_reason(exc)}). pfp-onnx measures a model by running it in "
            "onnxruntime: re-export it so that onnxruntime loads it (standard operators, unique node names), "
            "then try again.")
    for batch in batches:
        try:
            session.run(None, model_feeds(batch))
        except ONNXRUNTIME_ERRORS as exc:
            return ModelError(
                f"onnxruntime cannot run {name} on a batch of {points_in(batch)} points ({_reason(exc)}). If the model "
                "works only at one batch size, export it with that fixed batch dimension on its input (pfp-onnx "
                "then feeds it whole batches of that size); otherwise fix the model so that onnxruntime runs it.")
    return None


def blame(exc: Exception, model: onnx.ModelProto, name: str, batches: Iterable[Mapping[str, np.ndarray]],
          device: Device) -> Exception:
    """What to raise after onnxruntime failed on a model pfp-onnx derived from `model` (a capture model,
    the pruned model): the user's error when `model` itself fails on the same batches, else a bug report."""
    return runtime_failure(model, name, batches, device) or RuntimeError(
        f"onnxruntime failed on a model pfp-onnx derived from {name} ({_reason(exc)}), though {name} "
        "itself runs. This is a bug in pfp-onnx; please report it with the output of `pfp-onnx analyze` "
        "for this model.")


def verify(original: onnx.ModelProto, pruned: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]],
           device: Device, *, epsilon: float | None = None, epsilons: Iterable[float] = (),
           reference: ReferenceOutputs | None = None) -> Verification:
    """Relative output error ‖y' − y‖ / ‖y‖ per point and output, top-1 agreement and accuracy.

    A point's error is its worst over the outputs; `epsilons` ask for the empirical (ε, δ) of PFP's
    guarantee: δ = the fraction of points outside (1 ± ε). Batches carrying `labels` give accuracy.
    `reference` keeps (or already holds) the original's outputs on these same batches.
    """
    kept = reference.batches if reference is not None else None
    if reference is not None and kept is None:
        reference.start()
    original_session = create_session(original, device) if kept is None else None
    pruned_session = create_session(pruned, device)
    names = [output.name for output in original.graph.output]
    errors: dict[str, list[np.ndarray]] = {name: [] for name in names}
    max_abs = dict.fromkeys(names, 0.0)
    channels = {name: ChannelMoments() for name in names}
    classes: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in names}
    detections: dict[str, list[Matches]] = {}
    top1: list[tuple[np.ndarray, np.ndarray]] = []
    labels: list[np.ndarray] = []
    for index, batch in enumerate(batches):
        if LABELS in batch:
            labels.append(np.asarray(batch[LABELS]))
        feeds = model_feeds(batch)
        if kept is None:
            wanted = original_session.run(names, feeds)
            if reference is not None:
                reference.keep(wanted)
        else:
            wanted = kept[index]
        candidate = pruned_session.run(names, feeds)
        for name, want, got in zip(names, wanted, candidate):
            want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
            difference = (got - want).reshape(len(want), -1)
            norms = np.linalg.norm(want.reshape(len(want), -1), axis=1)
            errors[name].append(np.linalg.norm(difference, axis=1) / np.maximum(norms, TINY))
            max_abs[name] = max(max_abs[name], float(np.abs(difference).max(initial=0.0)))
            channels[name].update(want, got)
            if want.ndim == 2 and want.shape[1] > 1:
                classes[name].append((want.argmax(axis=1), got.argmax(axis=1)))
            if is_yolo_layout(want.shape):
                detections.setdefault(name, []).extend(match_points(want, got))
        if classes[names[0]]:
            top1.append(classes[names[0]][-1])
    if reference is not None and kept is None:
        reference.finish()
    per_output = {name: np.concatenate(parts) for name, parts in errors.items()}
    worst_per_point = np.max(np.stack(list(per_output.values())), axis=0)
    comparisons = tuple(OutputComparison(name, max_abs[name], float(values.max()), float(values.mean()))
                        for name, values in per_output.items())
    channel_errors = [error for name in names for error in channels[name].errors(name)]
    worst_channels = tuple(sorted(channel_errors, key=lambda item: -item.error)[:WORST_CHANNELS])
    agreement = {name: float(np.mean(np.concatenate([w for w, _ in pairs]) == np.concatenate([g for _, g in pairs])))
                 for name, pairs in classes.items() if pairs}
    want_top1 = np.concatenate([pair[0] for pair in top1]) if top1 else None
    got_top1 = np.concatenate([pair[1] for pair in top1]) if top1 else None
    labels = np.concatenate(labels) if labels else None
    has_labels = labels is not None and want_top1 is not None and len(labels) == len(want_top1)
    return Verification(
        points=len(worst_per_point),
        max_relative_error=float(worst_per_point.max()),
        mean_relative_error=float(worst_per_point.mean()),
        epsilon=epsilon,
        within_epsilon=None if epsilon is None else float(np.mean(worst_per_point <= epsilon)),
        top1_agreement=None if want_top1 is None else float(np.mean(want_top1 == got_top1)),
        accuracy_original=float(np.mean(want_top1 == labels)) if has_labels else None,
        accuracy_pruned=float(np.mean(got_top1 == labels)) if has_labels else None,
        outputs=comparisons,
        percentiles={f"p{q}": float(np.percentile(worst_per_point, q)) for q in (50, 90, 99)},
        outside={f"{value:g}": float(np.mean(worst_per_point > value)) for value in epsilons},
        worst_channels=worst_channels,
        channel_error={name: max((item.error for item in channel_errors if item.output == name), default=0.0)
                       for name in names},
        agreement=agreement,
        detections={name: sum(points, Matches(0, 0, 0)) for name, points in detections.items()},
        detections_interval={name: f1_interval(points) for name, points in detections.items()},
    )


class ChannelMoments:
    """Per channel (axis 1 of an output, the last axis of a [N, C] one; a [N] output is one channel) the
    running count, Σy, Σy² of the original's values and Σ(y' − y)², in float64: enough for the RMS error
    against the spread, streamed batch by batch."""

    def __init__(self) -> None:
        self._count = 0
        self._shift = self._sum = self._squares = self._errors = None

    def update(self, want: np.ndarray, got: np.ndarray) -> None:
        rows = _channel_rows(want)
        difference = _channel_rows(got) - rows
        if self._sum is None:  # sums about the first batch's means: no cancellation for a large mean
            self._shift = rows.mean(axis=0)
            self._sum, self._squares, self._errors = (np.zeros(rows.shape[1]) for _ in range(3))
        rows = rows - self._shift
        self._count += rows.shape[0]
        self._sum += rows.sum(axis=0)
        self._squares += np.einsum("ij,ij->j", rows, rows)
        self._errors += np.einsum("ij,ij->j", difference, difference)

    def errors(self, output: str) -> list[ChannelError]:
        if self._sum is None or self._count == 0:
            return []
        shifted_mean = self._sum / self._count
        spread = np.sqrt(np.maximum(self._squares / self._count - shifted_mean ** 2, 0.0))
        size = np.abs(self._shift + shifted_mean)
        scale = np.where(spread > TINY * np.maximum(size, 1.0), spread, np.maximum(size, TINY))
        rms = np.sqrt(self._errors / self._count)
        return [ChannelError(output, int(channel), float(rms[channel] / scale[channel]), float(spread[channel]))
                for channel in range(len(rms))]


def _channel_rows(values: np.ndarray) -> np.ndarray:
    """[values, channels]: the output's channel axis (1) last, every other axis folded into rows."""
    if values.ndim < 2:
        return values.reshape(-1, 1)
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])
