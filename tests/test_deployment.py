"""Deployment options and guarantees of `pfp-onnx compress`: rounded widths, exclusions, preserved model
identity and metadata, a valid and deterministic output file, external data, and the in-memory API.

Every CLI run compresses a 40-point slice of the digits fixture (holdout 0.25), once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pfp_onnx
from test_cli import DATA, MODEL, run_cli

POINTS = 40
BUDGET = 0.5
EXCLUDED_NODE = "/block_c/conv1/Conv"  # reads one prunable group and produces another
GEMM_NODE = "/fc/Gemm"
METADATA = {"author": "pfp-onnx tests", "license": "MIT"}
MODEL_DOC, GRAPH_DOC = "A residual digits classifier.", "Graph documentation kept through pruning."
ADDED_KEYS = ("pfp_onnx.version", "pfp_onnx.budget", "pfp_onnx.method", "pfp_onnx.mode", "pfp_onnx.seed",
              "pfp_onnx.round_to", "pfp_onnx.budget_of")


def calibration_arrays() -> dict[str, np.ndarray]:
    with np.load(DATA) as archive:
        return {name: archive[name][:POINTS] for name in archive.files}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """The calibration slice, and a copy of the fixture that carries metadata and doc strings."""
    folder = tmp_path_factory.mktemp("deployment")
    data = folder / "calib.npz"
    np.savez(data, **calibration_arrays())
    model = onnx.load(str(MODEL))
    model.doc_string, model.graph.doc_string = MODEL_DOC, GRAPH_DOC
    for key, value in METADATA.items():
        model.metadata_props.add(key=key, value=value)
    documented = folder / "documented.onnx"
    onnx.save(model, str(documented))
    return {"folder": folder, "data": data, "model": documented}


@pytest.fixture(scope="module")
def compress_cli(workspace):
    """compress(name, *options) → (CompletedProcess, output path, report path); each name runs once."""
    runs = {}

    def run(name: str, *options, model: Path | None = None, budget: float = BUDGET):
        if name not in runs:
            output, report = workspace["folder"] / f"{name}.onnx", workspace["folder"] / f"{name}.json"
            done = run_cli("compress", model or workspace["model"], "--data", workspace["data"], "--budget", budget,
                           "--holdout", 0.25, "-o", output, "--report", report, "-q", *options)
            runs[name] = (done, output, report)
        return runs[name]

    return run


def succeeded(result) -> tuple[Path, dict]:
    done, output, report = result
    assert done.returncode == 0, done.stderr
    return output, json.loads(report.read_text())


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Node name → shape of its weight (second input), for Conv and Gemm nodes."""
    initializers = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return {node.name: initializers[node.input[1]] for node in model.graph.node if node.op_type in ("Conv", "Gemm")}


def run_model(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": calibration_arrays()["input"]})[0]


# ---- widths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [("--round-to", 8), ("--round-to", "AUTO"), ()],
                         ids=["8", "auto", "default"])
def test_round_to_keeps_widths_multiples_within_budget(compress_cli, options):
    """Every prunable group of the fixture has 32 or more channels, so auto (the default) rounds them like 8."""
    output, report = succeeded(compress_cli(f"round_{'_'.join(map(str, options))}", *options))
    assert not any("multiples of 8" in note for note in report["notes"]), report["notes"]
    pruned_groups = 0
    for row in report["groups"]:
        after, before = row["channels_after"], row["channels_before"]
        assert after % 8 == 0 or after == before, row
        assert after == before or before >= 16, row
        pruned_groups += after < before
    assert pruned_groups > 0, "budget 0.5 must prune some group"
    totals = report["totals"]
    assert totals["layer_weights_after"] <= BUDGET * totals["layer_weights_before"]
    metadata = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
    assert metadata["pfp_onnx.round_to"] == report["round_to"] == ("8" if options[1:] == (8,) else "auto")


