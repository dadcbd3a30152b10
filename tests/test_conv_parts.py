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
    """The models here are small (8-32 channels): lift the 1×1 convs' width limits, which only weigh speed."""
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 0)
    monkeypatch.setattr(conv_parts, "SIGNED_PARTS_MIN_FEATURES", 0)


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


def _expected_parts(activation: np.ndarray, weight: np.ndarray, node: onnx.NodeProto, layer, count: int) -> tuple:
    """What a conv's parts must be: (z⁺, |z⁻|) of a nonnegative input, or those of a⁺ = max(a, 0) followed
    by those of a⁻ = max(−a, 0), in float64."""
    if count == 2:
        return _parts_in_float64(activation, weight, node, layer)
    return (*_parts_in_float64(np.maximum(activation, 0), weight, node, layer),
            *_parts_in_float64(np.maximum(-activation, 0), weight, node, layer))


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "vgg", "mobilenet_v3", "efficientnet_mbconv"])
def test_network_outputs_unchanged_and_parts_exact(name):
    """Relu-fed convs (ResNet, VGG) and ReLU6-fed ones written as Clip(x, 0, 6) (MobileNet v2) get two parts,
    convs after HardSwish (MobileNet v3) or Swish (EfficientNet) four; the network's outputs stay
    the original's up to float32 rounding, and each part is the float64 z of its half of the input."""
    model = ARCHITECTURES[name]()
    analysis = analyse_channel_groups(model)
    parts_model, parts = with_conv_parts(model, analysis.layers)
    assert parts
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    layers = {layer.node: layer for layer in analysis.layers}
    for node_name, names in parts.items():  # the stem reads the (signed) model input
        assert len(names) == (2 if producers.get(layers[node_name].input) in ("Relu", "Clip", "MaxPool") else 4)
    counts = [len(names) for names in parts.values()]
    assert 2 in counts if name in ("resnet_basic", "mobilenet_v2", "vgg") else counts.count(4) >= 2
    onnx.checker.check_model(parts_model, full_check=True)
    feeds = random_inputs(model, 4, seed=1)
    outputs = [output.name for output in model.graph.output]
    original = _run(model, feeds, outputs + [layers[node].input for node in parts])
    rewritten = _run(parts_model, feeds, outputs + [name for pair in parts.values() for name in pair])
    for output in outputs:
        np.testing.assert_allclose(rewritten[output], original[output], rtol=1e-4, atol=1e-5)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    for node_name, names in parts.items():
        layer = layers[node_name]
        expected = _expected_parts(original[layer.input], weights[layer.weight], nodes[node_name], layer, len(names))
        assert len(expected) == len(names)
        for got, want in zip((rewritten[name] for name in names), expected):
            assert got.size == want.size and got.min() >= 0
            want = want.reshape(got.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(np.abs(want).max(), 1e-30))


