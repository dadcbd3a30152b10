"""Small ONNX graphs built in code, one per graph shape the channel analysis and rewrite must handle.

Every builder returns a checked float32 ModelProto (IR 8, opset 17, so that onnxruntime here runs it)
with seeded random weights and uniquely named nodes. `ZOO` names them all; `random_inputs` feeds them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DYNAMIC_SIZE = 8  # what a dynamic non-batch dimension becomes in random_inputs


class _GraphBuilder:
    """Collects nodes, initializers and value infos; weights come from one seeded generator."""

    def __init__(self, name: str, seed: int, *, constant_nodes: bool = False):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    # ---- constants ---------------------------------------------------------------------------------
    def constant(self, name: str, values, dtype=np.float32, *, as_floats: bool = False) -> str:
        """Store `values` as an initializer, or as a Constant node when the builder says so."""
        values = np.asarray(values, dtype=dtype)
        if not self.constant_nodes:
            self.initializers.append(numpy_helper.from_array(values, name))
        elif as_floats:  # the value_floats spelling some exporters use for 1-D tensors
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}",
                                               value_floats=values.reshape(-1).tolist()))
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}",
                                               value=numpy_helper.from_array(values, name)))
        return name

    def weight(self, name: str, shape, fan_in: int | None = None) -> str:
        fan_in = fan_in if fan_in is not None else int(np.prod(shape[1:]))
        return self.constant(name, self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape))

    def bias(self, name: str, shape, *, as_floats: bool = False) -> str:
        return self.constant(name, self.rng.normal(0.0, 0.1, size=shape), as_floats=as_floats)

    # ---- nodes -------------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Add one node named `name` whose single output is also called `name`."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, name: str, data: str, in_channels: int, out_channels: int, kernel: int = 3, *,
             bias: bool = True, weight: str | None = None, conv_bias: str | None = None, **attrs) -> str:
        weight = weight or self.weight(f"{name}.weight", (out_channels, in_channels, kernel, kernel))
        inputs = [data, weight]
        if conv_bias is not None:
            inputs.append(conv_bias)
        elif bias:
            inputs.append(self.bias(f"{name}.bias", (out_channels,)))
        return self.node("Conv", inputs, name, kernel_shape=[kernel, kernel], **attrs)

    def batch_norm(self, name: str, data: str, channels: int) -> str:
        scale = self.constant(f"{name}.scale", self.rng.uniform(0.5, 1.5, channels))
        shift = self.constant(f"{name}.shift", self.rng.normal(0.0, 0.1, channels))
        mean = self.constant(f"{name}.mean", self.rng.normal(0.0, 0.1, channels))
        var = self.constant(f"{name}.var", self.rng.uniform(0.5, 1.5, channels))
        return self.node("BatchNormalization", [data, scale, shift, mean, var], name, epsilon=1e-5)

    def gemm(self, name: str, data: str, in_features: int, out_features: int, *, trans_b: int = 1,
             bias_shape=None, **attrs) -> str:
        shape = (out_features, in_features) if trans_b else (in_features, out_features)
        weight = self.weight(f"{name}.weight", shape, fan_in=in_features)
        bias = self.bias(f"{name}.bias", bias_shape if bias_shape is not None else (out_features,))
        return self.node("Gemm", [data, weight, bias], name, transB=trans_b, **attrs)

    def matmul(self, name: str, data: str, in_features: int, out_features: int) -> str:
        weight = self.weight(f"{name}.weight", (in_features, out_features), fan_in=in_features)
        return self.node("MatMul", [data, weight], name)

    # ---- signature ---------------------------------------------------------------------------------
    def input(self, name: str, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def output(self, name: str, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def build(self, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="pfp-onnx tests")
        onnx.checker.check_model(model, full_check=True)
        return model


# ---- the zoo ---------------------------------------------------------------------------------------
def chain() -> onnx.ModelProto:
    """A plain CNN: every conv/dense kind of weight and the per-channel ops between them.

    conv1 (no bias) → BN → Relu → MaxPool → conv2 (bias, stride 2, pads 2, dilation 2) → LeakyRelu
    → conv3 → Clip (min/max inputs) → Flatten ([N,6,3,3]: 9 features per channel) → gemm1 (transB=1)
    → Relu → gemm2 (transB=0, bias [1,10]) → Relu → gemm3 (transB=0, bias [1,5]) → logits.
    """
    b = _GraphBuilder("chain", seed=1)
    x = b.input("x", ["N", 3, 12, 12])
    h = b.conv("conv1", x, 3, 8, bias=False, pads=[1, 1, 1, 1])                          # [N,8,12,12]
    h = b.batch_norm("bn1", h, 8)
    h = b.node("Relu", [h], "relu1")
    h = b.node("MaxPool", [h], "pool1", kernel_shape=[2, 2], strides=[2, 2])            # [N,8,6,6]
    h = b.conv("conv2", h, 8, 10, strides=[2, 2], pads=[2, 2, 2, 2], dilations=[2, 2])  # [N,10,3,3]
    h = b.node("LeakyRelu", [h], "leaky2", alpha=0.1)
    h = b.conv("conv3", h, 10, 6, pads=[1, 1, 1, 1])                                     # [N,6,3,3]
    low = b.constant("clip.min", -0.5)
    high = b.constant("clip.max", 1.5)
    h = b.node("Clip", [h, low, high], "clip3")
    h = b.node("Flatten", [h], "flatten", axis=1)                                        # [N,54]
    h = b.gemm("gemm1", h, 54, 12, trans_b=1, alpha=0.5, beta=2.0)
    h = b.node("Relu", [h], "relu4")
    h = b.gemm("gemm2", h, 12, 10, trans_b=0, bias_shape=(1, 10))
    h = b.node("Relu", [h], "relu5")
    b.gemm("logits", h, 10, 5, trans_b=0, bias_shape=(1, 5))
    b.output("logits", ["N", 5])
    return b.build()


def residual() -> onnx.ModelProto:
    """A ResNet in miniature: identity and projection shortcuts couple groups through Add.

    stem conv → BN → Relu; block A (identity Add); block B (stride 2, projection 1x1 conv + BN, Add);
    PRelu with slope [12,1,1]; AveragePool; GlobalAveragePool → Reshape to [-1, 12] → fc.
    """
    b = _GraphBuilder("residual", seed=2)
    x = b.input("x", ["N", 3, 16, 16])
    stem = b.node("Relu", [b.batch_norm("stem.bn", b.conv("stem.conv", x, 3, 8, bias=False, pads=[1] * 4), 8)],
                  "stem.relu")
    h = b.batch_norm("a.bn1", b.conv("a.conv1", stem, 8, 8, bias=False, pads=[1] * 4), 8)
    h = b.node("Relu", [h], "a.relu1")
    h = b.batch_norm("a.bn2", b.conv("a.conv2", h, 8, 8, bias=False, pads=[1] * 4), 8)
    a_out = b.node("Relu", [b.node("Add", [h, stem], "a.add")], "a.relu2")               # [N,8,16,16]
    h = b.batch_norm("b.bn1", b.conv("b.conv1", a_out, 8, 12, bias=False, strides=[2, 2], pads=[1] * 4), 12)
    h = b.node("Relu", [h], "b.relu1")
    h = b.batch_norm("b.bn2", b.conv("b.conv2", h, 12, 12, bias=False, pads=[1] * 4), 12)
    shortcut = b.batch_norm("b.proj.bn", b.conv("b.proj", a_out, 8, 12, kernel=1, bias=False, strides=[2, 2]), 12)
    h = b.node("Add", [shortcut, h], "b.add")                                            # [N,12,8,8]
    slope = b.constant("b.prelu.slope", b.rng.uniform(0.05, 0.3, (12, 1, 1)))
    h = b.node("PRelu", [h, slope], "b.prelu")
    h = b.node("AveragePool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])         # [N,12,4,4]
    h = b.node("GlobalAveragePool", [h], "gap")                                          # [N,12,1,1]
    target = b.constant("flat.shape", [-1, 12], dtype=np.int64)
    h = b.node("Reshape", [h, target], "flat")
    b.gemm("logits", h, 12, 10)
    b.output("logits", ["N", 10])
    return b.build()


def reshape_variants() -> onnx.ModelProto:
    """Both Reshape spellings of a flatten, with H·W > 1, and two dense branches coupled by Add.

    branch 1: conv_a → Relu → MaxPool → Reshape [-1, 24] (explicit width) → fc_a (Gemm)
    branch 2: conv_b (1x1 stride 4) → Reshape [0, -1] → fc_b (MatMul)
    fc_a + fc_b → Relu → head (Gemm transB=0).
    """
    b = _GraphBuilder("reshape_variants", seed=3)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.conv("conv_a", x, 3, 6, strides=[2, 2], pads=[1] * 4)                        # [N,6,4,4]
    h = b.node("Relu", [h], "relu_a")
    h = b.node("MaxPool", [h], "pool_a", kernel_shape=[2, 2], strides=[2, 2])          # [N,6,2,2]
    h = b.node("Reshape", [h, b.constant("flat_a.shape", [-1, 24], dtype=np.int64)], "flat_a")
    fc_a = b.gemm("fc_a", h, 24, 8)
    g = b.conv("conv_b", x, 3, 5, kernel=1, strides=[4, 4])                             # [N,5,2,2]
    g = b.node("Reshape", [g, b.constant("flat_b.shape", [0, -1], dtype=np.int64)], "flat_b")
    fc_b = b.matmul("fc_b", g, 20, 8)
    h = b.node("Relu", [b.node("Add", [fc_a, fc_b], "fc_sum")], "relu_sum")
    b.gemm("head", h, 8, 4, trans_b=0)
    b.output("head", ["N", 4])
    return b.build()


def mlp3d() -> onnx.ModelProto:
    """A sequence MLP on [N, T, F]: MatMul on the last axis, biases and activations between."""
    b = _GraphBuilder("mlp3d", seed=4)
    h = b.input("x", ["N", "T", 6])
    h = b.node("Add", [b.matmul("mm1", h, 6, 16), b.bias("mm1.bias", (16,))], "add1")
    h = b.node("Tanh", [h], "tanh1")
    h = b.node("Add", [b.bias("mm2.bias", (1, 1, 12)), b.matmul("mm2", h, 16, 12)], "add2")  # constant first
    h = b.node("Sigmoid", [h], "sigmoid2")
    h = b.node("Mul", [h, b.constant("mm2.gain", b.rng.uniform(0.5, 2.0, 12))], "gain2")
    h = b.node("HardSigmoid", [b.matmul("mm3", h, 12, 10)], "hardsigmoid3", alpha=0.3, beta=0.4)
    h = b.node("HardSwish", [b.matmul("mm4", h, 10, 10)], "hardswish4")
    h = b.node("Elu", [b.matmul("mm5", h, 10, 9)], "elu5", alpha=0.7)
    h = b.node("Selu", [b.matmul("mm6", h, 9, 8)], "selu6")
    h = b.node("Softplus", [b.matmul("mm7", h, 8, 7)], "softplus7")
    b.matmul("out", h, 7, 3)
    b.output("out", ["N", "T", 3])
    return b.build()


def constant_nodes_dynamic() -> onnx.ModelProto:
    """Weights in Constant nodes (Paddle-style) and an input with dynamic batch, height and width."""
    b = _GraphBuilder("constant_nodes_dynamic", seed=5, constant_nodes=True)
    x = b.input("x", ["N", 3, "H", "W"])
    h = b.conv("conv1", x, 3, 8, bias=False, pads=[1] * 4,
               conv_bias=b.bias("conv1.bias", (8,), as_floats=True))
    h = b.node("Dropout", [h], "drop1")
    h = b.node("Relu", [h], "relu1")
    h = b.node("Identity", [h], "id1")
    h = b.conv("conv2", h, 8, 6, pads=[1] * 4)
    h = b.node("Relu", [b.batch_norm("bn2", h, 6)], "relu2")
    h = b.node("GlobalMaxPool", [h], "gmp")                                              # [N,6,1,1]
    h = b.node("Flatten", [h], "flatten")
    b.gemm("logits", h, 6, 5)
    b.output("logits", ["N", 5])
    return b.build()


def paddle_batch() -> onnx.ModelProto:
    """A Paddle export's signature: the dynamic batch written as dim_value -1 (not a dim_param), weights in
    Constant nodes, a depthwise/pointwise pair and a dense head. Capture once ran batches of -1 points, i.e.
    none, and least squares found no statistics to re-fit with."""
    b = _GraphBuilder("paddle_batch", seed=16, constant_nodes=True)
    x = b.input("x", [-1, 3, 12, 16])
    h = b.node("Relu", [b.batch_norm("bn1", b.conv("conv1", x, 3, 16, bias=False, pads=[1] * 4), 16)], "relu1")
    dw = b.weight("dw.weight", (16, 1, 3, 3), fan_in=9)
    h = b.node("Relu", [b.conv("dw", h, 16, 16, weight=dw, group=16, pads=[1] * 4)], "relu_dw")
    h = b.node("Relu", [b.conv("pw", h, 16, 24, kernel=1)], "relu_pw")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 24, 4)
    b.output("logits", [-1, 4])
    return b.build()


def shared_weight() -> onnx.ModelProto:
    """One weight and one bias initializer read by two Convs: conv_a (from the input) and conv_b."""
    b = _GraphBuilder("shared_weight", seed=6)
    x = b.input("x", ["N", 4, 8, 8])
    weight = b.weight("shared.weight", (4, 4, 3, 3))
    bias = b.bias("shared.bias", (4,))
    h = b.node("Relu", [b.conv("conv_a", x, 4, 4, weight=weight, conv_bias=bias, pads=[1] * 4)], "relu_a")
    h = b.node("Relu", [b.conv("conv_b", h, 4, 4, weight=weight, conv_bias=bias, pads=[1] * 4)], "relu_b")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 4, 3)
    b.output("logits", ["N", 3])
    return b.build()


def branches() -> onnx.ModelProto:
    """Per-channel Sub/Mul/Div constants, a spatial attention map, and an Add whose sum feeds two convs.

    left = (c0 - conv_l) * m[1,6,1,1] / 2;  right = conv_r * m[6,1,1];  sum = left + right
    sum * sigmoid(mean over channels of x) → conv_p, conv_q → Add → Relu → GAP → Flatten → fc.
    """
    b = _GraphBuilder("branches", seed=7)
    x = b.input("x", ["N", 3, 8, 8])
    left = b.conv("conv_l", x, 3, 6, pads=[1] * 4)
    left = b.node("Sub", [b.constant("left.offset", b.rng.normal(0, 0.1, (6, 1, 1))), left], "left_sub")
    left = b.node("Mul", [left, b.constant("left.gain", b.rng.uniform(0.5, 2, (1, 6, 1, 1)))], "left_mul")
    left = b.node("Div", [left, b.constant("left.divisor", 2.0)], "left_div")
    right = b.conv("conv_r", x, 3, 6, pads=[1] * 4)
    right = b.node("Mul", [right, b.constant("right.gain", b.rng.uniform(0.5, 2, (6, 1, 1)))], "right_mul")
    total = b.node("Add", [left, right], "sum")
    attention = b.node("Sigmoid", [b.node("ReduceMean", [x], "x_mean", axes=[1], keepdims=1)], "attention")
    total = b.node("Mul", [total, attention], "attend")                                 # [N,1,8,8] map
    p = b.conv("conv_p", total, 6, 5, pads=[1] * 4)
    q = b.conv("conv_q", total, 6, 5, kernel=1)
    h = b.node("Relu", [b.node("Add", [p, q], "pq")], "relu_pq")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 5, 4)
    b.output("logits", ["N", 4])
    return b.build()


def frozen_cases() -> onnx.ModelProto:
    """Every way a group must freeze, beside two prunable groups so compress can still act.

    conv_out's output is a graph output; conv_soft feeds Softmax(axis=1); conv_e is added to the graph
    input y; conv_t feeds a Transpose that moves the channels off axis 1 before a conv; conv_h feeds a
    grouped (not depthwise) conv. conv_f → Relu → conv_f2 is prunable, and so is the group of the six convs
    summed into `merged`, and conv_c ≡ conv_d, which meet in a Concat along a spatial axis.
    """
    b = _GraphBuilder("frozen_cases", seed=8)
    x = b.input("x", ["N", 4, 8, 8])
    y = b.input("y", ["N", 6, 8, 8])
    a = b.conv("conv_out", x, 4, 6, pads=[1] * 4)
    b.output("conv_out", ["N", 6, 8, 8])
    branch = [b.conv("conv_out2", b.node("Relu", [a], "relu_out"), 6, 4, kernel=1)]
    soft = b.node("Softmax", [b.conv("conv_soft", x, 4, 6, kernel=1)], "softmax", axis=1)
    branch.append(b.conv("conv_soft2", soft, 6, 4, kernel=1))
    both = b.node("Concat", [b.conv("conv_c", x, 4, 5, kernel=1), b.conv("conv_d", x, 4, 5, kernel=1)],
                  "concat", axis=2)
    both = b.node("MaxPool", [both], "concat_pool", kernel_shape=[2, 1], strides=[2, 1])
    branch.append(b.conv("conv_cd", both, 5, 4, kernel=1))
    plus_input = b.node("Add", [b.conv("conv_e", x, 4, 6, kernel=1), y], "add_input")
    branch.append(b.conv("conv_e2", plus_input, 6, 4, kernel=1))
    flipped = b.node("Transpose", [b.conv("conv_t", x, 4, 8, kernel=1)], "transpose", perm=[0, 2, 1, 3])
    branch.append(b.conv("conv_t2", flipped, 8, 4, kernel=1))
    grouped = b.conv("conv_dw", b.conv("conv_h", x, 4, 6, kernel=1), 3, 6, group=2, pads=[1] * 4)
    branch.append(b.conv("conv_h2", grouped, 6, 4, kernel=1))
    f = b.node("Relu", [b.conv("conv_f", x, 4, 7, pads=[1] * 4)], "relu_f")
    branch.append(b.conv("conv_f2", f, 7, 4, kernel=1))
    merged = branch[0]
    for index, other in enumerate(branch[1:]):
        merged = b.node("Add", [merged, other], f"merge{index}")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [merged], "gap")], "flatten")
    b.gemm("logits", h, 4, 3)
    b.output("logits", ["N", 3])
    return b.build()


def squeeze_excite() -> onnx.ModelProto:
    """A squeeze-and-excitation block: Mul couples [N,C,H,W] with the gate's broadcast [N,C,1,1].

    stem → Relu → s; gate = HardSigmoid(excite(Relu(squeeze(GAP(s))))); s * gate → conv_out → … → fc.
    """
    b = _GraphBuilder("squeeze_excite", seed=9)
    x = b.input("x", ["N", 3, 8, 8])
    s = b.node("Relu", [b.conv("stem", x, 3, 8, pads=[1] * 4)], "stem.relu")
    gate = b.conv("squeeze", b.node("GlobalAveragePool", [s], "se.gap"), 8, 3, kernel=1)
    gate = b.conv("excite", b.node("Relu", [gate], "se.relu"), 3, 8, kernel=1)
    gate = b.node("HardSigmoid", [gate], "se.gate", alpha=0.2, beta=0.5)
    h = b.node("Mul", [s, gate], "se.scale")
    h = b.node("Relu", [b.conv("conv_out", h, 8, 6, pads=[1] * 4)], "out.relu")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 6, 4)
    b.output("logits", ["N", 4])
    return b.build()


def self_coupled() -> onnx.ModelProto:
    """h + conv(h) with a square conv: one weight is both producer (axis 0) and consumer (axis 1)
    of the same group, and the coupled group passes through two such blocks."""
    b = _GraphBuilder("self_coupled", seed=10)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.conv("stem", x, 3, 5, pads=[1] * 4)], "stem.relu")
    h = b.node("Add", [h, b.conv("block1", h, 5, 5, pads=[1] * 4)], "add1")
    h = b.node("Add", [b.conv("block2", h, 5, 5, kernel=1), h], "add2")
    h = b.node("Flatten", [b.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])], "flatten")
    b.gemm("logits", h, 45, 3, trans_b=0)
    b.output("logits", ["N", 3])
    return b.build()


def outer_scope_subgraph() -> onnx.ModelProto:
    """conv1's output `h` feeds conv2 and is also read, implicitly, inside both branches of an If whose
    result is a graph output. Not in ZOO: the analysis does not see the subgraph read yet."""
    b = _GraphBuilder("outer_scope_subgraph", seed=11)
    x = b.input("x", ["N", 3, 4, 4])
    h = b.conv("conv1", x, 3, 6, kernel=1)
    b.node("Relu", [b.conv("conv2", h, 6, 4, kernel=1)], "relu2")
    branches = []
    for name, op in (("then", "Relu"), ("else", "Sigmoid")):
        branches.append(helper.make_graph(
            [helper.make_node(op, [h], [f"{name}_out"], name=f"{name}_op")], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 6, 4, 4])]))
    condition = b.constant("condition", True, dtype=np.bool_)
    b.nodes.append(helper.make_node("If", [condition], ["branch"], name="if",
                                    then_branch=branches[0], else_branch=branches[1]))
    b.output("relu2", ["N", 4, 4, 4])
    b.output("branch", ["N", 6, 4, 4])
    return b.build()


def extra_outputs() -> onnx.ModelProto:
    """Second outputs that carry the channels too: Dropout's mask (cast and returned) and MaxPool's
    Indices (returned as is). Not in ZOO: the analysis follows only the first output of these ops."""
    b = _GraphBuilder("extra_outputs", seed=12)
    x = b.input("x", ["N", 3, 4, 4])
    b.nodes.append(helper.make_node("Dropout", [b.conv("conv_drop", x, 3, 6, kernel=1)], ["drop", "mask"],
                                    name="drop"))
    b.node("Cast", ["mask"], "mask_float", to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("MaxPool", [b.conv("conv_pool", x, 3, 5, kernel=1)], ["pool", "indices"],
                                    name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    b.node("Add", [b.conv("head_drop", "drop", 6, 4, kernel=2, strides=[2, 2]),
                   b.conv("head_pool", "pool", 5, 4, kernel=1)], "out")
    b.output("out", ["N", 4, 2, 2])
    b.output("mask_float", ["N", 6, 4, 4])
    b.outputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", 5, 2, 2]))
    return b.build()


def instance_norm() -> onnx.ModelProto:
    """InstanceNormalization (style-transfer and GAN generators) carries channels like BatchNorm."""
    b = _GraphBuilder("instance_norm", seed=12)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.conv("conv1", x, 3, 8, pads=[1] * 4)
    scale = b.constant("in1.scale", b.rng.uniform(0.5, 1.5, 8))
    shift = b.constant("in1.shift", b.rng.normal(0.0, 0.3, 8))
    h = b.node("Relu", [b.node("InstanceNormalization", [h, scale, shift], "in1", epsilon=1e-5)], "relu1")
    h = b.node("Relu", [b.conv("conv2", h, 8, 6, pads=[1] * 4)], "relu2")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 6, 4)
    b.output("logits", ["N", 4])
    return b.build()


def shape_ops() -> onnx.ModelProto:
    """The shape-changing operators that carry channels: Pad (spatial), reductions, Squeeze/Unsqueeze, a
    1-D conv between them, Softmax and Split (equal parts, sizes implicit) off and on the channel axis.

    conv_a → Relu → Pad (H, W) → conv_b (no pads) → Relu → ReduceSum(W, keepdims) [N,6,8,1]
    → Squeeze(3) [N,6,8] → conv_c (1-D) → Softmax(axis 2) → Unsqueeze(2) [N,5,1,8]
    → Split(axis 1, two equal parts, no sizes) → conv_d, conv_e (1×1) → Add
    → ReduceMax(H, keepdims 0) [N,4,8] → Transpose [N,8,4] → MatMul (dense on the moved channel axis)
    → ReduceMean(axis 1, keepdims 0) → logits.
    """
    b = _GraphBuilder("shape_ops", seed=13)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Relu", [b.conv("conv_a", x, 3, 8, pads=[1] * 4)], "relu_a")
    h = b.node("Pad", [h, b.constant("pad.pads", [0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64),
                       b.constant("pad.value", 0.25)], "pad")                            # [N,8,10,10]
    h = b.node("Relu", [b.conv("conv_b", h, 8, 6)], "relu_b")                            # [N,6,8,8]
    h = b.node("ReduceSum", [h, b.constant("sum.axes", [3], dtype=np.int64)], "sum_w")   # [N,6,8,1]
    h = b.node("Squeeze", [h, b.constant("squeeze.axes", [-1], dtype=np.int64)], "squeeze")  # [N,6,8]
    weight = b.weight("conv_c.weight", (5, 6, 3))
    h = b.node("Conv", [h, weight, b.bias("conv_c.bias", (5,))], "conv_c", kernel_shape=[3], pads=[1, 1])
    h = b.node("Softmax", [h], "softmax", axis=2)                                        # [N,5,8]
    h = b.node("Unsqueeze", [h, b.constant("unsqueeze.axes", [2], dtype=np.int64)], "unsqueeze")  # [N,5,1,8]
    h = b.conv("conv_f", h, 5, 6, kernel=1)
    b.nodes.append(helper.make_node("Split", [h], ["half_a", "half_b"], name="split", axis=1))
    h = b.node("Add", [b.conv("conv_d", "half_a", 3, 4, kernel=1), b.conv("conv_e", "half_b", 3, 4, kernel=1)],
               "add")
    h = b.node("ReduceMax", [h], "max_h", axes=[2], keepdims=0)                          # [N,4,8]
    h = b.node("Transpose", [b.node("Relu", [h], "relu_max")], "to_last", perm=[0, 2, 1])  # [N,8,4]
    h = b.node("Relu", [b.matmul("dense", h, 4, 7)], "relu_dense")                       # [N,8,7]
    h = b.node("ReduceMean", [h], "mean_t", axes=[1], keepdims=0)                        # [N,7]
    b.gemm("logits", h, 7, 3)
    b.output("logits", ["N", 3])
    return b.build()


def legacy_axes() -> onnx.ModelProto:
    """The same operators at opset 11, where Squeeze, Unsqueeze, the reductions and Split take their axes
    and sizes as attributes (and Split's sizes, written out, must be rewritten there).

    conv_a → Relu → Pad (H, W; pads input) → conv_b → ReduceSum(W, attribute) → Squeeze(attribute)
    → Unsqueeze(attribute) → Split(axis 1, sizes [2, 6] attribute) → conv_c, conv_d → Add
    → ReduceMean(H, W; attribute, keepdims 0) → logits.
    """
    b = _GraphBuilder("legacy_axes", seed=14)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.conv("conv_a", x, 3, 8, pads=[1] * 4)], "relu_a")
    h = b.node("Pad", [h, b.constant("pad.pads", [0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)], "pad",
               mode="reflect")                                                           # [N,8,8,8]
    h = b.node("Relu", [b.conv("conv_b", h, 8, 8)], "relu_b")                            # [N,8,6,6]
    h = b.node("ReduceSum", [h], "sum_w", axes=[3], keepdims=1)                          # [N,8,6,1]
    h = b.node("Squeeze", [h], "squeeze", axes=[3])                                      # [N,8,6]
    h = b.node("Unsqueeze", [h], "unsqueeze", axes=[3])                                  # [N,8,6,1]
    b.nodes.append(helper.make_node("Split", [h], ["part_a", "part_b"], name="split", axis=1, split=[2, 6]))
    h = b.node("Add", [b.conv("conv_c", "part_a", 2, 5, kernel=1), b.conv("conv_d", "part_b", 6, 5, kernel=1)],
               "add")
    h = b.node("ReduceMean", [b.node("Relu", [h], "relu_add")], "mean_hw", axes=[2, 3], keepdims=0)  # [N,5]
    b.gemm("logits", h, 5, 3)
    b.output("logits", ["N", 3])
    return b.build(opset=11)


def frozen_shape_ops() -> onnx.ModelProto:
    """The shape operators that must freeze the channels they touch, each on its own conv beside one
    prunable pair (conv_ok → Relu → conv_ok2): Pad on the channel axis, a reduction over the channels,
    Slice with a step, and Squeeze without axes (which sizes are 1 is only known when it runs, and a
    pruned width could become 1)."""
    b = _GraphBuilder("frozen_shape_ops", seed=15)
    x = b.input("x", ["N", 4, 6, 6])
    branch = [b.conv("conv_ok2", b.node("Relu", [b.conv("conv_ok", x, 4, 7, kernel=1)], "relu_ok"), 7, 4,
                     kernel=1)]
    padded = b.node("Pad", [b.conv("conv_pad", x, 4, 3, kernel=1),
                            b.constant("pad.pads", [0, 1, 0, 0, 0, 0, 0, 0], dtype=np.int64)], "pad_channels")
    branch.append(b.conv("conv_pad2", padded, 4, 4, kernel=1))
    summed = b.node("ReduceSum", [b.conv("conv_sum", x, 4, 5, kernel=1), b.constant("sum.axes", [1], dtype=np.int64)],
                    "sum_channels")                                                      # [N,1,6,6]
    branch.append(b.node("Expand", [summed, b.constant("expand.shape", [1, 4, 1, 1], dtype=np.int64)], "expand"))
    strided = b.node("Slice", [b.conv("conv_step", x, 4, 8, kernel=1)] + [
        b.constant(f"step.{key}", [value], dtype=np.int64) for key, value in
        (("starts", 0), ("ends", 8), ("axes", 1), ("steps", 2))], "slice_step")          # [N,4,6,6]
    branch.append(b.conv("conv_step2", strided, 4, 4, kernel=1))
    pooled = b.node("GlobalAveragePool", [b.conv("conv_sq", x, 4, 6, kernel=1)], "gap_sq")  # [N,6,1,1]
    squeezed = b.gemm("dense_sq", b.node("Squeeze", [pooled], "squeeze_all"), 6, 4)    # [N,4]
    merged = branch[0]
    for index, other in enumerate(branch[1:]):
        merged = b.node("Add", [merged, other], f"merge{index}")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [merged], "gap")], "flatten")
    b.node("Add", [b.gemm("head", h, 4, 4), squeezed], "logits")
    b.output("logits", [2, 4])
    b.inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])
    return b.build()


def resize_sizes() -> onnx.ModelProto:
    """Resize given output sizes (fixed batch), whose channel entry must follow the pruned width."""
    b = _GraphBuilder("resize_sizes", seed=16)
    x = b.input("x", [2, 3, 4, 4])
    h = b.node("Relu", [b.conv("conv_a", x, 3, 6, pads=[1] * 4)], "relu_a")
    empty = b.constant("resize.roi", [], dtype=np.float32)
    h = b.node("Resize", [h, empty, b.constant("resize.scales", [], dtype=np.float32),
                          b.constant("resize.sizes", [2, 6, 8, 8], dtype=np.int64)], "resize", mode="nearest")
    h = b.node("Relu", [b.conv("conv_b", h, 6, 5, strides=[2, 2], pads=[1] * 4)], "relu_b")  # [2,5,4,4]
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    b.gemm("logits", h, 5, 3)
    b.output("logits", [2, 3])
    return b.build()


def concat_flatten() -> onnx.ModelProto:
    """Two convs concatenated on channels, then flattened into a dense layer: after the Concat conv_b's
    channel c sits at offset 4 + c, and after the Flatten it owns the 4 features (4 + c)·4 … (4 + c)·4 + 3."""
    b = _GraphBuilder("concat_flatten", seed=17)
    x = b.input("x", ["N", 3, 4, 4])
    a = b.node("Relu", [b.conv("conv_a", x, 3, 4, strides=[2, 2], pads=[1] * 4)], "relu_a")  # [N,4,2,2]
    h = b.node("Relu", [b.conv("conv_b", x, 3, 5, strides=[2, 2], pads=[1] * 4)], "relu_b")  # [N,5,2,2]
    h = b.node("Flatten", [b.node("Concat", [a, h], "concat", axis=1)], "flatten", axis=1)     # [N,36]
    h = b.node("Relu", [b.gemm("dense", h, 36, 6)], "relu_dense")
    b.gemm("logits", h, 6, 3)
    b.output("logits", ["N", 3])
    return b.build()


def layout_ops() -> onnx.ModelProto:
    """Operators that move the channels' place rather than their values, and a transposed conv reading them.

    conv_a (4) → Relu → Concat after the input x (3 untracked channels: conv_a's sit at offset 3)
    → Unsqueeze(1) [N,1,7,6,6] (the channel axis moves to 2) → Squeeze(1) → ConvTranspose (stride 2,
    weights [C_in, C_out, k, k]) [N,5,12,12] → Relu → conv_b (stride 2) [N,6,6,6] → Flatten → Flatten
    again (a no-op on [N,216] that keeps each channel's 36 features) → dense → logits.
    """
    b = _GraphBuilder("layout_ops", seed=18)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.conv("conv_a", x, 3, 4, kernel=1)], "relu_a")
    h = b.node("Concat", [x, h], "concat", axis=1)                                            # [N,7,6,6]
    h = b.node("Unsqueeze", [h, b.constant("unsqueeze.axes", [1], dtype=np.int64)], "unsqueeze")
    h = b.node("Squeeze", [h, b.constant("squeeze.axes", [1], dtype=np.int64)], "squeeze")    # [N,7,6,6]
    h = b.node("ConvTranspose", [h, b.weight("up.weight", (7, 5, 2, 2), fan_in=28), b.bias("up.bias", (5,))],
               "up", kernel_shape=[2, 2], strides=[2, 2])                                     # [N,5,12,12]
    h = b.node("Relu", [h], "relu_up")
    h = b.node("Relu", [b.conv("conv_b", h, 5, 6, strides=[2, 2], pads=[1] * 4)], "relu_b")  # [N,6,6,6]
    h = b.node("Flatten", [b.node("Flatten", [h], "flatten", axis=1)], "flatten_again", axis=1)  # [N,216]
    b.gemm("logits", h, 216, 3)
    b.output("logits", ["N", 3])
    return b.build()


ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "chain": chain,
    "residual": residual,
    "reshape_variants": reshape_variants,
    "mlp3d": mlp3d,
    "constant_nodes_dynamic": constant_nodes_dynamic,
    "paddle_batch": paddle_batch,
    "shared_weight": shared_weight,
    "branches": branches,
    "frozen_cases": frozen_cases,
    "squeeze_excite": squeeze_excite,
    "self_coupled": self_coupled,
    "instance_norm": instance_norm,
    "shape_ops": shape_ops,
    "legacy_axes": legacy_axes,
    "frozen_shape_ops": frozen_shape_ops,
    "resize_sizes": resize_sizes,
    "concat_flatten": concat_flatten,
    "layout_ops": layout_ops,
}


def input_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: a dynamic first dim (a dim_param, or a dim_value of -1 as Paddle writes it)
    becomes `batch`, any other dynamic dim DYNAMIC_SIZE."""
    shapes = {}
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        shapes[graph_input.name] = tuple(
            dim.dim_value if dim.dim_value > 0 else (batch if index == 0 else DYNAMIC_SIZE)
            for index, dim in enumerate(dims))
    return shapes


def random_inputs(model: onnx.ModelProto, count: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input, with batch `count`."""
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in input_shapes(model, batch=count).items() if name not in initializers}


# ---- exporters' shape arithmetic -------------------------------------------------------------------
def paddle_flatten() -> onnx.ModelProto:
    """What Paddle2ONNX writes around a PP-LCNet / MobileNetV3 head (PaddleOCR's text-direction classifier):
    weights in Constant nodes, a dynamic batch of dim_value -1, conv biases added as Reshape(bias [C],
    [1, C, 1, 1]), HardSwish written out, a squeeze-excite gate, and the flatten after global pooling
    computed from Shape with the width a constant, at opset 11:

    conv1 + bias → HardSwish → SE (GAP → squeeze + bias → Relu → excite + bias → HardSigmoid → Mul)
    → conv_last (1×1) + bias → Relu → GAP [N,12,1,1]
    → Reshape to Concat(Cast(Slice(Cast(Shape, int32), 0:1), int64), Cast([12] int32, int64)) [N,12]
    → MatMul + bias → logits.
    """
    b = _GraphBuilder("paddle_flatten", seed=18, constant_nodes=True)
    x = b.input("x", [-1, 3, 8, 16])

    def conv_bias(name: str, data: str, in_channels: int, out_channels: int, kernel: int, **attrs) -> str:
        h = b.conv(name, data, in_channels, out_channels, kernel, bias=False, **attrs)
        shape = b.constant(f"{name}.bias_shape", [1, out_channels, 1, 1], dtype=np.int64)
        bias = b.node("Reshape", [b.bias(f"{name}.bias", (out_channels,)), shape], f"{name}.bias_4d")
        return b.node("Add", [h, bias], f"{name}.add")

    h = conv_bias("conv1", x, 3, 8, 3, pads=[1] * 4, strides=[2, 2])                    # [N,8,4,8]
    clipped = b.node("Clip", [b.node("Add", [h, b.constant("hswish.three", 3.0)], "hswish.add"),
                              b.constant("hswish.min", 0.0), b.constant("hswish.max", 6.0)], "hswish.clip")
    h = b.node("Div", [b.node("Mul", [h, clipped], "hswish.mul"), b.constant("hswish.six", 6.0)], "hswish")
    gate = conv_bias("se.squeeze", b.node("GlobalAveragePool", [h], "se.gap"), 8, 2, 1)
    gate = conv_bias("se.excite", b.node("Relu", [gate], "se.relu"), 2, 8, 1)
    h = b.node("Mul", [h, b.node("HardSigmoid", [gate], "se.gate", alpha=0.2, beta=0.5)], "se.scale")
    h = b.node("Relu", [conv_bias("conv_last", h, 8, 12, 1)], "relu_last")
    pooled = b.node("GlobalAveragePool", [h], "gap")                                     # [N,12,1,1]
    shape = b.node("Cast", [b.node("Shape", [pooled], "shape")], "shape_int32", to=TensorProto.INT32)
    bounds = [b.constant(f"batch.{key}", [value], dtype=np.int64)
              for key, value in (("starts", 0), ("ends", 1), ("axes", 0), ("steps", 1))]
    batch = b.node("Cast", [b.node("Slice", [shape] + bounds, "batch")], "batch_int64", to=TensorProto.INT64)
    width = b.node("Cast", [b.constant("width", [12], dtype=np.int32)], "width_int64", to=TensorProto.INT64)
    h = b.node("Reshape", [pooled, b.node("Concat", [batch, width], "flat_shape", axis=-1)], "flat")
    b.node("Add", [b.matmul("fc", h, 12, 4), b.bias("fc.bias", (4,))], "logits")
    b.output("logits", [-1, 4])
    return b.build(opset=11)  # Paddle's opset, where ONNX's shape inference cannot follow the computed target


def tf2onnx_head() -> onnx.ModelProto:
    """What tf2onnx writes for a Keras head on an NHWC input with dynamic sizes: Transposes around the conv,
    its bias added as Reshape(bias, [1, C, 1, 1]), and three spellings of the flatten after the mean over
    H and W ([N,C,1,1]), summed: Reshape [-1, 1, 1, C] (the NHWC transpose of size-1 axes) → Flatten;
    Squeeze(2, 3); and a target from Shape → Gather(NHWC order) → Cast(int32) → Slice(0:1) → Concat with
    the width → Cast(int64). The three MatMuls share one weight. A second conv's map goes NHWC before a
    flatten of 2×2 positions (H = W = 8): its channels are strided there, and freeze.
    """
    b = _GraphBuilder("tf2onnx_head", seed=19)
    x = b.input("x", ["N", "H", "W", 3])
    nchw = b.node("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
    bias = b.node("Reshape", [b.bias("conv.bias", (8,)), b.constant("conv.bias_shape", [1, 8, 1, 1], dtype=np.int64)],
                  "conv.bias_4d")
    h = b.node("Relu", [b.node("Add", [b.conv("conv", nchw, 3, 8, bias=False, pads=[1] * 4), bias], "conv.add")],
               "relu")
    pooled = b.node("GlobalAveragePool", [h], "mean")                                    # [N,8,1,1]
    weight = b.weight("dense.weight", (8, 4), fan_in=8)
    nhwc = b.node("Reshape", [pooled, b.constant("nhwc_shape", [-1, 1, 1, 8], dtype=np.int64)], "to_nhwc")
    heads = [b.node("MatMul", [b.node("Flatten", [nhwc], "flatten"), weight], "dense_flat")]
    squeezed = b.node("Squeeze", [pooled, b.constant("squeeze.axes", [2, 3], dtype=np.int64)], "squeeze")
    heads.append(b.node("MatMul", [squeezed, weight], "dense_squeezed"))
    shape = b.node("Gather", [b.node("Shape", [pooled], "shape"), b.constant("nhwc_order", [0, 2, 3, 1],
                                                                             dtype=np.int64)], "shape_nhwc")
    shape = b.node("Cast", [shape], "shape_int32", to=TensorProto.INT32)
    bounds = [b.constant(f"batch.{key}", [value], dtype=np.int64) for key, value in
              (("starts", 0), ("ends", 1), ("axes", 0))]
    target = b.node("Concat", [b.node("Slice", [shape] + bounds, "batch"),
                               b.constant("width", [8], dtype=np.int32)], "flat_shape_int32", axis=0)
    target = b.node("Cast", [target], "flat_shape", to=TensorProto.INT64)
    heads.append(b.node("MatMul", [b.node("Reshape", [nhwc, target], "flat"), weight], "dense_shaped"))
    g = b.node("Relu", [b.conv("conv_map", nchw, 3, 6, kernel=2, strides=[4, 4])], "relu_map")
    g = b.node("Transpose", [g], "map_nhwc", perm=[0, 2, 3, 1])                            # [N,2,2,6]
    heads.append(b.matmul("dense_map", b.node("Reshape", [g, b.constant("map_shape", [-1, 24], dtype=np.int64)],
                                              "flat_map"), 24, 4))
    total = b.node("Add", [b.node("Add", heads[:2], "sum_a"), b.node("Add", heads[2:], "sum_b")], "sum")
    b.node("Add", [total, b.bias("dense.bias", (4,))], "out")
    b.output("out", ["N", 4])
    return b.build()


ZOO.update({"paddle_flatten": paddle_flatten, "tf2onnx_head": tf2onnx_head})


# ---- attention: heads, fused projections and the shape arithmetic exporters write around them ---------
def _int64(b: _GraphBuilder, name: str, values) -> str:
    return b.constant(name, values, dtype=np.int64)


def _unsqueezed(b: _GraphBuilder, scalar: str, name: str) -> str:
    return b.node("Unsqueeze", [scalar, _int64(b, f"{name}.axes", [0])], name)


def _stream(b: _GraphBuilder, x: str, in_features: int, width: int) -> str:
    """A residual-stream stand-in: a dense layer, then LayerNorm over its channels (which freeze)."""
    h = b.matmul("embed", x, in_features, width)
    return b.node("LayerNormalization", [h, b.constant("norm.scale", b.rng.uniform(0.5, 1.5, width)),
                                         b.bias("norm.shift", (width,))], "norm", axis=-1)


def hf_attention() -> onnx.ModelProto:
    """Hugging Face's ViTSelfAttention on [N, T, E] (E 12, 3 heads of 4), beside a GELU MLP:

    q, k, v = MatMul + bias each → Reshape [0, 0, 3, 4] → Transpose to [N, 3, T, 4] (k to [N, 3, 4, T])
    → q·k / 2 → Softmax → ·v → Transpose [N, T, 3, 4] → Reshape to Concat(Shape[:2], E read off the
    normalised stream) → dense + bias; MLP 12 → 16 (Erf GELU) → 12; the two summed.
    """
    b = _GraphBuilder("hf_attention", seed=20)
    s = _stream(b, b.input("x", ["N", 5, 6]), 6, 12)
    heads = _int64(b, "heads_shape", [0, 0, 3, 4])
    parts = {}
    for name, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
        h = b.node("Add", [b.matmul(name, s, 12, 12), b.bias(f"{name}.bias", (12,))], f"{name}.add")
        parts[name] = b.node("Transpose", [b.node("Reshape", [h, heads], f"{name}.heads")], f"{name}.t", perm=perm)
    scores = b.node("Div", [b.node("MatMul", [parts["query"], parts["key"]], "scores"), b.constant("root", 2.0)],
                    "scaled")
    context = b.node("MatMul", [b.node("Softmax", [scores], "weights", axis=-1), parts["value"]], "context")
    context = b.node("Transpose", [context], "context.t", perm=[0, 2, 1, 3])                  # [N, T, 3, 4]
    leading = b.node("Slice", [b.node("Shape", [context], "context.shape"), _int64(b, "lead.starts", [0]),
                               _int64(b, "lead.ends", [2])], "leading")
    width = b.node("Gather", [b.node("Shape", [s], "stream.shape"), _int64(b, "width.index", 2)], "width", axis=0)
    target = b.node("Concat", [leading, _unsqueezed(b, width, "width.vector")], "merge_shape", axis=0)
    merged = b.node("Reshape", [context, target], "merged")
    attended = b.node("Add", [b.matmul("dense", merged, 12, 12), b.bias("dense.bias", (12,))], "attended")
    h = b.node("Add", [b.matmul("fc1", s, 12, 16), b.bias("fc1.bias", (16,))], "fc1.add")
    gelu = b.node("Mul", [b.node("Mul", [h, b.constant("half", 0.5)], "gelu.half"), b.node(
        "Add", [b.node("Erf", [b.node("Div", [h, b.constant("sqrt2", np.sqrt(2.0))], "gelu.div")], "gelu.erf"),
                b.constant("one", 1.0)], "gelu.add")], "gelu")
    b.node("Add", [attended, b.matmul("fc2", gelu, 16, 12)], "out")
    b.output("out", ["N", 5, 12])
    return b.build()


def torch_multihead_attention() -> onnx.ModelProto:
    """nn.MultiheadAttention as TorchScript writes it (sequence first, need_weights: 3-D batched MatMuls),
    E 8 in 2 heads of 4, on a normalised stream [T, N, E] (T 5):

    fused in-projection [E, 3E] + bias → Reshape to Concat(Shape[0 : Reshape(-1 mod 3)], [3], E read off
    the stream) → Unsqueeze(0) → Transpose [3,1,2,0,4] → Squeeze(3) → Gather 0, 1, 2 (q, k, v) → each
    Reshape to [T, N·heads (one Mul, read by all three), E / heads] → Transpose [N·heads, T, 4]
    → q·scale · kᵀ → Softmax → ·v → Transpose → Reshape [T·N, E read off the stream]
    → Gemm out-projection → Reshape [T, N, E] (its width read off the Gemm) → Transpose to batch first.
    """
    b = _GraphBuilder("torch_multihead_attention", seed=21)
    x = b.node("Transpose", [b.input("x", ["N", 5, 6])], "sequence_first", perm=[1, 0, 2])
    s = _stream(b, x, 6, 8)                                                              # [T, N, E]
    shape = b.node("Shape", [s], "stream.shape")
    tokens, batch, width = (b.node("Gather", [shape, _int64(b, f"{name}.index", index)], name, axis=0)
                            for index, name in ((0, "tokens"), (1, "batch"), (2, "width")))
    proj = b.node("Add", [b.bias("in_proj.bias", (24,)), b.matmul("in_proj", s, 8, 24)], "proj")
    rank_end = b.node("Reshape", [b.node("Mod", [_int64(b, "minus_one", -1), _int64(b, "three", 3)], "last"),
                                  _int64(b, "vector", [1])], "last.vector")
    leading = b.node("Slice", [b.node("Shape", [proj], "proj.shape"), _int64(b, "lead.start", [0]), rank_end],
                     "leading")
    target = b.node("Concat", [leading, _int64(b, "parts", [3]), _unsqueezed(b, width, "width.vector")],
                    "unflatten_shape", axis=0)
    h = b.node("Reshape", [proj, target], "unflatten")                                  # [T, N, 3, E]
    h = b.node("Unsqueeze", [h, _int64(b, "front", [0])], "unflatten.u")
    h = b.node("Transpose", [h], "unflatten.t", perm=[3, 1, 2, 0, 4])
    h = b.node("Squeeze", [h, _int64(b, "squeezed", [3])], "qkv")                        # [3, T, N, E]
    stacked = b.node("Mul", [batch, _int64(b, "num_heads", 2)], "batch_heads")
    head_dim = b.node("Cast", [b.node("Div", [width, _int64(b, "num_heads_div", 2)], "head_dim.div")], "head_dim",
                      to=TensorProto.INT64)
    parts = []
    for index, name in enumerate(("q", "k", "v")):
        part = b.node("Gather", [h, _int64(b, f"{name}.select", index)], name, axis=0)
        split_shape = b.node("Concat", [_unsqueezed(b, tokens, f"{name}.tokens"), _unsqueezed(b, stacked, f"{name}.nh"),
                                        _unsqueezed(b, head_dim, f"{name}.hd")], f"{name}.heads_shape", axis=0)
        part = b.node("Reshape", [part, split_shape], f"{name}.heads")                  # [T, N·heads, 4]
        parts.append(b.node("Transpose", [part], f"{name}.batched", perm=[1, 0, 2]))
    q = b.node("Mul", [parts[0], b.constant("scale", 0.5)], "q.scaled")
    keys = b.node("Transpose", [parts[1]], "k.t", perm=[0, 2, 1])
    weights = b.node("Softmax", [b.node("MatMul", [q, keys], "scores")], "weights", axis=-1)
    context = b.node("Transpose", [b.node("MatMul", [weights, parts[2]], "context")], "context.t", perm=[1, 0, 2])
    rows = _unsqueezed(b, b.node("Mul", [tokens, batch], "rows"), "rows.vector")
    flat = b.node("Reshape", [context, b.node("Concat", [rows, _unsqueezed(b, width, "width.vector2")], "flat_shape",
                                              axis=0)], "flat")                         # [T·N, E]
    out = b.gemm("out_proj", flat, 8, 8)
    out_width = b.node("Gather", [b.node("Shape", [out], "out.shape"), _int64(b, "out.index", 1)], "out.width",
                       axis=0)
    target = b.node("Concat", [_unsqueezed(b, tokens, "o.t"), _unsqueezed(b, batch, "o.n"),
                               _unsqueezed(b, out_width, "o.e")], "out_shape", axis=0)
    b.node("Transpose", [b.node("Reshape", [out, target], "attended")], "out", perm=[1, 0, 2])
    b.output("out", ["N", 5, 8])
    return b.build()


def timm_attention() -> onnx.ModelProto:
    """timm's Attention on [N, T, E] (T 4, E 8, 2 heads of 4) and a Concat of two token sequences:

    qkv [E, 3E] + bias → Reshape [-1, 4, 3, 2, 4] → Transpose [2,0,3,1,4] → Split(axis 0, ones)
    → Squeeze (q, k, v) → q·kᵀ·scale → Softmax → ·v → Transpose [N, T, 2, 4] → Reshape [-1, 4, 8]
    → proj; and t1, t2 = two dense layers of x, joined along the tokens, Relu, dense: their channels are
    coupled by the Concat.
    """
    b = _GraphBuilder("timm_attention", seed=22)
    x = b.input("x", ["N", 4, 6])
    s = _stream(b, x, 6, 8)
    qkv = b.node("Add", [b.matmul("qkv", s, 8, 24), b.bias("qkv.bias", (24,))], "qkv.add")
    qkv = b.node("Reshape", [qkv, _int64(b, "qkv_shape", [-1, 4, 3, 2, 4])], "qkv.heads")
    qkv = b.node("Transpose", [qkv], "qkv.t", perm=[2, 0, 3, 1, 4])                      # [3, N, 2, T, 4]
    b.nodes.append(helper.make_node("Split", [qkv, _int64(b, "ones", [1, 1, 1])], ["q1", "k1", "v1"], name="unbind",
                                    axis=0))
    q, k, v = (b.node("Squeeze", [name, _int64(b, f"{name}.axes", [0])], f"{name[0]}") for name in ("q1", "k1", "v1"))
    scores = b.node("MatMul", [q, b.node("Transpose", [k], "k.t", perm=[0, 1, 3, 2])], "scores")
    weights = b.node("Softmax", [b.node("Mul", [scores, b.constant("scale", 0.5)], "scaled")], "weights", axis=-1)
    context = b.node("Transpose", [b.node("MatMul", [weights, v], "context")], "context.t", perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [context, _int64(b, "merge_shape", [-1, 4, 8])], "merged")
    b.node("Add", [b.matmul("proj", merged, 8, 8), b.bias("proj.bias", (8,))], "attended")
    b.output("attended", ["N", 4, 8])
    tokens = b.node("Concat", [b.matmul("t1", x, 6, 5), b.matmul("t2", x, 6, 5)], "tokens", axis=1)  # [N, 8, 5]
    b.matmul("t3", b.node("Relu", [tokens], "tokens.relu"), 5, 3)
    b.output("t3", ["N", 8, 3])
    return b.build()


ZOO.update({"hf_attention": hf_attention, "torch_multihead_attention": torch_multihead_attention,
            "timm_attention": timm_attention})
