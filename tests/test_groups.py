"""Channel-group analysis on the zoo: which groups exist, what couples them, what freezes them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pfp_onnx.groups import ChannelAnalysis, ChannelGroup, SizeFix, WeightSlice, analyse_channel_groups
from pfp_onnx.model import with_outputs
from pfp_onnx.recovery.least_squares import ConvPatches, layer_features
from zoo import ZOO, extra_outputs, input_shapes, outer_scope_subgraph


def analyse(name: str, *, concrete: bool = True) -> ChannelAnalysis:
    model = ZOO[name]()
    return analyse_channel_groups(model, input_shapes(model) if concrete else None)


def group_of(analysis: ChannelAnalysis, producer: str) -> ChannelGroup:
    (found,) = [group for group in analysis.groups if producer in group.producers]
    return found


def consumer_slices(group: ChannelGroup) -> dict[str, WeightSlice]:
    return {weight_slice.node: weight_slice for weight_slice in group.slices if weight_slice.role == "consumer"}


def layer(analysis: ChannelAnalysis, node: str):
    (found,) = [layer for layer in analysis.layers if layer.node == node]
    return found


# ---- plain chains ------------------------------------------------------------------------------------
def test_chain_has_one_group_per_layer_output():
    analysis = analyse("chain")
    expected = {  # producer: (width, consumers)
        "conv1": (8, ("conv2",)), "conv2": (10, ("conv3",)), "conv3": (6, ("gemm1",)),
        "gemm1": (12, ("gemm2",)), "gemm2": (10, ("logits",)), "logits": (5, ())}
    assert {group.producers: (group.width, group.consumers) for group in analysis.groups} == {
        (producer,): value for producer, value in expected.items()}
    assert [group.producers[0] for group in analysis.prunable_groups] == list(expected)[:-1]
    assert group_of(analysis, "logits").frozen == ("reaches graph output 'logits'",)
    # the channels ride through BN, Relu and MaxPool unchanged
    assert group_of(analysis, "conv1").tensors == ("conv1", "bn1", "relu1", "pool1")
    assert group_of(analysis, "conv3").tensors == ("conv3", "clip3", "flatten")


def test_chain_slices_cover_filters_biases_and_batchnorm():
    analysis = analyse("chain")
    assert set(group_of(analysis, "conv1").slices) == {
        WeightSlice("conv1", 1, 0, "producer"), *(WeightSlice("bn1", index, 0, "param") for index in range(1, 5)),
        WeightSlice("conv2", 1, 1, "consumer")}
    assert set(group_of(analysis, "conv2").slices) == {
        WeightSlice("conv2", 1, 0, "producer"), WeightSlice("conv2", 2, 0, "param"),
        WeightSlice("conv3", 1, 1, "consumer")}
    # Gemm transB=1 stores [out, in]; transB=0 stores [in, out], and its bias [1, N] is cut on axis 1
    assert set(group_of(analysis, "gemm1").slices) == {
        WeightSlice("gemm1", 1, 0, "producer"), WeightSlice("gemm1", 2, 0, "param"),
        WeightSlice("gemm2", 1, 0, "consumer")}
    assert set(group_of(analysis, "gemm2").slices) == {
        WeightSlice("gemm2", 1, 1, "producer"), WeightSlice("gemm2", 2, 1, "param"),
        WeightSlice("logits", 1, 0, "consumer")}


def test_flatten_gives_the_dense_consumer_a_block_of_h_times_w():
    analysis = analyse("chain")
    assert consumer_slices(group_of(analysis, "conv3")) == {"gemm1": WeightSlice("gemm1", 1, 1, "consumer", 9)}
    gemm1 = layer(analysis, "gemm1")
    assert (gemm1.in_units, gemm1.in_block, gemm1.out_units) == (6, 9, 12)


def test_reshape_spellings_of_flatten():
    """[-1, 24] spells the width out and gets a SizeFix; [0, -1] does not need one. Both give block 4."""
    analysis = analyse("reshape_variants")
    conv_a, conv_b = group_of(analysis, "conv_a"), group_of(analysis, "conv_b")
    assert consumer_slices(conv_a) == {"fc_a": WeightSlice("fc_a", 1, 1, "consumer", 4)}
    assert analysis.size_fixes == (SizeFix("flat_a", 1, 1, (conv_a.id,), 4),)
    assert consumer_slices(conv_b) == {"fc_b": WeightSlice("fc_b", 1, 0, "consumer", 4)}  # MatMul: [in, out]
    assert conv_a.prunable and conv_b.prunable


def test_mlp3d_groups_live_on_the_last_axis():
    analysis = analyse("mlp3d")
    widths = [group.width for group in analysis.groups]
    assert widths == [16, 12, 10, 10, 9, 8, 7, 3]
    assert len(analysis.prunable_groups) == 7
    assert set(group_of(analysis, "mm1").slices) == {
        WeightSlice("mm1", 1, 1, "producer"), WeightSlice("add1", 1, 0, "param"), WeightSlice("mm2", 1, 0, "consumer")}
    # bias [1,1,12] given as the *first* Add input, then a per-channel Mul gain [12]
    assert set(group_of(analysis, "mm2").slices) == {
        WeightSlice("mm2", 1, 1, "producer"), WeightSlice("add2", 0, 2, "param"),
        WeightSlice("gain2", 1, 0, "param"), WeightSlice("mm3", 1, 0, "consumer")}
    assert all(layer.positions == 8 for layer in analysis.layers)  # T = 8 rows per point (batch 1)


# ---- coupling ------------------------------------------------------------------------------------------
def test_residual_identity_add_couples_stem_and_block_output():
    analysis = analyse("residual")
    stem = group_of(analysis, "stem.conv")
    assert stem is group_of(analysis, "a.conv2")
    assert (stem.width, set(stem.producers), set(stem.consumers)) == (
        8, {"stem.conv", "a.conv2"}, {"a.conv1", "b.conv1", "b.proj"})
    assert stem.prunable


def test_residual_projection_add_couples_both_branches():
    analysis = analyse("residual")
    tail = group_of(analysis, "b.proj")
    assert tail is group_of(analysis, "b.conv2")
    assert (tail.width, set(tail.producers), tail.consumers) == (12, {"b.conv2", "b.proj"}, ("logits",))
    params = {(s.node, s.input_index) for s in tail.slices if s.role == "param"}
    assert params == {(bn, index) for bn in ("b.bn2", "b.proj.bn") for index in range(1, 5)} | {("b.prelu", 1)}
    assert analysis.size_fixes == (SizeFix("flat", 1, 1, (tail.id,), 1),)  # Reshape to [-1, 12]
    assert [group.width for group in analysis.groups] == [8, 8, 12, 12, 10]
    assert len(analysis.prunable_groups) == 4


def test_dense_outputs_couple_through_add():
    analysis = analyse("reshape_variants")
    summed = group_of(analysis, "fc_a")
    assert set(summed.producers) == {"fc_a", "fc_b"} and summed.consumers == ("head",) and summed.prunable


def test_branch_sum_feeding_two_consumers_with_per_channel_constants():
    analysis = analyse("branches")
    summed = group_of(analysis, "conv_l")
    assert set(summed.producers) == {"conv_l", "conv_r"} and set(summed.consumers) == {"conv_p", "conv_q"}
    assert summed.prunable  # the [N,1,H,W] attention map broadcasts over the channels
    params = {(s.node, s.input_index, s.axis) for s in summed.slices if s.role == "param"}
    # Sub with the constant first, Mul by [1,6,1,1] and [6,1,1]; Div by a scalar has nothing to cut
    assert params == {("conv_l", 2, 0), ("conv_r", 2, 0), ("left_sub", 0, 0), ("left_mul", 1, 1),
                      ("right_mul", 1, 0)}
    assert set(group_of(analysis, "conv_p").producers) == {"conv_p", "conv_q"}


def test_squeeze_excite_gate_couples_with_the_gated_tensor():
    analysis = analyse("squeeze_excite")
    gated = group_of(analysis, "stem")
    assert set(gated.producers) == {"stem", "excite"} and set(gated.consumers) == {"squeeze", "conv_out"}
    assert group_of(analysis, "squeeze").consumers == ("excite",)


def test_square_conv_in_a_residual_is_producer_and_consumer_of_one_group():
    analysis = analyse("self_coupled")
    group = group_of(analysis, "stem")
    assert set(group.producers) == {"stem", "block1", "block2"}
    assert {s for s in group.slices if s.node == "block1" and s.input_index == 1} == {
        WeightSlice("block1", 1, 0, "producer"), WeightSlice("block1", 1, 1, "consumer")}
    assert consumer_slices(group)["logits"] == WeightSlice("logits", 1, 0, "consumer", 9)
    assert layer(analysis, "block1").in_groups == layer(analysis, "block1").out_groups == (group.id,)


# ---- freezing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, producer, reason", [
    ("frozen_cases", "conv_out", "graph output 'conv_out'"),
    ("frozen_cases", "conv_soft", "Softmax 'softmax'"),
    ("frozen_cases", "conv_e", "'y'"),
    ("frozen_cases", "conv_t", "Conv 'conv_t2' reads channels on axis 2"),
    ("frozen_cases", "conv_h", "group=2"),
    ("frozen_cases", "logits", "graph output 'logits'"),
    # shape operators that cannot be rewritten
    ("frozen_shape_ops", "conv_pad", "Pad 'pad_channels' pads the channel axis"),
    ("frozen_shape_ops", "conv_sum", "ReduceSum 'sum_channels' reduces over the channels"),
    ("frozen_shape_ops", "conv_step", "Slice 'slice_step' takes channels with a step"),
    ("frozen_shape_ops", "conv_sq", "Squeeze 'squeeze_all' has no axes"),
])
def test_frozen_groups_say_why(name, producer, reason):
    group = group_of(analyse(name), producer)
    assert not group.prunable
    assert any(reason in text for text in group.frozen), group.frozen


def test_frozen_cases_keep_three_prunable_groups():
    """conv_f's, the seven convs summed into `merged`, and conv_c ≡ conv_d: a Concat along a spatial axis
    couples them (channel c of both is channel c of the output)."""
    analysis = analyse("frozen_cases")
    prunable = {group.producers for group in analysis.prunable_groups}
    merged = ("conv_out2", "conv_soft2", "conv_cd", "conv_e2", "conv_t2", "conv_h2", "conv_f2")
    assert prunable == {("conv_f",), merged, ("conv_c", "conv_d")}
    assert group_of(analysis, "conv_f2").consumers == ("logits",)
    # the grouped conv starts no group of its own and reads a frozen one
    grouped = layer(analysis, "conv_dw")
    assert grouped.out_groups == () and grouped.in_groups == ()
    reachable = {"conv_f", "conv_f2", "conv_c", "conv_d", *merged, "logits"}
    assert analysis.weights_in_prunable_groups == sum(
        layer.weights for layer in analysis.layers if layer.node in reachable)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_graph_inputs_and_outputs_are_never_pruned(name):
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    inputs = {graph_input.name for graph_input in model.graph.input}
    outputs = {graph_output.name for graph_output in model.graph.output}
    for group in analysis.groups:
        assert not inputs & set(group.tensors)
        if outputs & set(group.tensors):
            assert not group.prunable
    for each in analysis.layers:
        if each.input in inputs:
            assert each.in_groups == ()
    for group in analysis.prunable_groups:
        assert group.consumers and group.producers
        assert {s.node for s in group.slices if s.role == "consumer"} == set(group.consumers)


# ---- layers ----------------------------------------------------------------------------------------------
def test_chain_layers():
    analysis = analyse("chain")
    ids = {group.producers[0]: group.id for group in analysis.groups}
    table = [(each.node, each.op, each.in_groups, each.out_groups, each.weights, each.positions)
             for each in analysis.layers]
    assert table == [
        ("conv1", "Conv", (), (ids["conv1"],), 3 * 8 * 9, 144),
        ("conv2", "Conv", (ids["conv1"],), (ids["conv2"],), 8 * 10 * 9, 9),
        ("conv3", "Conv", (ids["conv2"],), (ids["conv3"],), 10 * 6 * 9, 9),
        ("gemm1", "Gemm", (ids["conv3"],), (ids["gemm1"],), 54 * 12, 1),
        ("gemm2", "Gemm", (ids["gemm1"],), (ids["gemm2"],), 12 * 10, 1),
        ("logits", "Gemm", (ids["gemm2"],), (ids["logits"],), 10 * 5, 1),
    ]
    conv2 = layer(analysis, "conv2")
    assert (conv2.conv.strides, conv2.conv.pads, conv2.conv.dilations) == ((2, 2), (2, 2, 2, 2), (2, 2))
    assert not layer(analysis, "gemm1").weight_is_in_by_out and layer(analysis, "gemm2").weight_is_in_by_out
    assert analysis.weights_total == sum(row[4] for row in table)
    assert analysis.weights_in_prunable_groups == analysis.weights_total


def test_residual_layers():
    analysis = analyse("residual")
    stem, tail = group_of(analysis, "stem.conv").id, group_of(analysis, "b.proj").id
    assert [(each.node, each.in_groups == (), each.weights) for each in analysis.layers] == [
        ("stem.conv", True, 3 * 8 * 9), ("a.conv1", False, 8 * 8 * 9), ("a.conv2", False, 8 * 8 * 9),
        ("b.conv1", False, 8 * 12 * 9), ("b.conv2", False, 12 * 12 * 9), ("b.proj", False, 8 * 12),
        ("logits", False, 12 * 10)]
    assert layer(analysis, "b.proj").in_groups == (stem,) and layer(analysis, "b.proj").out_groups == (tail,)
    assert layer(analysis, "b.proj").positions == 64 and layer(analysis, "stem.conv").positions == 256



def test_dense_rows_are_counted_per_point_when_tokens_are_folded_into_the_batch():
    """An exporter that runs a dense layer on [N·T, F] (tokens folded into the batch) gives T rows per
    point: with a fixed batch of 2 and 3 tokens, dense1 sees 6 rows per run, 3 per point."""
    from zoo import _GraphBuilder

    b = _GraphBuilder("folded_tokens", seed=0)
    h = b.node("Reshape", [b.input("x", [2, 3, 8]), b.constant("fold.shape", [-1, 8], dtype=np.int64)], "fold")
    h = b.matmul("dense2", b.node("Relu", [b.matmul("dense1", h, 8, 5)], "relu"), 5, 4)  # [6, 4]
    b.node("Reshape", [h, b.constant("unfold.shape", [2, 3, 4], dtype=np.int64)], "out")
    b.output("out", [2, 3, 4])
    model = b.build()
    analysis = analyse_channel_groups(model, input_shapes(model))
    assert [(each.node, each.positions) for each in analysis.layers] == [("dense1", 3), ("dense2", 3)]

# ---- Constant nodes and dynamic shapes -------------------------------------------------------------------
def test_constant_node_weights_are_found():
    analysis = analyse("constant_nodes_dynamic")
    assert [(each.node, each.weights) for each in analysis.layers] == [
        ("conv1", 3 * 8 * 9), ("conv2", 8 * 6 * 9), ("logits", 6 * 5)]
    conv1, conv2 = group_of(analysis, "conv1"), group_of(analysis, "conv2")
    assert conv1.prunable and conv2.prunable
    assert WeightSlice("conv1", 2, 0, "param") in conv1.slices  # bias given as value_floats
    assert {(s.node, s.input_index) for s in conv2.slices if s.node == "bn2"} == {("bn2", i) for i in range(1, 5)}
    assert conv1.tensors == ("conv1", "drop1", "relu1", "id1")
    assert consumer_slices(conv2) == {"logits": WeightSlice("logits", 1, 1, "consumer", 1)}


def test_dynamic_dims_use_the_given_input_shapes():
    model = ZOO["constant_nodes_dynamic"]()
    dynamic = analyse_channel_groups(model)
    assert [each.positions for each in dynamic.layers] == [None, None, 1]
    concrete = analyse_channel_groups(model, {"x": (1, 3, 10, 6)})
    assert [each.positions for each in concrete.layers] == [60, 60, 1]
    assert concrete.shapes["conv1"] == (1, 8, 10, 6)
    # the groups themselves do not depend on the spatial size
    assert [(g.producers, g.consumers, g.frozen) for g in dynamic.groups] == [
        (g.producers, g.consumers, g.frozen) for g in concrete.groups]


def test_dynamic_batch_alone_needs_no_input_shapes():
    assert analyse("chain", concrete=False).groups == analyse("chain").groups


def test_tensor_read_inside_a_subgraph_is_frozen():
    model = outer_scope_subgraph()
    group = group_of(analyse_channel_groups(model, input_shapes(model)), "conv1")
    assert not group.prunable


@pytest.mark.parametrize("producer", ["conv_drop", "conv_pool"])
def test_second_outputs_carrying_channels_freeze(producer):
    model = extra_outputs()
    assert not group_of(analyse_channel_groups(model, input_shapes(model)), producer).prunable


def test_instance_normalization_carries_channels_and_is_cut_with_them():
    analysis = analyse("instance_norm")
    group = group_of(analysis, "conv1")
    assert group.prunable and group.consumers == ("conv2",)
    assert {(s.node, s.input_index, s.axis) for s in group.slices if s.role == "param"} == {
        ("conv1", 2, 0), ("in1", 1, 0), ("in1", 2, 0)}


# ---- shape operators -------------------------------------------------------------------------------------
def test_shape_ops_carry_channels_through_pad_reductions_squeeze_and_unsqueeze():
    analysis = analyse("shape_ops")
    assert [group.producers for group in analysis.prunable_groups] == [
        ("conv_a",), ("conv_b",), ("conv_c",), ("conv_f",), ("conv_f",), ("conv_d", "conv_e"), ("dense",)]
    assert group_of(analysis, "conv_a").tensors == ("conv_a", "relu_a", "pad")
    assert group_of(analysis, "conv_b").tensors == ("conv_b", "relu_b", "sum_w", "squeeze")
    assert group_of(analysis, "conv_c").tensors == ("conv_c", "softmax", "unsqueeze")
    # ReduceMax without keepdims and a Transpose move the channels to the last axis, where MatMul reads them
    coupled = group_of(analysis, "conv_d")
    assert coupled.tensors == ("conv_d", "conv_e", "add", "max_h", "relu_max", "to_last")
    assert layer(analysis, "dense").in_groups == (coupled.id,)
    assert layer(analysis, "conv_c").kernel == 3  # the 1-D conv between Squeeze and Unsqueeze
    # Split into equal parts with no sizes: each part is a group of its own, and both sizes are counts
    first, second = [group for group in analysis.groups if group.producers == ("conv_f",)]
    assert (first.consumers, second.consumers) == (("conv_d",), ("conv_e",))
    assert analysis.size_fixes == (SizeFix("split", 1, 0, (first.id,)), SizeFix("split", 1, 1, (second.id,)))


def test_layout_ops_move_the_channels_and_keep_their_offsets_and_blocks():
    """layout_ops: conv_a's channels sit after the input's 3 in the Concat, survive an Unsqueeze and
    Squeeze in front of the channel axis, and reach the ConvTranspose's weight on its axis 0 at offset 3;
    the ConvTranspose's own filters are its weight's axis 1; conv_b's 36 features per channel survive a
    second Flatten."""
    analysis = analyse("layout_ops")
    conv_a = group_of(analysis, "conv_a")
    assert conv_a.prunable and conv_a.tensors == ("conv_a", "relu_a", "concat", "unsqueeze", "squeeze")
    assert consumer_slices(conv_a) == {"up": WeightSlice("up", 1, 0, "consumer", 1, 3)}
    up = group_of(analysis, "up")
    assert up.prunable and set(up.slices) == {
        WeightSlice("up", 1, 1, "producer"), WeightSlice("up", 2, 0, "param"), WeightSlice("conv_b", 1, 1, "consumer")}
    assert consumer_slices(group_of(analysis, "conv_b")) == {"logits": WeightSlice("logits", 1, 1, "consumer", 36)}
    assert [group.producers for group in analysis.prunable_groups] == [("conv_a",), ("up",), ("conv_b",)]


def test_pad_at_the_end_of_the_channel_axis_freezes():
    """Padding only after the last channel adds channels as surely as padding before the first."""
    from zoo import _GraphBuilder

    b = _GraphBuilder("pad_channel_end", seed=0)
    h = b.conv("conv_a", b.input("x", ["N", 3, 4, 4]), 3, 4, kernel=1)
    h = b.node("Pad", [h, b.constant("pads", [0, 0, 0, 0, 0, 2, 0, 0], dtype=np.int64)], "pad")   # [N,6,4,4]
    h = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv("conv_b", h, 6, 5, kernel=1)], "gap")], "flat")
    b.gemm("logits", h, 5, 3)
    b.output("logits", ["N", 3])
    model = b.build()
    group = group_of(analyse_channel_groups(model, input_shapes(model)), "conv_a")
    assert not group.prunable and any("pads the channel axis" in reason for reason in group.frozen)

def test_legacy_attribute_axes_and_split_sizes():
    analysis = analyse("legacy_axes")
    part_a, part_b = [group for group in analysis.groups if group.producers == ("conv_b",)]
    carried = ("conv_b", "relu_b", "sum_w", "squeeze", "unsqueeze")
    assert (part_a.tensors, part_b.tensors) == (carried + ("part_a",), carried + ("part_b",))
    assert (part_a.width, part_b.width) == (2, 6)
    assert (part_a.consumers, part_b.consumers) == (("conv_c",), ("conv_d",))
    assert group_of(analysis, "conv_a").tensors == ("conv_a", "relu_a", "pad")  # reflect padding, spatial
    assert [fix.node for fix in analysis.size_fixes] == ["split", "split"]
    assert all(group.prunable for group in analysis.groups if group.producers != ("logits",))


def test_frozen_shape_ops_leave_the_plain_pair_prunable():
    analysis = analyse("frozen_shape_ops")
    assert [group.producers for group in analysis.prunable_groups] == [("conv_ok",)]


def test_resize_to_fixed_sizes_rewrites_the_channel_entry():
    analysis = analyse("resize_sizes")
    group = group_of(analysis, "conv_a")
    assert group.prunable and group.consumers == ("conv_b",)
    assert analysis.size_fixes == (SizeFix("resize", 3, 1, (group.id,)),)



# ---- conv geometry -------------------------------------------------------------------------------------
def _single_conv(auto_pad: str, kernel: int, stride: int, dilation: int, size: int):
    """conv (auto_pad) → Relu → conv2 (1×1), so that conv is a consumer of nothing and a producer of a
    prunable group; its output y is also a graph output for the comparison."""
    rng = np.random.default_rng(kernel * 100 + stride * 10 + dilation)
    weight = rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad=auto_pad, strides=[stride] * 2,
                              dilations=[dilation] * 2),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["out"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    return model, weight, rng.standard_normal((2, 3, size, size)).astype(np.float32)


GEOMETRIES = [(auto_pad, 3, 1, 1, 7) for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID")] + [
    (auto_pad, kernel, stride, 1, size) for auto_pad in ("SAME_UPPER", "SAME_LOWER")
    for kernel, stride, size in ((2, 1, 6), (3, 2, 7), (4, 3, 8), (2, 2, 5))] + [
    ("VALID", 3, 2, 2, 9), ("VALID", 2, 3, 1, 8)]  # onnxruntime runs dilation only without SAME padding


@pytest.mark.parametrize("auto_pad, kernel, stride, dilation, size", GEOMETRIES)
def test_auto_pad_geometry_reproduces_onnxruntime(auto_pad, kernel, stride, dilation, size):
    """The pads the analysis derives from auto_pad are the ones onnxruntime uses: unfolding the input with
    them and multiplying by the filters gives the conv's own output (the scorers, the sign-part capture
    and the recovery all read the geometry to know what each output sees)."""
    model, weight, x = _single_conv(auto_pad, kernel, stride, dilation, size)
    geometry = layer(analyse_channel_groups(model, {"x": x.shape}), "conv").conv
    session = ort.InferenceSession(with_outputs(model, ["y"]).SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(["y"], {"x": x})
    features = layer_features(x, conv=ConvPatches(geometry.strides, geometry.pads, geometry.dilations,
                                                  geometry.kernel_shape))
    got = (features @ weight.reshape(4, -1).T).reshape(2, *want.shape[2:], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- operators whose meaning changed between opsets ---------------------------------------------------
def _softmax(op: str, axis: int | None, nhwc: bool = False):
    def middle(b, h):
        if nhwc:
            h = b.node("Transpose", [h], "to_nhwc", perm=[0, 2, 3, 1])
        h = b.node(op, [h], "softmax", **({} if axis is None else {"axis": axis}))
        return b.node("Transpose", [h], "to_nchw", perm=[0, 3, 1, 2]) if nhwc else h
    return middle


def _upsample(op: str, scales, *, attribute: bool = False, roi: bool = False):
    def middle(b, h):
        if attribute:
            return b.node(op, [h], "resize", mode="nearest", scales=list(scales))
        inputs = [h] + ([b.constant("roi", [])] if roi else []) + [b.constant("scales", scales)]
        return b.node(op, inputs, "resize", mode="nearest")
    return middle


def _slice_attributes(b, h):
    return b.node("Slice", [h], "slice", starts=[1], ends=[5], axes=[1])


NORMALISES = "Softmax 'softmax' normalises across the channels"
LEGACY_OPS = {  # name: (opset, the node(s) between conv1 [N, 6, 8, 8] and conv2, conv1's frozen reason or None)
    # before opset 13 (Log)Softmax normalises over every axis from its axis on, the default axis being 1
    "softmax 11, axis 0": (11, _softmax("Softmax", 0), NORMALISES),
    "softmax 11, default axis": (11, _softmax("Softmax", None), NORMALISES),
    "softmax 11, axis 2": (11, _softmax("Softmax", 2), None),
    "softmax 11, axis -1": (11, _softmax("Softmax", -1), None),
    "log-softmax 11 over NHWC, axis 1": (11, _softmax("LogSoftmax", 1, nhwc=True),
                                         "LogSoftmax 'softmax' normalises across the channels"),
    "softmax 11 over NHWC, axis 3": (11, _softmax("Softmax", 3, nhwc=True), NORMALISES),
    "softmax 13, axis 0": (13, _softmax("Softmax", 0), None),
    "softmax 13 over NHWC, axis 1": (13, _softmax("Softmax", 1, nhwc=True), None),
    # opset-10 Resize and Upsample read their scales from input 1; Upsample before opset 9 from an attribute
    "resize 10": (10, _upsample("Resize", [1.0, 1.0, 2.0, 2.0]), None),
    "resize 11": (11, _upsample("Resize", [1.0, 1.0, 2.0, 2.0], roi=True), None),
    "upsample 9": (9, _upsample("Upsample", [1.0, 1.0, 2.0, 2.0]), None),
    "upsample 7": (7, _upsample("Upsample", [1.0, 1.0, 2.0, 2.0], attribute=True), None),
    "resize 10 scaling the channels": (10, _upsample("Resize", [1.0, 2.0, 2.0, 2.0]),
                                       "Resize 'resize' may resize the channel axis"),
    "upsample 7 scaling the channels": (7, _upsample("Upsample", [1.0, 2.0, 1.0, 1.0], attribute=True),
                                        "Upsample 'resize' may resize the channel axis"),
    # before opset 10 a Slice's bounds are attributes, which the rewrite does not edit
    "slice 9": (9, _slice_attributes, "Slice 'slice' gives its bounds as attributes (before opset 10)"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_OPS))
def test_operators_are_read_as_their_opset_defines_them(case):
    """Each spelling is checked against onnxruntime: a carried group prunes to the zero-channel oracle (a
    pre-13 Softmax over the channels once did not: it was followed as if it normalised one axis)."""
    from test_rewrite import prune_and_check, run
    from zoo import _GraphBuilder, random_inputs

    from pfp_onnx.select import Selection

    opset, middle, reason = LEGACY_OPS[case]
    b = _GraphBuilder("legacy", 0)
    h = b.conv("conv1", b.input("x", ["N", 3, 8, 8]), 3, 6, pads=[1] * 4)
    h = middle(b, h)
    width = {"slice 9": 4}.get(case, 12 if "scaling the channels" in case else 6)  # what conv2 reads
    h = b.conv("conv2", h, width, 4, 1)
    b.output(h, ["N", 4, None, None])
    model = b.build(opset)
    feeds = [random_inputs(model, 2, 0), random_inputs(model, 1, 1)]
    run(model, feeds[0])
    analysis = analyse_channel_groups(model, input_shapes(model))
    group = group_of(analysis, "conv1")
    if reason is not None:
        assert group.frozen and group.frozen[0] == reason, group.frozen
        return
    assert not group.frozen, group.frozen
    for kept in ([0, 2, 5], [3]):
        scale = np.linspace(0.5, 2.0, len(kept)).astype(np.float32)
        prune_and_check(model, analysis, {group.id: Selection(np.array(kept), scale)}, feeds)


# ---- reshape targets computed in the graph, as exporters write them ------------------------------------
def _int64(b, name: str, values) -> str:
    return b.constant(name, values, dtype=np.int64)


def _batch_size(b, tensor: str, name: str = "n") -> str:
    """torch's x.size(0): Shape → Gather(0) → Unsqueeze, a 1-element vector."""
    size = b.node("Gather", [b.node("Shape", [tensor], f"{name}.shape"), _int64(b, f"{name}.index", 0)], name, axis=0)
    return b.node("Unsqueeze", [size, _int64(b, f"{name}.axes", [0])], f"{name}.vector")


