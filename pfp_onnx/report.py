"""The compress report: one data structure, rendered as a terminal table or written as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pfp_onnx.groups import ChannelAnalysis
from pfp_onnx.latency.target import SpeedTrial
from pfp_onnx.fidelity import Fidelity, wilson_interval
from pfp_onnx.verify import Verification


@dataclass(frozen=True)
class GroupRow:
    group: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channels_before: int
    channels_after: int
    sensitivity_kept: float | None  # share of the group's sensitivity mass that survives
    frozen: tuple[str, ...]
    unit: int = 1  # channels per counted unit: a head's width where the group counts attention heads


@dataclass(frozen=True)
class Totals:
    parameters_before: int
    parameters_after: int
    layer_weights_before: int  # Conv/Gemm/MatMul weight tensors: what --budget counts by default
    layer_weights_after: int
    macs_before: int | None  # multiply-accumulates of those layers, per point: what --budget-of macs counts;
    macs_after: int | None  # None where the analysis leaves some layer's output size open


@dataclass(frozen=True)
class LayerRow:
    """One Conv/Gemm/MatMul layer after pruning: units kept per side, and its latency alone (ms) before and
    after where a latency table timed it."""

    node: str
    op: str
    in_units: int
    in_kept: int
    out_units: int
    out_kept: int
    ms_before: float | None = None
    ms_after: float | None = None


@dataclass(frozen=True)
class LatencyReport:
    """--budget-of latency: the speed-up asked for, the one the table predicted for the chosen structure, and
    the one measured against the original, side by side, on the provider, batch and threads timed."""

    provider: str
    batch: int
    threads: int | None  # None: onnxruntime's default
    target_speedup: float
    predicted_speedup: float
    measured_speedup: float
    original_ms: float
    pruned_ms: float
    step: int  # the width staircase measured (what --round-to auto rounds to)
    table_seconds: float
    table_cached: bool
    table_path: str | None
    trials: tuple[SpeedTrial, ...] = ()  # every structure timed while landing on the target
    allocation_cost: str = "latency"  # what the chosen allocation counted: the table's latency, or macs
    # (cost, held-out fidelity, F1 of a detector's detections or None, mean relative output error) of each
    # structure on target, where both were built and verified
    compared: tuple[tuple[str, float, float | None, float], ...] = ()


@dataclass(frozen=True)
class BudgetTrial:
    budget: float
    fidelity: float
    met: bool


@dataclass(frozen=True)
class CompressReport:
    model: str
    budget: float
    method: str  # criterion/allocation, e.g. pfp/pfp or l1/uniform
    mode: str
    seed: int
    round_to: str  # "auto", or the multiple every pruned width keeps ("1": PFP's exact counts)
    epsilon: float | None  # PFP's solved error bound; None for the uniform allocation
    device: str  # cuda or cpu (the note says why)
    sensitivity_points: int
    recommended_sensitivity_points: int
    groups: tuple[GroupRow, ...]
    totals: Totals
    verification: Verification | None
    seconds: dict[str, float]
    notes: tuple[str, ...] = ()  # what compress printed as "note:" lines (device, points, widths)
    budget_of: str = "weights"  # what the budget counts: weights, or macs (multiply-accumulates per point)
    fidelity: Fidelity | None = None  # measured on the held-out points (and its target, when one was set)
    warnings: tuple[str, ...] = ()  # what compress printed as "warning:" lines (poor fidelity)
    search: tuple[BudgetTrial, ...] = ()  # --min-fidelity without --budget: every budget tried, in order
    latency: LatencyReport | None = None  # --budget-of latency
    layers: tuple[LayerRow, ...] = ()  # every layer in graph order: what the allocation kept of it

    def to_dict(self) -> dict:
        return asdict(self)


def write_json(report: CompressReport, path: str | os.PathLike) -> None:
    """Written whole or not at all: a temporary file beside the target, then renamed over it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(json.dumps(report.to_dict(), indent=2, default=_plain) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _names(names: tuple[str, ...], width: int, limit: int = 2) -> str:
    """At most `limit` node names and a count of the rest, within `width` characters: names that do not fit
    lose their start, not their distinctive tail (`…/block_a/conv1/Conv`); the JSON report keeps them whole."""
    text, more = ", ".join(names), ""
    for shown in range(min(limit, len(names)), 0, -1):
        more = f" +{len(names) - shown}" if len(names) > shown else ""
        text = ", ".join(names[:shown]) + more
        if len(text) <= width:
            return text
    return _tail(names[0], width - len(more)) + more if names else text


def _tail(name: str, width: int) -> str:
    """The end of `name` in `width` characters after an ellipsis, starting at a separator ('/', else '.')
    so that no word is cut, unless that would drop more than half of what fits."""
    if len(name) <= width:
        return name
    tail = name[len(name) - (width - 1):]
    for separator in "/.":
        if 0 <= tail.find(separator) <= len(tail) // 2:
            return "…" + tail[tail.find(separator):]
    return "…" + tail


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:6.1%}" if before and after is not None else "   n/a"