@pytest.mark.parametrize("options, hint", [
    ({"round_to": 1}, "--round-to auto (the default) keeps"),
    ({"mode": "randomized"}, "--mode deterministic (with the default --round-to auto) keeps"),
    ({}, None),
    ({"round_to": 8}, None),
    ({"round_to": 16}, None),
])
def test_odd_pruned_widths_bring_a_hint(options, hint):
    """Widths that are not multiples of 8 run slowly on onnxruntime's CPU kernels and on tensor cores (often
    slower than the unpruned model): the result says so, with the option that avoids it, and only then."""
    arrays = calibration_arrays()
    result = pfp_onnx.compress(str(MODEL), {"input": arrays["input"]}, budget=BUDGET, holdout=0.25,
                               recovery="none", **options)
    widths = [row.channels_after for row in result.report.groups if row.channels_after < row.channels_before]
    odd = [width for width in widths if width % 8]
    notes = [note for note in result.notes if "multiples of 8" in note]
    assert result.report.notes == result.notes and list(result.report.to_dict()["notes"]) == list(result.notes)
    if hint is None:
        assert not odd and not notes
    else:
        assert odd, "the fixture at this budget must leave some odd width"
        assert len(notes) == 1 and hint in notes[0] and notes[0].startswith(f"{len(odd)} of the {len(widths)} ")


def test_round_to_with_randomized_mode_is_refused(compress_cli):
    done, output, report = compress_cli("round8_randomized", "--round-to", 8, "--mode", "randomized")
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert message.startswith("Error: ") and "\n" not in message and "--round-to" in message, message
    assert not output.exists() and not report.exists()


# ---- exclusions ---------------------------------------------------------------------------------------
def test_exclude_node_keeps_its_channels(compress_cli):
    original = weight_shapes(onnx.load(str(MODEL)))
    baseline, _ = succeeded(compress_cli("baseline"))
    assert weight_shapes(onnx.load(str(baseline)))[EXCLUDED_NODE] != original[EXCLUDED_NODE], \
        "the excluded node must be one that pruning would otherwise change"
    output, report = succeeded(compress_cli("exclude_node", "--exclude", EXCLUDED_NODE))
    shapes = weight_shapes(onnx.load(str(output)))
    assert shapes[EXCLUDED_NODE] == original[EXCLUDED_NODE]
    assert shapes != original, "the rest of the model is still pruned"
    assert report["totals"]["layer_weights_after"] <= BUDGET * report["totals"]["layer_weights_before"]
    # Excluding this node leaves too little prunable for widths rounded to 8 (smallest such budget 0.541):
    # --round-to auto gives way to 1 rather than refuse a budget the exact allocation meets, and says so.
    notes = [note for note in report["notes"] if "left unrounded" in note]
    assert len(notes) == 1 and notes[0].startswith(f"budget {BUDGET:g} is below"), report["notes"]
    assert not any("multiples of 8 (" in note for note in report["notes"]), "no hint towards rounding in vain"
    metadata = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
    assert metadata["pfp_onnx.round_to"] == report["round_to"] == "1"


def test_exclude_op_keeps_gemm_weights(compress_cli):
    original = weight_shapes(onnx.load(str(MODEL)))
    baseline, _ = succeeded(compress_cli("baseline"))
    assert weight_shapes(onnx.load(str(baseline)))[GEMM_NODE] != original[GEMM_NODE], \
        "without the exclusion, the Gemm's input features are pruned"
    output, _ = succeeded(compress_cli("exclude_gemm", "--exclude-op", "Gemm"))
    pruned = onnx.load(str(output))
    gemm_shapes = {name: shape for name, shape in weight_shapes(pruned).items()
                   if next(n for n in pruned.graph.node if n.name == name).op_type == "Gemm"}
    assert gemm_shapes and all(shape == original[name] for name, shape in gemm_shapes.items())


# ---- identity, metadata and validity of the output ----------------------------------------------------
def test_output_keeps_model_identity_and_adds_metadata(compress_cli, workspace):
    output, _ = succeeded(compress_cli("baseline"))
    source, pruned = onnx.load(str(workspace["model"])), onnx.load(str(output))
    assert list(pruned.opset_import) == list(source.opset_import)
    assert pruned.ir_version == source.ir_version
    assert pruned.producer_name == source.producer_name
    assert pruned.doc_string == MODEL_DOC and pruned.graph.doc_string == GRAPH_DOC
    metadata = {prop.key: prop.value for prop in pruned.metadata_props}
    assert {key: metadata.get(key) for key in METADATA} == METADATA
    assert set(ADDED_KEYS) <= set(metadata)
    assert metadata["pfp_onnx.version"] == pfp_onnx.__version__
    assert float(metadata["pfp_onnx.budget"]) == BUDGET
    assert metadata["pfp_onnx.mode"] == "deterministic" and metadata["pfp_onnx.seed"] == "0"
    assert metadata["pfp_onnx.method"].startswith("pfp/") and metadata["pfp_onnx.budget_of"] == "weights"


def test_output_passes_full_checker_and_strict_shape_inference(compress_cli):
    output, _ = succeeded(compress_cli("baseline"))
    onnx.checker.check_model(str(output), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(str(output)), strict_mode=True)
    assert run_model(output).shape == (POINTS, 10)