def _torch_view(b, h):
    """x.view(x.size(0), -1) after global pooling (torch's TorchScript exporter)."""
    pooled = b.node("GlobalAveragePool", [h], "gap")
    target = b.node("Concat", [_batch_size(b, pooled), _int64(b, "rest", [-1])], "target", axis=0)
    return b.gemm("dense", b.node("Reshape", [pooled, target], "flat"), 6, 4), ["N", 4]


def _torch_reshape_n_c(b, h):
    """x.reshape(x.shape[0], x.shape[1]): the width is the channel axis' size, read by Shape."""
    pooled = b.node("GlobalAveragePool", [h], "gap")
    width = b.node("Gather", [b.node("Shape", [pooled], "c.shape"), _int64(b, "c.index", 1)], "c", axis=0)
    width = b.node("Unsqueeze", [width, _int64(b, "c.axes", [0])], "c.vector")
    target = b.node("Concat", [_batch_size(b, pooled), width], "target", axis=0)
    return b.gemm("dense", b.node("Reshape", [pooled, target], "flat"), 6, 4), ["N", 4]


def _tokens(b, flat):
    """[N, C, H·W] → Transpose → MatMul on the channels."""
    return b.matmul("dense", b.node("Transpose", [flat], "tokens", perm=[0, 2, 1]), 6, 4), ["N", 16, 4]


