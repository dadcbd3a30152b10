"""End-to-end: the `pfp-onnx` command on the shipped, really trained digits fixture."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"
DATA = FIXTURES / "digits_calib.npz"
CHANCE = 0.1  # ten digit classes


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pfp_onnx_cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def run_cli_here(capfd: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """run_cli in this interpreter: the same entry point, exit status and streams (file descriptors too, so
    onnxruntime's own messages count), without starting Python, onnx and onnxruntime again (a second a run).
    An exception that escapes the command escapes here too: the test fails as a traceback would."""
    from pfp_onnx_cli.main import main

    capfd.readouterr()
    try:
        main.main(args=[str(arg) for arg in args], prog_name="pfp-onnx", standalone_mode=True)
        status = 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else int(done.code is not None)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["pfp-onnx", *map(str, args)], status, out, err)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """Compress the fixture once per budget; tests below read the results."""
    folder = tmp_path_factory.mktemp("compressed")
    results = {}
    for budget in (0.8, 0.6, 0.4):
        output, report = folder / f"pruned_{budget}.onnx", folder / f"report_{budget}.json"
        done = run_cli("compress", MODEL, "--data", DATA, "--budget", budget, "-o", output, "--report", report)
        results[budget] = (done, output, report)
    return results


@pytest.mark.parametrize("budget", [0.8, 0.6, 0.4])
def test_compress_fixture_end_to_end(compressed, budget):
    done, output, report_path = compressed[budget]
    assert done.returncode == 0, done.stderr
    pruned = onnx.load(str(output))
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(str(MODEL))
    assert [(i.name, i.type) for i in pruned.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in pruned.graph.output] == [(o.name, o.type) for o in original.graph.output]

    report = json.loads(report_path.read_text())
    totals = report["totals"]
    assert totals["layer_weights_after"] <= budget * totals["layer_weights_before"]
    assert totals["parameters_after"] < totals["parameters_before"]
    assert totals["macs_after"] < totals["macs_before"]

    data = np.load(DATA)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    assert logits.shape == (len(data["labels"]), 10)

    verification = report["verification"]
    print(f"budget {budget}: held-out accuracy {verification['accuracy_original']:.3f} → "
          f"{verification['accuracy_pruned']:.3f}, weights kept {totals['layer_weights_after']}/"
          f"{totals['layer_weights_before']}, MACs kept {totals['macs_after']}/{totals['macs_before']}")
    assert verification["points"] == 100  # 20% of 500
    assert verification["accuracy_pruned"] > CHANCE
    assert f"pruned {verification['accuracy_pruned']:.1%}" in done.stdout
    assert "layer weights" in done.stdout and "MACs" in done.stdout


def test_accuracy_degrades_gracefully(compressed):
    """Smaller budgets keep less or equal accuracy and a strictly larger output error; with the default
    least-squares recovery every budget down to 0.4 keeps nearly all of the digits' accuracy (measured:
    1.00 at 0.8, 0.6 and 0.4; mean relative error 0.025, 0.052, 0.12)."""
    verification = {b: json.loads(compressed[b][2].read_text())["verification"] for b in compressed}
    budgets = sorted(verification, reverse=True)
    accuracy = [verification[b]["accuracy_pruned"] for b in budgets]
    error = [verification[b]["mean_relative_error"] for b in budgets]
    assert budgets == [0.8, 0.6, 0.4]
    assert accuracy == sorted(accuracy, reverse=True), dict(zip(budgets, accuracy))
    assert min(accuracy) >= 0.95, dict(zip(budgets, accuracy))
    assert all(tighter > looser for looser, tighter in zip(error, error[1:])), dict(zip(budgets, error))


def test_input_model_untouched(compressed):
    before = MODEL.read_bytes()
    assert all(result[0].returncode == 0 for result in compressed.values())
    assert MODEL.read_bytes() == before


def test_console_script_installed():
    import shutil

    assert shutil.which("pfp-onnx") or shutil.which("pfp-onnx", path=str(Path(sys.executable).parent))


def test_analyze_command():
    done = run_cli("analyze", MODEL)
    assert done.returncode == 0, done.stderr
    assert "prunable" in done.stdout and "reaches graph output 'logits'" in done.stdout
    assert "budget floor: 0.001 (--budget-of macs: 0.001), the lowest --budget accepted" in done.stdout
    assert "not a recommendation" in done.stdout
    as_json = json.loads(run_cli("analyze", MODEL, "--json").stdout)
    assert as_json["weights_in_prunable_groups"] == as_json["weights_total"]
    assert as_json["smallest_budget"] == {"weights": 0.001, "macs": 0.001}


def test_readme_cli_reference_is_current():
    """The README's CLI reference is generated from --help; regenerate with python -m pfp_onnx_cli.reference."""
    done = subprocess.run([sys.executable, "-m", "pfp_onnx_cli.reference", "--check"], capture_output=True)
    assert done.returncode == 0, "README.md's CLI reference is stale: run python -m pfp_onnx_cli.reference"


