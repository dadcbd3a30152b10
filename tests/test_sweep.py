"""Baselines, evaluate and sweep on the digits fixture."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest

import pfp_onnx
from pfp_onnx import verify
from pfp_onnx.baselines import norm_scores
from pfp_onnx.errors import OptionError
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.pipeline import Method
from pfp_onnx.sweep import parse_methods
from test_cli import DATA, MODEL, run_cli


def test_l1_and_l2_scores_are_filter_norms():
    model = onnx.load(str(MODEL))
    analysis = analyse_channel_groups(model, {"input": (1, 1, 8, 8)})
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    group = next(g for g in analysis.prunable_groups if g.producers == ("/block_a/conv1/Conv",))
    conv = next(n for n in model.graph.node if n.name == "/block_a/conv1/Conv")
    filters = weights[conv.input[1]].reshape(group.width, -1)
    np.testing.assert_allclose(norm_scores(model, analysis, 1)[group.id], np.abs(filters).sum(1), rtol=1e-6)
    np.testing.assert_allclose(norm_scores(model, analysis, 2)[group.id], np.linalg.norm(filters, axis=1), rtol=1e-6)
    # a residual group's norm covers all its producers' filters
    residual = next(g for g in analysis.prunable_groups if len(g.producers) == 2 and g.width == 32)
    producers = [n for n in model.graph.node if n.name in residual.producers]
    expected = sum(np.square(weights[n.input[1]].reshape(32, -1)).sum(1) for n in producers)
    np.testing.assert_allclose(norm_scores(model, analysis, 2)[residual.id], np.sqrt(expected), rtol=1e-6)


@pytest.mark.parametrize("round_to", [1, "auto"])
@pytest.mark.parametrize("criterion, allocation", [("l1", "uniform"), ("l2", "pfp"), ("random", "uniform")])
def test_baselines_meet_the_budget(criterion, allocation, round_to):
    result = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, criterion=criterion, allocation=allocation,
                               round_to=round_to)
    totals = result.report.totals
    assert totals.layer_weights_after <= 0.5 * totals.layer_weights_before
    assert result.report.method == f"{criterion}/{allocation}/sequential"  # recovery is on by default
    if allocation == "uniform":
        assert result.report.epsilon is None
        rows = [row for row in result.report.groups if not row.frozen]
        kept = [row.channels_after / row.channels_before for row in rows]
        # the same fraction everywhere, up to rounding up one count (1, or 8 in these 32-64-wide groups)
        step = 1 if round_to == 1 else 8
        assert max(kept) - min(kept) < max(step / row.channels_before for row in rows) + 0.05
        assert all(row.channels_after % step == 0 for row in rows)


def test_pfp_beats_l1_uniform_on_the_fixture():
    """The paper's prune-only claim, on our real trained fixture: PFP keeps more accuracy at the same size."""
    rows = pfp_onnx.sweep(str(MODEL), str(DATA), budgets=[0.8, 0.6, 0.4],
                          methods=[Method("pfp", "pfp", recovery="none"), Method("l1", "uniform", recovery="none")])
    accuracy = {(row.method, row.budget): row.accuracy for row in rows}
    original = rows[0]
    assert (original.method, original.budget, original.weights_kept, original.top1_agreement) == ("original", 1, 1, 1)
    assert original.accuracy >= max(accuracy.values()) - 0.05 and original.max_relative_error == 0
    for budget in (0.8, 0.6, 0.4):
        assert accuracy[("pfp/pfp/none", budget)] >= accuracy[("l1/uniform/none", budget)]


@pytest.mark.parametrize("limit", [verify.REFERENCE_BYTES, 0])
def test_sweep_runs_the_original_on_the_held_out_points_once(monkeypatch, limit):
    """The first row keeps the original's held-out outputs, and the later rows verify against them without
    a session of their own for it; rows are the same as when nothing is kept (limit 0: outputs too large)."""
    monkeypatch.setattr(verify, "REFERENCE_BYTES", limit)
    built = []
    create_session = verify.create_session
    monkeypatch.setattr(verify, "create_session", lambda model, device: (
        built.append(model.graph.name), create_session(model, device))[1])
    methods = [Method("pfp", "pfp", recovery="none"), Method("l1", "uniform", recovery="lstsq")]
    rows = pfp_onnx.sweep(str(MODEL), str(DATA), budgets=[0.7, 0.4], methods=methods)
    assert len(built) == (5 if limit else 8)  # a pruned model per row, and the original once (or per row)
    monkeypatch.setattr(verify, "REFERENCE_BYTES", 0 if limit else verify.REFERENCE_BYTES)
    assert pfp_onnx.sweep(str(MODEL), str(DATA), budgets=[0.7, 0.4], methods=methods) == rows


def test_sweep_command_writes_csv_and_plot(tmp_path):
    """The CSV, the accuracy plot, and --plot-allocation's picture of the first method's channels kept per
    layer (one line per budget)."""
    pytest.importorskip("matplotlib")
    table, picture, allocation = tmp_path / "sweep.csv", tmp_path / "sweep.png", tmp_path / "allocation.png"
    done = run_cli("sweep", MODEL, "--data", DATA, "--budgets", "0.8,0.5", "--methods", "pfp/pfp/none,random/uniform",
                   "--csv", table, "--plot", picture, "--plot-allocation", allocation)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(table.open()))
    assert [(row["method"], row["budget"]) for row in rows] == [
        ("original", "1.0"), ("pfp/pfp/none", "0.8"), ("pfp/pfp/none", "0.5"), ("random/uniform/sequential", "0.8"),
        ("random/uniform/sequential", "0.5")]
    assert all(float(row["weights_kept"]) <= float(row["budget"]) for row in rows)
    assert b"\r" not in table.read_bytes()  # plain \n line endings
    assert picture.read_bytes()[:8] == allocation.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.stdout.splitlines()[-1] == f"wrote {table} and {picture} and {allocation}"