def _torch_flatten_2(b, h):
    """x.flatten(2): Shape → Slice(0:2) → Concat with [-1] (TorchScript)."""
    bounds = [_int64(b, f"head.{key}", [value]) for key, value in (("starts", 0), ("ends", 2), ("axes", 0))]
    head = b.node("Slice", [b.node("Shape", [h], "shape")] + bounds, "head")
    target = b.node("Concat", [head, _int64(b, "rest", [-1])], "target", axis=0)
    return _tokens(b, b.node("Reshape", [h, target], "flat"))


def _dynamo_flatten_2(b, h):
    """x.flatten(2) from the dynamo exporter: a constant target with the width written out, allowzero=1."""
    return _tokens(b, b.node("Reshape", [h, _int64(b, "target", [-1, 6, 16])], "flat", allowzero=1))


def _copied_sizes(b, h):
    """Reshape [0, 0, -1]: the 0s copy the batch and the channel axis, then a 1-D conv."""
    flat = b.node("Reshape", [h, _int64(b, "target", [0, 0, -1])], "flat")
    return b.node("Conv", [flat, b.weight("conv1d.weight", (4, 6, 1))], "conv1d", kernel_shape=[1]), ["N", 4, 16]


def _paddle_flatten(b, h):
    """Paddle: Shape → Cast(int32) → Slice(0:1) → Cast(int64), concatenated with Cast([C] int32)."""
    pooled = b.node("GlobalAveragePool", [h], "gap")
    shape = b.node("Cast", [b.node("Shape", [pooled], "shape")], "shape32", to=TensorProto.INT32)
    bounds = [_int64(b, f"n.{key}", [value]) for key, value in (("starts", 0), ("ends", 1), ("axes", 0), ("steps", 1))]
    batch = b.node("Cast", [b.node("Slice", [shape] + bounds, "n")], "n64", to=TensorProto.INT64)
    width = b.node("Cast", [b.constant("width", [6], dtype=np.int32)], "width64", to=TensorProto.INT64)
    target = b.node("Concat", [batch, width], "target", axis=-1)
    return b.matmul("dense", b.node("Reshape", [pooled, target], "flat"), 6, 4), ["N", 4]