def _count(value: int | None) -> str:
    """n/a for a total the analysis cannot know (MACs of a layer whose output size is open)."""
    return "n/a" if value is None else f"{value:,}"


def render_table(report: CompressReport, *, verbose: bool = False) -> str:
    """The summary a user reads after `pfp-onnx compress`; verbose adds every frozen reason and the
    per-output comparison."""
    budget = f"{report.budget:g}" + {"macs": " of MACs", "latency": " of latency"}.get(report.budget_of, "")
    lines = [f"pfp-onnx compress {report.model}  budget={budget}  method={report.method}  "
             f"mode={report.mode}  round-to={report.round_to}  seed={report.seed}",
             "",
             f"{'group':>5}  {'producers':<34} {'channels':>13}  {'sens. kept':>10}  note"]
    for row in report.groups:
        channels = f"{row.channels_before:>5} → {row.channels_after:<5}"
        if row.unit > 1:  # the group counts heads: say so, beside the table's channel counts
            channels = f"{row.channels_before:>3} → {row.channels_after:<3}heads"
        kept = "" if row.sensitivity_kept is None else f"{row.sensitivity_kept:10.1%}"
        note = "frozen: " + row.frozen[0] if row.frozen else ""
        lines.append(f"{row.group:>5}  {_names(row.producers, 34):<34} {channels:>13}  {kept:>10}  {note}")
        if verbose:
            lines.extend(f"{'':>5}  producers: {name}" for name in row.producers[2:])
            lines.extend(f"{'':>5}  frozen: {reason}" for reason in row.frozen[1:])
    totals = report.totals
    lines += ["",
              f"parameters     {totals.parameters_before:>12,} → {totals.parameters_after:<12,} "
              f"({_ratio(totals.parameters_after, totals.parameters_before)} kept)",
              f"layer weights  {totals.layer_weights_before:>12,} → {totals.layer_weights_after:<12,} "
              f"({_ratio(totals.layer_weights_after, totals.layer_weights_before)} kept)",
              f"MACs / point   {_count(totals.macs_before):>12} → {_count(totals.macs_after):<12} "
              f"({_ratio(totals.macs_after, totals.macs_before)} kept)"]
    if report.latency is not None:
        lines.append(render_latency(report.latency))
    if report.verification is None:
        lines.append("verification   skipped (no held-out points; use --holdout > 0)")
    else:
        lines.append(render_verification(report.verification))
        if report.fidelity is not None:
            lines.append(report.fidelity.describe())
        if report.search:
            lines.append("budgets tried  " + ", ".join(f"{trial.budget:g} → {trial.fidelity:.4f}"
                                                       f"{'' if trial.met else ' (below)'}" for trial in report.search))
        if verbose:
            lines.extend(f"  output '{item.name}': max abs error {item.max_abs_error:.4g}, relative max "
                         f"{item.max_relative_error:.4g}, mean {item.mean_relative_error:.4g}"
                         for item in report.verification.outputs)
    timing = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in report.seconds.items())
    lines.append(f"time           {timing}")
    return "\n".join(lines)


def render_latency(latency: LatencyReport) -> str:
    threads = "default threads" if latency.threads is None else f"{latency.threads} thread(s)"
    where = f"{latency.provider.replace('ExecutionProvider', '')}, batch {latency.batch}, {threads}"
    table = "cached" if latency.table_cached else f"measured in {latency.table_seconds:.1f}s"
    return (f"latency        {latency.original_ms:.2f} ms → {latency.pruned_ms:.2f} ms, speed-up "
            f"{latency.measured_speedup:.2f}× measured (target {latency.target_speedup:.2f}×, table predicted "
            f"{latency.predicted_speedup:.2f}×; {where}; width step {latency.step}; table {table}; "
            f"{len(latency.trials)} structure(s) timed; allocated by {latency.allocation_cost}, {_why(latency)})")


def _why(latency: LatencyReport) -> str:
    if not latency.compared:
        return "the smaller error bound on target"
    values = {value for _, value, _, _ in latency.compared}
    if len(values) > 1:
        fidelity = ", ".join(f"{cost} {value:.1%}" for cost, value, _, _ in latency.compared)
        return f"the better held-out fidelity on target: {fidelity}"
    tied = f"equal held-out fidelity on target ({values.pop():.1%})"
    detected = {f1 for _, _, f1, _ in latency.compared}
    if None not in detected and len(detected) > 1:
        figures = ", ".join(f"{cost} {f1:.1%}" for cost, _, f1, _ in latency.compared)
        return f"{tied}, the better F1 of the original's detections: {figures}"
    errors = ", ".join(f"{cost} {error:.4g}" for cost, _, _, error in latency.compared)
    return f"{tied}, the smaller mean output error: {errors}"


