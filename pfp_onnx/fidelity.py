"""Fidelity: one number in [0, 1] that says how closely the pruned model follows the original on held-out
points, so that a pipeline can ask for it (--min-fidelity) and rely on it.

- top1: the share of points whose arg-max class agrees, for a classifier's [N, classes] output; reported
  with a 95% Wilson interval, since a few held-out points make the figure uncertain.
- error: 1 − the worst output channel's RMS error in units of that channel's own spread in the original
  (pfp_onnx.verify.ChannelError), so damage to a small-valued channel (a detector's class scores beside
  its box coordinates) cannot hide behind a large one.
- detections: F1 of the pruned model's detections against the original's, for a YOLOv8-style
  [N, 4 + classes, anchors] output (pfp_onnx.detections): what a detector's user judges it by; the
  channel error overstates the damage on its sparse score rows. Reported with a 95% bootstrap interval
  over the points, since a few held-out images make it uncertain too.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from pfp_onnx.errors import OptionError
from pfp_onnx.options import METRICS
from pfp_onnx.verify import Verification

Z95 = 1.959964  # the standard normal's 97.5% quantile
WARN_AGREEMENT = 0.9  # below this top-1 agreement compress warns, target or not
WARN_ACCURACY_DROP = 0.05  # and above this drop of labelled accuracy
WARN_ERROR_FIDELITY = 0.5  # and below this error fidelity (a channel off by half its spread)


@dataclass(frozen=True)
class Fidelity:
    metric: str  # top1 | error | detections
    output: str
    value: float
    low: float  # the 95% interval (Wilson for top1, a bootstrap over points for detections; error: the value)
    high: float
    points: int
    target: float | None = None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def describe(self) -> str:
        interval = "" if self.metric == "error" else f" (95% interval {self.low:.1%}–{self.high:.1%})"
        name = {"top1": "top-1 agreement", "error": "1 − worst channel error",
                "detections": "F1 of the original's detections"}[self.metric]
        target = "" if self.target is None else f", target {self.target:g}: {'met' if self.met else 'NOT met'}"
        return f"fidelity {self.value:.4f} ({name} on '{self.output}', {self.points} points{interval}{target})"


def check_metric(metric: str, output: str | None, outputs: list[str]) -> None:
    """Refuse an unknown metric or output before any work is done."""
    if metric not in METRICS:
        raise OptionError(f"--fidelity takes {', '.join(METRICS)}; got '{metric}'.")
    if output is not None and output not in outputs:
        raise OptionError(f"--fidelity-output '{output}' is not an output of the model; its outputs are "
                          f"{', '.join(outputs)}.")


def measure(verification: Verification, metric: str = "auto", output: str | None = None,
            target: float | None = None, detectors: Collection[str] = ()) -> Fidelity:
    """The fidelity of a verification. auto: top-1 agreement when the judged output (the first, unless
    named) is a classifier's [N, classes], the F1 of its detections when it is one of the `detectors`
    (pfp_onnx.detections.yolo_heads: the graph, not only the shape, says it is a YOLOv8 head), else the
    worst-channel error; error without a named output judges every output."""
    names = [item.name for item in verification.outputs]
    judged = output or names[0]
    if metric == "auto":
        metric = ("top1" if judged in verification.agreement else
                  "detections" if judged in detectors and judged in verification.detections else "error")
    if metric == "detections":
        if judged not in verification.detections:
            raise OptionError(f"--fidelity detections needs a detector's output shaped [N, 4 + classes, anchors] "
                              f"(YOLOv8's layout); '{judged}' is not one. Use --fidelity error, or name such an "
                              "output with --fidelity-output.")
        value = verification.detections[judged].f1
        low, high = verification.detections_interval.get(judged, (value, value))
        return Fidelity("detections", judged, value, low, high, verification.points, target)
    if metric == "top1":
        if judged not in verification.agreement:
            raise OptionError(f"--fidelity top1 needs a classifier's output shaped [N, classes]; '{judged}' is not "
                              "one. Use --fidelity error, or name a classifier output with --fidelity-output.")
        value = verification.agreement[judged]
        low, high = wilson_interval(value, verification.points)
        return Fidelity("top1", judged, value, low, high, verification.points, target)
    errors = verification.channel_error
    worst = errors[output] if output is not None else max(errors.values(), default=0.0)
    value = max(0.0, 1.0 - worst)
    return Fidelity("error", output or ", ".join(names), value, value, value, verification.points, target)


def wilson_interval(share: float, count: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion observed as `share` of `count` trials."""
    if count == 0:
        return 0.0, 1.0
    denominator = 1 + Z95 ** 2 / count
    centre = (share + Z95 ** 2 / (2 * count)) / denominator
    half = Z95 * math.sqrt(share * (1 - share) / count + Z95 ** 2 / (4 * count ** 2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def warnings(verification: Verification, fidelity: Fidelity) -> tuple[str, ...]:
    """What a user must not miss when no target guards them: poor agreement, a large accuracy drop, a
    detector that lost a tenth of its detections, a channel far off."""
    found = []
    if verification.top1_agreement is not None and verification.top1_agreement < WARN_AGREEMENT:
        found.append(f"top-1 agreement with the original is only {verification.top1_agreement:.1%} on "
                     f"{verification.points} held-out points: this pruned model does not behave like the original. "
                     "Use a larger --budget, or let --min-fidelity find one")
    if (verification.accuracy_original is not None
            and verification.accuracy_original - verification.accuracy_pruned > WARN_ACCURACY_DROP):
        found.append(f"labelled accuracy fell from {verification.accuracy_original:.1%} to "
                     f"{verification.accuracy_pruned:.1%}; use a larger --budget, or --min-fidelity")
    if fidelity.metric == "detections" and fidelity.value < WARN_AGREEMENT:
        found.append(f"the pruned model keeps only {fidelity.value:.1%} of the original's detections on "
                     f"'{fidelity.output}' (F1 over {verification.points} held-out points). Use a larger --budget, "
                     "or let --min-fidelity find one")
    if fidelity.metric == "error" and fidelity.value < WARN_ERROR_FIDELITY and verification.worst_channels:
        worst = verification.worst_channels[0]
        message = (f"output '{worst.output}' channel {worst.channel} is off by {worst.error:.2f} of its own "
                   f"spread (RMS over {verification.points} held-out points)")
        matches = verification.detections.get(worst.output)
        if matches is None:
            message += "; use a larger --budget, or --min-fidelity"
        else:  # a detector's sparse score rows make the channel error severe: say what its detections say
            message += (f"; as a YOLOv8-style detector's output, it keeps {matches.f1:.1%} of the original's "
                        "detections (F1; --fidelity detections judges by that)")
        found.append(message)
    return tuple(found)