def _single_conv_model(source: str, *, group: int = 1, constant_weight: bool = False, bias: bool = True,
                       kernel: int = 3):
    """input → <source> → Conv(8 → 8) → output, the conv's input made by `source`."""
    b = _GraphBuilder("single", seed=3, constant_nodes=constant_weight)
    x = b.input("x", ["N", 8, 6, 6])
    sources = {
        "input": lambda: x,
        "relu": lambda: b.node("Relu", [x], "relu"),
        "silu": lambda: b.node("Mul", [x, b.node("Sigmoid", [x], "sigmoid")], "silu"),
        "hard_swish": lambda: b.node("HardSwish", [x], "hard_swish"),
        "leaky_relu": lambda: b.node("LeakyRelu", [x], "leaky_relu", alpha=0.1),
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


@pytest.mark.parametrize("source, nonnegative", [
    ("relu", True), ("relu_maxpool", True), ("clip_0", True),
    ("input", False), ("clip_negative", False), ("clip_no_floor", False), ("add", False), ("maxpool_of_input", False),
    ("silu", False), ("hard_swish", False), ("leaky_relu", False),
])
def test_only_provably_nonnegative_inputs_get_two_parts(source, nonnegative, monkeypatch):
    """A conv whose input is nonnegative by construction gets z⁺ and |z⁻| of it; any other gets the parts of
    its positive and negative halves (four), or, with SIGNED_PARTS off, none (the model is returned as is)."""
    model = _single_conv_model(source)
    analysis = analyse_channel_groups(model)
    parts_model, parts = with_conv_parts(model, analysis.layers)
    assert [len(names) for names in parts.values()] == [2 if nonnegative else 4]
    monkeypatch.setattr(conv_parts, "SIGNED_PARTS", False)
    parts_model, parts = with_conv_parts(model, analysis.layers)
    assert bool(parts) is nonnegative
    if not nonnegative:
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


def test_narrow_pointwise_convs_of_signed_inputs_keep_the_numpy_path(monkeypatch):
    """The same for signed inputs, with their own limit SIGNED_PARTS_MIN_FEATURES (the other limit does not
    apply to them); a 3×3 conv of a signed input gets its four parts however narrow it is."""
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 0)
    monkeypatch.setattr(conv_parts, "SIGNED_PARTS_MIN_FEATURES", 9)
    pointwise = _single_conv_model("silu", kernel=1)
    assert with_conv_parts(pointwise, analyse_channel_groups(pointwise).layers)[1] == {}
    monkeypatch.setattr(conv_parts, "SIGNED_PARTS_MIN_FEATURES", 8)
    monkeypatch.setattr(conv_parts, "PARTS_MIN_FEATURES", 512)
    assert [len(names) for names in with_conv_parts(pointwise, analyse_channel_groups(pointwise).layers)[1].values()] \
        == [4]
    monkeypatch.setattr(conv_parts, "SIGNED_PARTS_MIN_FEATURES", 512)
    narrow = _single_conv_model("silu")
    assert [len(names) for names in with_conv_parts(narrow, analyse_channel_groups(narrow).layers)[1].values()] == [4]


@pytest.mark.parametrize("source", ["relu", "silu"])
@pytest.mark.parametrize("variant", [{"group": 2}, {"group": 8}, {"constant_weight": True}])
def test_grouped_convs_and_constant_node_weights_keep_the_numpy_path(variant, source):
    """Grouped convs (frozen) and depthwise ones (not scored) keep their conv, whatever their input."""
    model = _single_conv_model(source, **variant)
    assert with_conv_parts(model, analyse_channel_groups(model).layers)[1] == {}


@pytest.mark.parametrize("source", ["relu", "silu", "input"])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_is_added_back(bias, source):
    model = _single_conv_model(source, bias=bias)
    parts_model, parts = with_conv_parts(model, analyse_channel_groups(model).layers)
    assert parts
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_run(parts_model, feeds, ["conv"])["conv"], _run(model, feeds, ["conv"])["conv"],
                               rtol=1e-5, atol=1e-5)


def test_signed_halves_are_made_once_per_input():
    """Convs reading the same signed tensor share its a⁺ = Relu(x) and a⁻ = Relu(−x): one of each in the graph,
    and one more for the other tensor read."""
    b = _GraphBuilder("shared", seed=5)
    x = b.input("x", ["N", 8, 6, 6])
    h = b.node("HardSwish", [x], "act")
    left = b.conv("left", h, 8, 8, 3, pads=[1] * 4)
    right = b.conv("right", h, 8, 8, 3, pads=[1] * 4)
    h = b.conv("last", b.node("Add", [left, right], "sum"), 8, 8, 3, pads=[1] * 4)
    b.output(h, ["N", 8, 6, 6])
    model = b.build()
    parts_model, parts = with_conv_parts(model, analyse_channel_groups(model).layers)
    assert sorted(parts) == ["last", "left", "right"] and {len(names) for names in parts.values()} == {4}
    ops = [node.op_type for node in parts_model.graph.node]
    assert ops.count("Neg") == 2 and ops.count("Relu") == 4 and ops.count("Conv") == 12
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_run(parts_model, feeds, ["last"])["last"], _run(model, feeds, ["last"])["last"],
                               rtol=1e-4, atol=1e-5)


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
    on_grid, without = _with_and_without_parts(model, analysis, monkeypatch)
    for group in analysis.prunable_groups:
        np.testing.assert_allclose(on_grid[group.id], without[group.id], rtol=_summation_rounding(model), atol=1e-7)


