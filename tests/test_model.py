"""Model files: external data, Constant-node weights, output-path safety, atomic saving."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import pfp_onnx
from pfp_onnx.errors import ModelError, OutputError
from pfp_onnx.model import check_output_path, load_model, parameter_count, save_model, to_graph
from test_cli import DATA, MODEL


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