def _shape_start_end(b, h):
    """Shape(start=0, end=1) (opset 15) concatenated with the width."""
    pooled = b.node("GlobalAveragePool", [h], "gap")
    target = b.node("Concat", [b.node("Shape", [pooled], "n", start=0, end=1), _int64(b, "width", [6])], "target",
                    axis=0)
    return b.gemm("dense", b.node("Reshape", [pooled, target], "flat"), 6, 4), ["N", 4]


def _nhwc_ones_then_flatten(b, h):
    """tf2onnx: the NHWC transpose of [N, C, 1, 1] written as Reshape [-1, 1, 1, C], then Flatten."""
    nhwc = b.node("Reshape", [b.node("GlobalAveragePool", [h], "gap"), _int64(b, "target", [-1, 1, 1, 6])], "nhwc")
    return b.matmul("dense", b.node("Flatten", [nhwc], "flat"), 6, 4), ["N", 4]


def _reshaped_bias(target):
    """A per-channel constant reshaped in the graph before it is added (Paddle's and tf2onnx's conv bias)."""
    def middle(b, h):
        bias = b.node("Reshape", [b.bias("bias", (6,)), _int64(b, "bias.shape", target)], "bias_4d")
        return b.conv("conv2", b.node("Relu", [b.node("Add", [h, bias], "add_bias")], "relu2"), 6, 4, kernel=1), \
            ["N", 4, 4, 4]
    return middle