# ---- determinism ------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(compress_cli):
    first, _ = succeeded(compress_cli("baseline"))
    second, _ = succeeded(compress_cli("baseline_again"))
    assert first.read_bytes() == second.read_bytes()


def test_randomized_mode_is_deterministic_per_seed(compress_cli):
    first, _ = succeeded(compress_cli("randomized_5", "--mode", "randomized", "--seed", 5))
    second, _ = succeeded(compress_cli("randomized_5_again", "--mode", "randomized", "--seed", 5))
    other, _ = succeeded(compress_cli("randomized_6", "--mode", "randomized", "--seed", 6))
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()


# ---- external data ----------------------------------------------------------------------------------
def test_external_data_writes_model_and_data_file(tmp_path, workspace):
    output = tmp_path / "out.onnx"
    done = run_cli("compress", workspace["model"], "--data", workspace["data"], "--budget", BUDGET,
                   "--holdout", 0.25, "-o", output, "--external-data", "-q")
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx.data").stat().st_size > output.stat().st_size
    loaded = onnx.load(str(output))  # external data loaded from beside the model
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in loaded.graph.initializer)
    onnx.checker.check_model(str(output), full_check=True)
    assert run_model(output).shape == (POINTS, 10)


# ---- Python API ---------------------------------------------------------------------------------------
def test_api_accepts_model_proto_and_arrays():
    model = onnx.load(str(MODEL))
    before = model.SerializeToString()
    arrays = calibration_arrays()
    result = pfp_onnx.compress(model, {"input": arrays["input"], "labels": arrays["labels"]}, budget=0.6,
                               holdout=0.25)
    assert isinstance(result.model, onnx.ModelProto)
    assert model.SerializeToString() == before, "the caller's ModelProto is not modified"
    totals = result.report.totals
    assert totals.layer_weights_after <= 0.6 * totals.layer_weights_before
    assert result.report.verification is not None and result.report.verification.points == POINTS // 4
    onnx.checker.check_model(result.model, full_check=True)
    fc_weight = next(init for init in result.model.graph.initializer if init.name == "fc.weight")
    assert numpy_helper.to_array(fc_weight).shape[0] == 10


def test_node_doc_strings_survive():
    model = onnx.load(str(MODEL))
    for node in model.graph.node:
        node.doc_string = f"documentation of {node.name}"
    arrays = calibration_arrays()
    result = pfp_onnx.compress(model, {"input": arrays["input"]}, budget=0.6, holdout=0.25, recovery="none")
    docs = {node.name: node.doc_string for node in result.model.graph.node}
    assert all(docs[node.name] == node.doc_string for node in model.graph.node if node.name in docs)


