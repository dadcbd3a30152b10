"""Sequential reconstruction (pfp_onnx.recovery.sequential): exact where nothing changed, never worse than one-pass
least squares on the data it fits, output layers given the original's spread, equal to its oracle, and
scheduled by depth."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pfp_onnx
from pfp_onnx.model import with_outputs
from pfp_onnx.pipeline import Method, prepare, prune
from pfp_onnx.recovery.least_squares import layer_features
from pfp_onnx.recovery.refit import as_out_by_features, bias_site, patches
from pfp_onnx.rewrite import rewrite
from pfp_onnx.runtime import choose_device, create_session
from pfp_onnx.recovery.sequential import (OUTPUT_STRETCH_LIMIT, SCORE_WEIGHT_FLOOR, RefitLayer, ScoreMoments,
                                          TargetMoments, by_depth, output_layers, refit_layers, refit_to_targets,
                                          sequential_replacements, sigmoid_scored)
from pfp_onnx.model import to_graph
from test_graph_fuzz import _Network
from test_rewrite import run
from zoo import ZOO, random_inputs

CPU = choose_device("cpu")
BATCH = 8


def test_refit_recovers_an_exact_linear_map():
    """Targets that are an exact affine map of the features give that map back, whatever the anchor."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)) + 3.0
    weights, offset = rng.normal(size=(4, 6)), rng.normal(size=4)
    targets = features @ weights.T + offset
    moments = TargetMoments(6, 4)
    for start in range(0, 500, 64):
        moments.update(features[start:start + 64].astype(np.float32), targets[start:start + 64].astype(np.float32))
    x_mean, y_mean = moments.means()
    centred = features - features.mean(axis=0)
    scatter = centred.T @ centred
    fitted, fitted_offset = refit_to_targets(scatter, moments.cross_scatter(), x_mean, y_mean, weights, ridge=1e-3)
    np.testing.assert_allclose(fitted, weights, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fitted_offset, offset, rtol=1e-4, atol=1e-3)
    # the ridge pulls towards the anchor: with ridge 0 a wrong anchor makes no difference
    exact, _ = refit_to_targets(scatter, moments.cross_scatter(), x_mean, y_mean, np.zeros_like(weights), ridge=0)
    np.testing.assert_allclose(exact, weights, rtol=1e-4, atol=1e-4)