def _count_as_float(b, h):
    """The channel count leaves shape arithmetic (cast to float and multiplied in): it cannot follow."""
    count = b.node("ReduceProd", [b.node("Cast", [b.node("Shape", [h], "shape")], "count", to=TensorProto.FLOAT)],
                   "elements", keepdims=0)
    return b.node("Mul", [b.conv("conv2", h, 6, 4, kernel=1), count], "scaled"), ["N", 4, 4, 4]


def _expanded_to_shape(b, h):
    expanded = b.node("Expand", [b.constant("one", [1.0]), b.node("Shape", [h], "shape")], "expand")
    return b.conv("conv2", b.node("Add", [h, expanded], "plus"), 6, 4, kernel=1), ["N", 4, 4, 4]


def _width_of_another_tensor(b, h):
    """Reshape(GAP(h), [N, C of other]) where `other` has as many channels, but its own group: the count
    read off `other` becomes a constant (as torch's attention reads embed_dim off its input)."""
    other = b.node("Relu", [b.conv("conv_other", "x", 3, 6, kernel=1)], "other")
    width = b.node("Gather", [b.node("Shape", [other], "c.shape"), _int64(b, "c.index", 1)], "c", axis=0)
    target = b.node("Concat", [_batch_size(b, h), b.node("Unsqueeze", [width, _int64(b, "c.axes", [0])], "c.vector")],
                    "target", axis=0)
    flat = b.node("Reshape", [b.node("GlobalAveragePool", [h], "gap"), target], "flat")
    other = b.gemm("dense_other", b.node("Flatten", [other], "other.flat"), 96, 4)
    return b.node("Add", [b.gemm("dense", flat, 6, 4), other], "sum"), ["N", 4]


