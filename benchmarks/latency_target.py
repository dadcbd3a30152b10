"""Does --target-speedup land where it is asked to? Measured side by side in one run.

For each model, batch size and target speed-up, compress(target_speedup=S) with --recovery none (recovery
changes weights, not shapes, so it does not change latency); then the pruned model is timed again,
independently, against the original with benchmarks/latency.interleaved (median of alternating runs), and
the row prints the target, the latency table's prediction, the closed loop's own measurement and the
independent one, whether that is within ±10% of the target, and what the chosen allocation counted (the
table's latency or the MACs: the smaller error bound on target). The first row of a model and batch also
prints how long the latency table took to measure (the next rows read it from the cache).

Models (benchmarks/bench_compress.py builds them with random weights: speed does not depend on the
values): resnet18-imagenet (224), yolov8n-style (SiLU, C2f, SPPF, detect head; 320), pp-lcnet-style
(HardSwish, depthwise + pointwise, SE; 224); --table-only resnet50-imagenet times only the table.

    python benchmarks/latency_target.py                      # all three, batches 1 and 32, 1.3/1.5/2x
    python benchmarks/latency_target.py --models yolov8n-style --batches 1 --targets 1.5
    python benchmarks/latency_target.py --table-only resnet50-imagenet
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import pfp_onnx
from bench_compress import MODELS
from latency import cpu_session, interleaved
from pfp_onnx.latency import measure_table
from pfp_onnx.pipeline import _layer_sizes
from pfp_onnx.runtime import choose_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18-imagenet,yolov8n-style,pp-lcnet-style")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--targets", default="1.3,1.5,2")
    parser.add_argument("--points", type=int, default=32, help="calibration points (sensitivities only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="of interleaved runs per independent timing")
    parser.add_argument("--table-only", metavar="MODEL", help="time only the latency table of MODEL at batch 1")
    arguments = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="pfp-onnx-latency-")
    if arguments.table_only:
        table_seconds(arguments.table_only, arguments.points, arguments.threads, cache)
        return
    print(f"{'model':<18} {'batch':>5} {'target':>6} {'predicted':>9} {'loop':>6} {'again':>6} {'±10%':>5} "
          f"{'structures':>10} {'table s':>7} {'compress s':>10} {'by':>8}")
    for name in arguments.models.split(","):
        model, data = MODELS[name](arguments.points, 0)
        for batch in (int(text) for text in arguments.batches.split(",")):
            feed = {key: np.resize(values, (batch, *values.shape[1:])) for key, values in data.items()
                    if key != "labels"}
            original = cpu_session(model, arguments.threads)
            for target in (float(text) for text in arguments.targets.split(",")):
                started = time.perf_counter()
                try:
                    result = pfp_onnx.compress(model, data, target_speedup=target, recovery="none", holdout=0.0,
                                               latency_batch=batch, latency_threads=arguments.threads,
                                               latency_cache=cache)
                except pfp_onnx.PfpError as error:
                    print(f"{name:<18} {batch:>5} {target:>6g}  {' '.join(str(error).split())[:150]}", flush=True)
                    continue
                seconds = time.perf_counter() - started
                latency = result.report.latency
                again = interleaved(original, cpu_session(result.model, arguments.threads), feed,
                                    arguments.seconds).speedup
                table = "cached" if latency.table_cached else f"{latency.table_seconds:.1f}"
                print(f"{name:<18} {batch:>5} {target:>6g} {latency.predicted_speedup:>9.2f} "
                      f"{latency.measured_speedup:>6.2f} {again:>6.2f} {'yes' if abs(again / target - 1) <= 0.1 else 'no':>5} "
                      f"{len(latency.trials):>10} {table:>7} {seconds:>10.1f} {latency.allocation_cost:>8}", flush=True)


def table_seconds(name: str, points: int, threads: int, cache: str) -> None:
    model, data = MODELS[name](points, 0)
    analysis = pfp_onnx.analyze(model, {key: values[:1] for key, values in data.items() if key != "labels"})
    sizes = _layer_sizes(analysis, "latency")
    feed = {key: values[:1] for key, values in data.items() if key != "labels"}
    started = time.perf_counter()
    table = measure_table(model, analysis, sizes, choose_device("cpu"), feed=feed, batch=1, threads=threads,
                          cache=cache)
    print(f"{name}: latency table of {len(table.curves)} layers at batch 1, {threads} threads: "
          f"{time.perf_counter() - started:.1f} s (model {table.model_ms:.2f} ms, width step {table.step})")


if __name__ == "__main__":
    main()
