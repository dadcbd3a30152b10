"""Click commands only: parse options, call the pfp_onnx API, print. No pruning logic lives here.

Only click and pfp-onnx's light modules load at start; each command imports the API it calls, so that help,
--version and a refused argument answer at once instead of after onnx, onnxruntime and numba have loaded.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from dataclasses import asdict

import click

from pfp_onnx.crash_report import versions, write_crash_report
from pfp_onnx.errors import OptionError, PfpError
from pfp_onnx.options import (ALLOCATIONS, BUDGET_OF, CHANNEL_ORDERS, CRITERIA, DEFAULT_RECOVERY, DEVICES,
                              IMAGE_PRESETS, LAYOUTS, METRICS, MODES, RECOVERIES, RESIZES)
from pfp_onnx.version import __version__


# Exit statuses: 2 a user error (the message says what to do), 3 the pruned model missed --min-fidelity
# (nothing written), 70 a bug in pfp-onnx (EX_SOFTWARE of sysexits.h; a crash report is written), 130
# interrupted by the user.
USER_ERROR_STATUS, GATE_STATUS, BUG_STATUS, INTERRUPTED_STATUS = 2, 3, 70, 130


def _handled_errors(command):
    """Every failure ends in one paragraph on stderr, never a traceback: a user error says what to do
    (status 2); anything else is a bug in pfp-onnx, reported with the path of a crash report to attach."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _note_printer(kwargs.get("quiet", False), warnings.showwarning)
                return command(*args, **kwargs)
        except PfpError as error:
            click.echo(f"Error: {' '.join(str(error).split())}", err=True)
            sys.exit(USER_ERROR_STATUS)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(INTERRUPTED_STATUS)
        except Exception as error:  # a bug: say so plainly, keep the details for the report
            params = click.get_current_context().params
            report = write_crash_report(error, sys.argv, params.get("model") or params.get("original"))
            click.echo(f"Error: pfp-onnx failed unexpectedly ({type(error).__name__}: "
                       f"{' '.join(str(error).split())[:300]}). This is a bug in pfp-onnx, not in your model or "
                       f"data; nothing was written. Please report it with the crash report {report} (the "
                       f"traceback, the command line and the model's operators and shapes, no weights). "
                       f"{versions()}.", err=True)
            sys.exit(BUG_STATUS)

    return wrapper


def _note_printer(quiet: bool, show_warning):
    """The library says what it assumed about the data as a DataNote warning: print it as a note line (none
    when quiet); any other warning as Python would."""

    def show(message, category, filename, lineno, file=None, line=None):
        data = sys.modules.get("pfp_onnx.data")  # loaded whenever a DataNote can have been raised
        if data is None or not issubclass(category, data.DataNote):
            show_warning(message, category, filename, lineno, file, line)
        elif not quiet:
            click.echo(f"note: {message}", err=True)

    return show


def _progress_printer(quiet: bool):
    """Progress of the capture, refit and verify passes on stderr, nothing when quiet: a bar on a terminal,
    plain lines in a log."""
    if quiet:
        return None
    return _progress_bar() if sys.stderr.isatty() else _progress_log()


