"""Compress at many budgets with many methods from one capture: the accuracy-vs-size picture of the paper."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from pfp_onnx.allocate import ROUND_TO_AUTO
from pfp_onnx.errors import OptionError
from pfp_onnx.pipeline import DataSource, Method, ModelSource, Progress, prepare, prune
from pfp_onnx.refit import RECOVERIES


@dataclass(frozen=True)
class SweepRow:
    method: str
    budget: float
    weights_kept: float  # fraction of the prunable-layer weights
    parameters_kept: float
    macs_kept: float
    accuracy: float | None
    top1_agreement: float | None
    mean_relative_error: float | None
    max_relative_error: float | None


def parse_methods(text: str) -> list[Method]:
    """'pfp/pfp/none,l1/uniform/none,pfp/pfp/randomized/bias' → Methods: criterion/allocation, then
    optionally a sampling mode and/or a recovery, in either order (defaults: deterministic, lstsq)."""
    methods = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split("/")
        if len(parts) < 2:
            raise OptionError(f"Method '{item}' must read criterion/allocation[/mode][/recovery], "
                              "e.g. pfp/pfp or l1/uniform or pfp/pfp/lstsq.")
        extras = {"mode": "deterministic", "recovery": "lstsq"}
        for extra in parts[2:]:
            extras["recovery" if extra in RECOVERIES else "mode"] = extra
        methods.append(Method(parts[0], parts[1], **extras).check())
    if not methods:
        raise OptionError("Give at least one method, e.g. --methods pfp/pfp/none,l1/uniform/none.")
    return methods


def sweep(model: ModelSource, data: DataSource, *, budgets: Sequence[float], methods: Sequence[Method],
          holdout: float = 0.2, batch_size: int = 32, seed: int = 0, device: str = "auto",
          round_to: int | str = ROUND_TO_AUTO, budget_of: str = "weights", progress: Progress | None = None,
          on_row: Callable[[SweepRow], None] | None = None) -> list[SweepRow]:
    """One capture, then one pruned model per (method, budget), each verified on the same held-out points."""
    if holdout <= 0:
        raise OptionError("A sweep compares methods on held-out points: use --holdout > 0.")
    prepared = prepare(model, data, budgets=budgets, methods=methods, holdout=holdout, batch_size=batch_size,
                       seed=seed, device=device, round_to=round_to, budget_of=budget_of, progress=progress)
    rows = []
    for method in methods:
        for budget in budgets:
            report = prune(prepared, budget=budget, method=method, seed=seed).report
            totals, check = report.totals, report.verification
            row = SweepRow(method=method.label, budget=budget,
                           weights_kept=totals.layer_weights_after / totals.layer_weights_before,
                           parameters_kept=totals.parameters_after / totals.parameters_before,
                           macs_kept=totals.macs_after / totals.macs_before if totals.macs_before else 1.0,
                           accuracy=check.accuracy_pruned, top1_agreement=check.top1_agreement,
                           mean_relative_error=check.mean_relative_error,
                           max_relative_error=check.max_relative_error)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def write_csv(rows: Sequence[SweepRow], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SweepRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def plot(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "", budget_of: str = "weights") -> None:
    """Accuracy (or top-1 agreement without labels) against what the budget counts (weights or MACs) kept,
    one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("Plotting needs matplotlib: pip install 'pfp-onnx[plot]', or leave out --plot.") from None
    metric = "accuracy" if all(row.accuracy is not None for row in rows) else "top1_agreement"
    kept, label = ("macs_kept", "MACs per point") if budget_of == "macs" else ("weights_kept", "weights")
    figure, axes = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row.method for row in rows):
        mine = sorted((row for row in rows if row.method == method), key=lambda row: getattr(row, kept))
        axes.plot([100 * getattr(row, kept) for row in mine], [100 * getattr(row, metric) for row in mine],
                  marker="o", label=method)
    axes.set_xlabel(f"prunable-layer {label} kept (%)")
    axes.set_ylabel(f"held-out {metric.replace('_', ' ')} (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