def test_target_moments_do_not_depend_on_batching():
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(300, 5)).astype(np.float32), rng.normal(size=(300, 3)).astype(np.float32)
    whole, pieces = TargetMoments(5, 3), TargetMoments(5, 3)
    whole.update(features, targets)
    for start in range(0, 300, 7):
        pieces.update(features[start:start + 7], targets[start:start + 7])
    x64, y64 = features.astype(np.float64), targets.astype(np.float64)
    expected = (x64 - x64.mean(axis=0)).T @ (y64 - y64.mean(axis=0))
    for moments in (whole, pieces):
        np.testing.assert_allclose(moments.cross_scatter(), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(moments.means()[0], x64.mean(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("geometry", [
    ((1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),      # pointwise: the activation itself, no copy
    ((1, 1), (1, 1, 1, 1), (1, 1), (3, 3)),
    ((2, 1), (1, 0, 2, 1), (1, 2), (3, 2)),      # strides, uneven pads, dilation
    ((2,), (1, 1), (1,), (3,)),                  # a 1-D conv
])
def test_conv_moments_equal_the_unfolded_product(geometry):
    """Tap by tap on the padded input gives what the patch matrix gives, features ordered c·K + k."""
    from pfp_onnx.conv_geometry import padded_and_out
    from pfp_onnx.recovery.least_squares import ConvPatches

    strides, pads, dilations, kernel = geometry
    rng = np.random.default_rng(7)
    spatial = (7, 6)[:len(kernel)]
    conv = ConvPatches(strides, pads, dilations, kernel)
    _, out = padded_and_out(spatial, pads, dilations, kernel, strides)
    features, outputs = 3 * int(np.prod(kernel)), 4
    tapped, unfolded = TargetMoments(features, outputs), TargetMoments(features, outputs)
    for samples in (5, 2):
        activation = rng.normal(size=(samples, 3, *spatial)).astype(np.float32) + 1.5
        targets = rng.normal(size=(samples, outputs, *out)).astype(np.float32) + 4.0
        tapped.update_conv(activation, targets, conv)
        rows = np.moveaxis(targets, 1, -1).reshape(-1, outputs)
        unfolded.update(layer_features(activation, conv=conv), rows)
    assert tapped.count == unfolded.count == 7 * int(np.prod(out))
    np.testing.assert_allclose(tapped.cross_scatter(), unfolded.cross_scatter(), rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(tapped.means(), unfolded.means()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


def test_one_pass_per_depth():
    layers = [RefitLayer(None, "t", 1.0, 1.0, depth) for depth in (3, 0, 1, 1, 2)]
    assert [[layer.depth for layer in chunk] for chunk in by_depth(layers)] == [[0], [1, 1], [2], [3]]
    assert by_depth([]) == []


def test_depths_follow_the_graph():
    """In the residual miniature the projection shortcut and the block's first conv read the same tensor:
    one depth, one pass."""
    model = ZOO["residual"]()
    prepared = prepare(model, random_inputs(model, 16, seed=1), budgets=[0.5], methods=[Method()], holdout=0)
    result = prune(prepared, budget=0.5, method=Method(recovery="lstsq"))
    found = refit_layers(prepared.model, prepared.analysis, result.selections, result.replacements)
    by_node = {item.layer.node: item for item in found}
    inputs = {}
    for item in found:
        inputs.setdefault(item.layer.input, set()).add(item.depth)
    assert all(len(depths) == 1 for depths in inputs.values())
    assert len({item.depth for item in found}) < len(found), "layers reading one tensor share a depth"
    targets = {item.target for item in by_node.values()}
    assert len(targets) == len(found)


def test_unchanged_inputs_refit_to_the_original():
    """With nothing removed, marking the first layer as changed (to its own weights) re-fits every layer
    after it on inputs equal to the original's: the model computes what the original does."""
    model = ZOO["chain"]()
    data = random_inputs(model, 32, seed=3)
    prepared = prepare(model, data, budgets=[1.0], methods=[Method(recovery="sequential")], holdout=0)
    first = prepared.analysis.layers[0]
    weight = next(node for node in to_graph(prepared.model).nodes if node.name == first.node).inputs[1].values
    changes = sequential_replacements(prepared.model, prepared.original, prepared.analysis, {},
                                      {(first.node, 1): np.asarray(weight)},
                                      lambda: prepared.sensitivity_part.batches(8), CPU)
    assert len({node for node, _ in changes}) > 2, "the layers after the first were re-fitted"
    feed = random_inputs(model, 5, seed=4)
    got, = run(rewrite(prepared.model, prepared.analysis, {}, changes), feed)
    want, = run(model, feed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _layer_error(layer: RefitLayer, matrix: np.ndarray, bias: np.ndarray, features: np.ndarray,
                 targets: np.ndarray) -> float:
    return float(np.sum((features @ matrix.T * layer.alpha + bias * layer.beta - targets) ** 2))


def _effective(prepared, changes, selections, layer: RefitLayer) -> tuple[np.ndarray, np.ndarray]:
    """A layer's weights over the features its pruned input holds, and its bias, as the pruned model has them."""
    from pfp_onnx.recovery.refit import kept_features

    nodes = {node.name: node for node in to_graph(prepared.model).nodes}
    node = nodes[layer.layer.node]
    weight = changes.get((node.name, 1), np.asarray(node.inputs[1].values))
    site, index = bias_site(node)
    bias = changes.get((site.name, index), np.asarray(site.inputs[index].values))
    kept, scale = kept_features(prepared.analysis, selections, layer.layer)
    order = np.argsort(kept)
    matrix = as_out_by_features(np.asarray(weight), layer.layer)[:, kept[order]] * scale[order]
    return matrix, np.asarray(bias, np.float64).reshape(-1)


def _tensors(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named tensors over `feeds`, run in the batches of BATCH the re-fit saw (a graph may mix the
    points of a batch: a Softmax over axis 0)."""
    names = list(dict.fromkeys(names))
    session = create_session(with_outputs(model, names), CPU)
    count = len(next(iter(feeds.values())))
    parts = [session.run(names, {key: value[start:start + BATCH] for key, value in feeds.items()})
             for start in range(0, count, BATCH)]
    return {name: np.concatenate([part[index] for part in parts]) for index, name in enumerate(names)}


def _never_worse(model: onnx.ModelProto, budget: float, seed: int) -> None:
    """On the points it fits, each sequentially re-fitted layer reproduces the original's pre-activation at
    least as well as its one-pass weights do, both reading the same (final) pruned inputs. This is the
    least-squares re-fit's property (sequential-ls); the default then stretches the output layers on purpose
    (test_output_layers_get_the_originals_spread) and leaves every other layer as this fits it."""
    data = random_inputs(model, 24, seed=seed)
    prepared = prepare(model, data, budgets=[budget], methods=[Method(recovery="sequential")], holdout=0,
                       batch_size=BATCH)
    one_pass = prune(prepared, budget=budget, method=Method(recovery="lstsq"))
    selections = one_pass.selections
    sequential = sequential_replacements(prepared.model, prepared.original, prepared.analysis, selections,
                                         one_pass.replacements, lambda: prepared.sensitivity_part.batches(BATCH), CPU,
                                         match_outputs=False)
    layers = refit_layers(prepared.model, prepared.analysis, selections, one_pass.replacements)
    if not layers:
        return
    pruned = rewrite(prepared.model, prepared.analysis, selections, sequential)
    received = _tensors(pruned, [item.layer.input for item in layers], data)
    wanted = _tensors(prepared.original, [item.target for item in layers], data)
    for item in layers:
        features = layer_features(received[item.layer.input], conv=patches(item.layer)).astype(np.float64)
        target = wanted[item.target]
        rows = (np.moveaxis(target, 1, -1) if item.layer.conv is not None else target)
        rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
        errors = [_layer_error(item, *_effective(prepared, changes, selections, item), features, rows)
                  for changes in (sequential, one_pass.replacements)]
        assert errors[0] <= errors[1] * (1 + 1e-4) + 1e-6, (item.layer.node, errors)


@pytest.mark.parametrize("name", ["chain", "residual", "mlp3d", "paddle_batch"])
def test_never_worse_than_one_pass_on_the_zoo(name):
    _never_worse(ZOO[name](), 0.4, seed=1)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), seed=st.integers(0, 2**16), budget=st.sampled_from([0.3, 0.5, 0.7]))
def test_never_worse_than_one_pass_on_random_graphs(data, seed, budget):
    model = _Network(data, seed).build()
    try:
        pfp_onnx.analyze(model, random_inputs(model, 1, seed))
        _never_worse(model, budget, seed)
    except pfp_onnx.PfpError:  # nothing prunable, or an infeasible budget for this graph
        assume(False)


def test_output_layers_are_the_last_layers_before_an_output():
    """A YOLO-style head: the class conv feeds a Sigmoid and a Concat into the output, so it is an output
    layer; the box conv feeds a Softmax and the DFL conv, which is the output layer of that branch."""
    from onnx import TensorProto, helper, numpy_helper

    weight = lambda name, shape: numpy_helper.from_array(np.ones(shape, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["stem"], name="stem"),
             helper.make_node("Relu", ["stem"], ["feature"], name="act"),
             helper.make_node("Conv", ["feature", "w_cls"], ["cls"], name="cls"),
             helper.make_node("Sigmoid", ["cls"], ["scores"], name="sigmoid"),
             helper.make_node("Conv", ["feature", "w_box"], ["box"], name="box"),
             helper.make_node("Softmax", ["box"], ["bins"], name="softmax", axis=1),
             helper.make_node("Conv", ["bins", "w_dfl"], ["dist"], name="dfl"),
             helper.make_node("Concat", ["dist", "scores"], ["y"], name="concat", axis=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weight("w_stem", [8, 3, 1, 1]), weight("w_cls", [2, 8, 1, 1]),
                               weight("w_box", [16, 8, 1, 1]), weight("w_dfl", [1, 16, 1, 1])])
    assert output_layers(helper.make_model(graph)) == {"cls", "dfl"}
    assert output_layers(ZOO["chain"]()) == {"logits"}
    # of those, only the class conv's values all become probabilities
    assert sigmoid_scored(helper.make_model(graph)) & output_layers(helper.make_model(graph)) == {"cls"}
    assert not sigmoid_scored(ZOO["chain"]()) and sigmoid_scored(_with_sigmoid(ZOO["chain"]())) == {"logits"}


def _with_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its output's values squashed into probabilities (a multi-label head)."""
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Sigmoid", [logits], ["scores"], name="squash"))
    model.graph.output[0].name = "scores"
    return model


def test_score_moments_are_a_weighted_least_squares():
    """Each output's weighted fit, streamed in pieces, equals least squares on rows scaled by the square
    root of σ'(y) + SCORE_WEIGHT_FLOOR, computed whole."""
    rng = np.random.default_rng(8)
    features = rng.normal(size=(400, 5)) + 1.0
    logits = features @ rng.normal(size=(5, 3)) * 2 - 3 + rng.normal(size=(400, 3))  # not an exact map
    moments = ScoreMoments(5, 3)
    for start in range(0, 400, 37):
        moments.update(features[start:start + 37], logits[start:start + 37])
    fitted, offset = moments.refit(np.zeros((3, 5)), ridge=0)
    probability = 1 / (1 + np.exp(-logits))
    weight = probability * (1 - probability) + SCORE_WEIGHT_FLOOR
    design = np.hstack([features, np.ones((400, 1))])
    for output in range(3):
        root = np.sqrt(weight[:, output:output + 1])
        solution = np.linalg.lstsq(design * root, logits[:, output] * root[:, 0], rcond=None)[0]
        np.testing.assert_allclose(fitted[output], solution[:5], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(offset[output], solution[5], rtol=1e-4, atol=1e-5)


def _pruned(model: onnx.ModelProto, points: int, seed: int):
    """Points for `model`, its preparation for sequential recovery, and its one-pass pruning at budget 0.4."""
    data = random_inputs(model, points, seed=seed)
    prepared = prepare(model, data, budgets=[0.4], methods=[Method(recovery="sequential")], holdout=0,
                       batch_size=BATCH)
    return data, prepared, prune(prepared, budget=0.4, method=Method(recovery="lstsq"))


def _refit(prepared, one_pass, **options):
    """The sequential re-fit of a one-pass pruning, over the preparation's points."""
    return sequential_replacements(prepared.model, prepared.original, prepared.analysis, one_pass.selections,
                                   one_pass.replacements, lambda: prepared.sensitivity_part.batches(BATCH), CPU,
                                   **options)


@pytest.mark.parametrize("name", ["chain", "residual"])
def test_output_layers_get_the_originals_spread(name):
    """The default re-fit equals least squares alone (sequential-ls) in every layer but the output layers,
    whose pre-activation on the calibration points then has, channel by channel, the original's mean and the
    original's standard deviation, as far as a stretch in [1, OUTPUT_STRETCH_LIMIT] of the fit reaches."""
    data, prepared, one_pass = _pruned(ZOO[name](), 48, seed=5)
    matched, plain = (_refit(prepared, one_pass, match_outputs=match) for match in (True, False))
    layers = refit_layers(prepared.model, prepared.analysis, one_pass.selections, one_pass.replacements)
    outputs = [item for item in layers if item.layer.node in output_layers(prepared.model)]
    assert outputs, "an output layer is re-fitted"
    others = {node for node, _ in plain} - {item.layer.node for item in outputs}
    for key in plain:
        if key[0] in others:
            np.testing.assert_array_equal(matched[key], plain[key])
    targets = [item.target for item in outputs]
    want = _tensors(prepared.original, targets, data)
    got = _tensors(rewrite(prepared.model, prepared.analysis, one_pass.selections, matched), targets, data)
    fitted = _tensors(rewrite(prepared.model, prepared.analysis, one_pass.selections, plain), targets, data)
    stretched = 0
    for target in targets:
        axes = tuple(axis for axis in range(want[target].ndim) if axis != 1)
        spread = {key: values[target].astype(np.float64).std(axis=axes) for key, values in
                  (("want", want), ("got", got), ("fitted", fitted))}
        np.testing.assert_allclose(got[target].mean(axis=axes), want[target].mean(axis=axes), rtol=1e-3,
                                   atol=1e-4 * np.abs(want[target]).max())
        expected = np.clip(spread["want"], spread["fitted"], OUTPUT_STRETCH_LIMIT * spread["fitted"])
        np.testing.assert_allclose(spread["got"], expected, rtol=2e-3)
        stretched += int(np.sum(spread["got"] > spread["fitted"] * 1.01))
    assert stretched, "some output channel was stretched"


def test_compress_reports_the_refit_as_one_stage():
    """Every pass over the points counts towards one "refit" stage whose total is points × passes."""
    model = ZOO["residual"]()
    events = []
    result = pfp_onnx.compress(model, random_inputs(model, 24, seed=1), budget=0.5, recovery="sequential",
                               holdout=0.25, progress=lambda stage, done, total: events.append((stage, done, total)))
    assert list(dict.fromkeys(stage for stage, _, _ in events)) == ["capture", "refit", "verify"]
    refit = [(done, total) for stage, done, total in events if stage == "refit"]
    assert refit[0][0] == 0 and refit[-1][0] == refit[-1][1] and refit[-1][1] % 18 == 0  # 18 points a pass
    assert result.report.method == "pfp/pfp/sequential" and "refit" in result.report.seconds


def test_a_depth_that_does_not_fit_keeps_its_largest_layers_one_pass():
    """With room for the statistics of only the smallest layer of a depth, the others keep their one-pass
    weights and a note says which; the model still equals its oracle."""
    from pfp_onnx.recovery.sequential import statistics_bytes

    model = ZOO["residual"]()
    data = random_inputs(model, 16, seed=1)
    prepared = prepare(model, data, budgets=[0.5], methods=[Method(recovery="sequential")], holdout=0)
    one_pass = prune(prepared, budget=0.5, method=Method(recovery="lstsq"))
    layers = refit_layers(prepared.model, prepared.analysis, one_pass.selections, one_pass.replacements)
    sizes = sorted(statistics_bytes(item.layer, prepared.analysis, one_pass.selections) for item in layers)
    notes: list[str] = []
    changes = sequential_replacements(prepared.model, prepared.original, prepared.analysis, one_pass.selections,
                                      one_pass.replacements, lambda: prepared.sensitivity_part.batches(BATCH), CPU,
                                      memory_limit=sizes[0], notes=notes)
    skipped = [item.layer.node for item in layers
               if statistics_bytes(item.layer, prepared.analysis, one_pass.selections) > sizes[0]]
    assert skipped and len(notes) == 1 and f"{len(skipped)} layer(s) kept their one-pass" in notes[0]
    for node in skipped:  # untouched: the one-pass weights
        np.testing.assert_array_equal(changes.get((node, 1)), one_pass.replacements.get((node, 1)))
    refitted = [item.layer.node for item in layers if item.layer.node not in skipped]
    assert refitted and all(one_pass.replacements.get((node, 1)) is None
                            or not np.array_equal(changes[(node, 1)], one_pass.replacements[(node, 1)])
                            for node in refitted)


def test_a_layer_with_too_few_rows_per_feature_keeps_its_one_pass_weights():
    """chain's dense layers see one row per point: on 24 points, gemm1's 54 features would be fitted to the
    points themselves, so it keeps its one-pass weights; its convs, with many positions a point, are re-fitted."""
    from pfp_onnx.recovery.sequential import MIN_ROWS_PER_FEATURE

    model = ZOO["chain"]()
    prepared = prepare(model, random_inputs(model, 24, seed=2), budgets=[0.5], methods=[Method(recovery="sequential")],
                       holdout=0)
    one_pass = prune(prepared, budget=0.5, method=Method(recovery="lstsq"))
    layers = {item.layer.node: item for item in refit_layers(prepared.model, prepared.analysis, one_pass.selections,
                                                              one_pass.replacements)}
    assert "gemm1" in layers and 24 * layers["gemm1"].layer.positions < MIN_ROWS_PER_FEATURE * 54
    run_with = lambda points: sequential_replacements(  # noqa: E731
        prepared.model, prepared.original, prepared.analysis, one_pass.selections, one_pass.replacements,
        lambda: prepared.sensitivity_part.batches(BATCH), CPU, points=points)
    counted, uncounted = run_with(24), run_with(None)
    np.testing.assert_array_equal(counted[("gemm1", 1)], one_pass.replacements[("gemm1", 1)])
    assert not np.array_equal(uncounted[("gemm1", 1)], one_pass.replacements[("gemm1", 1)])
    convs = [node for node, item in layers.items() if item.layer.conv is not None]
    assert convs and all(not np.array_equal(counted[(node, 1)], one_pass.replacements.get((node, 1), np.zeros(0)))
                         for node in convs)


def test_an_output_of_probabilities_is_fitted_where_they_change():
    """An output layer under a Sigmoid is fitted to the original's logits by σ'-weighted least squares on
    what it really receives: the rewritten model's logits equal that fit computed from the tensors, and its
    weighted error is below plain least squares' (sequential-ls), which fits the logits alike everywhere."""
    data, prepared, one_pass = _pruned(_with_sigmoid(ZOO["residual"]()), 96, seed=6)
    scored, plain = (_refit(prepared, one_pass, ridge=0, match_outputs=match) for match in (True, False))
    item = next(item for item in refit_layers(prepared.model, prepared.analysis, one_pass.selections,
                                              one_pass.replacements) if item.layer.node == "logits")
    want = _tensors(prepared.original, [item.target], data)[item.target].astype(np.float64)
    pruned = {key: rewrite(prepared.model, prepared.analysis, one_pass.selections, changes)
              for key, changes in (("scored", scored), ("plain", plain))}
    got = {key: _tensors(value, [item.layer.input, item.target], data) for key, value in pruned.items()}
    received = got["scored"][item.layer.input].astype(np.float64)
    np.testing.assert_array_equal(received, got["plain"][item.layer.input])  # the same layers before it
    probability = 1 / (1 + np.exp(-want))
    weight = probability * (1 - probability) + SCORE_WEIGHT_FLOOR
    design = np.hstack([received, np.ones((len(received), 1))])
    expected = np.stack([design @ np.linalg.lstsq(design * np.sqrt(weight[:, [o]]),
                                                  want[:, o] * np.sqrt(weight[:, o]), rcond=None)[0]
                         for o in range(want.shape[1])], axis=1)
    np.testing.assert_allclose(got["scored"][item.target], expected, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    error = {key: np.sum(weight * (value[item.target] - want) ** 2) for key, value in got.items()}
    assert error["scored"] < error["plain"] * 0.999, error


def test_scores_that_would_not_fit_in_memory_keep_the_stretched_fit(monkeypatch):
    """Where the output layer's per-output Grams exceed a quarter of the memory the re-fit may take, it is
    fitted (and stretched) as if no Sigmoid followed it, and a note says so."""
    from pfp_onnx.recovery import sequential
    from pfp_onnx.recovery.refit import kept_features

    _, prepared, one_pass = _pruned(_with_sigmoid(ZOO["residual"]()), 48, seed=6)
    layer = next(layer for layer in prepared.analysis.layers if layer.node == "logits")
    features = len(kept_features(prepared.analysis, one_pass.selections, layer)[0])
    tight = 4 * 8 * 10 * features * features - 1  # a byte short of a quarter for 10 Grams of [F, F]
    notes: list[str] = []
    short, roomy = _refit(prepared, one_pass, memory_limit=tight, notes=notes), _refit(prepared, one_pass,
                                                                                     memory_limit=tight + 1, notes=[])
    assert any(note.startswith("logits is fitted by least squares on its logits, not weighted") for note in notes)
    assert not np.array_equal(short[("logits", 1)], roomy[("logits", 1)])
    monkeypatch.setattr(sequential, "sigmoid_scored", lambda model: set())
    np.testing.assert_array_equal(short[("logits", 1)], _refit(prepared, one_pass, memory_limit=tight,
                                                                notes=[])[("logits", 1)])
