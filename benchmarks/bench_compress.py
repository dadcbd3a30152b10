"""What compress costs and what pruning buys, as ratios measured side by side in one run.

1. compress wall time (recovery none, and lstsq) ÷ one plain onnxruntime forward pass over the same
   calibration points at the same batch size, with compress's own per-stage seconds; recovery none runs with
   the sign parts of convs of signed inputs (pfp_onnx/sensitivity/conv_parts.py) off, as before issue 24, and
   on, interleaved (--compress-repeats times);
2. the sensitivity stage alone (pfp_onnx.capture.capture_sensitivities) ÷ a straightforward PyTorch-CPU
   transcription of the reference tracker (docs/method.md §1), after checking both give the same sensitivities
   (skipped when torch is not installed); beside it, the same stage computing only z⁺ and z⁻ of every
   neuron (the part exact PFP cannot skip), each as a multiple of the forward pass; then the stage's seconds
   by layer kind (pointwise 1×1, dense k×k, depthwise, grouped, transposed, gemm/matmul): onnxruntime's
   profile of the capture pass and the numpy scoring of each kind's layers, so that the slowest kind shows;
3. pruned ÷ original inference latency on onnxruntime's CPU provider at several budgets, beside the MAC
   reduction the report claims, and their ratio (1.0 = the latency falls as much as the MACs).

Models: the checked-in MNIST ResNet-20 (fixtures/mnist_resnet.onnx with the first --points points of
fixtures/mnist_calib.npz); --model resnet56-cifar, a CIFAR-style ResNet-56 (3 stages × 9 basic blocks,
16/32/64 channels, 32×32 input); --model resnet18-imagenet, the ImageNet ResNet-18 topology (224×224
input); --model resnet50-imagenet, ResNet-50 (bottleneck blocks); --model yolov8n-style, the YOLOv8n detector
topology at 320×320 (SiLU everywhere: every scored conv reads a signed input); --model pp-lcnet-style, the
PP-LCNet x1.0 classifier (MobileNet-style depthwise-separable blocks with HardSwish). Those five are built here
with onnx.helper, with random weights, BatchNorm with random statistics (folded into the convs in the last
two, as their exporters write them), and random inputs. --onnx FILE --npz FILE takes any model with one input
and its calibration data instead, such as the same ImageNet topologies trained on upscaled digits by
benchmarks/train_resnet.py, or the real models of benchmarks/real_models.py (their inputs cached under
$PFP_ONNX_BENCH_CACHE/inputs; a model exported with a fixed batch of 1 needs --batch-size 1).

    python benchmarks/bench_compress.py                                  # MNIST ResNet-20, 256 points
    python benchmarks/bench_compress.py --model resnet56-cifar --points 128 --repeats 50
    python benchmarks/bench_compress.py --model resnet18-imagenet --points 32 --skip-torch
    python benchmarks/bench_compress.py --model yolov8n-style --sections 1,2 --compress-repeats 3 --skip-torch
    python benchmarks/bench_compress.py --onnx /tmp/trained/resnet50.onnx --npz /tmp/trained/resnet50_calib.npz
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import pfp_onnx
from pfp_onnx.capture import ConsumerProbe, capture_sensitivities, consumer_probes
from pfp_onnx.sensitivity import conv_parts
from pfp_onnx.sensitivity.conv_parts import with_conv_parts
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.model import node_names, with_outputs
from pfp_onnx.sensitivity.max_times import MaxTimesScorer
from pfp_onnx.runtime import choose_device, create_session
from pfp_onnx.sensitivity.scorers import ConvScorer

try:
    import torch
    import torch.nn.functional as torch_functional
except ImportError:  # the project venv has no torch: the comparison is skipped
    torch = None

ROOT = Path(__file__).resolve().parents[1]
Z_EPS = float(np.finfo(np.float32).eps)  # |z| at or below this counts as +infinity (docs/method.md §1, step 3)
TORCH_CHUNK_BYTES = 256 * 2**20  # bound on one [points, F, C, K, P] contribution tensor in the transcription


# ----------------------------------------------------------------------------------------------------------
# Models and data


def mnist_resnet20(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return from_files(ROOT / "fixtures" / "mnist_resnet.onnx", ROOT / "fixtures" / "mnist_calib.npz", points)


def from_files(model_path: Path, data_path: Path, points: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model with one input and the first `points` points of an .npz holding an array of that input's name
    (and optionally "labels"), such as benchmarks/train_resnet.py or benchmarks/real_models.py write. The input
    is renamed "input", which the benchmark feeds."""
    model = onnx.load(model_path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise SystemExit(f"{model_path}: the benchmark feeds models with one input")
    original = inputs[0].name
    if original != "input":
        inputs[0].name = "input"
        for node in model.graph.node:
            node.input[:] = ["input" if name == original else name for name in node.input]
    with np.load(data_path) as fixture:
        if original not in fixture:
            raise SystemExit(f"{data_path} holds no array named {original!r}, the model's input")
        if points > len(fixture[original]):
            raise SystemExit(f"{data_path} has {len(fixture[original])} points; ask for at most that many")
        return model, {"input": fixture[original][:points], **({"labels": fixture["labels"][:points]}
                                                               if "labels" in fixture else {})}


def resnet56_cifar(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """CIFAR ResNet-56 (He et al. 2016, §4.2): 3×3 stem, 3 stages × 9 basic blocks of 16/32/64 channels."""
    return basic_resnet("resnet56_cifar", points, seed, image=32, stem=(16, 3, 1, False), widths=(16, 32, 64),
                        blocks=(9, 9, 9), classes=10)


def resnet18_imagenet(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ImageNet ResNet-18 (He et al. 2016, Table 1): 7×7/2 stem and 3×3/2 max pool, 4 stages × 2 basic
    blocks of 64/128/256/512 channels, 224×224 input, 1000 classes."""
    return basic_resnet("resnet18_imagenet", points, seed, image=224, stem=(64, 7, 2, True),
                        widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000)


def resnet50_imagenet(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ImageNet ResNet-50 (He et al. 2016, Table 1): the ResNet-18 stem, then 3/4/6/3 bottleneck blocks
    (1×1, 3×3, 1×1 convs of 64–512 channels expanded 4×), 224×224 input, 1000 classes."""
    return basic_resnet("resnet50_imagenet", points, seed, image=224, stem=(64, 7, 2, True),
                        widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), classes=1000, bottleneck=True)


def basic_resnet(name: str, points: int, seed: int, *, image: int, stem: tuple[int, int, int, bool],
                 widths: tuple[int, ...], blocks: tuple[int, ...], classes: int,
                 bottleneck: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A ResNet of basic (or bottleneck) blocks with 1×1 projection shortcuts where the shape changes,
    random weights and BatchNorm statistics, and random inputs. stem = (width, kernel, stride, max pool
    after it); blocks = blocks per stage."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []

    def constant(name: str, values: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv_bn(name: str, source: str, channels_in: int, channels_out: int, kernel: int, stride: int,
                gamma_scale: float = 1.0) -> str:
        fan_in = channels_in * kernel * kernel
        weight = rng.normal(0, np.sqrt(2 / fan_in), size=(channels_out, channels_in, kernel, kernel))
        nodes.append(helper.make_node("Conv", [source, constant(f"{name}.weight", weight)], [f"{name}.conv"],
                                      name=f"{name}/Conv", kernel_shape=[kernel, kernel], strides=[stride, stride],
                                      pads=[kernel // 2] * 4))
        bn = [constant(f"{name}.bn.scale", gamma_scale * rng.uniform(0.5, 1.5, channels_out)),
              constant(f"{name}.bn.bias", rng.normal(0, 0.1, channels_out)),
              constant(f"{name}.bn.mean", rng.normal(0, 0.1, channels_out)),
              constant(f"{name}.bn.var", rng.uniform(0.5, 1.5, channels_out))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", *bn], [f"{name}.bn"],
                                      name=f"{name}/BatchNormalization"))
        return f"{name}.bn"

    def relu(name: str, source: str) -> str:
        nodes.append(helper.make_node("Relu", [source], [f"{name}.relu"], name=f"{name}/Relu"))
        return f"{name}.relu"

    stem_width, stem_kernel, stem_stride, stem_pool = stem
    tensor = relu("stem", conv_bn("stem", "input", 3, stem_width, stem_kernel, stem_stride))
    if stem_pool:
        nodes.append(helper.make_node("MaxPool", [tensor], ["stem.pool"], name="stem/MaxPool", kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        tensor = "stem.pool"
    channels = stem_width
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            block_name = f"stage{stage + 1}.block{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            # A small last BN scale keeps the random residual stream from growing over many blocks.
            if bottleneck:
                out = 4 * width
                branch = relu(f"{block_name}.conv1", conv_bn(f"{block_name}.conv1", tensor, channels, width, 1, 1))
                branch = relu(f"{block_name}.conv2", conv_bn(f"{block_name}.conv2", branch, width, width, 3, stride))
                branch = conv_bn(f"{block_name}.conv3", branch, width, out, 1, 1, gamma_scale=0.3)
            else:
                out = width
                branch = relu(f"{block_name}.conv1", conv_bn(f"{block_name}.conv1", tensor, channels, width, 3, stride))
                branch = conv_bn(f"{block_name}.conv2", branch, width, width, 3, 1, gamma_scale=0.3)
            shortcut = tensor if stride == 1 and channels == out else \
                conv_bn(f"{block_name}.shortcut", tensor, channels, out, 1, stride)
            nodes.append(helper.make_node("Add", [branch, shortcut], [f"{block_name}.add"], name=f"{block_name}/Add"))
            tensor, channels = relu(block_name, f"{block_name}.add"), out
    nodes.append(helper.make_node("GlobalAveragePool", [tensor], ["pooled"], name="pool/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten/Flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["features", constant("fc.weight", rng.normal(0, 0.1, (classes, channels))),
                                           constant("fc.bias", np.zeros(classes))], ["logits"], name="fc/Gemm",
                                  transB=1))
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    data = {"input": rng.normal(0, 1, size=(points, 3, image, image)).astype(np.float32)}
    return model, data


class _Builder:
    """Nodes and random initializers of a benchmark model (seeded), with the few blocks its models share."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, values, dtype=np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def conv(self, name: str, source: str, channels_in: int, channels_out: int, kernel: int, stride: int = 1, *,
             group: int = 1) -> str:
        """A conv with its BatchNorm folded in, as exporters write them: He-initialised weight, small bias."""
        fan_in = channels_in // group * kernel * kernel
        weight = self.rng.normal(0, np.sqrt(2 / fan_in), size=(channels_out, channels_in // group, kernel, kernel))
        return self.node("Conv", [source, self.constant(f"{name}.weight", weight),
                                  self.constant(f"{name}.bias", self.rng.normal(0, 0.1, channels_out))], name,
                         kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[kernel // 2] * 4, group=group)

    def silu(self, name: str, source: str) -> str:
        """SiLU as the PyTorch exporter writes it: x · Sigmoid(x)."""
        return self.node("Mul", [source, self.node("Sigmoid", [source], f"{name}.sigmoid")], f"{name}.silu")

    def hard_swish(self, name: str, source: str) -> str:
        return self.node("HardSwish", [source], f"{name}.hardswish")

    def model(self, name: str, image: tuple[int, int], outputs: list[tuple[str, list]], points: int
              ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        graph = helper.make_graph(self.nodes, name,
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *image])],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)
                                   for output, shape in outputs], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return model, {"input": self.rng.normal(0, 1, size=(points, 3, *image)).astype(np.float32)}


def yolov8n_style(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The YOLOv8n topology (Ultralytics, width 0.25, depth 0.33) at 320×320: every conv a folded-BN conv
    followed by SiLU (x · Sigmoid(x)), so that every scored conv reads a signed input; C2f blocks (1×1 conv,
    Split, 3×3 bottlenecks with residual Adds in the backbone, Concat, 1×1 conv), SPPF, the PAN neck and the
    decoupled head (per scale a box branch of 3×3, 3×3, 1×1 to 64 and a class branch to 11 classes), its six
    outputs flattened and concatenated into [N, 75, anchors]."""
    b = _Builder(seed)

    def conv_silu(name: str, source: str, channels_in: int, channels_out: int, kernel: int, stride: int = 1) -> str:
        return b.silu(name, b.conv(f"{name}.conv", source, channels_in, channels_out, kernel, stride))

    def c2f(name: str, source: str, channels_in: int, channels_out: int, count: int, shortcut: bool) -> str:
        hidden = channels_out // 2
        split = b.constant(f"{name}.split", [hidden, hidden], np.int64)
        head = conv_silu(f"{name}.cv1", source, channels_in, 2 * hidden, 1)
        b.nodes.append(helper.make_node("Split", [head, split], [f"{name}.y0", f"{name}.y1"], name=f"{name}.split",
                                        axis=1))
        pieces = [f"{name}.y0", f"{name}.y1"]
        for index in range(count):
            inner = conv_silu(f"{name}.m{index}.cv1", pieces[-1], hidden, hidden, 3)
            inner = conv_silu(f"{name}.m{index}.cv2", inner, hidden, hidden, 3)
            pieces.append(b.node("Add", [pieces[-1], inner], f"{name}.m{index}.add") if shortcut else inner)
        joined = b.node("Concat", pieces, f"{name}.concat", axis=1)
        return conv_silu(f"{name}.cv2", joined, (2 + count) * hidden, channels_out, 1)

    def upsample(name: str, source: str) -> str:
        return b.node("Resize", [source, "", b.constant(f"{name}.scales", [1, 1, 2, 2])], name, mode="nearest")

    h = conv_silu("model.0", "input", 3, 16, 3, 2)
    h = conv_silu("model.1", h, 16, 32, 3, 2)
    h = c2f("model.2", h, 32, 32, 1, True)
    h = conv_silu("model.3", h, 32, 64, 3, 2)
    p3 = c2f("model.4", h, 64, 64, 2, True)
    h = conv_silu("model.5", p3, 64, 128, 3, 2)
    p4 = c2f("model.6", h, 128, 128, 2, True)
    h = conv_silu("model.7", p4, 128, 256, 3, 2)
    h = c2f("model.8", h, 256, 256, 1, True)
    # SPPF: 1×1 to half, three chained 5×5 max pools, Concat of all four, 1×1 back.
    pooled = [conv_silu("model.9.cv1", h, 256, 128, 1)]
    for index in range(3):
        pooled.append(b.node("MaxPool", [pooled[-1]], f"model.9.pool{index}", kernel_shape=[5, 5], pads=[2] * 4))
    p5 = conv_silu("model.9.cv2", b.node("Concat", pooled, "model.9.concat", axis=1), 512, 256, 1)
    h = c2f("model.12", b.node("Concat", [upsample("model.10", p5), p4], "model.11", axis=1), 384, 128, 1, False)
    n3 = c2f("model.15", b.node("Concat", [upsample("model.13", h), p3], "model.14", axis=1), 192, 64, 1, False)
    down = conv_silu("model.16", n3, 64, 64, 3, 2)
    n4 = c2f("model.18", b.node("Concat", [down, h], "model.17", axis=1), 192, 128, 1, False)
    down = conv_silu("model.19", n4, 128, 128, 3, 2)
    n5 = c2f("model.21", b.node("Concat", [down, p5], "model.20", axis=1), 384, 256, 1, False)
    flat_shape = b.constant("head.shape", [0, 75, -1], np.int64)
    levels = []
    for level, (source, channels) in enumerate(((n3, 64), (n4, 128), (n5, 256))):
        branches = []
        for branch, width, outputs in (("cv2", 64, 64), ("cv3", 64, 11)):
            name = f"model.22.{branch}.{level}"
            inner = conv_silu(f"{name}.0", source, channels, width, 3)
            inner = conv_silu(f"{name}.1", inner, width, width, 3)
            branches.append(b.conv(f"{name}.2", inner, width, outputs, 1))
        joined = b.node("Concat", branches, f"model.22.concat{level}", axis=1)
        levels.append(b.node("Reshape", [joined, flat_shape], f"model.22.flat{level}"))
    b.node("Concat", levels, "output0", axis=2)
    return b.model("yolov8n_style", (320, 320), [("output0", ["N", 75, "anchors"])], points)


def pp_lcnet_style(points: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """PP-LCNet x1.0 (Cui et al. 2021; the MobileNet-family backbone of PaddleOCR's classifiers) at 224×224:
    a 3×3/2 stem, then 13 depthwise-separable blocks (a depthwise 3×3 or 5×5 conv and a pointwise 1×1 conv,
    each with folded BatchNorm and HardSwish) of 32 to 512 channels, squeeze-excite in the last two, global
    pooling, a 1×1 conv to 1280 with HardSwish and a 4-way classifier. Every pointwise conv reads a signed
    input; the depthwise convs are not scored."""
    b = _Builder(seed)
    h = b.hard_swish("stem", b.conv("stem.conv", "input", 3, 16, 3, 2))
    channels = 16
    blocks = [(3, 32, 1, False), (3, 64, 2, False), (3, 64, 1, False), (3, 128, 2, False), (3, 128, 1, False),
              (3, 256, 2, False), *[(5, 256, 1, False)] * 5, (5, 512, 2, True), (5, 512, 1, True)]
    for index, (kernel, width, stride, excite) in enumerate(blocks):
        name = f"blocks.{index}"
        h = b.hard_swish(f"{name}.dw", b.conv(f"{name}.dw.conv", h, channels, channels, kernel, stride,
                                              group=channels))
        if excite:  # GAP → 1×1 squeeze → Relu → 1×1 excite → HardSigmoid → Mul
            gate = b.node("GlobalAveragePool", [h], f"{name}.se.pool")
            gate = b.node("Relu", [b.conv(f"{name}.se.squeeze", gate, channels, channels // 4, 1)], f"{name}.se.relu")
            gate = b.node("HardSigmoid", [b.conv(f"{name}.se.excite", gate, channels // 4, channels, 1)],
                          f"{name}.se.gate", alpha=1 / 6, beta=0.5)
            h = b.node("Mul", [h, gate], f"{name}.se.scale")
        h = b.hard_swish(f"{name}.pw", b.conv(f"{name}.pw.conv", h, channels, width, 1))
        channels = width
    h = b.hard_swish("last", b.conv("last.conv", b.node("GlobalAveragePool", [h], "pool"), channels, 1280, 1))
    h = b.node("Flatten", [h], "flatten", axis=1)
    b.node("Gemm", [h, b.constant("fc.weight", b.rng.normal(0, 0.05, (4, 1280))),
                    b.constant("fc.bias", np.zeros(4))], "logits", transB=1)
    return b.model("pp_lcnet_style", (224, 224), [("logits", ["N", 4])], points)


MODELS = {"mnist-resnet20": mnist_resnet20, "resnet56-cifar": resnet56_cifar, "resnet18-imagenet": resnet18_imagenet,
          "resnet50-imagenet": resnet50_imagenet, "yolov8n-style": yolov8n_style, "pp-lcnet-style": pp_lcnet_style}
DEFAULT_POINTS = {"mnist-resnet20": 256, "resnet56-cifar": 64, "resnet18-imagenet": 32, "resnet50-imagenet": 32,
                  "yolov8n-style": 16, "pp-lcnet-style": 64}


def batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    count = len(data["input"])
    for start in range(0, count, batch_size):
        yield {name: array[start:start + batch_size] for name, array in data.items()}


def seconds_of(function: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


# ----------------------------------------------------------------------------------------------------------
# The PyTorch transcription of the reference sensitivity tracker (docs/method.md §1)


def torch_layer_sensitivity(activation: np.ndarray, probe: ConsumerProbe, weight: np.ndarray) -> "torch.Tensor":
    """s_c of one consuming layer over a batch of points, written the way a PyTorch user would.

    Per point: W⁺/W⁻ split, a⁺ and a⁻ as separate points, z± = layer(a; W±) without bias, unfolded patches,
    g± = W± · a_unf / z± (0 where |z±| ≤ eps), g = max(g⁺, g⁻), max over positions, kernel offsets,
    filters and points. Points are batched, in chunks that keep the 5-D contribution tensor bounded.
    """
    weight = torch.from_numpy(np.array(weight, dtype=np.float32))  # a writable copy
    activation = torch.from_numpy(np.ascontiguousarray(activation, dtype=np.float32))
    geometry = probe.layer.conv
    if geometry is None:
        points = activation.reshape(-1, weight.shape[1])  # every row is a point with its own z
    else:
        if geometry.transposed or weight.ndim != 4:
            raise SystemExit("the PyTorch transcription covers 2-D Conv and dense layers only")
        pads = geometry.pads  # ONNX (top, left, bottom, right) → torch (left, right, top, bottom)
        points = torch_functional.pad(activation, (pads[1], pads[3], pads[0], pads[2]))
    points = torch.cat([points.clamp(min=0), (-points).clamp(min=0)]) if (points < 0).any() else points
    positive_weight, negative_weight = weight.clamp(min=0), weight.clamp(max=0)

    if geometry is None:
        filters, channels = weight.shape
        per_point = filters * channels * 4
    else:
        filters, channels, kernel_h, kernel_w = weight.shape
        z_probe = torch_functional.conv2d(points[:1], weight, stride=geometry.strides, dilation=geometry.dilations)
        positions = z_probe.shape[2] * z_probe.shape[3]
        per_point = filters * channels * kernel_h * kernel_w * positions * 4
    chunk = max(1, TORCH_CHUNK_BYTES // per_point)

    sensitivity = torch.zeros(channels)
    for start in range(0, points.shape[0], chunk):
        a = points[start:start + chunk]
        for signed_weight in (positive_weight, negative_weight):
            if geometry is None:
                z = a @ signed_weight.T  # [n, F]
                inverse_z = torch.where(z.abs() > Z_EPS, 1 / z.abs(), torch.zeros(()))
                g = signed_weight.abs()[None] * a[:, None, :] * inverse_z[:, :, None]  # [n, F, C]
                sensitivity = torch.maximum(sensitivity, g.amax(dim=(0, 1)))
            else:
                z = torch_functional.conv2d(a, signed_weight, stride=geometry.strides, dilation=geometry.dilations)
                z = z.flatten(2)  # [n, F, P]
                unfolded = torch_functional.unfold(a, (kernel_h, kernel_w), dilation=geometry.dilations,
                                                   stride=geometry.strides)  # [n, C·K, P]
                unfolded = unfolded.reshape(a.shape[0], 1, channels, kernel_h * kernel_w, -1)
                inverse_z = torch.where(z.abs() > Z_EPS, 1 / z.abs(), torch.zeros(()))
                g = (signed_weight.abs().reshape(1, filters, channels, -1, 1) * unfolded
                     * inverse_z[:, :, None, None, :])  # [n, F, C, K, P]
                sensitivity = torch.maximum(sensitivity, g.amax(dim=4).amax(dim=3).amax(dim=1).amax(dim=0))
    if geometry is None:
        sensitivity = sensitivity.reshape(probe.layer.in_units, probe.layer.in_block).amax(dim=1)
    return sensitivity


def torch_sensitivities(model: onnx.ModelProto, analysis, data, batch_size: int, device) -> dict[int, np.ndarray]:
    """Same capture as pfp-onnx (one augmented onnxruntime session), scoring in PyTorch."""
    probes = consumer_probes(model, analysis)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {probe.layer.node: (initializers[probe.layer.weight].T if probe.layer.conv is None
                                  and probe.layer.weight_is_in_by_out else initializers[probe.layer.weight])
               for probe in probes}
    scores = {group.id: torch.zeros(group.width) for group in analysis.prunable_groups}
    names = sorted({probe.layer.input for probe in probes})
    session = create_session(model, device, outputs=names)
    for batch in batches(data, batch_size):
        activations = dict(zip(names, session.run(names, {"input": batch["input"]})))
        for probe in probes:
            channel_scores = torch_layer_sensitivity(activations[probe.layer.input], probe, weights[probe.layer.node])
            for group_id, start, width in probe.groups:
                scores[group_id] = torch.maximum(scores[group_id], channel_scores[start:start + width])
    return {group_id: values.numpy() for group_id, values in scores.items()}


def onnxruntime_capture_only(model: onnx.ModelProto, analysis, data, batch_size: int, device, *,
                             parts: bool = False) -> None:
    """The augmented forward pass, with no scoring: the one the PyTorch transcription reads (every scored
    layer's input), or with parts=True pfp-onnx's own, whose convs with sign parts also output them."""
    probes = consumer_probes(model, analysis)
    names = sorted({probe.layer.input for probe in probes})
    if parts:
        model, pairs = with_conv_parts(model, [probe.layer for probe in probes])
        names += [name for pair in pairs.values() for name in pair]
    session = create_session(model, device, outputs=names)
    for batch in batches(data, batch_size):
        session.run(names, {"input": batch["input"]})


def z_only_seconds(model: onnx.ModelProto, analysis, data, batch_size: int, device) -> float:
    """capture_sensitivities with each scorer computing only z⁺ and z⁻ of its batch (by BLAS on unfolded
    patches, unless the capture model already computed them): what exact PFP pays before the max-times part
    (its lower bound here)."""
    update, from_parts = MaxTimesScorer.update, ConvScorer._update_from_parts
    MaxTimesScorer.update = lambda scorer, flat, inverse_z=None: scorer._z(flat) if inverse_z is None else None
    ConvScorer._update_from_parts = lambda scorer, *arguments, **keywords: None
    try:
        return seconds_of(lambda: capture_sensitivities(model, analysis, batches(data, batch_size), device))[0]
    finally:
        MaxTimesScorer.update, ConvScorer._update_from_parts = update, from_parts


# ----------------------------------------------------------------------------------------------------------
# The sensitivity stage by layer kind

KINDS = ("pointwise 1×1", "dense k×k", "depthwise", "grouped", "transposed", "gemm/matmul", "other nodes")


def node_kind(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> str | None:
    """The kind of layer a Conv, ConvTranspose, Gemm or MatMul node is (None for other nodes)."""
    if node.op_type in ("Gemm", "MatMul"):
        return "gemm/matmul"
    if node.op_type == "ConvTranspose":
        return "transposed"
    if node.op_type != "Conv":
        return None
    group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
    weight = weights.get(node.input[1]) if len(node.input) > 1 else None
    if group > 1:
        return "depthwise" if weight is not None and weight.dims[1] == 1 else "grouped"
    if weight is not None and all(dim == 1 for dim in weight.dims[2:]):
        return "pointwise 1×1"
    return "dense k×k"


def weight_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The model's constant tensors by name: its initializers and the values of its Constant nodes (where
    Paddle exports keep their weights)."""
    tensors = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.update({node.output[0]: attribute.t for attribute in node.attribute if attribute.name == "value"})
    return tensors


# Nodes that onnxruntime fuses into the layer whose output they read (their time then shows as the layer's).
FUSED_INTO_LAYER = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid")


def _node_owners(model: onnx.ModelProto, capture_model: onnx.ModelProto, parts: dict[str, tuple[str, ...]]
                 ) -> dict[str, str]:
    """Every node of the capture model, by its name and by its outputs' names (onnxruntime names some fused
    nodes after an output), → the layer kind its time belongs to. The nodes conv_parts adds for a conv are
    named after the conv's output, and a⁺/a⁻ after the input that convs read (theirs, the first such conv's
    kind); a BatchNormalization or an activation right after a layer is the layer's (onnxruntime fuses them)."""
    weights = weight_tensors(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    nodes = dict(zip(node_names(model), model.graph.node))
    prefixes = {}
    for name in parts:
        node = nodes[name]
        prefixes[f"{node.output[0]}/pfp_onnx/"] = node_kind(node, weights)
        prefixes.setdefault(f"{node.input[0]}/pfp_onnx/", node_kind(node, weights))
    owners = {}
    for node in capture_model.graph.node:
        kind = node_kind(node, weights) if not node.name.startswith(tuple(prefixes)) else \
            next(kind for prefix, kind in prefixes.items() if node.name.startswith(prefix))
        if kind is None and node.op_type in FUSED_INTO_LAYER and node.input and node.input[0] in producers:
            kind = node_kind(producers[node.input[0]], weights)
        for name in (node.name, *node.output):
            owners.setdefault(name, kind or "other nodes")
    return owners


def onnxruntime_seconds_by_kind(model: onnx.ModelProto, capture_model: onnx.ModelProto,
                                parts: dict[str, tuple[str, ...]], outputs: list[str], data, batch_size: int,
                                device) -> dict[str, float]:
    """onnxruntime's own profile of the capture model over the points, its node times summed by layer kind
    (a fused node goes by the name onnxruntime gives it, a node's or an output's name, or failing that the
    longest node name it starts with; layout reorders and unmatched nodes count as other nodes)."""
    import json
    import tempfile

    owners = _node_owners(model, capture_model, parts)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.enable_mem_pattern = False  # as pfp_onnx.runtime.create_session does for a capture
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "capture")
        session = ort.InferenceSession(with_outputs(capture_model, outputs).SerializeToString(), options,
                                       providers=list(device.providers))
        for batch in batches(data, batch_size):
            session.run(outputs, {"input": batch["input"]})
        with open(session.end_profiling()) as file:
            events = json.load(file)
    seconds = dict.fromkeys(KINDS, 0.0)
    names = sorted(owners, key=len, reverse=True)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"][:-len("_kernel_time")].removesuffix("_nchwc")
        owner = owners.get(name) or next((owners[known] for known in names if known and name.startswith(known)),
                                         "other nodes")
        seconds[owner] += event["dur"] * 1e-6
    return seconds


def profile_by_kind(model: onnx.ModelProto, analysis, data, batch_size: int, device) -> None:
    """Print the seconds of the sensitivity stage per layer kind: onnxruntime's capture pass (profiled; the
    nodes of depthwise convs and others are the forward pass every capture pays) and the numpy scoring of
    each scored layer (its scorer's updates, timed around capture_sensitivities' calls)."""
    from pfp_onnx import capture

    weights = weight_tensors(model)
    nodes = dict(zip(node_names(model), model.graph.node))
    layers = {kind: 0 for kind in KINDS}
    for node in model.graph.node:
        if (kind := node_kind(node, weights)) is not None:
            layers[kind] += 1
    probes = consumer_probes(model, analysis)
    capture_model, parts = with_conv_parts(model, [probe.layer for probe in probes])
    kind_of = {probe.layer.node: node_kind(nodes[probe.layer.node], weights) for probe in probes}
    scored, with_parts = {kind: 0 for kind in KINDS}, {kind: 0 for kind in KINDS}
    for node, kind in kind_of.items():
        scored[kind] += 1
        with_parts[kind] += node in parts
    outputs = sorted({probe.layer.input for probe in probes}) + [name for names in parts.values() for name in names]
    runtime_seconds = onnxruntime_seconds_by_kind(model, capture_model, parts, outputs, data, batch_size, device)

    scoring = dict.fromkeys(KINDS, 0.0)
    made = capture.consumer_probes

    def timed_probes(*arguments, **keywords):
        timed = made(*arguments, **keywords)
        for probe in timed:
            update, kind = probe.scorer.update, kind_of[probe.layer.node]

            def timed_update(*values, update=update, kind=kind, **options):
                started = time.perf_counter()
                update(*values, **options)
                scoring[kind] += time.perf_counter() - started

            probe.scorer.update = timed_update
        return timed

    capture.consumer_probes = timed_probes
    try:
        total = seconds_of(lambda: capture_sensitivities(model, analysis, batches(data, batch_size), device))[0]
    finally:
        capture.consumer_probes = made
    everything = sum(runtime_seconds.values()) + sum(scoring.values())
    print(f"  by layer kind: nodes of that kind, of them scored and with sign parts; onnxruntime's profile of the "
          f"capture pass and the numpy scoring, s (capture_sensitivities took {total:.2f} s)")
    print("    kind            layers  scored  parts  onnxruntime s  scoring s  together s  share")
    for kind in KINDS:
        together = runtime_seconds[kind] + scoring[kind]
        if not (layers[kind] or together):
            continue
        print(f"    {kind:14s}  {layers[kind]:6d}  {scored[kind]:6d}  {with_parts[kind]:5d}  "
              f"{runtime_seconds[kind]:13.2f}  {scoring[kind]:9.2f}  {together:10.2f}  "
              f"{together / max(everything, 1e-9):5.0%}")


# ----------------------------------------------------------------------------------------------------------
# Latency


def cpu_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle worker threads spin by default; with sessions interleaved run by run, one session's spinning
    # threads would steal the cores of the next one (4× slower on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_latencies(models: dict[object, onnx.ModelProto], feed: dict[str, np.ndarray], threads: int,
                     repeats: int) -> dict[object, float]:
    """Median seconds per run of each model on one fixed batch; models are interleaved run by run so
    that machine noise hits all of them alike."""
    sessions = {name: cpu_session(model, threads) for name, model in models.items()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feed)
    timings = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feed)
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="mnist-resnet20", help="which built-in model to compress")
    parser.add_argument("--onnx", type=Path, help="compress this model instead (one input; with --npz)")
    parser.add_argument("--npz", type=Path, help="its calibration data, an .npz with an array named as the input "
                        "(benchmarks/train_resnet.py, benchmarks/real_models.py)")
    parser.add_argument("--points", type=int, default=None,
                        help="calibration points; None means 256 for mnist-resnet20, 64 for resnet56-cifar and "
                             "pp-lcnet-style, 16 for yolov8n-style, 32 for the ImageNet ResNets and --onnx")
    parser.add_argument("--batch-size", type=int, default=32, help="points per onnxruntime run, everywhere")
    parser.add_argument("--budget", type=float, default=0.5, help="budget of the timed compress runs")
    parser.add_argument("--budgets", default="0.7,0.5,0.3", help="budgets whose inference latency is measured")
    parser.add_argument("--latency-batch", type=int, default=32, help="points in the fixed latency batch")
    parser.add_argument("--round-to", default="1,auto",
                        help="comma-separated --round-to values for the latency models (1: PFP's exact widths; "
                             "auto, the default: multiples of 8 in groups of 16 or more channels)")
    parser.add_argument("--budget-of", default="weights",
                        help="comma-separated: what the latency budgets count (weights, macs, or both)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for latency")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model for the latency median")
    parser.add_argument("--skip-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random model and data")
    parser.add_argument("--compress-repeats", type=int, default=1,
                        help="interleaved compress runs (recovery none) with the signed parts off and on")
    parser.add_argument("--sections", default="1,2,3", help="which parts to run (1: compress, 2: the sensitivity "
                        "stage and its profile by layer kind, 3: latency)")
    args = parser.parse_args()
    sections = {value.strip() for value in args.sections.split(",")}

    if (args.onnx is None) != (args.npz is None):
        parser.error("--onnx and --npz go together")
    name = args.onnx.stem if args.onnx else args.model
    points = args.points or (DEFAULT_POINTS["resnet50-imagenet"] if args.onnx else DEFAULT_POINTS[args.model])
    model, data = from_files(args.onnx, args.npz, points) if args.onnx else MODELS[args.model](points, args.seed)
    device = choose_device("cpu")
    print(f"bench_compress: {name}, {points} calibration points, batch size {args.batch_size}, "
          f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else 'absent'}, python {platform.python_version()}")

    # 1. compress ÷ one plain forward pass over the same points.
    plain = create_session(model, device)
    forward = min(seconds_of(lambda: [plain.run(None, {"input": b["input"]})
                                      for b in batches(data, args.batch_size)])[0] for _ in range(3))
    print(f"\nforward pass over the {points} points {forward:.3f} s (best of 3)")
    if "1" in sections:
        print(f"\n[1] compress wall time ÷ one onnxruntime forward pass over the same {points} points")
        compress_ratios(model, data, forward, args)

    # 2. the sensitivity stage alone ÷ the PyTorch transcription, on the same analysis and points.
    analysis = analyse_channel_groups(model, {"input": (1, *data["input"].shape[1:])})
    if "2" in sections:
        sensitivity_stage(model, analysis, data, forward, points, device, args)
    if "3" in sections:
        latencies(model, data, args)


def compress_ratios(model: onnx.ModelProto, data: dict[str, np.ndarray], forward: float, args) -> None:
    """compress (recovery none, then lstsq) ÷ the forward pass. recovery none runs --compress-repeats times
    with the signed parts of conv_parts off (as before issue 24: only Relu-fed convs get sign parts) and on
    (the default), interleaved, each run's ratio printed and the fastest of each compared."""
    def timed(recovery: str, signed_parts: bool) -> tuple[float, float]:
        conv_parts.SIGNED_PARTS = signed_parts
        started = time.process_time()
        try:
            seconds, result = seconds_of(lambda: pfp_onnx.compress(model, data, budget=args.budget,
                                                                   recovery=recovery, batch_size=args.batch_size,
                                                                   device="cpu"))
        finally:
            conv_parts.SIGNED_PARTS = True
        cpu = time.process_time() - started
        stages = ", ".join(f"{stage} {value:.2f}" for stage, value in result.report.seconds.items()
                           if stage != "total")
        label = f"recovery={recovery}, signed parts {'on ' if signed_parts else 'off'}"
        print(f"  {label:32s} {seconds:8.2f} s = {seconds / forward:7.1f} × forward, CPU {cpu:8.2f} s   "
              f"(stages, s: {stages})")
        return seconds, cpu

    runs = {False: [], True: []}
    for _ in range(args.compress_repeats):
        for signed_parts in (False, True):
            runs[signed_parts].append(timed("none", signed_parts))
    fastest = {key: min(seconds for seconds, _ in values) for key, values in runs.items()}
    least_cpu = {key: min(cpu for _, cpu in values) for key, values in runs.items()}
    print(f"  recovery=none, fastest of {args.compress_repeats}: signed parts off {fastest[False] / forward:.1f} × "
          f"forward, on {fastest[True] / forward:.1f} × forward (on ÷ off {fastest[True] / fastest[False]:.2f}; "
          f"process CPU seconds, least of each, on ÷ off {least_cpu[True] / least_cpu[False]:.2f})")
    timed("lstsq", True)


def sensitivity_stage(model: onnx.ModelProto, analysis, data: dict[str, np.ndarray], forward: float, points: int,
                      device, args) -> None:
    """Part 2: the sensitivity stage beside the PyTorch transcription and the z± floor, then by layer kind."""
    capture_seconds, _ = seconds_of(lambda: onnxruntime_capture_only(model, analysis, data, args.batch_size, device))
    ours_seconds, ours = seconds_of(lambda: capture_sensitivities(model, analysis, batches(data, args.batch_size),
                                                                  device))
    floor_seconds = z_only_seconds(model, analysis, data, args.batch_size, device)
    parts_seconds, _ = seconds_of(lambda: onnxruntime_capture_only(model, analysis, data, args.batch_size, device,
                                                                   parts=True))
    print(f"\n[2] sensitivity stage on {points} points (augmented onnxruntime pass alone: {capture_seconds:.2f} s "
          f"= {capture_seconds / forward:.1f} × forward; with the sign-part convs: {parts_seconds:.2f} s = "
          f"{parts_seconds / forward:.1f} × forward)")
    print(f"  pfp-onnx capture_sensitivities {ours_seconds:8.2f} s = {ours_seconds / forward:5.1f} × forward")
    print(f"  the same with z± only          {floor_seconds:8.2f} s = {floor_seconds / forward:5.1f} × forward   "
          "(augmented pass, which computes z⁺/z⁻ of the convs with sign parts, and unfolding and BLAS z⁺/z⁻ "
          "for the other layers: what exact PFP needs for every point; no max-times work)")
    if torch is None or args.skip_torch:
        print("  PyTorch comparison skipped: " + ("--skip-torch" if torch else "torch is not installed here "
              "(pip install torch==2.13.0 in a separate venv and run this script there)"))
    else:
        torch_seconds, theirs = seconds_of(lambda: torch_sensitivities(model, analysis, data, args.batch_size,
                                                                       device))
        for group_id in ours:
            np.testing.assert_allclose(ours[group_id], theirs[group_id], rtol=1e-4, atol=0,
                                       err_msg=f"group {group_id}: pfp-onnx and the PyTorch transcription differ")
        worst = max(float(np.max(np.abs(ours[g] - theirs[g]) / np.maximum(np.abs(theirs[g]), 1e-30)))
                    for g in ours)
        print(f"  PyTorch transcription ({torch.get_num_threads()} threads) {torch_seconds:8.2f} s   "
              f"(same sensitivities: worst relative difference {worst:.1e} over {len(ours)} groups)")
        print(f"  pfp-onnx ÷ PyTorch: {ours_seconds / torch_seconds:.3f} overall, "
              f"{(ours_seconds - capture_seconds) / (torch_seconds - capture_seconds):.3f} "
              f"scoring only (augmented pass subtracted)")
    profile_by_kind(model, analysis, data, args.batch_size, device)


def latencies(model: onnx.ModelProto, data: dict[str, np.ndarray], args) -> None:
    """Part 3: pruned vs original latency beside the MAC reduction."""
    budgets = [float(value) for value in args.budgets.split(",")]
    method = pfp_onnx.Method(recovery="none")  # recovery changes weights, not shapes: same latency
    pruned = {}
    for budget_of in (value.strip() for value in args.budget_of.split(",")):
        for round_to in (value.strip() for value in args.round_to.split(",")):
            prepared = pfp_onnx.prepare(model, data, budgets=budgets, methods=[method], batch_size=args.batch_size,
                                        device="cpu", round_to=round_to, budget_of=budget_of)
            for budget in budgets:
                pruned[(budget_of, round_to, budget)] = pfp_onnx.prune(prepared, budget=budget, method=method)
    feed = {"input": np.resize(data["input"], (args.latency_batch, *data["input"].shape[1:]))}
    latency = median_latencies({"original": model, **{key: result.model for key, result in pruned.items()}}, feed,
                               args.threads, args.repeats)
    print(f"\n[3] onnxruntime CPU latency, batch {args.latency_batch}, {args.threads} intra-op threads, median of "
          f"{args.repeats} interleaved runs (original {latency['original'] * 1e3:.2f} ms)")
    print("  budget  of       round-to  latency ms  speed-up  MAC reduction  speed-up ÷ MAC reduction")
    for key, result in pruned.items():
        budget_of, round_to, budget = key
        speedup = latency["original"] / latency[key]
        mac_ratio = result.report.totals.macs_before / result.report.totals.macs_after
        print(f"  {budget:6g}  {budget_of:<7}  {round_to:>8}  {latency[key] * 1e3:10.2f}  {speedup:7.2f}×  "
              f"{mac_ratio:12.2f}×  {speedup / mac_ratio:10.2f}")

if __name__ == "__main__":
    main()
