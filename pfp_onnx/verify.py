"""Compare the original and the pruned model on held-out points, the way Polygraphy compares runners.

Both models stream over the same batches; only per-point statistics are kept, so memory stays bounded
by one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx

from pfp_onnx.data import LABELS, model_feeds
from pfp_onnx.runtime import Device, create_session

TINY = 1e-12


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs_error: float
    max_relative_error: float
    mean_relative_error: float


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


def check_runs(model: onnx.ModelProto, batch: Mapping[str, np.ndarray], device: Device) -> None:
    """Run the pruned model once: onnx.checker does not catch every inconsistency (a conv's group count)."""
    try:
        create_session(model, device).run(None, model_feeds(batch))
    except Exception as exc:
        raise RuntimeError(
            f"pfp-onnx produced a model that onnxruntime cannot run ({exc}). This is a bug in pfp-onnx; "
            "please report it with the output of `pfp-onnx analyze` for this model.") from exc


def verify(original: onnx.ModelProto, pruned: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]],
           device: Device, *, epsilon: float | None = None,
           epsilons: Iterable[float] = ()) -> Verification:
    """Relative output error ‖y' − y‖ / ‖y‖ per point and output, top-1 agreement and accuracy.

    A point's error is its worst over the outputs; `epsilons` ask for the empirical (ε, δ) of PFP's
    guarantee: δ = the fraction of points outside (1 ± ε). Batches carrying `labels` give accuracy.
    """
    sessions = [create_session(model, device) for model in (original, pruned)]
    names = [output.name for output in original.graph.output]
    errors: dict[str, list[np.ndarray]] = {name: [] for name in names}
    max_abs = dict.fromkeys(names, 0.0)
    top1: list[tuple[np.ndarray, np.ndarray]] = []
    labels: list[np.ndarray] = []
    for batch in batches:
        if LABELS in batch:
            labels.append(np.asarray(batch[LABELS]))
        reference, candidate = (session.run(names, model_feeds(batch)) for session in sessions)
        for name, want, got in zip(names, reference, candidate):
            want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
            difference = (got - want).reshape(len(want), -1)
            norms = np.linalg.norm(want.reshape(len(want), -1), axis=1)
            errors[name].append(np.linalg.norm(difference, axis=1) / np.maximum(norms, TINY))
            max_abs[name] = max(max_abs[name], float(np.abs(difference).max(initial=0.0)))
        if reference[0].ndim == 2 and reference[0].shape[1] > 1:
            top1.append((reference[0].argmax(axis=1), candidate[0].argmax(axis=1)))
    per_output = {name: np.concatenate(parts) for name, parts in errors.items()}
    worst_per_point = np.max(np.stack(list(per_output.values())), axis=0)
    comparisons = tuple(OutputComparison(name, max_abs[name], float(values.max()), float(values.mean()))
                        for name, values in per_output.items())
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
    )
