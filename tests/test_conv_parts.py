"""The capture model's sign-part convs: same network outputs, exact z⁺/|z⁻|, only where provably safe."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from architectures import ARCHITECTURES
from pfp_onnx import capture, runtime
from pfp_onnx.sensitivity import conv_parts
from pfp_onnx.capture import capture_sensitivities
from pfp_onnx.sensitivity.conv_parts import CUDA_OPTIONS, with_conv_parts
from pfp_onnx.data import validate
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.model import with_outputs
from pfp_onnx.recovery.least_squares import ConvPatches, layer_features
from pfp_onnx.runtime import CPU, CUDA, Device, choose_device
from pfp_onnx.sensitivity.scorers import ConvScorer
from test_cli import DATA, MODEL
from test_grid_screen import grid_path_taken
from zoo import _GraphBuilder, random_inputs


@pytest.fixture(autouse=True)
def every_conv_size(monkeypatch):
    """The models here are small (8-32 channels): lift the 1×1 convs' width limit, which only weighs speed."""
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(with_outputs(model, names).SerializeToString(), providers=[CPU])
    return dict(zip(names, session.run(names, feeds)))


def _parts_in_float64(activation: np.ndarray, weight: np.ndarray, node: onnx.NodeProto, layer) -> tuple:
    """z⁺ and |z⁻| [N, F, *out] of a conv, by float64 products of its unfolded patches."""
    geometry = layer.conv
    patches = layer_features(activation.astype(np.float64), conv=ConvPatches(
        geometry.strides, geometry.pads, geometry.dilations, weight.shape[2:]))
    flat = weight.reshape(len(weight), -1).astype(np.float64)
    samples = len(activation)
    return tuple((patches @ np.maximum(sign * flat, 0).T).reshape(samples, -1, len(weight)).transpose(0, 2, 1)
                 for sign in (1, -1))


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "vgg"])
def test_network_outputs_unchanged_and_parts_exact(name):
    """Relu-fed convs (ResNet, VGG) and ReLU6-fed ones written as Clip(x, 0, 6) (MobileNet v2) get parts;
    the network's outputs stay the original's up to float32 rounding, and each part is the float64 z."""
    model = ARCHITECTURES[name]()
    analysis = analyse_channel_groups(model)
    parts_model, parts = with_conv_parts(model, analysis.layers)
    assert parts
    onnx.checker.check_model(parts_model, full_check=True)
    feeds = random_inputs(model, 4, seed=1)
    outputs = [output.name for output in model.graph.output]
    layers = {layer.node: layer for layer in analysis.layers}
    original = _run(model, feeds, outputs + [layers[node].input for node in parts])
    rewritten = _run(parts_model, feeds, outputs + [name for pair in parts.values() for name in pair])
    for output in outputs:
        np.testing.assert_allclose(rewritten[output], original[output], rtol=1e-4, atol=1e-5)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    for node_name, (plus, minus) in parts.items():
        layer = layers[node_name]
        expected = _parts_in_float64(original[layer.input], weights[layer.weight], nodes[node_name], layer)
        for got, want in zip((rewritten[plus], rewritten[minus]), expected):
            assert got.size == want.size and got.min() >= 0
            want = want.reshape(got.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _single_conv_model(source: str, *, group: int = 1, constant_weight: bool = False, bias: bool = True,
                       kernel: int = 3):
    """input → <source> → Conv(8 → 8) → output, the conv's input made by `source`."""
    b = _GraphBuilder("single", seed=3, constant_nodes=constant_weight)
    x = b.input("x", ["N", 8, 6, 6])
    sources = {
        "input": lambda: x,
        "relu": lambda: b.node("Relu", [x], "relu"),
        "relu_maxpool": lambda: b.node("MaxPool", [b.node("Relu", [x], "relu")], "pool", kernel_shape=[2, 2]),
        "clip_0": lambda: b.node("Clip", [x, b.constant("lo", 0.0), b.constant("hi", 6.0)], "clip"),
        "clip_negative": lambda: b.node("Clip", [x, b.constant("lo", -1.0), b.constant("hi", 6.0)], "clip"),
        "clip_no_floor": lambda: b.node("Clip", [x, "", b.constant("hi", 6.0)], "clip"),
        "add": lambda: b.node("Add", [b.node("Relu", [x], "relu"), b.constant("one", np.ones((1, 8, 1, 1)))], "add"),
        "maxpool_of_input": lambda: b.node("MaxPool", [x], "pool", kernel_shape=[2, 2]),
    }
    h = sources[source]()
    h = b.conv("conv", h, 8 // group, 8, kernel, pads=[kernel // 2] * 4, group=group, bias=bias)
    b.output(h, ["N", 8, "H", "W"])
    return b.build()


@pytest.mark.parametrize("source, eligible", [
    ("relu", True), ("relu_maxpool", True), ("clip_0", True),
    ("input", False), ("clip_negative", False), ("clip_no_floor", False), ("add", False), ("maxpool_of_input", False),
])
def test_only_provably_nonnegative_inputs_get_parts(source, eligible):
    model = _single_conv_model(source)
    analysis = analyse_channel_groups(model)
    parts_model, parts = with_conv_parts(model, analysis.layers)
    assert bool(parts) is eligible
    if not eligible:
        assert parts_model is model


def test_narrow_pointwise_convs_keep_the_numpy_path(monkeypatch):
    """A 1×1 conv over fewer than PARTS_MIN_FEATURES channels has nothing to unfold, so its parts would
    only cost; a larger kernel gets parts however narrow it is (8 channels × 3×3 here)."""
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 9)
    pointwise = _single_conv_model("relu", kernel=1)
    assert with_conv_parts(pointwise, analyse_channel_groups(pointwise).layers)[1] == {}
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 8)
    assert with_conv_parts(pointwise, analyse_channel_groups(pointwise).layers)[1]
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 512)
    narrow = _single_conv_model("relu")
    assert with_conv_parts(narrow, analyse_channel_groups(narrow).layers)[1]


