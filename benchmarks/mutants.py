"""Targeted mutation check of the core modules: does each module's own test file notice a plausible bug?

Not a test and not run in CI. Each mutant is one textual change to one module of pfp_onnx (a comparison
flipped, a term dropped, the wrong operand): the script copies the repository to a temporary folder, puts
one mutant at a time into the copy, runs that module's own test file(s) there with `pytest -x`, and
prints KILLED (a test failed) or SURVIVED. The working tree is only read. A mutant whose original text is
no longer in the module is reported STALE: update its snippet after a refactor.

Mutants marked `equivalent` cannot change any result the module's contract defines; they are listed
with the reason instead of being run (use --all to run them too).

    python benchmarks/mutants.py                  # every mutant, about 10 minutes on 2 cores
    python benchmarks/mutants.py --only allocate,verify
    python benchmarks/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
# Each module's own tests: op_rules is exercised by the channel analysis and by the rewrite's oracle.
TEST_FILES = {
    "allocate": ("tests/test_allocate.py",),
    "select": ("tests/test_select.py",),
    "rewrite": ("tests/test_rewrite.py",),
    "op_rules": ("tests/test_groups.py", "tests/test_rewrite.py"),
    "verify": ("tests/test_verify.py",),
}
# Not copied: version control, environments, caches and recorded results.
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                 ".hypothesis", "results")
# A mutant that makes a loop endless is killed when its tests take this many times the unmutated run.
TIMEOUT_FACTOR = 10
MIN_TIMEOUT_S = 60


@dataclass(frozen=True)
class Mutant:
    module: str
    description: str
    original: str  # must occur exactly once in pfp_onnx/<module>.py
    replacement: str
    equivalent: str = ""  # why no test can tell it apart, when that is so


MUTANTS = (
    # ---- allocate ------------------------------------------------------------------------------------
    Mutant("allocate", "top-up takes the lowest-priority step first (max → min)",
           "name = max(steps, key=", "name = min(steps, key="),
    Mutant("allocate", "kernel size K dropped from ln(8(P+1)K/δ)",
           "math.log(8.0 * (group.patches + 1) * group.kernel / delta)",
           "math.log(8.0 * (group.patches + 1) / delta)"),
    Mutant("allocate", "P instead of P + 1 in the log term",
           "(group.patches + 1) * group.kernel", "max(group.patches, 1) * group.kernel"),
    Mutant("allocate", "δ ignored (the default 1e-16 always)",
           "group.kernel / delta)", "group.kernel / 1e-16)"),
    Mutant("allocate", "m(ε) with (6 + ε) instead of (6 + 2ε)",
           "3.0 * (6.0 / epsilon + 2.0) / epsilon", "3.0 * (6.0 / epsilon + 1.0) / epsilon"),
    Mutant("allocate", "expected distinct count with m − 1 draws",
           "-np.expm1(m * log_miss)", "-np.expm1((m - 1) * log_miss)"),
    Mutant("allocate", "n(ε) without the float-noise tolerance",
           "math.ceil(distinct - DISTINCT_TOLERANCE)", "math.ceil(distinct)"),
    Mutant("allocate", "MAC budget ignores a layer's positions",
           "in_units * layer.in_block * out_units * layer.positions", "in_units * layer.in_block * out_units"),
    Mutant("allocate", "rounding goes down instead of up",
           "return min(width, -(-count // step) * step)", "return min(width, max(step, count // step * step))"),
    Mutant("allocate", "auto rounding starts above 16 channels, not at 16",
           "AUTO_MULTIPLE if width >= AUTO_MIN_WIDTH", "AUTO_MULTIPLE if width > AUTO_MIN_WIDTH"),
    Mutant("allocate", "top-up takes at most one step per group",
           "                steps[name] = step\n", "                pass\n"),
    Mutant("allocate", "budget 1 rejected",
           "if not 0 < budget <= 1:", "if not 0 < budget < 1:"),
    Mutant("allocate", "uniform top-up steps the highest fraction first",
           "(-step / full[name], step)", "(step / full[name], step)"),
    Mutant("allocate", "log-scale midpoint as √(low·high)",
           "middle = math.sqrt(low) * math.sqrt(high)", "middle = math.sqrt(low * high)",
           equivalent="low·high stays within [1e-24, 1e300] on the bracket [1e-12, 1e150], so both forms give "
                      "the geometric mean up to the last bit, and the bisection runs to adjacent floats anyway"),
    Mutant("allocate", "smallest budget rounded to nearest, not up",
           "math.ceil(weights_floor / weights_total * 1000 - 1e-9) / 1000",
           "round(weights_floor / weights_total * 1000) / 1000"),
    # ---- select ----------------------------------------------------------------------------------------
    Mutant("select", "sampling keeps count + 1 channels",
           "if channels.size > count:", "if channels.size > count + 1:"),
    Mutant("select", "scale divided by C instead of m′",
           "scale = draws[kept] / (samples * probabilities[kept])",
           "scale = draws[kept] / (probabilities.size * probabilities[kept])"),
    Mutant("select", "scale uses the planned m, not the draws made",
           "return np.bincount(sequence, minlength=probabilities.size), len(sequence)",
           "return np.bincount(sequence, minlength=probabilities.size), samples"),
    Mutant("select", "hybrid rest scaled with p instead of the renormalised p′",
           "drawn_scale = draws[drawn] / (rest_samples * rest_probabilities[drawn])",
           "drawn_scale = draws[drawn] / (rest_samples * probabilities[rest[drawn]])"),
    Mutant("select", "top-k ties go to the higher index",
           "np.argsort(-sensitivity, kind=\"stable\")[:count]",
           "np.argsort(sensitivity, kind=\"stable\")[::-1][:count]"),
    Mutant("select", "count 0 keeps nothing",
           "count = max(1, min(int(count), channels))", "count = min(int(count), channels)"),
    Mutant("select", "sample count one above the smallest",
           "if expected_distinct(probabilities, middle) >= count:",
           "if expected_distinct(probabilities, middle) > count:"),
    Mutant("select", "bulk draw keeps one channel too many",
           "draws[extra[:max(0, len(extra) - count)]] = 0", "draws[extra[:max(0, len(extra) - count - 1)]] = 0"),
    Mutant("select", "sampling attempted when only `count` channels matter",
           "count >= np.count_nonzero(sensitivity)", "count > np.count_nonzero(sensitivity)"),
    Mutant("select", "hybrid's heavy set uses p > 1/m instead of ≥",
           "probabilities >= 1.0 / samples", "probabilities > 1.0 / samples"),
    # ---- rewrite ---------------------------------------------------------------------------------------
    Mutant("rewrite", "block offset added after the block multiply",
           "kept = np.asarray(kept, dtype=np.int64) + offset\n    if block == 1:\n        return kept\n"
           "    return (kept[:, None] * block",
           "kept = np.asarray(kept, dtype=np.int64)\n    if block == 1:\n        return kept + offset\n"
           "    return offset + (kept[:, None] * block"),
    Mutant("rewrite", "a block's scales tiled instead of repeated",
           "np.repeat(np.asarray(selection.scale, dtype=np.float64), weight_slice.block)",
           "np.tile(np.asarray(selection.scale, dtype=np.float64), weight_slice.block)"),
    Mutant("rewrite", "per-channel parameters scaled like consumers",
           "if weight_slice.role == \"consumer\":", "if weight_slice.role != \"producer\":"),
    Mutant("rewrite", "removed channels not cut",
           "        keep[group_positions] = False\n", "        pass\n"),
    Mutant("rewrite", "an untouched Slice skipped like an untouched Split",
           "if nodes[node_name].op == \"Split\" and all(", "if all("),
    Mutant("rewrite", "channel counts written without their block",
           "value = fix.block * sum(", "value = sum("),
    Mutant("rewrite", "a shared constant changed in place",
           "    if len(tensor.outputs) <= 1:\n        tensor.values = values",
           "    if True:\n        tensor.values = values"),
    Mutant("rewrite", "a group left out of the selections counted as empty",
           "return analysis.group(group_id).width if selection is None",
           "return 1 if selection is None"),
    Mutant("rewrite", "scaled weights left in float64",
           "return (cut * scale[keep].reshape(shape)).astype(values.dtype)",
           "return cut * scale[keep].reshape(shape)"),
    Mutant("rewrite", "no shortcut for cuts without scales",
           "    if np.all(scale == 1):\n        return cut\n", "",
           equivalent="the shortcut only skips multiplying by ones and casting back to the same dtype"),
    Mutant("rewrite", "Split sizes written as an attribute up to opset 17",
           "        if opset < 13:\n", "        if opset < 18:\n"),
    # ---- op_rules --------------------------------------------------------------------------------------
    Mutant("op_rules", "transpose perm inverted",
           "perm.index(incoming.axis)", "perm[incoming.axis]"),
    Mutant("op_rules", "reduce without keepdims shifts by the axes after the channels",
           "    else:\n        shift = sum(1 for a in axes if a < incoming.axis)",
           "    else:\n        shift = sum(1 for a in axes if a > incoming.axis)"),
    Mutant("op_rules", "squeeze shifts by the axes after the channels",
           "        return\n    shift = sum(1 for a in axes if a < incoming.axis)",
           "        return\n    shift = sum(1 for a in axes if a > incoming.axis)"),
    Mutant("op_rules", "unsqueeze keeps the channel axis number",
           "_moved(incoming, kept_positions[incoming.axis], rank)", "_moved(incoming, incoming.axis, rank)"),
    Mutant("op_rules", "concat drops an untracked input's channels from the offsets",
           "        if shape[axis]:\n", "        if False:\n"),
    Mutant("op_rules", "a flatten or reshape forgets an earlier block",
           "    per_channel *= incoming.block\n", ""),
    Mutant("op_rules", "ConvTranspose cut on the Conv axes",
           "weight_in_axis, weight_out_axis = (0, 1) if transposed else (1, 0)",
           "weight_in_axis, weight_out_axis = (1, 0)"),
    Mutant("op_rules", "dense weight [out, in] cut as [in, out]",
           "in_axis, out_axis = (0, 1) if in_by_out else (1, 0)", "in_axis, out_axis = (0, 1)"),
    Mutant("op_rules", "Slice end bound fixed by its own part only",
           "tracer.add_size_fix(node, 2, hit, before + part.groups)", "tracer.add_size_fix(node, 2, hit, part.groups)"),
    Mutant("op_rules", "Split parts all start at 0",
           "        start += size\n", "        start += 0\n"),
    Mutant("op_rules", "Pad at the channel axis's end allowed",
           "(pads[axes.index(incoming.axis)] or pads[len(axes) + axes.index(incoming.axis)])",
           "pads[axes.index(incoming.axis)]"),
    Mutant("op_rules", "legacy Softmax: channels before the axis freeze instead of after",
           "legacy and incoming.axis > axis", "legacy and incoming.axis < axis"),
    Mutant("op_rules", "Reshape 0 entry accepted after a flatten",
           "entry.value == 0 and axis == incoming.axis and block == incoming.block",
           "entry.value == 0 and axis == incoming.axis",
           equivalent="a 0 copies the input's size on the channel axis, width × its block, and the landing "
                      "already requires width × block there, so the two blocks are equal whenever it applies"),
    Mutant("op_rules", "dense rows per point not divided by the batch",
           "return rows // batch", "return rows"),
    Mutant("op_rules", "broadcast constant's channel position counted from the front",
           "return rank - (channels.rank - channels.axis)", "return channels.axis"),
    # ---- verify ----------------------------------------------------------------------------------------
    Mutant("verify", "worst over outputs → first output only",
           "worst_per_point = np.max(np.stack(list(per_output.values())), axis=0)",
           "worst_per_point = next(iter(per_output.values()))"),
    Mutant("verify", "error divided by the pruned model's norm",
           "norms = np.linalg.norm(want.reshape(", "norms = np.linalg.norm(got.reshape("),
    Mutant("verify", "within ε excludes points exactly at ε",
           "np.mean(worst_per_point <= epsilon)", "np.mean(worst_per_point < epsilon)"),
    Mutant("verify", "outside ε counts points exactly at ε",
           "np.mean(worst_per_point > value)", "np.mean(worst_per_point >= value)"),
    Mutant("verify", "percentiles without interpolation",
           "np.percentile(worst_per_point, q)", "np.percentile(worst_per_point, q, method=\"lower\")"),
    Mutant("verify", "max abs error signed",
           "np.abs(difference).max(initial=0.0)", "difference.max(initial=0.0)"),
    Mutant("verify", "agreement read from the last output",
           "if classes[names[0]]:\n            top1.append(classes[names[0]][-1])",
           "if classes[names[-1]]:\n            top1.append(classes[names[-1]][-1])"),
    Mutant("verify", "original accuracy from the pruned model's classes",
           "accuracy_original=float(np.mean(want_top1 == labels))", "accuracy_original=float(np.mean(got_top1 == labels))"),
    Mutant("verify", "mean error is the median",
           "mean_relative_error=float(worst_per_point.mean())", "mean_relative_error=float(np.median(worst_per_point))"),
    Mutant("verify", "per-output mean is the median",
           "float(values.max()), float(values.mean()))", "float(values.max()), float(np.median(values)))"),
    Mutant("verify", "zero norms guarded by adding TINY instead of a floor",
           "np.maximum(norms, TINY)", "(norms + TINY)",
           equivalent="a point's error changes by a factor 1 − 1e-12/‖y‖ at most: under 1e-8 for any output "
                      "of norm above 1e-4, far below what a report prints, and both give ‖y' − y‖/1e-12 for an "
                      "all-zero output"),
    Mutant("verify", "kept reference holds only the last batch",
           "            self._kept.append(outputs)", "            self._kept = [outputs]"),
)


def source_of(root: Path, module: str) -> Path:
    return root / "pfp_onnx" / f"{module}.py"


def run_tests(copy: Path, files: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """Run the test files in the copy; (passed, the first failing test or the reason)."""
    environment = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-x", "-p", "no:cacheprovider"],
                              cwd=copy, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    return False, failed[0] if failed else (done.stdout + done.stderr).strip().splitlines()[-1]


def check_copy_is_imported(copy: Path) -> None:
    """The copy's pfp_onnx must shadow the editable install, or every mutant would survive."""
    found = subprocess.run([sys.executable, "-c", "import pfp_onnx; print(pfp_onnx.__file__)"], cwd=copy,
                           env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True, check=True)
    if not Path(found.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"pfp_onnx is imported from {found.stdout.strip()}, not from the copy {copy}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated modules (default: all of " + ", ".join(TEST_FILES) + ")")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--all", action="store_true", help="run the mutants marked equivalent too")
    args = parser.parse_args()
    modules = args.only.split(",") if args.only else list(TEST_FILES)
    unknown = set(modules) - set(TEST_FILES)
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}; choose from {', '.join(TEST_FILES)}")
    chosen = [mutant for mutant in MUTANTS if mutant.module in modules]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.module:<9} {mutant.description}" + (" (equivalent)" if mutant.equivalent else ""))
        return 0

    counts = {"KILLED": 0, "SURVIVED": 0, "STALE": 0, "EQUIVALENT": 0}
    with tempfile.TemporaryDirectory(prefix="pfp-mutants-") as folder:
        copy = Path(folder) / "repository"
        shutil.copytree(REPOSITORY, copy, ignore=IGNORED)
        check_copy_is_imported(copy)
        timeouts = {}
        for module in modules:
            start = time.monotonic()
            passed, reason = run_tests(copy, TEST_FILES[module], timeout=3600)
            if not passed:
                raise SystemExit(f"the unmutated tests of {module} fail ({reason}); fix them first")
            timeouts[module] = max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * (time.monotonic() - start))
        for mutant in chosen:
            path = source_of(copy, mutant.module)
            original = path.read_text()
            if original.count(mutant.original) != 1:
                verdict, detail = "STALE", f"snippet found {original.count(mutant.original)} times"
            elif mutant.equivalent and not args.all:
                verdict, detail = "EQUIVALENT", mutant.equivalent
            else:
                path.write_text(original.replace(mutant.original, mutant.replacement))
                start = time.monotonic()
                try:
                    passed, failure = run_tests(copy, TEST_FILES[mutant.module], timeouts[mutant.module])
                finally:
                    path.write_text(original)
                verdict = "SURVIVED" if passed else "KILLED"
                detail = f"{time.monotonic() - start:.0f} s" + (f", by {failure}" if failure else "")
            counts[verdict] += 1
            print(f"{verdict:<10} {mutant.module:<9} {mutant.description} ({detail})", flush=True)
    print(", ".join(f"{count} {verdict.lower()}" for verdict, count in counts.items()))
    return 1 if counts["SURVIVED"] or counts["STALE"] else 0


if __name__ == "__main__":
    sys.exit(main())
