"""Recoveries side by side on one real model, from one preparation: every budget pruned with each recovery.

prepare() with recovery="sequential" collects what every recovery needs (sequential starts from one-pass
least squares), and nothing it captures depends on the recovery, so the rows differ only in how the kept
weights are re-fitted. The judging, timing and inputs are benchmarks/fidelity.py's (its Bench).

    python benchmarks/compare_recoveries.py doclaynet-yolov8n --budgets 0.8,0.6,0.5 --mac-budgets 0.5774,0.3343
    python benchmarks/compare_recoveries.py ppocr-textline-cls --recoveries none,lstsq,sequential
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pfp_onnx
from fidelity import Bench, format_row
from pypi_models import DEFAULT_CACHE
from real_models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--budgets", default="0.8,0.6,0.5", help="weight budgets")
    parser.add_argument("--mac-budgets", default="", help="MAC budgets (e.g. those fidelity.csv found for 1.3x/1.5x)")
    parser.add_argument("--recoveries", default="lstsq,sequential")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--holdout", type=float, default=0.0, help="calibration share held out (fidelity.py's)")
    arguments = parser.parse_args()
    arguments.quick = False
    bench = Bench(MODELS[arguments.model], arguments)
    print(bench.describe(), flush=True)
    started = time.perf_counter()
    prepared = bench.prepare(pfp_onnx.Method(recovery="sequential"), [])
    print(f"prepare {time.perf_counter() - started:.0f} s", flush=True)
    plan = [(prepared, float(budget)) for budget in arguments.budgets.split(",") if budget]
    by_macs = dataclasses.replace(prepared, budget_of="macs")  # the capture is the same for either count
    plan += [(by_macs, float(budget)) for budget in arguments.mac_budgets.split(",") if budget]
    for source, budget in plan:
        for recovery in arguments.recoveries.split(","):
            print(format_row(bench.measure(source, pfp_onnx.Method(recovery=recovery), budget)), flush=True)


if __name__ == "__main__":
    main()