@pytest.mark.parametrize("variant", [{"group": 2}, {"constant_weight": True}])
def test_grouped_convs_and_constant_node_weights_keep_the_numpy_path(variant):
    model = _single_conv_model("relu", **variant)
    assert with_conv_parts(model, analyse_channel_groups(model).layers)[1] == {}


@pytest.mark.parametrize("bias", [True, False])
def test_bias_is_added_back(bias):
    model = _single_conv_model("relu", bias=bias)
    parts_model, parts = with_conv_parts(model, analyse_channel_groups(model).layers)
    assert parts
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_run(parts_model, feeds, ["conv"])["conv"], _run(model, feeds, ["conv"])["conv"],
                               rtol=1e-5, atol=1e-5)


def test_capture_with_parts_matches_the_numpy_path(monkeypatch):
    """Sensitivities with z± from the capture model equal those with z± from BLAS, up to float32 rounding
    (the two sum in different orders, and the capture model's activations differ by rounding too)."""
    model = onnx.load(str(MODEL))
    data = validate({"input": np.load(DATA)["input"][:24]}, model)
    analysis = analyse_channel_groups(model, data.point_shapes())
    assert with_conv_parts(model, analysis.layers)[1]  # the fixture has Relu-fed convs
    device = choose_device("cpu")
    with_parts = capture_sensitivities(model, analysis, data.batches(8), device)
    monkeypatch.setattr(capture, "with_conv_parts", lambda model, layers: (model, {}))
    without = capture_sensitivities(model, analysis, data.batches(8), device)
    for group in analysis.prunable_groups:
        np.testing.assert_allclose(with_parts[group.id], without[group.id], rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "mobilenet_v2", "vgg", "densenet",
                                  "unet_fpn"])
def test_whole_capture_on_the_grid_matches_the_numpy_path(name, monkeypatch):
    """Every Relu-fed conv of a real architecture on its parts, screened on the input grid over several
    batches, scores what the numpy path scores from unfolded patches and BLAS z± (up to float32 rounding:
    the parts are summed in another order); the grid path is really taken."""
    model = ARCHITECTURES[name]()
    analysis = analyse_channel_groups(model)
    feeds = random_inputs(model, 12, seed=4)
    batches = [{key: value[start:start + 4] for key, value in feeds.items()} for start in range(0, 12, 4)]
    device = choose_device("cpu")
    taken = grid_path_taken(monkeypatch)
    on_grid = capture_sensitivities(model, analysis, iter(batches), device)
    assert any(taken)
    monkeypatch.setattr(capture, "with_conv_parts", lambda model, layers: (model, {}))
    without = capture_sensitivities(model, analysis, iter(batches), device)
    for group in analysis.prunable_groups:
        np.testing.assert_allclose(on_grid[group.id], without[group.id], rtol=1e-5, atol=1e-7)


def test_scorer_uses_parts_only_for_nonnegative_batches():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    geometry = dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    signed = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    bogus = (np.ones((2, 4, 5, 5), np.float32), np.ones((2, 4, 5, 5), np.float32))
    reference, given = ConvScorer(weight, **geometry), ConvScorer(weight, **geometry)
    reference.update(signed)
    given.update(signed, bogus)  # a⁺ and a⁻ are two points: whole-batch parts cannot be theirs
    np.testing.assert_array_equal(given.sensitivity, reference.sensitivity)
    nonnegative = np.abs(signed)
    trusted = ConvScorer(weight, **geometry)
    trusted.update(nonnegative, bogus)  # now they are used: every |z| = 1
    assert not np.array_equal(trusted.sensitivity, ConvScorer(weight, **geometry).sensitivity)
    with pytest.raises(ValueError, match="do not fit"):
        ConvScorer(weight, **geometry).update(nonnegative, (bogus[0][:, :3], bogus[1][:, :3]))


def test_cuda_sessions_ask_for_sums_of_products(monkeypatch):
    """On CUDA the capture session gets cuDNN's implicit-GEMM algorithm and no TF32; CPU-only devices
    pass no options."""
    seen = []

    class Recorder:
        def __init__(self, model, options, providers):
            seen.append(providers)

    monkeypatch.setattr(runtime.ort, "InferenceSession", Recorder)
    model = _single_conv_model("relu")
    runtime.create_session(model, Device((CUDA, CPU), "cuda"), cuda_options=CUDA_OPTIONS)
    runtime.create_session(model, Device((CPU,), "cpu"), cuda_options=CUDA_OPTIONS)
    assert seen == [[(CUDA, CUDA_OPTIONS), CPU], [CPU]]
    assert CUDA_OPTIONS == {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": "0"}

    requested = []
    monkeypatch.setattr(capture, "create_session", lambda *args, **kwargs: requested.append(kwargs) or 1 / 0)
    model = ARCHITECTURES["vgg"]()
    with pytest.raises(ZeroDivisionError):
        capture_sensitivities(model, analyse_channel_groups(model), [], Device((CUDA, CPU), "cuda"))
    assert requested[0]["cuda_options"] == CUDA_OPTIONS
