"""Peak memory of `pfp-onnx compress` with a small and a large calibration set, side by side.

Capture streams batches and folds them into running maxima (and, for recovery, running moments), so
the peak resident set should barely depend on how many calibration points there are. This script checks
that: it writes two calibration sets made from the MNIST fixture's points (repeated, with a little noise
so no two points are identical), runs the CLI on each in a fresh child process, and prints the peak RSS of
each run and their ratio.

Peak RSS is resource.getrusage(RUSAGE_CHILDREN).ru_maxrss read inside a small fresh Python process whose
only child is the `pfp-onnx compress` run, so every number belongs to exactly one run. The CLI loads an
.npz array of up to 64 MiB whole (pfp_onnx.npz.LAZY_BYTES; the input array, points × 3 KiB for 28×28 float32,
is then part of the peak) and reads larger ones a few rows at a time: from about 21,400 points on, the
input array no longer adds to the peak.

    python benchmarks/bench_memory.py                       # 256 vs 2048 points, --recovery none and lstsq
    python benchmarks/bench_memory.py --small 512 --large 8192 --recoveries none
    python benchmarks/bench_memory.py --small 2048 --large 32768 --recoveries none   # a 100 MB array
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODEL = ROOT / "fixtures" / "mnist_resnet.onnx"
FIXTURE_DATA = ROOT / "fixtures" / "mnist_calib.npz"

# Runs its arguments as one child and prints that child's peak RSS in KiB (ru_maxrss is KiB on Linux).
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def calibration_points(count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` points: the fixture's points repeated, each copy after the first slightly perturbed."""
    fixture = np.load(FIXTURE_DATA)
    images, labels = fixture["input"], fixture["labels"]
    rng = np.random.default_rng(seed)
    repeats = -(-count // len(images))
    tiled_images = np.concatenate([images] * repeats)[:count].copy()
    tiled_labels = np.concatenate([labels] * repeats)[:count]
    copies = np.arange(count) >= len(images)
    tiled_images[copies] += rng.normal(0, 0.05, size=tiled_images[copies].shape).astype(np.float32)
    return {"input": tiled_images.astype(np.float32), "labels": tiled_labels.astype(np.int64)}


def cli_command() -> list[str]:
    beside_python = Path(sys.executable).with_name("pfp-onnx")
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("pfp-onnx")
    if found:
        return [found]
    return [sys.executable, "-c", "from pfp_onnx_cli.main import main; main()"]


def peak_rss_of_run(arguments: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command run in a fresh child process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *arguments], capture_output=True, text=True,
                            check=True)
    seconds = time.perf_counter() - started
    status, peak_kib = result.stdout.split()
    if int(status) != 0:
        raise SystemExit(f"`{' '.join(arguments)}` failed with status {status}; run it by hand to see why.")
    return int(peak_kib) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--small", type=int, default=256, help="calibration points of the small set")
    parser.add_argument("--large", type=int, default=2048, help="calibration points of the large set")
    parser.add_argument("--recoveries", default="none,lstsq", help="comma-separated --recovery values to run")
    parser.add_argument("--batch-size", type=int, default=32, help="--batch-size of every run")
    parser.add_argument("--budget", type=float, default=0.5, help="--budget of every run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbation noise")
    args = parser.parse_args()

    print(f"bench_memory: pfp-onnx compress {FIXTURE_MODEL.name}, --budget {args.budget} "
          f"--batch-size {args.batch_size} --device cpu, peak RSS of a fresh child per run")
    with tempfile.TemporaryDirectory() as folder:
        data_paths = {}
        for count in (args.small, args.large):
            data_paths[count] = os.path.join(folder, f"calib_{count}.npz")
            np.savez(data_paths[count], **calibration_points(count, args.seed))
        for recovery in args.recoveries.split(","):
            peaks = {}
            for count in (args.small, args.large):
                command = [*cli_command(), "compress", str(FIXTURE_MODEL), "--data", data_paths[count],
                           "--budget", str(args.budget), "--batch-size", str(args.batch_size), "--device", "cpu",
                           "--recovery", recovery, "-q", "-o", os.path.join(folder, "pruned.onnx")]
                peaks[count], seconds = peak_rss_of_run(command)
                print(f"  --recovery {recovery:5s} {count:6d} points: peak RSS {peaks[count]:8.1f} MiB "
                      f"(run took {seconds:6.1f} s)", flush=True)
            print(f"  --recovery {recovery:5s} peak RSS {args.large} ÷ {args.small} points: "
                  f"{peaks[args.large] / peaks[args.small]:.3f}  "
                  f"(+{peaks[args.large] - peaks[args.small]:.1f} MiB; input array +"
                  f"{(args.large - args.small) * 28 * 28 * 4 / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