@pytest.mark.parametrize("recovery", ["none", "lstsq"])
def test_nodes_sharing_a_name_are_renamed_not_refused(recovery):
    """onnxruntime refuses two nodes of one name, though the checker accepts them: compress names them as the
    pruned model would anyway, and prunes exactly what it prunes in the same model with its own names."""
    named = onnx.load(str(MODEL))
    shared = onnx.load(str(MODEL))
    for node in shared.graph.node:
        node.name = "node"
    before = shared.SerializeToString()
    arrays = {"input": calibration_arrays()["input"]}
    results = [pfp_onnx.compress(model, arrays, budget=0.5, holdout=0.25, recovery=recovery)
               for model in (named, shared)]
    assert shared.SerializeToString() == before, "the caller's ModelProto is not modified"
    names = [node.name for node in results[1].model.graph.node]
    assert len(set(names)) == len(names)
    kept = [{group: selection.kept.tolist() for group, selection in result.selections.items()} for result in results]
    assert kept[0] == kept[1]
    outputs = [ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
               .run(None, arrays)[0] for result in results]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_fixed_batch_models_run_whole_batches_only():
    """A model exported with batch dimension 8 runs nothing else: compress and evaluate feed it whole batches
    and say how many points did not fill one (40 points, holdout 0.25: 30 → 24 and 10 → 8)."""
    model = onnx.load(str(MODEL))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 8
    arrays = calibration_arrays()
    # analysed at its own batch of 8 (the Gemm's [8, 10] output is 1 row per point, not 8): the same
    # positions, MACs and error bounds as the dynamic-batch original
    assert [layer.positions for layer in pfp_onnx.analyze(model, arrays).layers] == \
        [layer.positions for layer in pfp_onnx.analyze(str(MODEL), arrays).layers]
    result = pfp_onnx.compress(model, arrays, budget=0.6, holdout=0.25)
    assert result.report.sensitivity_points == 24 and result.report.verification.points == 8
    assert any("batches of exactly 8 points: 8 calibration point(s)" in note for note in result.notes)
    dims = [dim.dim_value for dim in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 8
    assert pfp_onnx.evaluate(model, result.model, arrays).points == 40
    assert pfp_onnx.evaluate(model, result.model, {name: values[:37] for name, values in arrays.items()}).points == 32

    def streamed():  # batches of 10 points, whose parts are re-cut into batches of 8 as they stream
        return ({name: values[start:start + 10] for name, values in arrays.items()} for start in range(0, 40, 10))

    result = pfp_onnx.compress(model, streamed, budget=0.6, holdout=0.25)
    assert result.report.sensitivity_points % 8 == 0 and result.report.verification.points % 8 == 0
    assert result.report.sensitivity_points >= 24


# ---- a MAC budget --------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["pfp", "uniform"])
def test_mac_budget_bounds_the_macs_and_prunes_to_the_oracle(allocation):
    """--budget-of macs counts each weight once per output position (docs/method.md §3): the MACs per point meet
    the budget, not necessarily the weights; the header, the JSON report and the metadata say which; the
    pruned model equals the original with the removed channels zeroed."""
    from test_refit import recovery_oracle
    from test_rewrite import assert_same_outputs, run

    arrays = {"input": calibration_arrays()["input"]}
    by_macs = pfp_onnx.compress(str(MODEL), arrays, budget=0.4, budget_of="macs", allocation=allocation,
                                holdout=0.25)
    by_weights = pfp_onnx.compress(str(MODEL), arrays, budget=0.4, allocation=allocation, holdout=0.25)
    macs, weights = by_macs.report.totals, by_weights.report.totals
    assert macs.macs_after <= 0.4 * macs.macs_before < weights.macs_after  # the weight budget keeps more MACs
    assert weights.layer_weights_after <= 0.4 * weights.layer_weights_before
    # the MACs sit in the early, high-resolution layers: a MAC budget spends its weights there less
    assert macs.layer_weights_after != weights.layer_weights_after
    assert by_macs.report.budget_of == "macs" and by_macs.report.to_dict()["budget_of"] == "macs"
    assert by_weights.report.budget_of == "weights"
    assert "budget=0.4 of MACs " in pfp_onnx.report.render_table(by_macs.report).splitlines()[0]
    assert "budget=0.4 " in pfp_onnx.report.render_table(by_weights.report).splitlines()[0]
    metadata = {entry.key: entry.value for entry in by_macs.model.metadata_props}
    assert metadata["pfp_onnx.budget_of"] == "macs"
    feed = {"input": arrays["input"][:5]}
    assert_same_outputs(run(by_macs.model, feed), run(recovery_oracle(by_macs), feed))


def test_mac_budget_on_the_command_line(compress_cli):
    output, report = succeeded(compress_cli("macs", "--budget-of", "macs", budget=0.3))
    totals = report["totals"]
    assert totals["macs_after"] <= 0.3 * totals["macs_before"] and report["budget_of"] == "macs"
    done, output, report = compress_cli("macs_word", "--budget-of", "flops")
    assert done.returncode == 2 and "--budget-of" in done.stderr and not output.exists() and not report.exists()


def test_infeasible_mac_budget_names_macs(compress_cli):
    done, output, report = compress_cli("macs_tiny", "--budget-of", "macs", budget=1e-5)
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert message.startswith("Error: ") and "\n" not in message and "prunable-layer MACs" in message, message
    assert not output.exists() and not report.exists()


def test_mac_budget_needs_known_output_sizes():
    """Without calibration shapes a dynamic model's output positions are unknown: a MAC budget is refused
    with a reason, never computed from guesses."""
    from pfp_onnx.pipeline import _layer_sizes

    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    analysis = pfp_onnx.analyze(model)
    assert any(layer.positions is None for layer in analysis.layers)
    assert _layer_sizes(analysis, "weights")  # weights need no positions
    with pytest.raises(pfp_onnx.errors.OptionError, match="--budget-of macs needs every layer's output size"):
        _layer_sizes(analysis, "macs", "the model")
    with pytest.raises(pfp_onnx.errors.OptionError, match="--budget-of takes weights or macs"):
        pfp_onnx.compress(str(MODEL), {"input": calibration_arrays()["input"]}, budget=0.5, budget_of="flops")