def test_quiet_and_verbose(tmp_path):
    quiet = run_cli("compress", MODEL, "--data", DATA, "--budget", 0.7, "-o", tmp_path / "q.onnx", "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = run_cli("compress", MODEL, "--data", DATA, "--budget", 0.7, "-o", tmp_path / "v.onnx", "-v")
    assert verbose.returncode == 0 and "output 'logits': max abs error" in verbose.stdout
    assert "note: running on" in verbose.stderr  # the execution provider is said once


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    from pfp_onnx_cli import main as cli_main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli_main._progress_printer(quiet=True) is None
    clock = iter([1000.0, 1010.0, 1040.0, 5000.0, 5000.5])
    monkeypatch.setattr(cli_main.time, "monotonic", lambda: next(clock))
    show = cli_main._progress_printer(quiet=False)
    show("capture", 0, 400)
    show("capture", 100, 400)
    show("capture", 400, 400)
    err = capsys.readouterr().err
    assert "\rcapture [" + "." * 30 + "] 0/400 points  0:00\r" in err  # shown before the first batch
    # 100 points in 10 s: 300 more take about 30 s
    assert "capture [#######.......................] 100/400 points  0:10, about 0:30 left\r" in err
    # the finished line is padded over the longer one before it, and ends the line
    assert err.endswith("[" + "#" * 30 + "] 400/400 points  0:40" + " " * len(", about 0:30 left") + "\n")
    # a stage starting again (a sweep's next row) restarts its clock
    show("verify", 0, None)
    show("verify", 64, None)
    assert capsys.readouterr().err == "\rverify: 0 points  0:00\rverify: 64 points  0:00"


def test_progress_in_a_log_is_a_line_per_stage(monkeypatch, capsys):
    """Off a terminal (CI, a pipe): no carriage returns; a stage that ends within LOG_SECONDS is one line with
    its time, a longer one also says where it is, at most once every LOG_SECONDS; nothing when quiet."""
    from pfp_onnx_cli import main as cli_main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert cli_main._progress_printer(quiet=True) is None
    clock = iter([0.0, 1.0, 2.0, 3.0,  # a fast stage: only its end
                  100.0, 104.0, 111.0, 115.0, 160.0, 200.0,  # a slow one: its end and every ≥ 10 s
                  300.0, 312.0])  # a streamed stage (total unknown)
    monkeypatch.setattr(cli_main.time, "monotonic", lambda: next(clock))
    show = cli_main._progress_printer(quiet=False)
    for done in (0, 100, 200, 300):
        show("refit 1/2", done, 300)
    for done in (0, 10, 20, 30, 90, 100):
        show("capture", done, 100)
    show("verify", 0, None)
    show("verify", 64, None)
    assert capsys.readouterr().err.splitlines() == [
        "refit 1/2: 300 points in 0:03",
        "capture: 20/100 points (20%) after 0:11, about 0:44 left",
        "capture: 90/100 points (90%) after 1:00, about 0:07 left",
        "capture: 100 points in 1:40",
        "verify: 64 points after 0:12"]


def test_data_notes_print_once_as_notes_and_not_when_quiet(tmp_path):
    renamed = tmp_path / "calib.npz"
    np.savez(renamed, arr_0=np.load(DATA)["input"][:50])
    done = run_cli("analyze", MODEL, "--data", renamed)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("note: the calibration array 'arr_0' was taken as the model's only input, 'input' (save "
                           "it under the input's name to match it explicitly)\n")
    quiet = run_cli("compress", MODEL, "--data", renamed, "--budget", 0.7, "-o", tmp_path / "q.onnx", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_progress_clock_reads_minutes_and_hours():
    from pfp_onnx_cli.main import _clock

    assert [_clock(s) for s in (0, 9.4, 59.6, 61, 3599, 3600, 36000 + 62)] == \
        ["0:00", "0:09", "1:00", "1:01", "59:59", "1:00:00", "10:01:02"]


def test_progress_covers_capture_then_verify():
    """compress reports every point of the capture pass, then every held-out point of verification, each
    counting up from 0 (said when the stage starts) to its own total."""
    import pfp_onnx

    events = []
    pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, holdout=0.25, batch_size=64, recovery="none",
                      progress=lambda stage, done, total: events.append((stage, done, total)))
    stages = [stage for stage, _, _ in events]
    assert stages == sorted(stages, key=["capture", "verify"].index) and set(stages) == {"capture", "verify"}
    for stage, points in (("capture", 375), ("verify", 125)):  # 500 points, a quarter held out
        mine = [(done, total) for name, done, total in events if name == stage]
        assert all(total == points for _, total in mine)
        assert [done for done, _ in mine] == sorted({done for done, _ in mine}) and mine[-1][0] == points
        assert mine[0][0] == 0 and len(mine) == 1 + -(-points // 64)  # the start, then one report per batch


def test_the_users_own_command_writes_beside_the_input(tmp_path):
    """`pfp-onnx compress model.onnx --data calib.npz --budget 0.4`, exactly, in a folder holding both: the
    pruned model lands beside the input as model.pruned.onnx, valid, and the input stays byte-identical. A
    second run replaces its own output and says so."""
    (tmp_path / "model.onnx").write_bytes(MODEL.read_bytes())
    (tmp_path / "calib.npz").write_bytes(DATA.read_bytes())
    command = [sys.executable, "-m", "pfp_onnx_cli.main", "compress", "model.onnx", "--data", "calib.npz",
               "--budget", "0.4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "model.pruned.onnx"
    assert done.stdout.splitlines()[-1] == "wrote model.pruned.onnx" and "replaced" not in done.stderr
    pruned = onnx.load(str(output))
    onnx.checker.check_model(pruned, full_check=True)
    assert (tmp_path / "model.onnx").read_bytes() == MODEL.read_bytes()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.load(DATA)["input"][:4]})[0].shape == (4, 10)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["calib.npz", "model.onnx", "model.pruned.onnx"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "note: replaced the existing model.pruned.onnx" in again.stderr
    assert (tmp_path / "model.onnx").read_bytes() == MODEL.read_bytes()


def test_default_output_names():
    from pfp_onnx.model import default_output_path

    assert default_output_path("dir/model.onnx") == Path("dir/model.pruned.onnx")
    assert default_output_path("Model.ONNX") == Path("Model.pruned.onnx")
    assert default_output_path("weights") == Path("weights.pruned.onnx")
    assert default_output_path("a.pruned.onnx") == Path("a.pruned.pruned.onnx")  # never the input itself


def _invoke(args, monkeypatch, failure: BaseException):
    """Run the CLI in-process with compress replaced by a function raising `failure` (the command imports it
    from the package when it runs)."""
    from click.testing import CliRunner

    import pfp_onnx
    from pfp_onnx_cli import main as cli_main

    def broken(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(pfp_onnx, "compress", broken)
    monkeypatch.setattr(sys, "argv", ["pfp-onnx", *map(str, args)])
    return CliRunner().invoke(cli_main.main, list(map(str, args)))


def test_a_bug_ends_in_one_paragraph_and_a_crash_report(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the report goes where the test cleans up
    output = tmp_path / "out.onnx"
    args = ["compress", MODEL, "--data", DATA, "--budget", "0.5", "-o", output, "--report", tmp_path / "r.json"]
    result = _invoke(args, monkeypatch, IndexError("index 7 is out of bounds for axis 0 with size 4"))
    assert result.exit_code == 70
    message = result.output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert "This is a bug in pfp-onnx" in message and "IndexError: index 7 is out of bounds" in message
    assert "pfp-onnx 0." in message and "onnxruntime " in message
    report = Path(message.split("crash report ")[1].split(" ")[0])
    text = report.read_text()
    report.unlink()
    assert "Traceback (most recent call last)" in text and "IndexError" in text
    assert f"command: pfp-onnx compress {MODEL}" in text
    assert "operators: Conv 8, BatchNormalization 8" in text and "input input: [N, 1, 8, 8]" in text
    assert "raw_data" not in text and len(text) < 20_000  # a summary, no weights
    assert not output.exists() and not (tmp_path / "r.json").exists()


def test_interrupt_is_one_line(tmp_path, monkeypatch):
    result = _invoke(["compress", MODEL, "--data", DATA, "--budget", "0.5", "-o", tmp_path / "o.onnx"],
                     monkeypatch, KeyboardInterrupt())
    assert result.exit_code == 130 and result.output.strip() == "Interrupted; nothing was written."
    assert not (tmp_path / "o.onnx").exists()


def test_a_failed_report_write_leaves_no_model(tmp_path, monkeypatch):
    from pfp_onnx import report
    from pfp_onnx_cli import main as cli_main

    def failing_json(report, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_json", failing_json)
    reports = tmp_path.parent / f"{tmp_path.name}-reports"  # the crash report, not beside the outputs
    reports.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(reports))
    output = tmp_path / "o.onnx"
    from click.testing import CliRunner

    result = CliRunner().invoke(cli_main.main, ["compress", str(MODEL), "--data", str(DATA), "--budget", "0.7",
                                                "-o", str(output), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 70 and "No space left on device" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    assert [path.name.startswith("pfp-onnx-crash-") for path in reports.iterdir()] == [True]