def _shape_of_another_tensor(b, h):
    """Reshape(GAP(h), Shape(GAP(other))): the whole target is another tensor's shape, with no piece to
    replace."""
    other = b.node("GlobalAveragePool", [b.node("Relu", [b.conv("conv_other", "x", 3, 6, kernel=1)], "other")],
                   "other.gap")
    flat = b.node("Reshape", [b.node("GlobalAveragePool", [h], "gap"), b.node("Shape", [other], "target")], "flat")
    return b.node("Add", [b.conv("conv2", flat, 6, 4, kernel=1), b.conv("conv3", other, 6, 4, kernel=1)], "sum"), \
        ["N", 4, 1, 1]


def _one_target_for_two(b, h):
    """One computed target [N, 6] reshapes two tensors of different groups: its 6 cannot be rewritten for
    either without changing the other."""
    other = b.node("GlobalAveragePool", [b.node("Relu", [b.conv("conv_other", "x", 3, 6, kernel=1)], "other")],
                   "other.gap")
    pooled = b.node("GlobalAveragePool", [h], "gap")
    target = b.node("Concat", [_batch_size(b, pooled), _int64(b, "width", [6])], "target", axis=0)
    flats = [b.node("Reshape", [tensor, target], f"flat{index}") for index, tensor in enumerate((pooled, other))]
    return b.node("Add", [b.gemm("dense", flats[0], 6, 4), b.gemm("dense_other", flats[1], 6, 4)], "sum"), ["N", 4]


def _nhwc_flatten(b, h):
    """tf2onnx's Flatten of an NHWC map with 16 positions: channel c owns every 6th feature, not a block."""
    nhwc = b.node("Transpose", [h], "nhwc", perm=[0, 2, 3, 1])
    return b.matmul("dense", b.node("Reshape", [nhwc, _int64(b, "target", [-1, 96])], "flat"), 96, 4), ["N", 4]


SHAPE_SPELLINGS = {  # name: (the nodes from conv1's [N, 6, 4, 4] to an output, conv1's frozen reason or None)
    "torch view(N, -1)": (_torch_view, None),
    "torch reshape(N, C)": (_torch_reshape_n_c, None),
    "torch flatten(2)": (_torch_flatten_2, None),
    "dynamo flatten(2)": (_dynamo_flatten_2, None),
    "reshape [0, 0, -1]": (_copied_sizes, None),
    "paddle flatten": (_paddle_flatten, None),
    "shape start/end": (_shape_start_end, None),
    "tf2onnx [N, 1, 1, C] then Flatten": (_nhwc_ones_then_flatten, None),
    "bias reshaped to [1, C, 1, 1]": (_reshaped_bias([1, 6, 1, 1]), None),
    "bias reshaped to [1, -1, 1, 1]": (_reshaped_bias([1, -1, 1, 1]), None),
    "channel count cast to float": (_count_as_float, "Cast 'count' reads the size of the channel axis (input 0)"),
    "Expand to the tensor's shape": (_expanded_to_shape, "Expand 'expand' reads the size of the channel axis"),
    "width of another tensor": (_width_of_another_tensor, None),
    "shape of another tensor": (_shape_of_another_tensor,
                                "Reshape 'flat' takes the width of its channel axis from another tensor's channels"),
    "one target for two tensors": (_one_target_for_two, "'target' counts these channels for other readers too"),
    "NHWC flatten of 16 positions": (_nhwc_flatten, "Reshape 'flat' does not keep the channels in whole blocks"),
}