def render_verification(check: Verification) -> str:
    """The held-out comparison, shared by compress and evaluate."""
    lines = [f"points {check.points}: relative output error max {check.max_relative_error:.4g}, "
             f"mean {check.mean_relative_error:.4g}, "
             + ", ".join(f"{name} {value:.4g}" for name, value in check.percentiles.items())]
    for epsilon, fraction in check.outside.items():
        lines.append(f"  ε={epsilon}: δ={fraction:.1%} of points outside (1±ε)")
    if check.worst_channels:
        lines.append("  worst channels (RMS error / the channel's spread): " + ", ".join(
            f"{item.output}[{item.channel}] {item.error:.3g}" for item in check.worst_channels[:3]))
    if check.top1_agreement is not None:
        low, high = wilson_interval(check.top1_agreement, check.points)
        lines.append(f"  top-1 agreement with the original: {check.top1_agreement:.1%} "
                     f"(95% interval {low:.1%}–{high:.1%})")
    if check.accuracy_original is not None:
        lines.append(f"  accuracy: original {check.accuracy_original:.1%} → pruned {check.accuracy_pruned:.1%}")
    for name, matches in check.detections.items():
        low, high = check.detections_interval.get(name, (matches.f1, matches.f1))
        lines.append(f"  detections on '{name}' (read as YOLOv8's): F1 {matches.f1:.1%} (95% interval {low:.1%}–"
                     f"{high:.1%}); {matches.matched} of the original's {matches.matched + matches.missed} found, "
                     f"{matches.extra} extra")
    return "\n".join(lines)


LARGEST_FROZEN_SHOWN = 5


def analysis_dict(analysis: ChannelAnalysis, floors: dict[str, float | None]) -> dict:
    """What `analyze --json` prints: every group (with the layer weights it holds) and layer, and the
    weights by what pruning can do to their layers."""
    return {"groups": [{**asdict(group), "weights": analysis.group_weights(group.id)} for group in analysis.groups],
            "layers": [asdict(layer) for layer in analysis.layers],
            "weights_total": analysis.weights_total,
            "weights_losing_outputs": analysis.weights_losing_outputs,
            "weights_losing_inputs_only": analysis.weights_losing_inputs_only,
            "weights_untouched": analysis.weights_untouched,
            "weights_in_prunable_groups": analysis.weights_in_prunable_groups,
            "largest_frozen_groups": [group.id for group in analysis.largest_frozen_groups()],
            "smallest_budget": floors}


def render_analysis(analysis: ChannelAnalysis, floors: dict[str, float | None]) -> str:
    """What `analyze` prints: first where the layer weights stand (a layer that can only lose input
    channels shrinks far less than one that loses filters) and the frozen groups that hold the most, then
    every group."""
    total = analysis.weights_total
    lines = [f"{total:,} Conv/Gemm/MatMul weights, in layers that"]
    for weights, what in ((analysis.weights_losing_outputs, "can lose output channels"),
                          (analysis.weights_losing_inputs_only, "can lose only input channels"),
                          (analysis.weights_untouched, "cannot be pruned")):
        lines.append(f"  {what:<30} {weights:>12,}  {_ratio(weights, total)}")
    largest = analysis.largest_frozen_groups()
    if largest:
        lines.append("largest frozen groups:")
    for group in largest[:LARGEST_FROZEN_SHOWN]:
        more = f" (+{len(group.frozen) - 1} more)" if len(group.frozen) > 1 else ""
        lines.append(f"  group {group.id} ({group.width} channels, {analysis.group_weights(group.id):,} weights): "
                     f"{group.frozen[0]}{more}")
    if len(largest) > LARGEST_FROZEN_SHOWN:
        lines.append(f"  … {len(largest) - LARGEST_FROZEN_SHOWN} more below")
    if floors["weights"] is not None:
        macs = ("give --data to count MACs" if floors["macs"] is None
                else f"--budget-of macs: {floors['macs']:g}")
        lines.append(f"budget floor: {floors['weights']:g} ({macs}), the lowest --budget accepted: every prunable "
                     "group down to one channel (--round-to 1). A limit, not a recommendation: find a budget that "
                     "keeps accuracy with `pfp-onnx sweep` or compress --min-fidelity")
    lines += ["", f"{'group':>5}  {'width':>5}  {'producers':<30} {'consumers':<30} status"]
    for group in analysis.groups:
        status = "prunable" if group.prunable else "frozen: " + "; ".join(group.frozen)
        lines.append(f"{group.id:>5}  {group.width:>5}  {_names(group.producers, 30, limit=3):<30} "
                     f"{_names(group.consumers, 30, limit=3):<30} {status}")
    return "\n".join(lines)
