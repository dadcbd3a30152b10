"""Miniature versions of the architectures people prune, built in code with the zoo's `_GraphBuilder`.

Each builder returns a checked float32 ModelProto (IR 8, opset 17) with seeded random weights and
BatchNorms whose statistics are random (so no BatchNorm is an identity). Widths are 8–32 channels and
images 16×16 so that compressing every one of them stays fast. `ARCHITECTURES` names them all.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from zoo import _GraphBuilder

SIZE = 16  # input height and width


# ---- building blocks -------------------------------------------------------------------------------
def conv_bn(b: _GraphBuilder, name: str, data: str, in_channels: int, out_channels: int, kernel: int = 3, *,
            stride: int = 1, group: int = 1) -> str:
    """Conv (no bias, 'same' padding) → BatchNorm, as every torchvision CNN writes it."""
    attrs = {"strides": [stride, stride], "pads": [kernel // 2] * 4}
    if group != 1:
        attrs["group"] = group
    h = b.conv(f"{name}.conv", data, in_channels // group, out_channels, kernel, bias=False, **attrs)
    return b.batch_norm(f"{name}.bn", h, out_channels)


def relu6(b: _GraphBuilder, name: str, data: str) -> str:
    return b.node("Clip", [data, b.constant(f"{name}.min", 0.0), b.constant(f"{name}.max", 6.0)], name)


def hard_swish_written_out(b: _GraphBuilder, name: str, data: str) -> str:
    """x · Clip(x + 3, 0, 6) / 6, the spelling of exporters that predate the HardSwish op."""
    shifted = b.node("Add", [data, b.constant(f"{name}.three", 3.0)], f"{name}.add")
    clipped = b.node("Clip", [shifted, b.constant(f"{name}.min", 0.0), b.constant(f"{name}.max", 6.0)],
                     f"{name}.clip")
    product = b.node("Mul", [data, clipped], f"{name}.mul")
    return b.node("Div", [product, b.constant(f"{name}.six", 6.0)], name)


def hard_swish_by_hard_sigmoid(b: _GraphBuilder, name: str, data: str) -> str:
    gate = b.node("HardSigmoid", [data], f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)
    return b.node("Mul", [data, gate], name)


def swish(b: _GraphBuilder, name: str, data: str) -> str:
    return b.node("Mul", [data, b.node("Sigmoid", [data], f"{name}.sigmoid")], name)


def squeeze_excite(b: _GraphBuilder, name: str, data: str, channels: int, squeezed: int, *,
                   activation: str = "relu", gate: str = "hardsigmoid") -> str:
    """GlobalAveragePool → 1x1 conv → activation → 1x1 conv → gate, multiplied back onto `data`."""
    h = b.conv(f"{name}.squeeze", b.node("GlobalAveragePool", [data], f"{name}.gap"), channels, squeezed, 1)
    h = swish(b, f"{name}.swish", h) if activation == "swish" else b.node("Relu", [h], f"{name}.relu")
    h = b.conv(f"{name}.excite", h, squeezed, channels, 1)
    if gate == "sigmoid":
        h = b.node("Sigmoid", [h], f"{name}.gate")
    else:
        h = b.node("HardSigmoid", [h], f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)
    return b.node("Mul", [data, h], f"{name}.scale")


def classifier(b: _GraphBuilder, data: str, channels: int, classes: int = 10) -> None:
    """GlobalAveragePool → Flatten → Gemm → `logits`."""
    h = b.node("Flatten", [b.node("GlobalAveragePool", [data], "head.gap")], "head.flatten")
    b.gemm("logits", h, channels, classes)
    b.output("logits", ["N", classes])


def resize_2x(b: _GraphBuilder, name: str, data: str) -> str:
    scales = b.constant(f"{name}.scales", [1.0, 1.0, 2.0, 2.0])
    return b.node("Resize", [data, "", scales], name, mode="nearest")


# ---- architectures ---------------------------------------------------------------------------------
def vgg() -> onnx.ModelProto:
    """conv-bn-relu ×2, maxpool, conv-bn-relu ×2, maxpool, Flatten → Gemm → Relu → Gemm."""
    b = _GraphBuilder("vgg", seed=101)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    for index, (cin, cout) in enumerate([(3, 8), (8, 8)]):
        h = b.node("Relu", [conv_bn(b, f"stage1.{index}", h, cin, cout)], f"stage1.{index}.relu")
    h = b.node("MaxPool", [h], "pool1", kernel_shape=[2, 2], strides=[2, 2])             # [N,8,8,8]
    for index, (cin, cout) in enumerate([(8, 16), (16, 16)]):
        h = b.node("Relu", [conv_bn(b, f"stage2.{index}", h, cin, cout)], f"stage2.{index}.relu")
    h = b.node("MaxPool", [h], "pool2", kernel_shape=[2, 2], strides=[2, 2])             # [N,16,4,4]
    h = b.node("Flatten", [h], "flatten")                                                 # [N,256]
    h = b.node("Relu", [b.gemm("fc1", h, 16 * 4 * 4, 32)], "fc1.relu")
    b.gemm("logits", h, 32, 10)
    b.output("logits", ["N", 10])
    return b.build()


def _basic_block(b: _GraphBuilder, name: str, data: str, in_channels: int, out_channels: int, stride: int) -> str:
    h = b.node("Relu", [conv_bn(b, f"{name}.1", data, in_channels, out_channels, stride=stride)], f"{name}.relu1")
    h = conv_bn(b, f"{name}.2", h, out_channels, out_channels)
    shortcut = data
    if stride != 1 or in_channels != out_channels:
        shortcut = conv_bn(b, f"{name}.down", data, in_channels, out_channels, 1, stride=stride)
    return b.node("Relu", [b.node("Add", [h, shortcut], f"{name}.add")], f"{name}.out")


def resnet_basic() -> onnx.ModelProto:
    """Stem, an identity basic block, a stride-2 basic block with a projection shortcut, classifier."""
    b = _GraphBuilder("resnet_basic", seed=102)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    h = b.node("Relu", [conv_bn(b, "stem", h, 3, 8)], "stem.relu")
    h = _basic_block(b, "layer1", h, 8, 8, 1)
    h = _basic_block(b, "layer2", h, 8, 16, 2)                                             # [N,16,8,8]
    h = _basic_block(b, "layer3", h, 16, 16, 1)
    classifier(b, h, 16)
    return b.build()


def _bottleneck(b: _GraphBuilder, name: str, data: str, in_channels: int, width: int, out_channels: int,
                stride: int) -> str:
    h = b.node("Relu", [conv_bn(b, f"{name}.1", data, in_channels, width, 1)], f"{name}.relu1")
    h = b.node("Relu", [conv_bn(b, f"{name}.2", h, width, width, stride=stride)], f"{name}.relu2")
    h = conv_bn(b, f"{name}.3", h, width, out_channels, 1)
    shortcut = data
    if stride != 1 or in_channels != out_channels:
        shortcut = conv_bn(b, f"{name}.down", data, in_channels, out_channels, 1, stride=stride)
    return b.node("Relu", [b.node("Add", [h, shortcut], f"{name}.add")], f"{name}.out")


def resnet_bottleneck() -> onnx.ModelProto:
    """Bottleneck blocks (1x1-3x3-1x1): a projection block, an identity block, a stride-2 projection."""
    b = _GraphBuilder("resnet_bottleneck", seed=103)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    h = b.node("Relu", [conv_bn(b, "stem", h, 3, 8)], "stem.relu")
    h = _bottleneck(b, "layer1.0", h, 8, 8, 16, 1)
    h = _bottleneck(b, "layer1.1", h, 16, 8, 16, 1)
    h = _bottleneck(b, "layer2.0", h, 16, 12, 32, 2)                                       # [N,32,8,8]
    classifier(b, h, 32)
    return b.build()


def _inverted_residual(b: _GraphBuilder, name: str, data: str, in_channels: int, expanded: int,
                       out_channels: int, stride: int) -> str:
    h = relu6(b, f"{name}.expand.relu6", conv_bn(b, f"{name}.expand", data, in_channels, expanded, 1))
    h = relu6(b, f"{name}.dw.relu6", conv_bn(b, f"{name}.dw", h, expanded, expanded, stride=stride, group=expanded))
    h = conv_bn(b, f"{name}.project", h, expanded, out_channels, 1)
    if stride == 1 and in_channels == out_channels:
        h = b.node("Add", [data, h], f"{name}.add")
    return h


def mobilenet_v2() -> onnx.ModelProto:
    """Inverted residuals: 1x1 expand, depthwise 3x3 (group = C), 1x1 project, ReLU6 as Clip(0, 6)."""
    b = _GraphBuilder("mobilenet_v2", seed=104)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    h = relu6(b, "stem.relu6", conv_bn(b, "stem", h, 3, 8))
    h = _inverted_residual(b, "block1", h, 8, 24, 8, 1)
    h = _inverted_residual(b, "block2", h, 8, 24, 16, 2)                                   # [N,16,8,8]
    h = _inverted_residual(b, "block3", h, 16, 32, 16, 1)
    h = relu6(b, "last.relu6", conv_bn(b, "last", h, 16, 32, 1))
    classifier(b, h, 32)
    return b.build()


def mobilenet_v3() -> onnx.ModelProto:
    """Blocks with squeeze-and-excitation and the three spellings of HardSwish."""
    b = _GraphBuilder("mobilenet_v3", seed=105)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    stem = b.node("HardSwish", [conv_bn(b, "stem", h, 3, 8)], "stem.hswish")
    # block 1: hard swish written out, SE, residual
    h = hard_swish_written_out(b, "block1.expand.hswish", conv_bn(b, "block1.expand", stem, 8, 16, 1))
    h = b.node("Relu", [conv_bn(b, "block1.dw", h, 16, 16, group=16)], "block1.dw.relu")
    h = squeeze_excite(b, "block1.se", h, 16, 4)
    h = b.node("Add", [stem, conv_bn(b, "block1.project", h, 16, 8, 1)], "block1.add")
    # block 2: x · HardSigmoid(x), stride 2, SE, no residual
    h = hard_swish_by_hard_sigmoid(b, "block2.expand.hswish", conv_bn(b, "block2.expand", h, 8, 24, 1))
    h = hard_swish_by_hard_sigmoid(b, "block2.dw.hswish", conv_bn(b, "block2.dw", h, 24, 24, stride=2, group=24))
    h = squeeze_excite(b, "block2.se", h, 24, 8)
    h = conv_bn(b, "block2.project", h, 24, 16, 1)                                         # [N,16,8,8]
    h = b.node("HardSwish", [conv_bn(b, "last", h, 16, 32, 1)], "last.hswish")
    classifier(b, h, 32)
    return b.build()


def _mbconv(b: _GraphBuilder, name: str, data: str, in_channels: int, expanded: int, out_channels: int,
            stride: int) -> str:
    h = swish(b, f"{name}.expand.swish", conv_bn(b, f"{name}.expand", data, in_channels, expanded, 1))
    h = swish(b, f"{name}.dw.swish", conv_bn(b, f"{name}.dw", h, expanded, expanded, stride=stride, group=expanded))
    h = squeeze_excite(b, f"{name}.se", h, expanded, max(4, in_channels // 2), activation="swish", gate="sigmoid")
    h = conv_bn(b, f"{name}.project", h, expanded, out_channels, 1)
    if stride == 1 and in_channels == out_channels:
        h = b.node("Add", [h, data], f"{name}.add")
    return h


def efficientnet_mbconv() -> onnx.ModelProto:
    """MBConv blocks: Swish as x · Sigmoid(x), depthwise conv, SE with Swish, residual Add."""
    b = _GraphBuilder("efficientnet_mbconv", seed=106)
    h = b.input("x", ["N", 3, SIZE, SIZE])
    h = swish(b, "stem.swish", conv_bn(b, "stem", h, 3, 8))
    h = _mbconv(b, "block1", h, 8, 32, 8, 1)
    h = _mbconv(b, "block2", h, 8, 32, 16, 2)                                              # [N,16,8,8]
    h = _mbconv(b, "block3", h, 16, 32, 16, 1)
    h = swish(b, "last.swish", conv_bn(b, "last", h, 16, 32, 1))
    classifier(b, h, 32)
    return b.build()


def densenet() -> onnx.ModelProto:
    """A dense block (each layer BN-Relu-Conv on the Concat of all earlier maps) and a transition."""
    b = _GraphBuilder("densenet", seed=107)
    x = b.input("x", ["N", 3, SIZE, SIZE])
    features = [b.conv("stem", x, 3, 8, bias=False, pads=[1] * 4)]
    channels, growth = 8, 6
    for index in range(3):
        name = f"dense{index}"
        joined = features[0] if len(features) == 1 else b.node("Concat", features, f"{name}.concat", axis=1)
        h = b.node("Relu", [b.batch_norm(f"{name}.bn", joined, channels)], f"{name}.relu")
        features.append(b.conv(f"{name}.conv", h, channels, growth, bias=False, pads=[1] * 4))
        channels += growth
    joined = b.node("Concat", features, "block.concat", axis=1)                           # [N,26,16,16]
    h = b.node("Relu", [b.batch_norm("transition.bn", joined, channels)], "transition.relu")
    h = b.conv("transition.conv", h, channels, 12, kernel=1, bias=False)
    h = b.node("AveragePool", [h], "transition.pool", kernel_shape=[2, 2], strides=[2, 2])  # [N,12,8,8]
    h = b.node("Relu", [b.batch_norm("final.bn", h, 12)], "final.relu")
    classifier(b, h, 12)
    return b.build()


def unet_fpn() -> onnx.ModelProto:
    """Encoder (conv, maxpool), decoder (nearest Resize ×2 + Concat skip), FPN lateral 1x1 + Add."""
    b = _GraphBuilder("unet_fpn", seed=108)
    x = b.input("x", ["N", 3, SIZE, SIZE])
    e1 = b.node("Relu", [b.conv("enc1", x, 3, 8, pads=[1] * 4)], "enc1.relu")                  # 16×16
    e2 = b.node("Relu", [b.conv("enc2", b.node("MaxPool", [e1], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
                                8, 16, pads=[1] * 4)], "enc2.relu")                           # 8×8
    mid = b.node("Relu", [b.conv("mid", b.node("MaxPool", [e2], "pool2", kernel_shape=[2, 2], strides=[2, 2]),
                                 16, 16, pads=[1] * 4)], "mid.relu")                          # 4×4
    d2 = b.node("Concat", [resize_2x(b, "up2", mid), e2], "dec2.concat", axis=1)          # [N,32,8,8]
    d2 = b.node("Relu", [b.conv("dec2", d2, 32, 16, pads=[1] * 4)], "dec2.relu")
    d1 = b.node("Concat", [resize_2x(b, "up1", d2), e1], "dec1.concat", axis=1)           # [N,24,16,16]
    d1 = b.node("Relu", [b.conv("dec1", d1, 24, 8, pads=[1] * 4)], "dec1.relu")
    # FPN: lateral 1x1 convs on the encoder maps, each plus the upsampled coarser level
    p3 = b.conv("fpn.p3", mid, 16, 8, kernel=1)
    p2 = b.node("Add", [b.conv("fpn.lateral2", e2, 16, 8, kernel=1), resize_2x(b, "fpn.up3", p3)], "fpn.p2")
    p1 = b.node("Add", [b.conv("fpn.lateral1", e1, 8, 8, kernel=1), resize_2x(b, "fpn.up2", p2)], "fpn.p1")
    h = b.node("Add", [d1, b.node("Relu", [p1], "fpn.relu")], "merge")
    b.conv("out", h, 8, 2, kernel=1)
    b.output("out", ["N", 2, SIZE, SIZE])
    return b.build()


def convtranspose_head() -> onnx.ModelProto:
    """Two stride-2 convs, a ConvTranspose (stride 2, pads, output_padding) upsampling head, a 1x1 conv."""
    b = _GraphBuilder("convtranspose_head", seed=109)
    x = b.input("x", ["N", 3, SIZE, SIZE])
    h = b.node("Relu", [conv_bn(b, "down1", x, 3, 8, stride=2)], "down1.relu")            # [N,8,8,8]
    h = b.node("Relu", [conv_bn(b, "down2", h, 8, 16, stride=2)], "down2.relu")           # [N,16,4,4]
    h = b.node("Relu", [conv_bn(b, "mid", h, 16, 16)], "mid.relu")
    weight = b.weight("up.weight", (16, 12, 3, 3))  # ConvTranspose weights are [in, out / group, k, k]
    h = b.node("ConvTranspose", [h, weight, b.bias("up.bias", (12,))], "up", kernel_shape=[3, 3],
               strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])                  # [N,12,8,8]
    h = b.node("Relu", [b.batch_norm("up.bn", h, 12)], "up.relu")
    b.conv("out", h, 12, 2, kernel=1)
    b.output("out", ["N", 2, 8, 8])
    return b.build()


def shufflenet() -> onnx.ModelProto:
    """ShuffleNetV2 units: Split on the channel axis, a conv branch, Concat, and a channel shuffle
    (Reshape [N, 2, C/2, H, W] → Transpose(0,2,1,3,4) → Reshape [N, C, H, W])."""
    b = _GraphBuilder("shufflenet", seed=110)
    x = b.input("x", ["N", 3, SIZE, SIZE])
    h = b.node("Relu", [conv_bn(b, "stem", x, 3, 16)], "stem.relu")
    for unit in range(2):
        name = f"unit{unit}"
        b.nodes.append(helper.make_node("Split", [h, b.constant(f"{name}.split", [8, 8], dtype=np.int64)],
                                        [f"{name}.left", f"{name}.right"], name=f"{name}.split", axis=1))
        right = b.node("Relu", [conv_bn(b, f"{name}.pw1", f"{name}.right", 8, 8, 1)], f"{name}.pw1.relu")
        right = conv_bn(b, f"{name}.dw", right, 8, 8, group=8)
        right = b.node("Relu", [conv_bn(b, f"{name}.pw2", right, 8, 8, 1)], f"{name}.pw2.relu")
        h = b.node("Concat", [f"{name}.left", right], f"{name}.concat", axis=1)
        h = b.node("Reshape", [h, b.constant(f"{name}.shape5", [0, 2, 8, SIZE, SIZE], dtype=np.int64)],
                   f"{name}.reshape5")
        h = b.node("Transpose", [h], f"{name}.shuffle", perm=[0, 2, 1, 3, 4])
        h = b.node("Reshape", [h, b.constant(f"{name}.shape4", [0, 16, SIZE, SIZE], dtype=np.int64)],
                   f"{name}.reshape4")
    h = b.node("Relu", [conv_bn(b, "last", h, 16, 32, 1)], "last.relu")
    classifier(b, h, 32)
    return b.build()


def nhwc_tf2onnx() -> onnx.ModelProto:
    """What tf2onnx writes: NHWC input → Transpose(0,3,1,2) → conv → a Transpose pair around an NHWC
    activation → conv → Transpose(0,2,3,1) → MatMul on the channel (last) axis → Add bias."""
    b = _GraphBuilder("nhwc_tf2onnx", seed=111)
    x = b.input("x", ["N", SIZE, SIZE, 3])
    h = b.node("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
    h = b.conv("conv1", h, 3, 8, pads=[1] * 4)
    h = b.node("Transpose", [h], "conv1.to_nhwc", perm=[0, 2, 3, 1])
    h = b.node("Relu", [h], "conv1.relu")                                                  # NHWC
    h = b.node("Transpose", [h], "conv2.to_nchw", perm=[0, 3, 1, 2])
    h = b.node("Relu", [b.conv("conv2", h, 8, 16, pads=[1] * 4)], "conv2.relu")
    h = b.node("Relu", [b.conv("conv3", h, 16, 16, pads=[1] * 4)], "conv3.relu")
    h = b.node("Transpose", [h], "to_nhwc", perm=[0, 2, 3, 1])                              # [N,16,16,16]
    h = b.matmul("dense", h, 16, 10)
    b.node("Add", [h, b.bias("dense.bias", (10,))], "out")
    b.output("out", ["N", SIZE, SIZE, 10])
    return b.build()


def constant_nodes_dynamic_hw() -> onnx.ModelProto:
    """Every weight in a Constant node; input [N, 3, H, W] with all three sizes dynamic."""
    b = _GraphBuilder("constant_nodes_dynamic_hw", seed=112, constant_nodes=True)
    x = b.input("x", ["N", 3, "H", "W"])
    h = b.node("Relu", [conv_bn(b, "conv1", x, 3, 8)], "conv1.relu")
    h = b.node("Relu", [b.conv("conv2", h, 8, 16, strides=[2, 2], pads=[1] * 4)], "conv2.relu")
    h = b.node("Relu", [conv_bn(b, "conv3", h, 16, 16)], "conv3.relu")
    classifier(b, h, 16)
    return b.build()


def split_slice() -> onnx.ModelProto:
    """Split and Slice along the channel axis (constant bounds) feeding different convs; Concats rejoin
    both the convs' outputs and the cut pieces themselves."""
    b = _GraphBuilder("split_slice", seed=113)
    x = b.input("x", ["N", 3, SIZE, SIZE])
    h = b.node("Relu", [conv_bn(b, "stem", x, 3, 16)], "stem.relu")
    b.nodes.append(helper.make_node("Split", [h, b.constant("split.sizes", [6, 10], dtype=np.int64)],
                                    ["part_a", "part_b"], name="split", axis=1))

    def channel_slice(name: str, data: str, start: int, stop: int) -> str:
        bounds = [b.constant(f"{name}.{key}", [value], dtype=np.int64)
                  for key, value in (("starts", start), ("ends", stop), ("axes", 1))]
        return b.node("Slice", [data] + bounds, name)

    part_b1 = channel_slice("slice_b1", "part_b", 0, 4)
    part_b2 = channel_slice("slice_b2", "part_b", 4, 10)
    branch_a = b.node("Relu", [b.conv("conv_a", "part_a", 6, 8, pads=[1] * 4)], "conv_a.relu")
    branch_b1 = b.node("Relu", [b.conv("conv_b1", part_b1, 4, 8, kernel=1)], "conv_b1.relu")
    branch_b2 = b.node("Relu", [b.conv("conv_b2", part_b2, 6, 8, pads=[1] * 4)], "conv_b2.relu")
    joined = b.node("Concat", [branch_a, branch_b1, branch_b2], "join_convs", axis=1)    # [N,24,16,16]
    rejoined = b.node("Concat", ["part_a", part_b1, part_b2], "join_parts", axis=1)     # the stem's 16
    h = b.node("Add", [b.conv("mix", joined, 24, 16, kernel=1), b.conv("skip", rejoined, 16, 16, kernel=1)],
               "merge")
    h = b.node("Relu", [h], "merge.relu")
    classifier(b, h, 16)
    return b.build()


