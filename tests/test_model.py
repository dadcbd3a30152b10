"""Model files: external data, Constant-node weights, layer weights the graph computes from constants,
output-path safety, atomic saving."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import pfp_onnx
from pfp_onnx.errors import ModelError, OutputError
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.model import check_output_path, for_analysis, load_model, parameter_count, save_model, to_graph
from pfp_onnx.select import Selection
from test_cli import DATA, MODEL
from test_rewrite import assert_same_outputs, prune_and_check, run, signature
from zoo import _GraphBuilder, input_shapes, random_inputs


def test_external_data_model_compresses(tmp_path):
    model = onnx.load(str(MODEL))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=0)
    assert (tmp_path / "external.onnx.data").stat().st_size > 500_000
    loaded = load_model(path)
    assert parameter_count(loaded) == parameter_count(model)
    result = pfp_onnx.compress(path, DATA, budget=0.7)
    assert result.report.totals.layer_weights_after <= 0.7 * result.report.totals.layer_weights_before


def test_external_data_missing_is_a_model_error(tmp_path):
    model = onnx.load(str(MODEL))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(ModelError, match="external-data"):
        load_model(path)


def test_save_with_external_data_roundtrips(tmp_path):
    model = onnx.load(str(MODEL))
    before = model.SerializeToString()
    target = tmp_path / "out.onnx"
    save_model(model, target, external_data=True)
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    reloaded = onnx.load(str(target))
    assert parameter_count(reloaded) == parameter_count(model)
    for original, loaded in zip(model.graph.initializer, reloaded.graph.initializer):
        assert original.name == loaded.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(original), onnx.numpy_helper.to_array(loaded))
    external = [t for t in onnx.load(str(target), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 65536 == 0
                            for t in external)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"out.onnx.data"}


def test_constant_nodes_become_constants():
    model = onnx.load(str(MODEL))
    constant_model = onnx.ModelProto()
    constant_model.CopyFrom(model)
    nodes = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer]
    del constant_model.graph.initializer[:]
    graph_nodes = list(constant_model.graph.node)
    del constant_model.graph.node[:]
    constant_model.graph.node.extend(nodes + graph_nodes)
    onnx.checker.check_model(constant_model)
    graph = to_graph(constant_model)
    assert not [node for node in graph.nodes if node.op == "Constant"]
    assert pfp_onnx.analyze(constant_model).weights_total == pfp_onnx.analyze(model).weights_total


def _dynamo_attention() -> onnx.ModelProto:
    """nn.MultiheadAttention with separate q, k, v projections (DETR's) as the dynamo exporter writes it, on a
    normalised stream [N, T, E] (T 5, E 8, 2 heads of 4), beside a Paddle-style MLP and a tied read-out:

    in_proj_weight [3E, E] → Split (num_outputs 3) → Transpose each → q, k, v MatMuls, each + a part of
    in_proj_bias [3E] → Split; heads → scores → Softmax → context → out-projection. MLP: fc1 (a stored
    weight) + Reshape(fc1.bias [16], [1, 1, 16]) → Relu → fc2. Read-out: MatMul with Transpose(embed.weight),
    the stream's own weight (a tied embedding).
    """
    b = _GraphBuilder("dynamo_attention", seed=23)
    embed = b.weight("embed.weight", (6, 8), fan_in=6)
    h = b.node("MatMul", [b.input("x", ["N", 5, 6]), embed], "embed")
    s = b.node("LayerNormalization", [h, b.constant("norm.scale", b.rng.uniform(0.5, 1.5, 8)),
                                      b.bias("norm.shift", (8,))], "norm", axis=-1)
    pieces = {}
    for kind, shape in (("weight", (24, 8)), ("bias", (24,))):
        source = b.weight(f"in_proj_{kind}", shape, fan_in=8) if kind == "weight" else b.bias(f"in_proj_{kind}", shape)
        outputs = [f"{part}.{kind}_part" for part in "qkv"]
        b.nodes.append(onnx.helper.make_node("Split", [source], outputs, name=f"split_{kind}", axis=0,
                                             num_outputs=3))
        pieces[kind] = outputs
    heads = b.constant("heads_shape", [0, 0, 2, 4], dtype=np.int64)
    parts = {}
    for part, weight, bias, perm in zip("qkv", pieces["weight"], pieces["bias"],
                                        ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])):
        weight = b.node("Transpose", [weight], f"{part}.weight_t", perm=[1, 0])
        h = b.node("Add", [b.node("MatMul", [s, weight], part), bias], f"{part}.add")
        parts[part] = b.node("Transpose", [b.node("Reshape", [h, heads], f"{part}.heads")], f"{part}.t", perm=perm)
    weights = b.node("Softmax", [b.node("MatMul", [parts["q"], parts["k"]], "scores")], "weights", axis=-1)
    context = b.node("Transpose", [b.node("MatMul", [weights, parts["v"]], "context")], "context.t",
                     perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [context, b.constant("merge_shape", [0, 0, 8], dtype=np.int64)], "merged")
    attended = b.node("Add", [b.matmul("out_proj", merged, 8, 8), b.bias("out_proj.bias", (8,))], "attended")
    bias = b.node("Reshape", [b.bias("fc1.bias", (16,)), b.constant("fc1.bias_shape", [1, 1, 16], dtype=np.int64)],
                  "fc1.bias_3d")
    h = b.node("Relu", [b.node("Add", [b.matmul("fc1", s, 8, 16), bias], "fc1.add")], "relu")
    out = b.node("Add", [attended, b.matmul("fc2", h, 16, 8)], "out")
    b.output("out", ["N", 5, 8])
    b.node("MatMul", [out, b.node("Transpose", [embed], "embed.weight_t", perm=[1, 0])], "tied")
    b.output("tied", ["N", 5, 6])
    return b.build(opset=18)


def test_layer_weights_computed_from_constants_are_folded_and_nothing_else():
    """The q, k and v projections, Split and Transposed out of one constant, become initializers read by their
    MatMuls (and their biases, Split out of one too); the Splits and Transposes and the two constants go.
    The MLP's reshaped bias stays as Paddle writes it, and so does the tied read-out's Transpose: folding it
    would store the embedding twice. The folded model computes what the original does."""
    model = _dynamo_attention()
    before = model.SerializeToString()
    folded = for_analysis(model, in_place=False)
    assert model.SerializeToString() == before, "the caller's model is left as it was"
    onnx.checker.check_model(folded, full_check=True)
    assert (signature(folded.graph.input), signature(folded.graph.output)) == \
        (signature(model.graph.input), signature(model.graph.output))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in folded.graph.initializer}
    nodes = {node.name: node for node in folded.graph.node}
    source = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    for index, part in enumerate("qkv"):
        np.testing.assert_array_equal(initializers[nodes[part].input[1]],
                                      source["in_proj_weight"][8 * index:8 * index + 8].T)
        np.testing.assert_array_equal(initializers[nodes[f"{part}.add"].input[1]],
                                      source["in_proj_bias"][8 * index:8 * index + 8])
    assert not {"split_weight", "split_bias", "q.weight_t", "k.weight_t", "v.weight_t"} & nodes.keys()
    assert not {"in_proj_weight", "in_proj_bias"} & initializers.keys()
    assert list(nodes["fc1.bias_3d"].input) == ["fc1.bias", "fc1.bias_shape"]
    assert list(nodes["embed.weight_t"].input) == ["embed.weight"] and nodes["tied"].input[1] == "embed.weight_t"
    assert parameter_count(folded) == parameter_count(model)
    feed = random_inputs(model, 3, 0)
    assert_same_outputs(run(folded, feed), run(model, feed))
    assert for_analysis(folded, in_place=False) is folded, "nothing is left to fold"


def test_folded_projections_prune_their_heads_like_stored_ones():
    """Unfolded, q, k and v are MatMuls of two activations and no head can go; folded, the two heads are one
    group (q, k, v make them, the out-projection reads them), the MLP's hidden width another, and a pruned
    model equals its zero-head oracle."""
    model = _dynamo_attention()
    assert not any(group.unit > 1 for group in analyse_channel_groups(model, input_shapes(model)).groups)
    folded = for_analysis(model, in_place=False)
    analysis = analyse_channel_groups(folded, input_shapes(folded))
    heads, mlp = analysis.prunable_groups
    assert (heads.width, heads.unit, heads.producers, heads.consumers) == (2, 4, ("q", "k", "v"), ("out_proj",))
    assert (mlp.width, mlp.producers, mlp.consumers) == (16, ("fc1",), ("fc2",))
    assert pfp_onnx.analyze(model).groups == analysis.groups  # the pipeline folds on loading
    selections = {heads.id: Selection(np.array([1]), np.array([1.5], np.float32)),
                  mlp.id: Selection(np.array([0, 3, 7, 12]), np.ones(4, np.float32))}
    pruned = prune_and_check(folded, analysis, selections, [random_inputs(model, 2, 0), random_inputs(model, 1, 1)])
    shapes = {init.name: tuple(init.dims) for init in pruned.graph.initializer}
    nodes = {node.name: node for node in pruned.graph.node}
    assert [shapes[nodes[part].input[1]] for part in "qkv"] == [(8, 4)] * 3
    assert shapes["fc1.bias"] == (4,)


@pytest.mark.parametrize("reads", ["transposed_and_as_is", "rows_repeated"])
def test_no_fold_stores_a_constant_twice(reads):
    """A constant read by two computed weights (Transpose and Identity of one X), or a Gather repeating its
    rows, would hold more numbers folded than stored: the model stays as it is."""
    b = _GraphBuilder("twice", seed=0)
    x, weight = b.input("x", ["N", 8]), b.weight("X", (8, 8))
    if reads == "transposed_and_as_is":
        transposed = b.node("MatMul", [x, b.node("Transpose", [weight], "x_t", perm=[1, 0])], "a")
        b.node("Add", [transposed, b.node("MatMul", [x, b.node("Identity", [weight], "x_i")], "b")], "out")
    else:
        rows = b.constant("rows", [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], dtype=np.int64)
        b.node("MatMul", [x, b.node("Transpose", [b.node("Gather", [weight, rows], "gather", axis=0)], "g_t",
                                    perm=[1, 0])], "out")
    b.output("out", ["N", None])
    model = b.build()
    assert for_analysis(model, in_place=False) is model


def test_output_path_checks(tmp_path):
    with pytest.raises(OutputError, match="input model itself"):
        check_output_path(MODEL, MODEL)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.onnx", MODEL)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path, MODEL)
    assert check_output_path(tmp_path / "x.onnx", MODEL) == tmp_path / "x.onnx"


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"

    def broken_save(*args, **kwargs):
        with open(args[1], "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        save_model(onnx.load(str(MODEL)), target)
    assert list(tmp_path.iterdir()) == []


def test_saved_files_have_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(onnx.load(str(MODEL)), tmp_path / "out.onnx", external_data=True)
    finally:
        os.umask(umask)
    for name in ("out.onnx", "out.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (7, 5), (2, 3, 4, 5)])
def test_tensor_size_estimate_never_undercounts(dtype, shape):
    """Size decisions (the 2 GB limit, skeletons) read tensor_bytes instead of protobuf's slow ByteSize."""
    from onnx import numpy_helper

    from pfp_onnx.model import tensor_bytes

    rng = np.random.default_rng(0)
    tensor = numpy_helper.from_array((rng.standard_normal(shape) * 100).astype(dtype), name="weight.of_some_layer")
    tensor.doc_string = "kept"
    assert tensor.HasField("raw_data") or tensor.ByteSize() == tensor_bytes(tensor)
    assert tensor.ByteSize() <= tensor_bytes(tensor) <= tensor.ByteSize() + 200
    typed = onnx.helper.make_tensor("typed", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    assert tensor_bytes(typed) == typed.ByteSize()