def test_sweep_command_prints_the_table_without_csv(tmp_path):
    """The table goes to the terminal by default, the original model's held-out accuracy first."""
    done = run_cli("sweep", MODEL, "--data", DATA, "--budgets", "0.5", "--methods", "pfp/pfp/none", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, original, pruned = done.stdout.splitlines()
    assert header.split() == ["method", "budget", "weights", "MACs", "accuracy", "agreement"]
    assert original.split()[:4] == ["original", "1", "100.0%", "100.0%"] and original.split()[-1] == "100.0%"
    assert pruned.split()[:2] == ["pfp/pfp/none", "0.5"]
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert "capture: 400 points in" in done.stderr  # progress off a terminal: a line per stage


def test_sweep_rounds_like_compress():
    """One capture serves both roundings, and each row equals compress with the same options: "auto" rounds
    the deterministic method and leaves the sampled one alone."""
    methods = [Method("pfp", "pfp", recovery="none"), Method("pfp", "pfp", "randomized", "none")]
    for round_to in (1, "auto"):
        rows = pfp_onnx.sweep(MODEL, DATA, budgets=[0.6], methods=methods, round_to=round_to)
        assert rows[0].method == "original" and len(rows) == 3
        for method, row in zip(methods, rows[1:]):
            report = pfp_onnx.compress(MODEL, DATA, budget=0.6, mode=method.mode, recovery="none",
                                       round_to=round_to).report
            assert row.weights_kept == report.totals.layer_weights_after / report.totals.layer_weights_before
            assert report.round_to == ("auto" if round_to == "auto" and method.mode == "deterministic" else "1")
            widths = [group.channels_after for group in report.groups if group.channels_after < group.channels_before]
            assert widths and all(width % 8 == 0 for width in widths) == (report.round_to == "auto"), widths


def test_sweep_command_with_a_mac_budget(tmp_path):
    """--budget-of macs: every row keeps at most its budget of MACs, equals compress with the same options,
    and the picture is drawn against MACs kept."""
    pytest.importorskip("matplotlib")
    table, picture = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    done = run_cli("sweep", MODEL, "--data", DATA, "--budgets", "0.6,0.4", "--methods", "pfp/pfp/none,l1/uniform/none",
                   "--budget-of", "macs", "--csv", table, "--plot", picture)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(table.open()))[1:]  # after the original's row
    assert len(rows) == 4 and all(float(row["macs_kept"]) <= float(row["budget"]) for row in rows)
    assert any(float(row["weights_kept"]) > float(row["budget"]) for row in rows) or \
        all(float(row["macs_kept"]) > float(row["weights_kept"]) for row in rows)
    report = pfp_onnx.compress(MODEL, DATA, budget=0.4, recovery="none", budget_of="macs").report
    assert float(rows[1]["macs_kept"]) == report.totals.macs_after / report.totals.macs_before
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("option", [("--round-to", "x"), ("--budgets", "0.5,a"), ("--methods", "pfp")])
def test_sweep_command_refuses_bad_options_with_only_an_error(tmp_path, option):
    done = run_cli("sweep", MODEL, "--data", DATA, "--csv", tmp_path / "sweep.csv", *option)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "sweep.csv").exists()


def test_parse_methods():
    assert [m.label for m in parse_methods("pfp/pfp, l1/uniform/none,pfp/pfp/randomized,pfp/pfp/bias/hybrid")] == [
        "pfp/pfp/sequential", "l1/uniform/none", "pfp/pfp/randomized/sequential", "pfp/pfp/hybrid/bias"]
    with pytest.raises(OptionError, match="criterion/allocation"):
        parse_methods("pfp")
    with pytest.raises(OptionError, match="--criterion"):
        parse_methods("l3/pfp")


def test_evaluate_command(tmp_path):
    pruned = tmp_path / "pruned.onnx"
    assert run_cli("compress", MODEL, "--data", DATA, "--budget", 0.7, "-o", pruned, "-q").returncode == 0
    done = run_cli("evaluate", MODEL, pruned, "--data", DATA, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["points"] == 500
    assert set(result["outside"]) == {"0.01", "0.05", "0.1", "0.2", "0.5"}
    assert list(result["outside"].values()) == sorted(result["outside"].values(), reverse=True)
    assert result["accuracy_original"] > 0.95 and 0.1 < result["accuracy_pruned"] <= 1
    same = json.loads(run_cli("evaluate", MODEL, MODEL, "--data", DATA, "--json").stdout)
    assert same["max_relative_error"] == 0 and same["top1_agreement"] == 1


def test_evaluate_rejects_unrelated_models(tmp_path):
    other = tmp_path / "other.onnx"
    model = onnx.load(str(MODEL))
    model.graph.output[0].name = "renamed"
    model.graph.node[-1].output[0] = "renamed"
    onnx.save(model, str(other))
    done = run_cli("evaluate", MODEL, other, "--data", DATA)
    assert done.returncode == 2 and "does not have the inputs and outputs" in done.stderr