ARCHITECTURES: dict[str, Callable[[], onnx.ModelProto]] = {
    "vgg": vgg,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet_mbconv": efficientnet_mbconv,
    "densenet": densenet,
    "unet_fpn": unet_fpn,
    "convtranspose_head": convtranspose_head,
    "shufflenet": shufflenet,
    "nhwc_tf2onnx": nhwc_tf2onnx,
    "constant_nodes_dynamic_hw": constant_nodes_dynamic_hw,
    "split_slice": split_slice,
}

# Architectures whose channel groups should nearly all be prunable: layers with at least one prunable
# side must hold ≥ 90% of the layer weights.
MOSTLY_PRUNABLE = ("vgg", "resnet_basic", "resnet_bottleneck", "mobilenet_v2", "mobilenet_v3",
                   "efficientnet_mbconv", "densenet", "unet_fpn")


def pp_lcnet() -> onnx.ModelProto:
    """PP-LCNet as Paddle2ONNX writes it: weights in Constant nodes, a dynamic batch of dim_value -1,
    depthwise-separable blocks with HardSwish written out, an SE in the last block, then global pooling
    → the 1×1 `last_conv` (its bias added as Reshape(bias, [1, C, 1, 1])) → HardSwish → Dropout → the
    flatten computed from Shape (Cast → Slice → Cast, concatenated with the width) → fc. That last conv
    once froze, with most of the weights, on the flatten's Shape."""
    b = _GraphBuilder("pp_lcnet", seed=114, constant_nodes=True)
    h = b.input("x", [-1, 3, SIZE, SIZE])
    h = hard_swish_written_out(b, "stem.hswish", conv_bn(b, "stem", h, 3, 8, stride=2))      # [N,8,8,8]
    for name, in_channels, out_channels, stride in (("block1", 8, 16, 1), ("block2", 16, 24, 2)):
        h = hard_swish_written_out(b, f"{name}.dw.hswish", conv_bn(b, f"{name}.dw", h, in_channels, in_channels,
                                                                   stride=stride, group=in_channels))
        if name == "block2":
            h = squeeze_excite(b, f"{name}.se", h, in_channels, 4)
        h = hard_swish_written_out(b, f"{name}.pw.hswish", conv_bn(b, f"{name}.pw", h, in_channels, out_channels, 1))
    h = b.conv("last_conv", b.node("GlobalAveragePool", [h], "gap"), 24, 48, 1, bias=False)  # [N,48,1,1]
    bias = b.node("Reshape", [b.bias("last_conv.bias", (48,)),
                              b.constant("last_conv.bias_shape", [1, 48, 1, 1], dtype=np.int64)], "last_conv.bias_4d")
    h = hard_swish_written_out(b, "last.hswish", b.node("Add", [h, bias], "last_conv.add"))
    h = b.node("Dropout", [h], "dropout")
    shape = b.node("Cast", [b.node("Shape", [h], "shape")], "shape_int32", to=onnx.TensorProto.INT32)
    bounds = [b.constant(f"batch.{key}", [value], dtype=np.int64)
              for key, value in (("starts", 0), ("ends", 1), ("axes", 0), ("steps", 1))]
    batch = b.node("Cast", [b.node("Slice", [shape] + bounds, "batch")], "batch_int64", to=onnx.TensorProto.INT64)
    width = b.node("Cast", [b.constant("width", [48], dtype=np.int32)], "width_int64", to=onnx.TensorProto.INT64)
    h = b.node("Reshape", [h, b.node("Concat", [batch, width], "flat_shape", axis=-1)], "flat")
    b.gemm("logits", h, 48, 10)
    b.output("logits", [-1, 10])
    return b.build()


ARCHITECTURES["pp_lcnet"] = pp_lcnet
MOSTLY_PRUNABLE += ("pp_lcnet",)
