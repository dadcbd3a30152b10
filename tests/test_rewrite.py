"""The rewrite against the zero-channel oracle (docs/method.md §6).

The pruned model must compute exactly what the original computes once every removed channel's entries
are zeroed at all its consumers and the kept entries multiplied by their scale. The oracle is built here,
independently of rewrite.py: it edits a copy of the original model's consumer weights in place of
cutting anything, so the two paths share nothing but the analysis.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from pfp_onnx.groups import ChannelAnalysis, analyse_channel_groups
from pfp_onnx.rewrite import block_indices, rewrite
from pfp_onnx.select import Selection
from zoo import ZOO, _GraphBuilder, extra_outputs, input_shapes, outer_scope_subgraph, random_inputs

SEEDS = (0, 1, 2)
RTOL, ATOL = 1e-4, 1e-5


# ---- helpers -------------------------------------------------------------------------------------------
def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the oracle leaves the original weights behind, unused
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant a node can read: initializers and Constant-node outputs."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_floats":
                values[node.output[0]] = np.array(attr.floats, dtype=np.float32)
    return values


def constant_input_sizes(model: onnx.ModelProto) -> dict[tuple[str, int], int]:
    """(node, input index) → element count, for every constant input of every non-Constant node."""
    values = constant_values(model)
    return {(node.name, index): values[name].size
            for node in model.graph.node if node.op_type != "Constant"
            for index, name in enumerate(node.input) if name in values}


def random_selections(analysis: ChannelAnalysis, seed: int, *, randomized: bool) -> dict[int, Selection]:
    """A non-empty random subset per prunable group: one channel, all but one, or anything between.

    Now and then a group is left out of the selections, which must leave it untouched.
    """
    rng = np.random.default_rng(seed)
    selections = {}
    for group in analysis.prunable_groups:
        kind = rng.integers(4)
        if kind == 3 and seed % 2:
            continue
        if kind == 0:
            count = 1
        elif kind == 1:
            count = max(group.width - 1, 1)
        else:
            count = int(rng.integers(1, group.width + 1))
        kept = np.sort(rng.choice(group.width, size=count, replace=False)).astype(np.int64)
        scale = (rng.uniform(0.25, 3.0, size=count) if randomized else np.ones(count)).astype(np.float32)
        selections[group.id] = Selection(kept=kept, scale=scale)
    return selections


def zeroed_oracle(model: onnx.ModelProto, analysis: ChannelAnalysis,
                  selections: dict[int, Selection]) -> onnx.ModelProto:
    """The original model with removed channels zeroed (and kept ones scaled) at every consumer.

    Each edited (node, input) gets its own new initializer, so a weight shared with another node (which
    may read it unpruned) is never changed under that node's feet.
    """
    oracle = onnx.ModelProto()
    oracle.CopyFrom(model)
    nodes = {node.name: node for node in oracle.graph.node}
    values = constant_values(model)
    edited: dict[tuple[str, int], np.ndarray] = {}
    for group_id, selection in selections.items():
        group = analysis.group(group_id)
        factor = np.zeros(group.width, dtype=np.float64)
        factor[selection.kept] = selection.scale
        for weight_slice in group.slices:
            if weight_slice.role != "consumer":
                continue
            key = (weight_slice.node, weight_slice.input_index)
            array = edited.get(key)
            if array is None:
                array = values[nodes[weight_slice.node].input[weight_slice.input_index]].astype(np.float64)
            shape = [1] * array.ndim
            shape[weight_slice.axis] = -1
            # channel c sits at (offset + c) along the axis (after a Concat, offset > 0) and owns entries
            # (offset + c)·block … (offset + c)·block + block - 1; other groups' entries stay as they are
            along = np.ones(array.shape[weight_slice.axis])
            start = weight_slice.offset * weight_slice.block
            along[start:start + group.width * weight_slice.block] = np.repeat(factor, weight_slice.block)
            edited[key] = array * along.reshape(shape)
    for (node_name, index), array in edited.items():
        node = nodes[node_name]
        name = f"{node.input[index]}__oracle__{node_name}__{index}"
        oracle.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
        node.input[index] = name
    onnx.checker.check_model(oracle)
    return oracle


def signature(infos) -> list[tuple[str, bytes]]:
    """Name and full type (element type, dims with dim_params) of graph inputs or outputs."""
    return [(info.name, info.type.SerializeToString(deterministic=True)) for info in infos]


def assert_same_outputs(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def prune_and_check(model: onnx.ModelProto, analysis: ChannelAnalysis, selections: dict[int, Selection],
                    feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """Rewrite, then hold the result to every contract the oracle test states; returns the pruned model."""
    before = model.SerializeToString()
    pruned = rewrite(model, analysis, selections)
    assert model.SerializeToString() == before, "rewrite changed its input model"
    onnx.checker.check_model(pruned, full_check=True)
    assert signature(pruned.graph.input) == signature(model.graph.input)
    assert signature(pruned.graph.output) == signature(model.graph.output)

    oracle = zeroed_oracle(model, analysis, selections)
    for feed in feeds:
        assert_same_outputs(run(pruned, feed), run(oracle, feed))

    original_sizes, pruned_sizes = constant_input_sizes(model), constant_input_sizes(pruned)
    split_nodes = {node.name for node in model.graph.node if node.op_type == "Split"}
    concat_nodes = {node.name for node in model.graph.node if node.op_type == "Concat"}
    for key, size in pruned_sizes.items():
        if key not in original_sizes:  # what a rewrite may add: equal Split parts written out, or a count
            # a shape's Concat read off another tensor, made a constant
            assert key[0] in split_nodes and key[1] == 1 or key[0] in concat_nodes and size == 1, \
                f"rewrite added constant input {key}"
            continue
        assert size <= original_sizes[key], f"constant input {key} grew from {original_sizes[key]} to {size}"
    removed = any(len(selection.kept) < analysis.group(group_id).width
                  for group_id, selection in selections.items())
    if removed:  # (an added Split sizes input can outweigh a removed channel of a tiny graph: not counted)
        assert sum(size for key, size in pruned_sizes.items() if key in original_sizes) < sum(original_sizes.values())
    return pruned


# ---- the oracle test over the zoo ----------------------------------------------------------------------
@pytest.mark.parametrize("randomized", [False, True], ids=["deterministic", "randomized"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruned_model_equals_zeroed_oracle(name, seed, randomized):
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    assert analysis.prunable_groups, f"zoo model {name} has nothing to prune"
    selections = random_selections(analysis, seed, randomized=randomized)
    prune_and_check(model, analysis, selections, [random_inputs(model, 3, seed), random_inputs(model, 1, 99)])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_keeping_every_channel_changes_nothing(name):
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    selections = {group.id: Selection(np.arange(group.width, dtype=np.int64), np.ones(group.width, np.float32))
                  for group in analysis.prunable_groups}
    pruned = rewrite(model, analysis, selections)
    feed = random_inputs(model, 2, 5)
    assert_same_outputs(run(pruned, feed), run(model, feed))
    assert constant_input_sizes(pruned) == constant_input_sizes(model)


@pytest.mark.parametrize("name", ["chain", "residual", "reshape_variants", "mlp3d", "shape_ops", "legacy_axes",
                                  "resize_sizes", "frozen_shape_ops", "concat_flatten"])
def test_single_channel_everywhere(name):
    """The harshest cut: every prunable group down to its last channel, with a non-trivial scale."""
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    selections = {group.id: Selection(np.array([group.width - 1], np.int64), np.array([1.5], np.float32))
                  for group in analysis.prunable_groups}
    prune_and_check(model, analysis, selections, [random_inputs(model, 2, 0)])


# ---- specific cases ------------------------------------------------------------------------------------
def test_flatten_block_slices_whole_channel_runs():
    """chain: conv3's 6 channels reach gemm1 as 6 runs of 9 features; keeping {1, 4} keeps 18 columns."""
    model = ZOO["chain"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    group = next(group for group in analysis.groups if group.producers == ("conv3",))
    pruned = prune_and_check(model, analysis, {group.id: Selection(np.array([1, 4]), np.ones(2, np.float32))},
                             [random_inputs(model, 2, 0)])
    weights = constant_values(pruned)
    gemm1 = next(node for node in pruned.graph.node if node.name == "gemm1")
    original = constant_values(model)["gemm1.weight"]
    np.testing.assert_array_equal(weights[gemm1.input[1]], original[:, np.r_[9:18, 36:45]])
    np.testing.assert_array_equal(block_indices(np.array([1, 4]), 9), np.r_[9:18, 36:45])


def test_concat_offsets_scale_with_the_flatten_block():
    """concat_flatten: conv_b's channels sit after conv_a's 4 in the Concat, so after the Flatten its channel
    c owns dense columns (4 + c)·4 … (4 + c)·4 + 3; keeping {0, 2} of conv_a and {1, 4} of conv_b keeps
    columns 0–3, 8–11, 20–23 and 32–35."""
    model = ZOO["concat_flatten"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    by_producer = {group.producers[0]: group for group in analysis.groups if len(group.producers) == 1}
    selections = {by_producer["conv_a"].id: Selection(np.array([0, 2]), np.ones(2, np.float32)),
                  by_producer["conv_b"].id: Selection(np.array([1, 4]), np.array([0.5, 2.0], np.float32))}
    pruned = prune_and_check(model, analysis, selections, [random_inputs(model, 3, 0)])
    dense = constant_values(pruned)[_node(pruned, "dense").input[1]]
    original = constant_values(model)["dense.weight"]
    expected = np.concatenate([original[:, np.r_[0:4, 8:12]], 0.5 * original[:, 20:24], 2.0 * original[:, 32:36]],
                              axis=1)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    np.testing.assert_array_equal(block_indices(np.array([1, 4]), 4, offset=4), np.r_[20:24, 32:36])


def test_explicit_reshape_width_is_rewritten():
    """reshape_variants: Reshape [-1, 24] becomes [-1, 4·kept]; [0, -1] needs no change."""
    model = ZOO["reshape_variants"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    by_producer = {group.producers[0]: group for group in analysis.groups}
    selections = {by_producer["conv_a"].id: Selection(np.array([0, 2, 5]), np.ones(3, np.float32)),
                  by_producer["conv_b"].id: Selection(np.array([3]), np.ones(1, np.float32))}
    pruned = prune_and_check(model, analysis, selections, [random_inputs(model, 2, 0)])
    values = constant_values(pruned)
    targets = {node.name: values[node.input[1]].tolist() for node in pruned.graph.node if node.op_type == "Reshape"}
    assert targets == {"flat_a": [-1, 12], "flat_b": [0, -1]}


def test_residual_coupled_group_prunes_both_branches_alike():
    model = ZOO["residual"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    stem_group = next(group for group in analysis.groups if "stem.conv" in group.producers)
    pruned = prune_and_check(model, analysis, {stem_group.id: Selection(np.array([0, 3, 7]), np.ones(3, np.float32))},
                             [random_inputs(model, 2, 0)])
    sizes = constant_input_sizes(pruned)
    assert sizes[("stem.conv", 1)] == 3 * 3 * 9 and sizes[("a.conv2", 1)] == 3 * 8 * 9
    assert sizes[("a.conv1", 1)] == 8 * 3 * 9 and sizes[("b.conv1", 1)] == 12 * 3 * 9
    assert sizes[("b.proj", 1)] == 12 * 3 * 1


def test_shared_weight_is_copied_not_cut_for_both_readers():
    """shared_weight: conv_a and conv_b read one initializer; pruning conv_a's output channels cuts
    conv_a's filters (axis 0) and conv_b's inputs (axis 1), which must land in two different tensors."""
    model = ZOO["shared_weight"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    first = next(group for group in analysis.groups if group.producers == ("conv_a",))
    selections = {first.id: Selection(np.array([1, 2]), np.array([0.5, 2.0], np.float32))}
    pruned = prune_and_check(model, analysis, selections, [random_inputs(model, 2, 0)])
    nodes = {node.name: node for node in pruned.graph.node}
    values = constant_values(pruned)
    shared = constant_values(model)["shared.weight"]
    conv_a, conv_b = values[nodes["conv_a"].input[1]], values[nodes["conv_b"].input[1]]
    assert nodes["conv_a"].input[1] != nodes["conv_b"].input[1]
    np.testing.assert_array_equal(conv_a, shared[[1, 2]])
    np.testing.assert_allclose(conv_b, shared[:, [1, 2]] * np.array([0.5, 2.0]).reshape(1, 2, 1, 1), rtol=1e-6)
    # conv_b's output channels were not pruned: its bias keeps all 4 entries, conv_a's keeps 2
    assert values[nodes["conv_a"].input[2]].shape == (2,) and values[nodes["conv_b"].input[2]].shape == (4,)


def test_oracle_keeps_shared_weight_intact_for_the_other_reader():
    """The oracle itself: zeroing conv_b's input slice must not zero conv_a's filters, which read the
    same initializer. Compared with a hand-made model in which conv_b alone gets the zeroed copy."""
    model = ZOO["shared_weight"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    first = next(group for group in analysis.groups if group.producers == ("conv_a",))
    oracle = zeroed_oracle(model, analysis, {first.id: Selection(np.array([0, 3]), np.ones(2, np.float32))})
    nodes = {node.name: node for node in oracle.graph.node}
    values = constant_values(oracle)
    assert nodes["conv_a"].input[1] == "shared.weight"
    np.testing.assert_array_equal(values["shared.weight"], constant_values(model)["shared.weight"])
    zeroed = values[nodes["conv_b"].input[1]]
    assert not zeroed[:, [1, 2]].any() and zeroed[:, [0, 3]].all()


def test_constant_node_weights_prune_and_dynamic_sizes_still_run():
    """constant_nodes_dynamic: weights live in Constant nodes and H, W are dynamic; the pruned model
    runs at spatial sizes other than the one the analysis saw, and still matches the oracle."""
    model = ZOO["constant_nodes_dynamic"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    by_producer = {group.producers[0]: group for group in analysis.groups}
    selections = {by_producer["conv1"].id: Selection(np.array([0, 5, 6]), np.ones(3, np.float32)),
                  by_producer["conv2"].id: Selection(np.array([2, 3]), np.array([1.25, 0.75], np.float32))}
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in [(2, 3, 8, 8), (1, 3, 11, 5)]]
    pruned = prune_and_check(model, analysis, selections, feeds)
    sizes = constant_input_sizes(pruned)
    assert sizes[("conv1", 1)] == 3 * 3 * 9 and sizes[("conv1", 2)] == 3
    assert sizes[("conv2", 1)] == 2 * 3 * 9 and sizes[("bn2", 1)] == 2 and sizes[("logits", 1)] == 5 * 2


def test_frozen_group_cannot_be_pruned():
    model = ZOO["frozen_cases"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    frozen = next(group for group in analysis.groups if not group.prunable)
    with pytest.raises(ValueError, match="frozen"):
        rewrite(model, analysis, {frozen.id: Selection(np.array([0]), np.ones(1, np.float32))})


def test_oracle_tells_a_wrong_cut_apart():
    """The oracle is only worth something if it notices when the kept channels are not the cut ones."""
    model = ZOO["chain"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    group = next(group for group in analysis.groups if group.producers == ("conv2",))
    pruned = rewrite(model, analysis, {group.id: Selection(np.array([0, 1, 2]), np.ones(3, np.float32))})
    wrong = zeroed_oracle(model, analysis, {group.id: Selection(np.array([0, 1, 3]), np.ones(3, np.float32))})
    feed = random_inputs(model, 4, 0)
    assert not np.allclose(run(pruned, feed)[0], run(wrong, feed)[0], rtol=RTOL, atol=ATOL)


def test_subgraph_reads_keep_graph_output_shapes():
    assert_graph_output_shapes_survive(outer_scope_subgraph())


def test_second_outputs_keep_graph_output_shapes():
    assert_graph_output_shapes_survive(extra_outputs())


def assert_graph_output_shapes_survive(model: onnx.ModelProto) -> None:
    """Prune every prunable group to two channels; every graph output must keep its shape."""
    analysis = analyse_channel_groups(model, input_shapes(model))
    selections = {group.id: Selection(np.array([0, 1]), np.ones(2, np.float32)) for group in analysis.prunable_groups}
    pruned = rewrite(model, analysis, selections)
    feed = random_inputs(model, 1, 0)
    assert [out.shape for out in run(pruned, feed)] == [out.shape for out in run(model, feed)]


# ---- counts of channels that shape operators carry -------------------------------------------------------
def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (found,) = [node for node in model.graph.node if node.name == name]
    return found


def _keep_first(analysis: ChannelAnalysis, counts: dict[str, int]) -> dict[int, Selection]:
    """Keep the first n channels of the group(s) of each named producer (one group per Split part)."""
    selections = {}
    for producer, count in counts.items():
        for group in analysis.groups:
            if producer in group.producers:
                selections[group.id] = Selection(np.arange(min(count, group.width)), np.ones(min(count, group.width),
                                                                                          np.float32))
    return selections


def test_split_sizes_are_written_out_when_implicit_and_rewritten_when_attributes():
    implicit = ZOO["shape_ops"]()
    analysis = analyse_channel_groups(implicit, input_shapes(implicit))
    pruned = prune_and_check(implicit, analysis, _keep_first(analysis, {"conv_f": 2}), [random_inputs(implicit, 2, 0)])
    sizes = constant_values(pruned)[_node(pruned, "split").input[1]]
    np.testing.assert_array_equal(sizes, [2, 2])

    legacy = ZOO["legacy_axes"]()
    analysis = analyse_channel_groups(legacy, input_shapes(legacy))
    pruned = prune_and_check(legacy, analysis, _keep_first(analysis, {"conv_b": 1}), [random_inputs(legacy, 2, 0)])
    (split,) = [attr for attr in _node(pruned, "split").attribute if attr.name == "split"]
    assert list(split.ints) == [1, 1]
    assert pruned.opset_import[0].version == 11


def test_resize_sizes_follow_the_pruned_width():
    model = ZOO["resize_sizes"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    pruned = prune_and_check(model, analysis, _keep_first(analysis, {"conv_a": 4}), [random_inputs(model, 2, 0)])
    np.testing.assert_array_equal(constant_values(pruned)[_node(pruned, "resize").input[3]], [2, 4, 8, 8])


def test_keeping_every_channel_leaves_counts_as_they_were():
    """A node whose channel counts all stay is not touched: implicit Split sizes stay implicit."""
    model = ZOO["shape_ops"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    pruned = rewrite(model, analysis, _keep_first(analysis, {"conv_a": 3}))
    assert list(_node(pruned, "split").input) == list(_node(model, "split").input)


def test_negative_slice_bounds_are_rewritten_when_later_channels_go():
    """Slice(-4, -3) takes channel 0 of 4. Pruning only channels after it leaves the slice's own counts as
    they were, but its bounds count from the end, which moved: they must still be rewritten."""
    b = _GraphBuilder("negative_slice", seed=0)
    h = b.conv("stem", b.input("x", ["N", 3, 8, 8]), 3, 4, kernel=1)
    bounds = [b.constant(name, [value], dtype=np.int64) for name, value in (("starts", -4), ("ends", -3), ("axes", 1))]
    taken = b.conv("conv_a", b.node("Slice", [h] + bounds, "slice"), 1, 2, kernel=1)
    h = b.node("Add", [taken, b.conv("conv_b", h, 4, 2, kernel=1)], "add")
    b.gemm("logits", b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten"), 2, 3)
    b.output("logits", ["N", 3])
    model = b.build()
    analysis = analyse_channel_groups(model, input_shapes(model))
    rest = next(group for group in analysis.prunable_groups if group.producers == ("stem",) and group.width == 3)
    prune_and_check(model, analysis, {rest.id: Selection(np.array([1]), np.ones(1, np.float32))},
                    [random_inputs(model, 2, 0)])


def _windows_added(width: int, first: int, second: int, size: int) -> onnx.ModelProto:
    """stem (width channels) → h[first:first+size] + h[second:second+size] → conv → logits."""
    b = _GraphBuilder("windows_added", seed=0)
    h = b.conv("stem", b.input("x", ["N", 3, 4, 4]), 3, width, kernel=1)
    windows = []
    for name, start in (("a", first), ("b", second)):
        bounds = [b.constant(f"{name}.{key}", [value], dtype=np.int64)
                  for key, value in (("starts", start), ("ends", start + size), ("axes", 1))]
        windows.append(b.node("Slice", [h] + bounds, name))
    h = b.node("Relu", [b.conv("conv", b.node("Add", windows, "add"), size, 4, kernel=1)], "relu")
    b.gemm("logits", b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten"), 4, 3)
    b.output("logits", ["N", 3])
    return b.build()


@pytest.mark.parametrize("width, first, second, size, coupled", [
    (6, 0, 1, 5, False),  # overlapping: channel c would be channel c + 1 of itself
    (7, 0, 2, 5, False),
    (6, 0, 3, 3, True),   # the two halves: channel c is channel c + 3, a group carried twice by h
    (8, 1, 5, 3, True),
])
def test_windows_of_one_tensor_added(width, first, second, size, coupled):
    model = _windows_added(width, first, second, size)
    analysis = analyse_channel_groups(model, input_shapes(model))
    stem_groups = [group for group in analysis.groups if "stem" in group.producers]
    if coupled:
        (shared,) = [group for group in stem_groups if group.consumers == ("conv",)]
        assert shared.prunable and shared.width == size
    else:
        assert not any(group.prunable for group in stem_groups)
        assert any("overlapping channel windows" in reason for group in stem_groups for reason in group.frozen)
    for seed in range(3):
        prune_and_check(model, analysis, random_selections(analysis, seed, randomized=True),
                        [random_inputs(model, 2, seed)])


def test_counts_in_computed_targets_and_reshaped_biases_follow_the_pruned_width():
    """paddle_flatten keeps 5 of conv_last's 12 channels: the flatten's width, a constant read through a
    Cast, becomes 5 (still int32), and the bias reshaped to [1, 12, 1, 1] is cut to 5 and reshaped to
    [1, 5, 1, 1]. tf2onnx_head keeps 3 of 8: its NHWC target [-1, 1, 1, 8] and its int32 width follow."""
    model = ZOO["paddle_flatten"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    pruned = prune_and_check(model, analysis, _keep_first(analysis, {"conv_last": 5}), [random_inputs(model, 3, 0)])
    values = constant_values(pruned)
    width = values[_node(pruned, "width_int64").input[0]]
    assert width.dtype == np.int32 and width.tolist() == [5]
    assert values[_node(pruned, "conv_last.bias_4d").input[1]].tolist() == [1, 5, 1, 1]
    assert values[_node(pruned, "conv_last.bias_4d").input[0]].shape == (5,)

    model = ZOO["tf2onnx_head"]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    pruned = prune_and_check(model, analysis, _keep_first(analysis, {"conv": 3}), [random_inputs(model, 2, 0)])
    values = constant_values(pruned)
    assert values[_node(pruned, "to_nhwc").input[1]].tolist() == [-1, 1, 1, 3]
    assert values[_node(pruned, "flat_shape_int32").input[1]].tolist() == [3]
    assert values[_node(pruned, "conv.bias_4d").input[1]].tolist() == [1, 3, 1, 1]
