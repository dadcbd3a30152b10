"""--budget-of latency (pfp_onnx.latency): the per-layer table, its cache, the staircase step, the cost the
allocation spends, and the closed loop that lands the measured speed-up on target.

Wall-clock timings never decide a test: where an outcome depends on them, the timer is replaced by a
deterministic one (a layer's multiply-adds, with widths rounded up to a staircase of 8), so that the tests
check the arithmetic, not the machine. Real timings are measured by benchmarks/latency_target.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pfp_onnx
import pfp_onnx.latency.table as table_module
import pfp_onnx.pipeline as pipeline_module
from pfp_onnx.allocate import GroupDemand, LayerSize, allocate, kept_weights
from pfp_onnx.errors import BudgetError, OptionError
from pfp_onnx.latency import LayerCurve, SpeedTrial, calibrate
from pfp_onnx.latency.table import STEP_SHARE, _one_node_model, measure_table, staircase_step
from pfp_onnx.report import render_latency
from pfp_onnx.runtime import choose_device
from test_cli import DATA, MODEL, run_cli

STAIR = 8


def stair_cost(model: onnx.ModelProto, feed) -> float:
    """A one-node model's weights with its two channel counts rounded up to multiples of 8, in the units of
    parameter_cost: a staircase like real kernels', without their noise."""
    weight = numpy_helper.to_array(model.graph.initializer[0])
    dims = [-(-dim // STAIR) * STAIR if index < 2 and dim > 1 else dim for index, dim in enumerate(weight.shape)]
    return 1e-4 * float(np.prod(dims))


def parameter_cost(model: onnx.ModelProto) -> float:
    return 1e-4 * sum(int(np.prod(init.dims)) for init in model.graph.initializer) + 0.05


@pytest.fixture
def fake_timer(monkeypatch):
    """Sessions become their models; a layer costs stair_cost, a whole model its parameter count."""
    monkeypatch.setattr(table_module, "timing_session", lambda model, device, threads=None: model)
    monkeypatch.setattr(table_module, "fastest_ms", lambda model, feed, **_: (
        stair_cost(model, feed) if len(model.graph.node) == 1 and model.graph.name == "layer"
        else parameter_cost(model)))
    monkeypatch.setattr(pipeline_module, "timing_session", lambda model, device, threads=None: model)
    monkeypatch.setattr(pipeline_module, "compare", lambda original, candidate, feed: (
        parameter_cost(original), parameter_cost(candidate)))


def analysed(model: onnx.ModelProto):
    """The analysis, the allocation's layer sizes, and one point to time on (the zoo's inputs are [N, 3, 16, 16])."""
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    analysis = pfp_onnx.analyze(model, feed)
    return analysis, pipeline_module._layer_sizes(analysis), feed


def digits_arrays(points: int = 40) -> dict[str, np.ndarray]:
    with np.load(DATA) as archive:
        return {"input": archive["input"][:points], "labels": archive["labels"][:points]}


# ---- pieces -------------------------------------------------------------------------------------------
def test_staircase_step_finds_the_widths_kernels_block():
    widths = range(97, 129)
    stairs = {width: float(-(-width // 8) * 8) for width in widths}  # multiples of 8 cost the same as below
    assert staircase_step(stairs) == 8
    sixteen = {width: float(-(-width // 16) * 16) for width in widths}
    assert staircase_step(sixteen) == 16
    linear = {width: float(width) for width in widths}  # every channel costs the same: no step
    assert staircase_step(linear) == 1
    flat = dict.fromkeys(widths, 1.0)  # bound by something else: nothing says where steps are
    assert staircase_step(flat) == 1
    noisy = {width: value * (1.01 if width % 3 else 0.99) for width, value in stairs.items()}
    assert staircase_step(noisy) == 8 and 0 < STEP_SHARE < 1


def test_layer_curve_is_exact_at_its_timed_widths_and_separable_between():
    curve = LayerCurve("conv", full_ms=8.0, in_units=16, out_units=32, in_widths=(4, 8, 16), in_ms=(2.0, 4.0, 8.0),
                       out_widths=(8, 16, 32), out_ms=(2.0, 4.0, 8.0))
    assert curve.ms(16, 32) == 8.0 and curve.ms(8, 32) == 4.0 and curve.ms(16, 8) == 2.0
    assert curve.ms(8, 16) == pytest.approx(2.0)  # half of each side: a quarter of the time
    assert curve.ms(12, 32) == pytest.approx(6.0)  # interpolated between timed widths
    assert curve.ms(1, 32) == 2.0  # below the narrowest width timed: that width's time, not less
    no_input_side = LayerCurve("dw", full_ms=3.0, in_units=1, out_units=8, out_widths=(4, 8), out_ms=(1.5, 3.0))
    assert no_input_side.ms(1, 4) == 1.5


@pytest.mark.parametrize("model_name", ["mobilenet_v3", "convtranspose_head", "resnet_bottleneck"])
def test_every_prunable_layer_runs_alone_at_every_width(model_name):
    """The one-node models: depthwise convs lose groups with their channels, grouped and transposed convs,
    Gemm and MatMul their input or output features; each runs in onnxruntime and gives the kept width."""
    import architectures
    import onnxruntime as ort

    model = getattr(architectures, model_name)()
    analysis, sizes, _ = analysed(model)
    timed = table_module._timed_layers(model, analysis, {size.name for size in sizes if size.in_groups or
                                                         size.out_groups}, batch=2, fixed_batch=False)
    assert timed, "nothing to time"
    by_name = {size.name: size for size in sizes}
    for item in timed:
        size = by_name[item.layer.node]
        for kept_in, kept_out in ((size.in_units, size.out_units), (max(1, size.in_units // 2), size.out_units),
                                  (size.in_units, max(1, size.out_units // 3))):
            one, feed = _one_node_model(item, size, kept_in, kept_out)
            onnx.checker.check_model(one)
            output = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            assert output.shape[0] == item.data_shape[0]
            channel_axis = 1 if item.node.op_type.startswith("Conv") else -1
            if size.out_groups:
                expected = item.layer.out_units if kept_out == size.out_units else kept_out
                scale = output.shape[channel_axis] // expected
                assert output.shape[channel_axis] == expected * scale and scale >= 1


def test_allocation_under_a_cost_meets_it_and_matches_the_weight_count_when_the_cost_is_that():
    groups = [GroupDemand("a", np.linspace(1, 2, 32), 10, 9), GroupDemand("b", np.linspace(2, 1, 16), 10, 9)]
    layers = [LayerSize("one", (), 3, 9, (("a", 32),), 32), LayerSize("two", (("a", 32),), 32, 9, (("b", 16),), 16),
              LayerSize("head", (("b", 16),), 16, 1, (), 10)]
    by_weights = allocate(groups, layers, 0.5, round_to=1)
    same = allocate(groups, layers, 0.5, round_to=1, cost=lambda kept: kept_weights(layers, kept))
    assert same.kept == by_weights.kept and same.epsilon == by_weights.epsilon

    def expensive_a(kept):  # group a's channels cost ten times what their weights say
        return kept_weights(layers, kept) + 9 * 3 * 9 * kept.get("a", 32)

    by_cost = allocate(groups, layers, 0.5, round_to=1, cost=expensive_a)
    full = expensive_a({"a": 32, "b": 16})
    assert by_cost.weights_total == full and by_cost.weights_kept == expensive_a(by_cost.kept) <= 0.5 * full
    assert by_cost.kept["a"] < by_weights.kept["a"]
    stepped = allocate(groups, layers, 0.5, round_to="auto", cost=expensive_a, auto_step=16)
    assert stepped.kept["a"] % 16 == 0 and stepped.kept["b"] in range(1, 17)  # b (16 wide) is too narrow for 16
    with pytest.raises(BudgetError, match="speed-up"):
        allocate(groups, layers, 0.01, round_to=1, cost=expensive_a, unit="latency")


def trial_of(speedup_of_budget):
    return lambda budget: SpeedTrial(budget, 1 / budget, speedup_of_budget(budget), 10.0, 10.0 / speedup_of_budget(budget))


@pytest.mark.parametrize("bias", [0.7, 1.0, 1.3])
def test_calibration_lands_within_tolerance_when_the_table_is_biased(bias):
    """Measured speed-ups 30% below or above what the budget asks for: corrected within four structures."""
    best, trials = calibrate(1.5, trial_of(lambda budget: 1 + bias * (1 / budget - 1)), floor=0.05)
    assert abs(best.measured / 1.5 - 1) <= 0.04 and len(trials) <= 4
    assert trials[0].budget == pytest.approx(1 / 1.5)
    if bias == 1.0:
        assert len(trials) == 1


def test_calibration_stops_at_the_floor_and_returns_the_closest():
    best, trials = calibrate(3.0, trial_of(lambda budget: min(1.6, 1 / budget)), floor=0.4)
    assert all(trial.budget >= 0.4 for trial in trials) and best.measured == pytest.approx(1.6)
    assert len(trials) <= 4


# ---- the table ------------------------------------------------------------------------------------------
def test_table_is_measured_once_and_read_from_its_cache(tmp_path, fake_timer):
    import architectures

    model = architectures.resnet_bottleneck()
    analysis, sizes, feed = analysed(model)
    measured = measure_table(model, analysis, sizes, choose_device("cpu"), feed=feed, batch=1, cache=tmp_path)
    assert not measured.cached and measured.path and len(list(tmp_path.glob("latency-*.json"))) == 1
    prunable = {size.name for size in sizes if size.in_groups or size.out_groups}
    assert set(measured.curves) == prunable
    assert measured.step == STAIR  # the fake kernels' staircase
    again = measure_table(model, analysis, sizes, choose_device("cpu"), feed=feed, batch=1, cache=tmp_path)
    assert again.cached and again.curves == measured.curves and again.model_ms == measured.model_ms
    other_batch = measure_table(model, analysis, sizes, choose_device("cpu"), feed=feed, batch=4, cache=tmp_path)
    assert not other_batch.cached and len(list(tmp_path.glob("latency-*.json"))) == 2
    predict = measured.predictor(sizes)
    full = {str(group.id): group.width for group in analysis.prunable_groups}
    assert predict(full) == pytest.approx(measured.model_ms)
    halved = {name: max(1, width // 2) for name, width in full.items()}
    assert predict(halved) < predict(full)


def test_an_unwritable_cache_is_a_note_not_an_error(tmp_path, fake_timer):
    import architectures

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    analysis, sizes, feed = analysed(architectures.vgg())
    table = measure_table(architectures.vgg(), analysis, sizes, choose_device("cpu"), feed=feed, batch=1,
                          cache=blocked / "cache")
    assert table.path is None and any("could not be cached" in note for note in table.notes)


# ---- compress ------------------------------------------------------------------------------------------
def test_target_speedup_lands_and_the_model_equals_its_oracle(tmp_path, fake_timer):
    """compress(target_speedup=1.6): the report's measured speed-up is within the tolerance, the JSON says so,
    every layer's kept widths are listed, and the pruned model equals the original with the removed channels
    zeroed (recovery off)."""
    from test_refit import recovery_oracle
    from test_rewrite import assert_same_outputs, run

    arrays = digits_arrays()
    result = pfp_onnx.compress(str(MODEL), arrays, target_speedup=1.6, recovery="none", holdout=0.25,
                               latency_cache=tmp_path)
    latency = result.report.latency
    assert result.report.budget_of == "latency" and result.report.budget == pytest.approx(1 / 1.6)
    assert latency.target_speedup == pytest.approx(1.6)
    assert abs(latency.measured_speedup / 1.6 - 1) <= 0.04
    assert latency.measured_speedup == pytest.approx(latency.original_ms / latency.pruned_ms)
    assert 2 <= len(latency.trials) <= 8 and latency.step == STAIR and not latency.table_cached
    # both proxies were landed on the target, both structures recovered and verified, and the one with the
    # better held-out fidelity kept
    assert {trial.cost for trial in latency.trials} == {"latency", "macs"}
    landed = [trial for trial in latency.trials if abs(trial.measured / 1.6 - 1) <= 0.04]
    assert {trial.cost for trial in landed} == {"latency", "macs"}
    kept = [trial for trial in landed if trial.cost == latency.allocation_cost]
    assert kept and result.report.epsilon == pytest.approx(kept[0].epsilon)
    compared = {cost: (value, -error) for cost, value, detected, error in latency.compared}
    assert all(detected is None for _, _, detected, _ in latency.compared)  # a classifier
    assert set(compared) == {"latency", "macs"}
    assert compared[latency.allocation_cost] == max(compared.values())
    assert compared[latency.allocation_cost][0] == result.report.fidelity.value
    assert -compared[latency.allocation_cost][1] == result.report.verification.mean_relative_error
    line = render_latency(latency)
    if compared["latency"][0] != compared["macs"][0]:
        assert "the better held-out fidelity on target" in line
    else:
        assert "equal held-out fidelity on target" in line and "the smaller mean output error" in line
    kept = {row.node: row for row in result.report.layers}
    assert set(kept) == {layer.node for layer in result.analysis.layers}
    assert all(row.ms_after <= row.ms_before for row in kept.values() if row.ms_before is not None)
    assert any(row.out_kept < row.out_units for row in kept.values())
    document = json.loads(json.dumps(result.report.to_dict(), default=float))
    assert document["latency"]["measured_speedup"] == pytest.approx(latency.measured_speedup)
    metadata = {entry.key: entry.value for entry in result.model.metadata_props}
    assert metadata["pfp_onnx.budget_of"] == "latency"
    feed = {"input": arrays["input"][:5]}
    assert_same_outputs(run(result.model, feed), run(recovery_oracle(result), feed))
    again = pfp_onnx.compress(str(MODEL), arrays, budget=1 / 1.6, budget_of="latency", recovery="none",
                              holdout=0.25, latency_cache=tmp_path)
    assert again.report.latency.table_cached and again.report.layers == result.report.layers


def test_the_report_says_what_chose_the_structure():
    from pfp_onnx.report import LatencyReport

    base = dict(provider="CPUExecutionProvider", batch=1, threads=1, target_speedup=1.3, predicted_speedup=1.29,
                measured_speedup=1.3, original_ms=10.0, pruned_ms=7.7, step=16, table_seconds=1.0,
                table_cached=True, table_path=None, allocation_cost="macs")
    assert "the smaller error bound on target" in render_latency(LatencyReport(**base))
    differ = LatencyReport(**base, compared=(("latency", 0.8125, None, 0.02), ("macs", 0.9375, None, 0.03)))
    assert "the better held-out fidelity on target: latency 81.2%, macs 93.8%" in render_latency(differ)
    detector = LatencyReport(**base, compared=(("macs", 0.0, 0.97, 0.0315), ("latency", 0.0, 0.94, 0.0331)))
    assert ("equal held-out fidelity on target (0.0%), the better F1 of the original's detections: macs 97.0%, "
            "latency 94.0%") in render_latency(detector)
    tied = LatencyReport(**base, compared=(("macs", 0.0, None, 0.0315), ("latency", 0.0, None, 0.0331)))
    assert ("equal held-out fidelity on target (0.0%), the smaller mean output error: macs 0.0315, "
            "latency 0.0331") in render_latency(tied)


def test_without_held_out_points_the_smaller_error_bound_decides(tmp_path, fake_timer):
    """Nothing to compare the structures' fidelity on: of those on target, the smaller ε is built alone."""
    result = pfp_onnx.compress(str(MODEL), digits_arrays(), target_speedup=1.6, recovery="none", holdout=0,
                               latency_cache=tmp_path)
    latency = result.report.latency
    landed = [trial for trial in latency.trials if abs(trial.measured / 1.6 - 1) <= 0.04]
    assert len({trial.cost for trial in landed}) == 2 and not latency.compared
    assert result.report.epsilon == min(trial.epsilon for trial in landed)
    assert "the smaller error bound on target" in render_latency(result.report.latency)


def test_latency_options_that_contradict_are_refused(tmp_path):
    arrays = digits_arrays()
    for wrong, message in ((dict(target_speedup=1.5, budget=0.5), "leave out"),
                           (dict(target_speedup=1.5, budget_of="macs"), "leave out"),
                           (dict(target_speedup=0.8), "above 1"),
                           (dict(budget=0.5, budget_of="latency", latency_batch=0), "latency-batch")):
        with pytest.raises(OptionError, match=message):
            pfp_onnx.compress(str(MODEL), arrays, recovery="none", latency_cache=tmp_path, **wrong)


def test_an_impossible_speedup_is_refused_before_the_capture(tmp_path, fake_timer):
    with pytest.raises(BudgetError, match="speed-up"):
        pfp_onnx.compress(str(MODEL), digits_arrays(), target_speedup=1000.0, recovery="none",
                          latency_cache=tmp_path)


def test_target_speedup_on_the_command_line(tmp_path):
    """Real timings: the run succeeds, says the measured and predicted speed-ups, writes the allocation
    picture; --target-speedup with --budget is a user error that writes nothing."""
    pytest.importorskip("matplotlib")
    output, report, picture = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "allocation.png"
    done = run_cli("compress", str(MODEL), "--data", str(DATA), "--target-speedup", "1.2", "--recovery", "none",
                   "--latency-cache", str(tmp_path / "cache"), "-o", str(output), "--report", str(report),
                   "--plot", str(picture))
    assert done.returncode == 0, done.stderr
    assert "measured (target 1.20×" in done.stdout and "latency:" in done.stderr
    document = json.loads(report.read_text())
    assert document["budget_of"] == "latency" and document["latency"]["measured_speedup"] > 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(onnx.load(output))
    refused = run_cli("compress", str(MODEL), "--data", str(DATA), "--target-speedup", "1.2", "--budget", "0.5",
                      "-o", str(tmp_path / "no.onnx"))
    assert refused.returncode == 2 and "--target-speedup" in refused.stderr
    assert not (tmp_path / "no.onnx").exists() and "Traceback" not in refused.stderr


def test_sweep_by_latency_prints_speedups_and_keeps_the_csv_flat(tmp_path, fake_timer):
    from pfp_onnx.sweep import table_line, write_csv

    rows = pfp_onnx.sweep(str(MODEL), digits_arrays(), budgets=[0.8, 0.6], methods=[pfp_onnx.Method(recovery="none")],
                          budget_of="latency", latency_cache=tmp_path)
    pruned = [row for row in rows if row.method != "original"]
    assert all(row.speedup_measured and row.speedup_predicted and row.layers for row in pruned)
    assert table_line(pruned[0]).endswith("x")
    write_csv(rows, tmp_path / "sweep.csv")
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0]
    assert "speedup_measured" in header and "layers" not in header
    assert math.isclose(1 / pruned[0].budget, 1.25)


def test_the_allocation_picture_shares_latency_even_where_a_layer_was_not_timed():
    from pfp_onnx.allocation_plot import layer_shares
    from pfp_onnx.report import LayerRow

    row = lambda ms, units: LayerRow(node="n", op="Conv", in_units=units, in_kept=units, out_units=units,  # noqa: E731
                                     out_kept=units, ms_before=ms, ms_after=ms)
    shares, label = layer_shares([row(3.0, 4), row(1.0, 8), row(None, 16)])
    assert shares == [75.0, 25.0, 0.0] and label == "share of layer latency (1 layer(s) not timed)"
    shares, label = layer_shares([row(None, 1), row(None, 3)])
    assert shares == [10.0, 90.0] and label.startswith("share of layer weights")


def test_the_reports_layer_rows_are_the_pruned_models_widths(tmp_path):
    """report.layers (the JSON's and the allocation picture's source) says what the pruned model holds: each
    Conv's kept output and input units are its weight's first two dimensions."""
    from pfp_onnx.allocation_plot import plot_allocation

    result = pfp_onnx.compress(str(MODEL), digits_arrays(), budget=0.5, recovery="none", holdout=0.25)
    weights = {init.name: tuple(init.dims) for init in result.model.graph.initializer}
    convs = {node.name: weights[node.input[1]] for node in result.model.graph.node if node.op_type == "Conv"}
    rows = [row for row in result.report.layers if row.op == "Conv"]
    assert rows and {row.node for row in rows} == set(convs)
    for row in rows:
        assert convs[row.node][:2] == (row.out_kept, row.in_kept), row.node
        assert row.ms_before is None and row.ms_after is None  # nothing was timed
    assert any(row.out_kept < row.out_units for row in rows)
    pytest.importorskip("matplotlib")
    plot_allocation([("budget 0.5", result.report.layers)], tmp_path / "allocation.png")
    assert (tmp_path / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