def _progress_bar():
    """A bar redrawn in place, with the time the stage has taken and, once a batch is done, an estimate of
    the time left."""
    started: dict[str, float] = {}
    shown = [0]  # length of the line on screen, so that a shorter one blanks what is left of it

    def show(stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if done == 0 or stage not in started:  # a stage reports 0 points when it starts (a sweep, once per row)
            started[stage] = now
        elapsed = now - started[stage]
        if total:
            filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
            line = (f"{stage} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {_unit(stage)}  "
                    f"{_clock(elapsed)}")
            if 0 < done < total:
                line += f", about {_clock(elapsed * (total - done) / done)} left"
        else:
            line = f"{stage}: {done} {_unit(stage)}  {_clock(elapsed)}"
        click.echo(f"\r{line.ljust(shown[0])}", err=True, nl=False)
        shown[0] = len(line)
        if total and done >= total:
            click.echo("", err=True)
            shown[0] = 0

    return show


def _progress_log():
    """Off a terminal (a CI log, a pipe), where a redrawn bar would print every frame: a line when a stage
    ends, with its time, and, within a long stage, one every LOG_SECONDS with its share done and time left."""
    started: dict[str, float] = {}
    said: dict[str, float] = {}

    def show(stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if done == 0 or stage not in started:
            started[stage] = said[stage] = now
            return
        finished = bool(total) and done >= total
        if not finished and now - said[stage] < LOG_SECONDS:
            return
        said[stage] = now
        elapsed = now - started[stage]
        if finished:
            line = f"{stage}: {done} {_unit(stage)} in {_clock(elapsed)}"
        elif total:
            line = (f"{stage}: {done}/{total} {_unit(stage)} ({done / total:.0%}) after {_clock(elapsed)}, "
                    f"about {_clock(elapsed * (total - done) / done)} left")
        else:
            line = f"{stage}: {done} {_unit(stage)} after {_clock(elapsed)}"
        click.echo(line, err=True)

    return show


LOG_SECONDS = 10
# What a stage counts, where it is not calibration points: layer widths timed, pruned structures timed.
STAGE_UNITS = {"latency": "timings", "speed-up": "structures"}


def _unit(stage: str) -> str:
    return STAGE_UNITS.get(stage, "points")


def _clock(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour)."""
    minutes, second = divmod(int(round(seconds)), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}" if hours else f"{minute}:{second:02d}"


BAR_WIDTH = 30


DEVICE_HELP = "Execution provider: CUDA when onnxruntime can use it (auto), or force one."


def _run_options(command):
    """Options shared by the commands that prune: the split, batching, seed and device."""
    for option in reversed([
        click.option("--holdout", type=float, default=0.2, show_default=True,
                     help="Fraction of the calibration points held out to verify the pruned model."),
        click.option("--batch-size", type=int, default=32, show_default=True,
                     help="Points per onnxruntime run (fewer, with a note, where a capture batch would not fit in "
                          "half the free memory)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split and for sampling."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=DEVICE_HELP),
    ]):
        command = option(command)
    return command


_round_to_option = click.option(
    "--round-to", default="auto", show_default=True, metavar="auto|N",
    help="Keep pruned widths multiples of N, within the budget. auto: multiples of 8 (fast on onnxruntime's CPU "
         "kernels and tensor cores) in groups of 16 or more channels, deterministic mode only; 1: PFP's exact "
         "allocation.")


_budget_of_option = click.option(
    "--budget-of", type=click.Choice(BUDGET_OF), default="weights", show_default=True,
    help="What --budget counts: the Conv/Gemm/MatMul weights, their multiply-accumulates per point (macs), or "
         "the model's latency measured with onnxruntime on this machine (latency: each layer timed at a few "
         "widths, the pruned model timed against the original until the speed-up is on target).")


def _latency_options(command):
    """Where --budget-of latency times: the deployment's batch and threads, and the table's cache."""
    for option in reversed([
        click.option("--latency-batch", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--budget-of latency: the batch size the model will run at (a model exported with a "
                          "fixed batch runs that one)."),
        click.option("--latency-threads", type=click.IntRange(min=1),
                     help="--budget-of latency: onnxruntime intra-op threads it will run with.  "
                          "[default: onnxruntime's, one per physical core]"),
        click.option("--latency-cache", type=click.Path(file_okay=False),
                     help="Folder for latency tables, so a re-run does not time again.  "
                          "[default: $PFP_ONNX_CACHE, else ~/.cache/pfp-onnx]"),
    ]):
        command = option(command)
    return command


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"{option} takes comma-separated numbers, e.g. 0.9,0.8,0.7; got '{text}'.") from None


def _size(text: str | None) -> tuple[int, int] | None:
    """224 (square) or 480x640 (height x width)."""
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.lower().replace(",", "x").split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise OptionError(f"--size takes one size or height x width, e.g. 224 or 480x640; got '{text}'.")
    return sizes[0], sizes[-1]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pfp-onnx")
def main() -> None:
    """Provable Filter Pruning for ONNX models: remove whole filters and neurons, keep a dense model."""


@main.command("compress")
@click.argument("model", type=click.Path(dir_okay=False, readable=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, readable=False),
              help="Calibration .npz: one array per model input (by input name), optional 'labels'.")
@click.option("--budget", type=float,
              help="Fraction of the Conv/Gemm/MatMul weights (or MACs, --budget-of) to keep, in (0, 1]. "
                   "Optional with --min-fidelity.")
@_budget_of_option
@click.option("--target-speedup", type=float, metavar="S",
              help="The speed-up to prune for, measured with onnxruntime on this machine (e.g. 1.5): short for "
                   "--budget-of latency --budget 1/S.")
@_latency_options
@click.option("--min-fidelity", type=float, metavar="F",
              help="Held-out fidelity to keep, in (0, 1] (see --fidelity). Without --budget: find the smallest "
                   "budget that keeps it (within 0.01). With --budget: a gate; below it, exit status 3 and no "
                   "model is written.")
@click.option("--fidelity", "fidelity", type=click.Choice(METRICS), default="auto", show_default=True,
              help="How fidelity is measured: top1 agreement of a classifier's [N, classes] output, error "
                   "(1 - the worst output channel's RMS error in units of its own spread), or detections (F1 "
                   "of the original's detections, for a YOLOv8-style [N, 4 + classes, anchors] output); auto: "
                   "top1 where the judged output is a classifier's, detections where it is a YOLOv8 head (boxes "
                   "beside Sigmoid scores), else error.")
@click.option("--fidelity-output", metavar="NAME",
              help="The output fidelity judges.  [default: the first for top1 and detections, all for error]")
@click.option("-o", "--output", type=click.Path(dir_okay=False, readable=False),
              help="Where to write the pruned model.  [default: beside MODEL, as MODEL's name with .pruned.onnx]")
@click.option("--mode", type=click.Choice(MODES), default="deterministic", show_default=True,
              help="Keep the most sensitive channels, or sample them by sensitivity (randomized, hybrid).")
@click.option("--criterion", type=click.Choice(CRITERIA), default="pfp", show_default=True,
              help="Channel score: PFP sensitivity, or a baseline (filter L1/L2 norm, random).")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="pfp", show_default=True,
              help="Channels per group: PFP's error-bound allocation, or the same fraction everywhere.")
@click.option("--recovery", type=click.Choice(RECOVERIES), default=DEFAULT_RECOVERY, show_default=True,
              help="Training-free recovery after pruning: fold the removed channels' mean into the bias (bias), "
                   "re-fit the layers reading pruned channels by least squares on the original's activations "
                   "(lstsq), or re-fit every layer after a pruned one on the pruned model's own activations, "
                   "depth after depth, the output layers given the original's spread so that scores are not "
                   "shrunk below thresholds (sequential; sequential-ls: least squares alone).")
@_run_options
@click.option("--exclude", "exclude", multiple=True, metavar="NODE",
              help="Keep this node's channels untouched (repeatable).")
@click.option("--exclude-op", "exclude_ops", multiple=True, metavar="TYPE",
              help="Keep the channels of every node of this op type untouched (repeatable).")
@_round_to_option
@click.option("--external-data", is_flag=True,
              help="Store the output's weights in OUT.data beside it (automatic above 2 GB).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, readable=False), help="Also write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, readable=False),
              help="Also draw the allocation as a PNG: per layer, the output channels kept and its share of the "
                   "latency (or weights). Needs matplotlib.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also print every frozen reason and each output's errors.")
@_handled_errors
def compress_command(model, data, budget, budget_of, target_speedup, latency_batch, latency_threads, latency_cache,
                     min_fidelity, fidelity, fidelity_output, output, mode, criterion, allocation, recovery, holdout,
                     batch_size, seed, device, exclude, exclude_ops, round_to, external_data, report_path, plot_path,
                     quiet, verbose):
    """Prune MODEL to keep BUDGET of its layer weights (or MACs) and write a smaller dense ONNX model."""
    from pfp_onnx import compress
    from pfp_onnx.model import check_output_path, default_output_path, remove_model, save_model
    from pfp_onnx.report import render_table, write_json

    output_path = check_output_path(output or default_output_path(model), model, data)
    replacing = output is None and output_path.exists()
    if report_path is not None:
        check_output_path(report_path, model, data, output_path, option="--report")
    if plot_path is not None:
        check_output_path(plot_path, model, data, output_path, report_path, option="--plot")
        _check_matplotlib()
    result = compress(model, data, budget=budget, mode=mode, criterion=criterion, allocation=allocation,
                      recovery=recovery, holdout=holdout, batch_size=batch_size, seed=seed, device=device,
                      exclude=exclude, exclude_ops=exclude_ops, round_to=round_to, budget_of=budget_of,
                      min_fidelity=min_fidelity, fidelity=fidelity, fidelity_output=fidelity_output,
                      progress=_progress_printer(quiet), target_speedup=target_speedup, latency_batch=latency_batch,
                      latency_threads=latency_threads, latency_cache=latency_cache)
    gate_failed = result.report.fidelity is not None and result.report.fidelity.met is False
    if not gate_failed:
        save_model(result.model, output_path, external_data=external_data)
    try:
        if report_path is not None:
            write_json(result.report, report_path)
        if plot_path is not None:
            from pfp_onnx.allocation_plot import plot_allocation

            plot_allocation([(f"budget {result.report.budget:g}", result.report.layers)], plot_path, title=str(model))
    except BaseException:  # the command writes all or none
        if not gate_failed:
            remove_model(output_path)
        raise
    if not quiet:
        notes = result.notes + ((f"replaced the existing {output_path}, the default output beside the input "
                                 "(-o writes elsewhere)",) if replacing and not gate_failed else ())
        for note in notes:
            click.echo(f"note: {note}", err=True)
        sys.stderr.flush()
        click.echo(render_table(result.report, verbose=verbose))
    if gate_failed:
        click.echo(f"Error: {result.report.fidelity.describe()} at budget {result.report.budget:g}, so no model "
                   f"was written. Raise --budget, or leave it out to let --min-fidelity find the smallest budget "
                   f"that meets the target" + (f"; the report is in {report_path}." if report_path else "."),
                   err=True)
        sys.exit(GATE_STATUS)
    if not quiet:
        click.echo("wrote " + " and ".join(str(path) for path in (output_path, report_path, plot_path) if path))
    for warning in result.report.warnings:  # even with -q: the model was written, but may not be usable
        click.echo(f"warning: {warning}", err=True)


@main.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False, readable=False))
@click.option("--data", "data", type=click.Path(dir_okay=False, readable=False),
              help="Optional calibration .npz to make dynamic sizes concrete.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@_handled_errors
def analyze_command(model, data, as_json):
    """Show MODEL's channel groups: which can be pruned, and why the others are frozen."""
    from pfp_onnx import analyze, smallest_budgets
    from pfp_onnx.report import analysis_dict, render_analysis

    analysis = analyze(model, data)
    floors = smallest_budgets(analysis)
    if as_json:
        click.echo(json.dumps(analysis_dict(analysis, floors), indent=2))
    else:
        click.echo(render_analysis(analysis, floors))


@main.command("evaluate")
@click.argument("original", type=click.Path(dir_okay=False, readable=False))
@click.argument("pruned", type=click.Path(dir_okay=False, readable=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, readable=False),
              help="Test .npz: one array per model input, optional 'labels'. Every point is used.")
@click.option("--epsilons", default="0.01,0.05,0.1,0.2,0.5", show_default=True,
              help="Relative errors ε for which to report δ, the fraction of points outside (1±ε).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Points per onnxruntime run.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handled_errors
def evaluate_command(original, pruned, data, epsilons, batch_size, device, as_json):
    """Compare PRUNED with ORIGINAL: accuracy, top-1 agreement, output error and the empirical (ε, δ)."""
    epsilons = _floats(epsilons, "--epsilons")
    from pfp_onnx import evaluate
    from pfp_onnx.report import render_verification

    result = evaluate(original, pruned, data, batch_size=batch_size, device=device, epsilons=epsilons)
    click.echo(json.dumps(asdict(result), indent=2) if as_json else render_verification(result))


@main.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False, readable=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, readable=False), help="Calibration .npz.")
@click.option("--budgets", default="0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2", show_default=True,
              help="Comma-separated budgets.")
@click.option("--methods", default="pfp/pfp/none,l1/uniform/none,pfp/pfp/lstsq,pfp/pfp/sequential", show_default=True,
              help="Comma-separated criterion/allocation[/mode][/recovery] (recovery defaults to sequential), "
                   "e.g. pfp/pfp/none,l2/pfp/none,pfp/pfp/bias.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, readable=False),
              help="Also write the table (every column) as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, readable=False), help="Also draw a PNG (needs matplotlib).")
@click.option("--plot-allocation", "allocation_path", type=click.Path(dir_okay=False, readable=False),
              help="Also draw each budget's allocation of the first method as a PNG: per layer, the output "
                   "channels kept and its share of the latency (or weights). Needs matplotlib.")
@_budget_of_option
@_latency_options
@_run_options
@_round_to_option
@_handled_errors
def sweep_command(model, data, budgets, methods, csv_path, plot_path, allocation_path, budget_of, latency_batch,
                  latency_threads, latency_cache, holdout, batch_size, seed, device, round_to):
    """Compress MODEL at every budget with every method (one capture) and print held-out accuracy beside the
    original's."""
    budgets = _floats(budgets, "--budgets")
    from pfp_onnx.model import check_output_path
    from pfp_onnx.sweep import LATENCY_HEADER, TABLE_HEADER, parse_methods, plot, sweep, table_line, write_csv

    if csv_path is not None:
        check_output_path(csv_path, model, data, option="--csv")
    if plot_path is not None:
        check_output_path(plot_path, model, data, csv_path, option="--plot")
    if allocation_path is not None:
        check_output_path(allocation_path, model, data, csv_path, plot_path, option="--plot-allocation")
    if plot_path is not None or allocation_path is not None:
        _check_matplotlib()
    shown = []

    def show(row) -> None:
        if not shown:  # the header with the first row: a refused option or input prints only its error
            click.echo(LATENCY_HEADER if budget_of == "latency" else TABLE_HEADER)
        shown.append(row)
        click.echo(table_line(row))

    rows = sweep(model, data, budgets=budgets, methods=parse_methods(methods), holdout=holdout,
                 batch_size=batch_size, seed=seed, device=device, round_to=round_to, budget_of=budget_of,
                 progress=_progress_printer(quiet=False), on_row=show, latency_batch=latency_batch,
                 latency_threads=latency_threads, latency_cache=latency_cache)
    written = [path for path in (csv_path, plot_path, allocation_path) if path is not None]
    if csv_path is not None:
        write_csv(rows, csv_path)
    if plot_path is not None:
        plot(rows, plot_path, title=str(model), budget_of=budget_of)
    if allocation_path is not None:
        from pfp_onnx.allocation_plot import plot_allocation

        first = next(row.method for row in rows if row.layers)
        plot_allocation([(f"budget {row.budget:g}", row.layers) for row in rows if row.method == first],
                        allocation_path, title=f"{model} ({first})")
    if written:
        click.echo("wrote " + " and ".join(map(str, written)))


def _check_matplotlib() -> None:
    """Before the long work, not after it: a plot asked for needs matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OptionError("Plotting needs matplotlib: pip install 'pfp-onnx[plot]', or leave out the plot option.")


@main.command("calib")
@click.argument("images", type=click.Path(file_okay=False, readable=False))
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False, readable=False),
              help="The model the set is for: its input's name, dtype, size and layout.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, readable=False),
              help="Where to write the calibration .npz (compress's --data).")
@click.option("--preset", type=click.Choice(IMAGE_PRESETS),
              help="imagenet: short side to 8/7 of the size, centre crop, 0–1, ImageNet mean/std, RGB (torchvision); "
                   "yolo: letterbox padded with grey 114, 0–1, RGB (Ultralytics). The options below override it.")
@click.option("--size", metavar="S|HxW",
              help="Height and width to make, e.g. 224 or 480x640; needed where the model leaves them open.  "
                   "[default: the model's]")
@click.option("--resize", type=click.Choice(RESIZES),
              help="crop: scale the short side to fit, then centre-crop; letterbox: fit inside, pad with --fill; "
                   "stretch: ignore the aspect ratio.  [default: the preset's, else crop]")
@click.option("--crop-fraction", type=float, metavar="F",
              help="crop: the share of the scaled short side the crop keeps (0.875: 224 of 256).  "
                   "[default: the preset's, else 1]")
@click.option("--pixel-range", type=float, metavar="R",
              help="Pixels 0–255 are scaled to 0–R before --mean and --std: 1 or 255.  [default: 1]")
@click.option("--mean", metavar="M[,M,M]",
              help="Subtracted per channel, in R,G,B order.  [default: the preset's, else 0]")
@click.option("--std", metavar="S[,S,S]", help="Divides per channel, in R,G,B order.  [default: the preset's, else 1]")
@click.option("--channels", type=click.Choice(CHANNEL_ORDERS), help="Colour order the model reads.  [default: RGB]")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="The model input's layout.  [default: read from its shape, where an axis of 1 or 3 says it]")
@click.option("--fill", type=click.IntRange(0, 255), help="letterbox: grey level of the padding.  [default: 114]")
@click.option("--labels", is_flag=True,
              help="Add class labels from sub-folders (IMAGES/<class>/*.jpg): folders named by number give that "
                   "class id; others are numbered in sorted order.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Use at most N images, a seeded random sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit's sample.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and warnings.")
@_handled_errors
def calib_command(images, model, output, preset, size, resize, crop_fraction, pixel_range, mean, std, channels,
                  layout, fill, labels, limit, seed, quiet):
    """Make a calibration .npz for MODEL from the images under IMAGES, preprocessed as the model expects, and
    say whether they are as many as PFP's bound asks for. Needs Pillow (the extra named images)."""
    size = _size(size)
    mean = None if mean is None else _floats(mean, "--mean")
    std = None if std is None else _floats(std, "--std")
    from pfp_onnx.calibration_images import calibration_set, save_npz
    from pfp_onnx.model import check_output_path

    output_path = check_output_path(output, model)
    made = calibration_set(images, model, preset=preset, size=size, resize=resize, crop_fraction=crop_fraction,
                           pixel_range=pixel_range, mean=mean, std=std, channels=channels, layout=layout, fill=fill,
                           labels=labels, limit=limit, seed=seed)
    save_npz(made, output_path)
    for note in () if quiet else made.notes:
        click.echo(f"note: {note}", err=True)
    for warning in made.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        click.echo(f"wrote {output_path}")


if __name__ == "__main__":
    main()