@pytest.mark.parametrize("case", list(SHAPE_SPELLINGS))
def test_reshape_targets_computed_from_shape(case):
    """Each spelling carries conv1's channels and prunes to the zero-channel oracle at batch 2 and 1 (the
    batch the target computes must still be read at run time), or freezes them and says why."""
    from test_rewrite import prune_and_check
    from zoo import _GraphBuilder, random_inputs

    from pfp_onnx.select import Selection

    middle, reason = SHAPE_SPELLINGS[case]
    b = _GraphBuilder("shape_spelling", 0)
    h = b.node("Relu", [b.conv("conv1", b.input("x", ["N", 3, 4, 4]), 3, 6, pads=[1] * 4)], "relu1")
    b.output(*middle(b, h))
    model = b.build()
    analysis = analyse_channel_groups(model, input_shapes(model))
    group = group_of(analysis, "conv1")
    if reason is not None:
        assert any(text.startswith(reason) for text in group.frozen), group.frozen
        return
    assert not group.frozen, group.frozen
    feeds = [random_inputs(model, 2, 0), random_inputs(model, 1, 1)]
    for kept in ([0, 2, 5], [3]):
        scale = np.linspace(0.5, 2.0, len(kept)).astype(np.float32)
        prune_and_check(model, analysis, {group.id: Selection(np.array(kept), scale)}, feeds)


def test_paddle_head_is_prunable_up_to_its_logits():
    """paddle_flatten: the biases reshaped in the graph, the gate and the flatten computed from Shape all
    carry; the flatten's constant width (read through a Cast) is the count to rewrite. Without input
    shapes the batch the target reads stays unknown, and the flatten still carries."""
    assert [group.producers for group in analyse("paddle_flatten", concrete=False).groups if group.frozen] == [("fc",)]
    analysis = analyse("paddle_flatten")
    assert [group.producers for group in analysis.groups if group.frozen] == [("fc",)]
    last = group_of(analysis, "conv_last")
    assert last.consumers == ("fc",) and "flat" in last.tensors
    assert SizeFix("width_int64", 0, 0, (last.id,)) in analysis.size_fixes
    assert SizeFix("conv_last.bias_4d", 1, 1, (last.id,)) in analysis.size_fixes
    assert WeightSlice("conv_last.bias_4d", 0, 0, "param") in last.slices


def test_weights_by_what_pruning_can_do_to_their_layers():
    """The three figures analyze reports add up to all layer weights; a layer whose outputs are frozen
    counts only as losing inputs, and the largest frozen group comes first."""
    analysis = analyse("tf2onnx_head")
    dense = sum(layer(analysis, name).weights for name in ("dense_flat", "dense_squeezed", "dense_shaped"))
    assert analysis.weights_losing_outputs == layer(analysis, "conv").weights
    assert analysis.weights_losing_inputs_only == dense
    assert analysis.weights_untouched == layer(analysis, "conv_map").weights + layer(analysis, "dense_map").weights
    assert analysis.weights_in_prunable_groups == analysis.weights_losing_outputs + analysis.weights_losing_inputs_only
    largest = analysis.largest_frozen_groups()
    assert [group.producers for group in largest] == [
        ("dense_flat", "dense_squeezed", "dense_shaped", "dense_map"), ("conv_map",)]
    # the frozen Reshape stops the group before dense_map: it holds conv_map's filters alone
    assert analysis.group_weights(largest[1].id) == layer(analysis, "conv_map").weights
    assert analysis.group_weights(largest[0].id) == 4 * 8 * 3 + 24 * 4


def test_analyze_prints_the_figures_and_the_largest_frozen_groups_first():
    from pfp_onnx.report import analysis_dict, render_analysis

    analysis = analyse("tf2onnx_head")
    floors = {"weights": 0.5, "macs": None}
    lines = render_analysis(analysis, floors).splitlines()
    assert lines[0] == f"{analysis.weights_total:,} Conv/Gemm/MatMul weights, in layers that"
    assert lines[1].split()[-2:] == [f"{analysis.weights_losing_outputs:,}",
                                     f"{analysis.weights_losing_outputs / analysis.weights_total:.1%}"]
    assert lines[4] == "largest frozen groups:"
    assert lines[5].endswith("reaches graph output 'out'") and "(4 channels, 192 weights)" in lines[5]
    assert "does not keep the channels in whole blocks" in lines[6]
    assert lines.index("") < len(lines) - len(analysis.groups)  # the table of every group comes after
    as_json = analysis_dict(analysis, floors)
    assert as_json["weights_losing_outputs"] + as_json["weights_losing_inputs_only"] + as_json["weights_untouched"] \
        == as_json["weights_total"]
    assert as_json["largest_frozen_groups"] == [group.id for group in analysis.largest_frozen_groups()]
    assert [group["weights"] for group in as_json["groups"]] == [analysis.group_weights(g.id) for g in analysis.groups]


# ---- attention heads (docs/heads.md) ---------------------------------------------------------------------
def test_heads_are_the_units_of_their_group():
    """hf_attention: q, k and v's 12 outputs are one group of 3 heads of 4 — each projection's weight
    columns and bias in runs of 4, the out-projection's input rows too, the head count in the three
    Reshape targets and 4 · heads in the merge's target (read off the normalised stream, made a constant)."""
    analysis = analyse("hf_attention")
    heads = group_of(analysis, "query")
    assert heads.prunable and (heads.width, heads.unit) == (3, 4)
    assert set(heads.producers) == {"query", "key", "value"} and heads.consumers == ("dense",)
    assert {WeightSlice(name, 1, 1, "producer", 4) for name in ("query", "key", "value")} <= set(heads.slices)
    assert WeightSlice("value.add", 1, 0, "param", 4) in heads.slices
    assert consumer_slices(heads)["dense"] == WeightSlice("dense", 1, 0, "consumer", 4)
    assert SizeFix("query.heads", 1, 2, (heads.id,)) in analysis.size_fixes
    assert SizeFix("merge_shape", 1, 0, (heads.id,), 4) in analysis.size_fixes
    dense, query = layer(analysis, "dense"), layer(analysis, "query")
    assert (dense.in_units, dense.in_block, dense.kernel) == (3, 4, 1)
    assert (query.out_units, query.kernel, query.weights) == (3, 4, 12 * 12)
    assert "MatMul 'query' makes attention heads from them" in group_of(analysis, "embed").frozen
    assert group_of(analysis, "fc1").prunable and group_of(analysis, "fc1").unit == 1  # the MLP's hidden width


