"""Compress at many budgets with many methods from one capture: the accuracy-vs-size picture of the paper.

Importing this module is light (the pipeline loads when a sweep runs), so that the package can bind `sweep`
at import without loading onnx.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from pfp_onnx.errors import OptionError
from pfp_onnx.options import DEFAULT_RECOVERY, RECOVERIES, ROUND_TO_AUTO

if TYPE_CHECKING:
    from pfp_onnx.pipeline import DataSource, Method, ModelSource, Progress

ORIGINAL = "original"  # the method column of the unpruned model's row


@dataclass(frozen=True)
class SweepRow:
    method: str
    budget: float
    weights_kept: float  # fraction of the prunable-layer weights
    parameters_kept: float
    macs_kept: float | None  # None where the analysis leaves some layer's output size open
    accuracy: float | None
    top1_agreement: float | None
    mean_relative_error: float | None
    max_relative_error: float | None
    speedup_predicted: float | None = None  # --budget-of latency: the latency table's prediction
    speedup_measured: float | None = None  # and the speed-up measured against the original, side by side
    layers: tuple = field(default=(), repr=False)  # the report's LayerRows (the allocation plot; not in the CSV)


def parse_methods(text: str) -> list[Method]:
    """'pfp/pfp/none,l1/uniform/none,pfp/pfp/randomized/bias' → Methods: criterion/allocation, then
    optionally a sampling mode and/or a recovery, in either order (defaults: deterministic, sequential)."""
    from pfp_onnx.pipeline import Method

    methods = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split("/")
        if len(parts) < 2:
            raise OptionError(f"Method '{item}' must read criterion/allocation[/mode][/recovery], "
                              "e.g. pfp/pfp or l1/uniform or pfp/pfp/lstsq.")
        extras = {"mode": "deterministic", "recovery": DEFAULT_RECOVERY}
        for extra in parts[2:]:
            extras["recovery" if extra in RECOVERIES else "mode"] = extra
        methods.append(Method(parts[0], parts[1], **extras).check())
    if not methods:
        raise OptionError("Give at least one method, e.g. --methods pfp/pfp/none,l1/uniform/none.")
    return methods


def sweep(model: ModelSource, data: DataSource, *, budgets: Sequence[float], methods: Sequence[Method],
          holdout: float = 0.2, batch_size: int = 32, seed: int = 0, device: str = "auto",
          round_to: int | str = ROUND_TO_AUTO, budget_of: str = "weights", progress: Progress | None = None,
          on_row: Callable[[SweepRow], None] | None = None, latency_batch: int = 1,
          latency_threads: int | None = None, latency_cache: str | os.PathLike | None = None) -> list[SweepRow]:
    """One capture, then one pruned model per (method, budget), each verified on the same held-out points;
    the first row is the original model's (method "original", budget 1), measured on those points too."""
    from pfp_onnx.pipeline import prepare, prune

    if holdout <= 0:
        raise OptionError("A sweep compares methods on held-out points: use --holdout > 0.")
    prepared = prepare(model, data, budgets=budgets, methods=methods, holdout=holdout, batch_size=batch_size,
                       seed=seed, device=device, round_to=round_to, budget_of=budget_of, progress=progress,
                       latency_batch=latency_batch, latency_threads=latency_threads, latency_cache=latency_cache)
    rows = []
    for method in methods:
        for budget in budgets:
            report = prune(prepared, budget=budget, method=method, seed=seed).report
            totals, check = report.totals, report.verification
            row = SweepRow(method=method.label, budget=budget,
                           weights_kept=totals.layer_weights_after / totals.layer_weights_before,
                           parameters_kept=totals.parameters_after / totals.parameters_before,
                           macs_kept=_share(totals.macs_after, totals.macs_before),
                           accuracy=check.accuracy_pruned, top1_agreement=check.top1_agreement,
                           mean_relative_error=check.mean_relative_error,
                           max_relative_error=check.max_relative_error,
                           speedup_predicted=None if report.latency is None else report.latency.predicted_speedup,
                           speedup_measured=None if report.latency is None else report.latency.measured_speedup,
                           layers=report.layers)
            for found in ([_original_row(check)] if not rows else []) + [row]:
                rows.append(found)
                if on_row is not None:
                    on_row(found)
    return rows


def _original_row(check) -> SweepRow:
    """The unpruned model on the same held-out points: what every other row gives up accuracy from."""
    return SweepRow(method=ORIGINAL, budget=1.0, weights_kept=1.0, parameters_kept=1.0, macs_kept=1.0,
                    accuracy=check.accuracy_original,
                    top1_agreement=None if check.top1_agreement is None else 1.0,
                    mean_relative_error=0.0, max_relative_error=0.0)


def _share(after: int | None, before: int | None) -> float | None:
    if after is None or before is None:
        return None
    return after / before if before else 1.0


TABLE_HEADER = f"{'method':<24} {'budget':>6} {'weights':>8} {'MACs':>7} {'accuracy':>9} {'agreement':>10}"
LATENCY_HEADER = f"{TABLE_HEADER} {'speed-up':>8}"  # --budget-of latency: the measured speed-up too


def table_line(row: SweepRow) -> str:
    """One row of the table `pfp-onnx sweep` prints as it goes (under TABLE_HEADER, or LATENCY_HEADER)."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    return (f"{row.method:<24} {row.budget:>6g} {percent(row.weights_kept):>8} {percent(row.macs_kept):>7} "
            f"{'' if row.accuracy is None else percent(row.accuracy):>9} "
            f"{'' if row.top1_agreement is None else percent(row.top1_agreement):>10} "
            f"{'' if row.speedup_measured is None else f'{row.speedup_measured:.2f}x':>8}").rstrip()


def write_csv(rows: Sequence[SweepRow], path: str | os.PathLike) -> None:
    """Plain \\n line endings (the csv module's default is \\r\\n); an unknown value is an empty cell."""
    with open(path, "w", newline="") as handle:
        columns = [name for name in SweepRow.__dataclass_fields__ if name != "layers"]
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: value for name, value in asdict(row).items() if name != "layers"})


def plot(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "", budget_of: str = "weights") -> None:
    """Accuracy (or top-1 agreement without labels) against what the budget counts (weights, MACs, or the
    latency measured) kept, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("Plotting needs matplotlib: pip install 'pfp-onnx[plot]', or leave out --plot.") from None
    metric = "accuracy" if all(row.accuracy is not None for row in rows) else "top1_agreement"
    kept, label = {"macs": (lambda row: row.macs_kept, "prunable-layer MACs per point kept (%)"),
                   "latency": (lambda row: 1 / (row.speedup_measured or 1.0), "latency kept, measured (%)")}.get(
        budget_of, (lambda row: row.weights_kept, "prunable-layer weights kept (%)"))
    figure, axes = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row.method for row in rows):
        mine = sorted((row for row in rows if row.method == method), key=kept)
        axes.plot([100 * kept(row) for row in mine], [100 * getattr(row, metric) for row in mine],
                  marker="o", label=method)
    axes.set_xlabel(label)
    axes.set_ylabel(f"held-out {metric.replace('_', ' ')} (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
