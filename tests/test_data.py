"""Calibration data: matching arrays to inputs, validation messages, the seeded split, batching."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pfp_onnx.data import DataNote, read_npz, split, validate
from pfp_onnx.errors import DataError
from test_cli import DATA, MODEL


@pytest.fixture(scope="module")
def model():
    return onnx.load(str(MODEL))


def test_single_input_accepts_any_name_with_a_note(model):
    images = np.load(DATA)["input"][:10]
    with pytest.warns(DataNote, match="'arr_0' was taken as the model's only input, 'input'"):
        data = validate({"arr_0": images}, model)
    assert list(data.inputs) == ["input"] and data.count == 10 and data.labels is None


def test_ambiguous_names_are_an_error_naming_the_inputs(model):
    images = np.load(DATA)["input"][:10]
    with pytest.raises(DataError, match=r"no array for model input\(s\) 'input'.*found: 'images', 'other'"):
        validate({"images": images, "other": images}, model)


def test_labels_outside_the_class_range_are_refused(model):
    arrays = dict(np.load(DATA))
    with pytest.raises(DataError, match=r"from 1 to 10, but the model's first output 'logits' scores 10 classes"):
        validate({**arrays, "labels": arrays["labels"] + 1}, model)
    with pytest.raises(DataError, match="from -1 to"):
        validate({**arrays, "labels": arrays["labels"] - 1}, model)
    assert validate(arrays, model).labels.max() == 9


def test_a_single_array_file_says_how_to_make_an_archive(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"single NumPy array \(\.npy\).*numpy\.savez\('calib\.npz'"):
        read_npz(path)


def _model(inputs: dict[str, tuple[int, list]]) -> onnx.ModelProto:
    """A model whose inputs have these element types and dims (validation reads only its signature)."""
    infos = [helper.make_tensor_value_info(name, kind, dims) for name, (kind, dims) in inputs.items()]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", kind, dims) for name, (kind, dims) in inputs.items()]
    return helper.make_model(helper.make_graph(nodes, "signature", infos, outputs))


def test_inputs_without_the_points_on_axis_0_are_refused():
    """silero-vad's signature: audio [N, samples], an RNN state [2, N, 128] and a scalar sample rate: every
    problem named in one message, before any array is looked at (a 0-d array used to crash len())."""
    vad = _model({"input": (TensorProto.FLOAT, ["N", "samples"]), "state": (TensorProto.FLOAT, [2, "N", 128]),
                  "sr": (TensorProto.INT64, [])})
    arrays = {"input": np.zeros((8, 512), np.float32), "state": np.zeros((2, 8, 128), np.float32),
              "sr": np.array(16000)}
    with pytest.raises(DataError, match="points on axis 0") as refused:
        validate(arrays, vad)
    message = str(refused.value)
    assert "'sr' [] int64 is a scalar" in message
    assert "'state' [2, ?, 128] float32 fixes axis 0 while 'input' [?, ?] float32 leaves it open" in message
    assert "export a model whose inputs all take the batch on axis 0" in message
    scalar = _model({"input": (TensorProto.FLOAT, ["N", 4]), "sr": (TensorProto.INT64, [])})
    with pytest.raises(DataError, match=r"'sr' \[\] int64 is a scalar"):
        validate({"input": np.zeros((8, 4), np.float32), "sr": np.array(16000)}, scalar)
    fixed = _model({"a": (TensorProto.FLOAT, [1, 4]), "b": (TensorProto.FLOAT, [2, 4])})
    with pytest.raises(DataError, match="fix axis 0 to different sizes"):
        validate({"a": np.zeros((1, 4), np.float32), "b": np.zeros((2, 4), np.float32)}, fixed)


def test_a_whole_input_fixed_at_one_batch_size_is_a_fixed_batch():
    """silero-vad's LSTM export: audio [N, 576] beside states h, c [1, 1, 128] fixed whole: a model that runs
    batches of exactly one point, which compress feeds it (it was refused once)."""
    from pfp_onnx.pipeline import _fixed_batch

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["h"], ["h_mean"], keepdims=0), helper.make_node("Add", ["x", "h_mean"],
                                                                                          ["y"])], "lstm_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    data = validate({"x": np.ones((3, 1), np.float32), "h": np.zeros((3, 1, 128), np.float32)}, model)
    assert data.count == 3
    assert _fixed_batch(model) == 1


def test_a_single_value_is_not_points(model):
    with pytest.raises(DataError, match="single value, not points"):
        validate({"input": np.float32(0.5)}, model)


def test_points_on_another_axis_are_named():
    pair = _model({"audio": (TensorProto.FLOAT, ["N", 4]), "state": (TensorProto.FLOAT, ["N", "M", 4])})
    arrays = {"audio": np.zeros((10, 4), np.float32), "state": np.zeros((3, 10, 4), np.float32)}
    with pytest.raises(DataError, match=r"'state' holds 10 on axis 1: move that axis first"):
        validate(arrays, pair)


def test_labels_are_kept_and_checked(model):
    arrays = dict(np.load(DATA))
    assert validate(arrays, model).labels.shape == (500,)
    with pytest.raises(DataError, match="one per point"):
        validate({**arrays, "labels": arrays["labels"][:-1]}, model)
    with pytest.raises(DataError, match="integer class ids"):
        validate({**arrays, "labels": arrays["labels"].astype(np.float32)}, model)


def test_extra_arrays_and_zero_points_rejected(model):
    arrays = dict(np.load(DATA))
    with pytest.raises(DataError, match="match no model input"):
        validate({**arrays, "mask": np.zeros(500)}, model)
    with pytest.raises(DataError, match="zero points"):
        validate({"input": arrays["input"][:0]}, model)


def test_inf_rejected(model):
    images = np.load(DATA)["input"].copy()
    images[0, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="NaN or infinite"):
        validate({"input": images}, model)


def test_not_an_npz(tmp_path):
    path = tmp_path / "calib.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="Could not read"):
        read_npz(path)


def test_split_is_seeded_and_disjoint(model):
    data = validate(dict(np.load(DATA)), model)
    first, held = split(data, 0.2, seed=3)
    again, held_again = split(data, 0.2, seed=3)
    assert first.count == 400 and held.count == 100
    np.testing.assert_array_equal(held.inputs["input"], held_again.inputs["input"])
    together = np.concatenate([first.inputs["input"], held.inputs["input"]]).reshape(500, -1)
    assert len(np.unique(together, axis=0)) == len(np.unique(data.inputs["input"].reshape(500, -1), axis=0))
    other, _ = split(data, 0.2, seed=4)
    assert not np.array_equal(other.inputs["input"], first.inputs["input"])


def test_split_needs_enough_points(model):
    data = validate({"input": np.load(DATA)["input"][:1]}, model)
    with pytest.raises(DataError, match="too few"):
        split(data, 0.2, seed=0)
    assert split(data, 0.0, seed=0)[1] is None


def test_batches_cover_every_point_once(model):
    data = validate({"input": np.load(DATA)["input"][:23]}, model)
    sizes = [len(batch["input"]) for batch in data.batches(5)]
    assert sizes == [5, 5, 5, 5, 3]


def test_streamed_batches_give_the_same_model_as_arrays():
    """A batch source (for sets that do not fit in memory) is split, captured and verified like arrays."""
    import pfp_onnx

    arrays = dict(np.load(DATA))
    calls = []

    def batches():
        calls.append(1)
        for start in range(0, 500, 64):
            yield {"input": arrays["input"][start:start + 64], "labels": arrays["labels"][start:start + 64]}

    streamed = pfp_onnx.compress(str(MODEL), batches, budget=0.5, recovery="none")
    check = streamed.report.verification
    assert len(calls) >= 3  # validation, capture and verification each start a fresh pass
    assert 60 <= check.points <= 140 and check.accuracy_original is not None
    assert streamed.report.sensitivity_points + check.points == 500
    again = pfp_onnx.compress(str(MODEL), batches, budget=0.5, recovery="none")
    assert again.model.SerializeToString() == streamed.model.SerializeToString()


def test_streamed_batches_are_validated():
    import pfp_onnx
    from pfp_onnx.errors import DataError

    def bad():
        yield {"input": np.zeros((4, 1, 8, 8), np.float64)}

    with pytest.raises(DataError, match="dtype float64"):
        pfp_onnx.compress(str(MODEL), bad, budget=0.5)
    with pytest.raises(DataError, match="yielded no points"):
        pfp_onnx.compress(str(MODEL), lambda: iter(()), budget=0.5)


def test_split_copies_no_points(model):
    """The parts keep indices into the data, not copies of its points; their batches gather the points."""
    import tracemalloc

    data = validate(dict(np.load(DATA)), model)
    tracemalloc.start()
    first, held = split(data, 0.2, seed=3)
    allocated, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert allocated < data.inputs["input"].nbytes / 20
    batches = list(held.batches(32))
    assert [len(batch["input"]) for batch in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([batch["input"] for batch in batches]), held.inputs["input"])
    np.testing.assert_array_equal(np.concatenate([batch["labels"] for batch in batches]), held.labels)
    inner = held.subset(np.array([3, 1]))
    np.testing.assert_array_equal(inner.inputs["input"], held.inputs["input"][[3, 1]])