def test_a_fused_projection_couples_its_q_k_v_parts():
    """torch_multihead_attention: the fused in-projection's 24 outputs are q | k | v; the unflatten to
    [T, N, 3, E] couples channel c of each part, the split into heads makes them heads: one group of 2
    heads at offsets 0, 2 and 4 of the weight's columns. N · heads is one Mul read by the three Reshapes,
    rewritten for all of them; the widths torch reads off the stream are replaced."""
    analysis = analyse("torch_multihead_attention")
    heads = group_of(analysis, "in_proj")
    assert heads.prunable and (heads.width, heads.unit) == (2, 4)
    assert {piece.offset for piece in heads.slices if piece.node == "in_proj"} == {0, 2, 4}
    in_proj = layer(analysis, "in_proj")
    assert in_proj.out_groups == (heads.id,) * 3 and (in_proj.out_units, in_proj.kernel) == (6, 4)
    assert [fix for fix in analysis.size_fixes if fix.node == "batch_heads"] == [SizeFix("batch_heads", 1, 0,
                                                                                        (heads.id,))] * 3
    assert SizeFix("unflatten_shape", 2, 0, (heads.id,), 4) in analysis.size_fixes
    assert SizeFix("flat_shape", 1, 0, (heads.id,), 4) in analysis.size_fixes
    assert "Div 'head_dim.div' computes with the size of a channel axis" in group_of(analysis, "embed").frozen


def test_a_concat_of_token_sequences_couples_their_channels():
    analysis = analyse("timm_attention")
    tokens = group_of(analysis, "t1")
    assert tokens.prunable and set(tokens.producers) == {"t1", "t2"} and tokens.consumers == ("t3",)
    assert group_of(analysis, "qkv").width == 2 and group_of(analysis, "qkv").prunable


def _attention(b, extra):
    """q, k, v of 3 heads of 4 on a dense stream [N, 5, 12] (MatMul, Reshape [0, 0, 3, 4], Transpose),
    softmax(q·kᵀ)·v merged back and projected; `extra(b, q_flat, scores)` may add a reader and returns
    the scores to use."""
    x = b.input("x", ["N", 5, 6])
    s = b.node("Relu", [b.matmul("embed", x, 6, 12)], "stream")
    heads = b.constant("heads_shape", [0, 0, 3, 4], dtype=np.int64)
    flat = {name: b.matmul(name, s, 12, 12) for name in ("query", "key", "value")}
    q, k, v = (b.node("Transpose", [b.node("Reshape", [flat[name], heads], f"{name}.heads")], f"{name}.t",
                      perm=perm) for name, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]),
                                                    ("value", [0, 2, 1, 3])))
    scores = extra(b, flat["query"], b.node("MatMul", [q, k], "scores"))
    context = b.node("MatMul", [b.node("Softmax", [scores], "weights", axis=-1), v], "context")
    context = b.node("Transpose", [context], "context.t", perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [context, b.constant("merge_shape", [0, 0, 12], dtype=np.int64)], "merged")
    b.matmul("dense", merged, 12, 12)
    b.output("dense", ["N", 5, 12])


def _head_cut_by_a_slice(b, query, scores):
    b.matmul("side", b.node("Slice", [query, b.constant("cut.starts", [0], dtype=np.int64),
                                      b.constant("cut.ends", [6], dtype=np.int64),
                                      b.constant("cut.axes", [2], dtype=np.int64)], "cut"), 6, 2)
    b.output("side", ["N", 5, 2])
    return scores


def _bias_per_head(b, query, scores):
    return b.node("Add", [scores, b.constant("relative_bias", b.rng.normal(size=(3, 5, 5)))], "biased")


def _heads_averaged(b, query, scores):
    b.node("ReduceMean", [scores], "averaged", axes=[1], keepdims=0)
    b.output("averaged", ["N", 5, 5])
    return scores


@pytest.mark.parametrize("extra, reason", [
    (_head_cut_by_a_slice, "its channels are cut inside a head of 4"),
    (_bias_per_head, "Add 'biased' reads a constant with one entry per head"),
    (_heads_averaged, "ReduceMean 'averaged' reduces over the channels"),
], ids=["head cut by a Slice", "bias per head", "heads averaged"])
def test_attention_that_cannot_lose_heads_says_why(extra, reason):
    from zoo import _GraphBuilder

    b = _GraphBuilder("attention_frozen", 23)
    _attention(b, extra)
    analysis = analyse_channel_groups(model := b.build(), input_shapes(model))
    heads = [group for group in analysis.groups if "key" in group.producers]  # a cut head: two groups
    assert heads and all(not group.prunable and any(text.startswith(reason) for text in group.frozen)
                         for group in heads), [group.frozen for group in heads]


def test_a_count_another_reader_also_reads_freezes_the_heads():
    """torch_multihead_attention with N · heads also read by a graph output: rewriting it for the heads
    would change that output, so the heads freeze and say so."""
    model = ZOO["torch_multihead_attention"]()
    model.graph.node.append(helper.make_node("Identity", ["batch_heads"], ["batch_heads.copy"], name="copy"))
    model.graph.output.append(helper.make_tensor_value_info("batch_heads.copy", TensorProto.INT64, []))
    heads = group_of(analyse_channel_groups(model, input_shapes(model)), "in_proj")
    assert "'batch_heads' counts these channels for other readers too" in heads.frozen


def test_shapes_onnx_leaves_open_are_inferred_again_from_the_computed_targets():
    """ONNX's data propagation does not divide: torch's embed_dim / heads leaves every shape after the split
    into heads open, until the analysis infers them again with the targets its walk computed."""
    from pfp_onnx.groups import tensor_shapes
    from pfp_onnx.model import with_input_shapes

    model = ZOO["torch_multihead_attention"]()
    assert tensor_shapes(with_input_shapes(model, input_shapes(model)))["q.heads"] == (5, 2, None)
    shapes = analyse_channel_groups(model, input_shapes(model)).shapes
    assert shapes["q.heads"] == (5, 2, 4) and shapes["context"] == (2, 5, 4)