def _summation_rounding(model: onnx.ModelProto) -> float:
    """The worst relative float32 rounding of the model's widest conv sum, K terms summed in any order:
    K · 2⁻²⁴ (at least 1e-5). unet_fpn's 288-term sums were seen to differ by 1.3e-5 between the two paths
    (onnxruntime 1.31.1 on a 2-core machine), within its bound of 1.7e-5."""
    weights = {item.name: item for item in model.graph.initializer}
    widest = max(int(np.prod(weights[node.input[1]].dims[1:])) for node in model.graph.node
                 if node.op_type == "Conv" and node.input[1] in weights)
    return max(1e-5, widest * 2.0 ** -24)


def _with_and_without_parts(model: onnx.ModelProto, analysis, monkeypatch):
    """Sensitivities of 12 points in batches of 4 captured on the conv parts (the grid path really taken),
    then on the numpy path alone."""
    feeds = random_inputs(model, 12, seed=4)
    batches = [{key: value[start:start + 4] for key, value in feeds.items()} for start in range(0, 12, 4)]
    device = choose_device("cpu")
    taken = grid_path_taken(monkeypatch)
    on_parts = capture_sensitivities(model, analysis, iter(batches), device)
    assert any(taken)
    monkeypatch.setattr(capture, "with_conv_parts", lambda model, layers: (model, {}))
    return on_parts, capture_sensitivities(model, analysis, iter(batches), device)


def _signed_network(activation: str) -> onnx.ModelProto:
    """input → 3×3 conv → act → 3×3 conv (stride 2) → act → depthwise 3×3 → act → 1×1 conv → act → grouped
    3×3 conv (2 groups) → act → global pooling → Gemm, with `act` one of the activations whose outputs take
    both signs. The second, third (after the depthwise conv) and 1×1 convs are scored on signed inputs."""
    b = _GraphBuilder(f"signed_{activation}", seed=7)

    def act(name: str, data: str) -> str:
        if activation == "silu":
            return b.node("Mul", [data, b.node("Sigmoid", [data], f"{name}.sigmoid")], name)
        if activation == "hard_swish":
            return b.node("HardSwish", [data], name)
        if activation == "leaky_relu":
            return b.node("LeakyRelu", [data], name, alpha=0.1)
        # GELU as the exporters write it: x · 0.5 · (1 + erf(x / √2))
        erf = b.node("Erf", [b.node("Div", [data, b.constant(f"{name}.sqrt2", np.sqrt(2.0))], f"{name}.div")],
                     f"{name}.erf")
        half = b.node("Mul", [data, b.constant(f"{name}.one_half", 0.5)], f"{name}.half")
        return b.node("Mul", [half, b.node("Add", [erf, b.constant(f"{name}.one", 1.0)], f"{name}.plus")], name)

    x = b.input("x", ["N", 3, 12, 12])
    h = act("act1", b.conv("conv1", x, 3, 12, 3, pads=[1] * 4))
    h = act("act2", b.conv("conv2", h, 12, 16, 3, strides=[2, 2], pads=[1] * 4))
    h = act("act3", b.conv("depthwise", h, 1, 16, 3, pads=[1] * 4, group=16))
    h = act("act4", b.conv("pointwise", h, 16, 24, 1))
    h = act("act5", b.conv("grouped", h, 12, 24, 3, pads=[1] * 4, group=2))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "pool")], "flatten", axis=1)
    b.output(b.gemm("fc", h, 24, 10), ["N", 10])
    return b.build()


@pytest.mark.parametrize("activation", ["silu", "hard_swish", "leaky_relu", "gelu"])
def test_signed_inputs_on_parts_match_the_numpy_path(activation, monkeypatch):
    """Convs fed by SiLU, HardSwish, LeakyReLU or GELU, after a depthwise conv too, score on their four parts
    (screened on the input grid, over several batches) what the numpy path scores from the unfolded patches
    of a⁺ and a⁻ with BLAS z±, up to float32 rounding (the parts are summed in another order, and the capture
    model's activations differ by rounding); the depthwise and the grouped conv keep their convs."""
    model = _signed_network(activation)
    analysis = analyse_channel_groups(model)
    scored = [probe.layer.node for probe in capture.consumer_probes(model, analysis)]
    parts = with_conv_parts(model, analysis.layers)[1]
    assert {"conv2", "pointwise"} <= set(scored) and {"depthwise", "grouped"}.isdisjoint(parts)
    assert all(len(parts[node]) == 4 for node in scored if node != "fc")
    on_parts, without = _with_and_without_parts(model, analysis, monkeypatch)
    assert analysis.prunable_groups
    for group in analysis.prunable_groups:
        assert np.any(without[group.id] > 0)
        np.testing.assert_allclose(on_parts[group.id], without[group.id], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel, chunk_bytes", [(3, None), (1, None), (3, 1)])
def test_signed_parts_score_bit_for_bit_as_the_numpy_path(kernel, chunk_bytes, monkeypatch):
    """Given the four parts summed exactly as the numpy path sums z± (its own BLAS product on the unfolded
    patches of a⁺ and of a⁻), the scorer's parts path gives the numpy path's sensitivities bit for bit:
    every product is the same float32 operation. With one sample a chunk, a nonnegative sample's a⁻ is
    skipped as the numpy path skips it."""
    from pfp_onnx.sensitivity import scorers

    if chunk_bytes is not None:
        monkeypatch.setattr(scorers, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(9)
    weight = rng.normal(size=(12, 10, kernel, kernel)).astype(np.float32)
    geometry = dict(strides=[1, 1], pads=[kernel // 2] * 4, dilations=[1, 1])
    batch = rng.normal(size=(3, 10, 9, 9)).astype(np.float32)
    batch[1] = np.abs(batch[1])  # a nonnegative sample: no a⁻ point of its own
    reference, given = ConvScorer(weight, **geometry), ConvScorer(weight, **geometry)
    reference.update(batch)

    def blas_parts(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out_shape = points.shape[2:]
        z = reference._scorer._z(reference._unfold(points, out_shape))  # [2F, N·P]
        z = z.reshape(2, len(weight), len(points), -1).transpose(0, 2, 1, 3)
        return tuple(np.ascontiguousarray(part).reshape(len(points), len(weight), *out_shape) for part in z)

    def halves_parts(points: np.ndarray) -> list[np.ndarray]:
        """The parts of a⁺ and a⁻ of each chunk the scorer cuts (the whole batch, or one sample at a time)."""
        chunks = [points] if chunk_bytes is None else [points[index:index + 1] for index in range(len(points))]
        halves = []
        for sign in (1, -1):
            by_chunk = [blas_parts(np.maximum(sign * chunk, 0)) for chunk in chunks]
            halves += [np.concatenate([plus for plus, _ in by_chunk]), np.concatenate([minus for _, minus in by_chunk])]
        return halves

    given.update(batch, halves_parts(batch))
    np.testing.assert_array_equal(given.sensitivity, reference.sensitivity)
    assert np.all(reference.sensitivity > 0)


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
    with pytest.raises(ValueError, match="do not fit"):  # two parts, or two of each half
        ConvScorer(weight, **geometry).update(signed, (*bogus, bogus[0]))


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
