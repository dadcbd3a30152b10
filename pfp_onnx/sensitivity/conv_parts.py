"""The capture model computes the sign parts of the convs it scores, in place of the convs themselves.

PFP's sensitivity needs both sign parts of every neuron's pre-activation at every point (docs/method.md §1): twice
a conv's multiply-adds for a nonnegative input, four times for a signed one (a⁺ and a⁻ are two points), which
numpy would pay on the unfolded patches after onnxruntime has already run the conv once. The capture model
computes them instead, as convs of nonnegative tensors with nonnegative weights, and feeds the network the
conv's value rebuilt from them:

- an input that is nonnegative by construction (it comes from a Relu, a Clip at ≥ 0, or a MaxPool of one):
  z⁺ = Conv(x, W⁺) and |z⁻| = Conv(x, |W⁻|), and the network gets z⁺ − |z⁻| + b. onnxruntime does the
  conv work twice in all instead of 1 + 2 times.
- any other input (after SiLU, HardSwish, LeakyReLU, GELU, a residual sum, …): a⁺ = Relu(x) and
  a⁻ = Relu(−x), both exact, and for each of these two points z⁺(a±) = Conv(a±, W⁺) and
  |z⁻|(a±) = Conv(a±, |W⁻|): the four sums the numpy path computes for its two points, four times the conv
  work in all instead of 1 + 4 times. The network gets (z⁺(a⁺) + |z⁻|(a⁻)) − (|z⁻|(a⁺) + z⁺(a⁻)) + b: the
  sum of the positive products of W·x minus the magnitude of the negative ones. a⁺ and a⁻ are made once
  per input tensor, however many convs read it.

  Four separate sums are what the definition needs: a⁺ and a⁻ are two points, each with its own z⁺ and z⁻
  (docs/method.md §1, step 2, as the reference tracker does), so one conv of the channel concatenation
  [a⁺, a⁻] with weights [W⁺, |W⁻|] (z⁺ of x as a single point, W⁺a⁺ + |W⁻|a⁻) would change what is
  measured. Stacking [W⁺; |W⁻|] as 2F filters of one conv per half computes the same four sums in two convs,
  but the scorer and the network value then need channel slices of its output (copies); for Relu-fed convs
  that measured slower than two convs (docs/performance.md, "What was tried").

Either way the network's values are W·x + b up to float32 rounding (summed in another order). The parts become
extra outputs, computed on CUDA when the session runs there. Each part is a sum of nonnegative products,
free of cancellation as long as the convolution really is a sum of products: on CUDA the capture session
asks cuDNN for its implicit-GEMM algorithm and no TF32 (CUDA_OPTIONS), never Winograd or FFT, which an
exhaustive algorithm search may pick.

Which convs get parts is a matter of speed only (the sensitivities are the same either way, up to float32
rounding); the limits below come from measurements recorded beside them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pfp_onnx.groups import Layer
from pfp_onnx.sensitivity.max_times import STACKED_CACHE_BYTES
from pfp_onnx.model import node_names

__all__ = ["CUDA_OPTIONS", "PARTS_MIN_FEATURES", "SIGNED_PARTS", "SIGNED_PARTS_MIN_FEATURES", "parts_per_conv",
           "with_conv_parts"]

# cuDNN's implicit precomputed GEMM and no TF32: sums of float32 products, as on the CPU.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": "0"}
# 1×1 convs over fewer input channels than this keep the numpy path: their patches are their input (no
# unfolding to save), and the parts write, reorder and read two more output tensors (measured: a
# ResNet-50's 1×1 convs over 64-256 channels made its capture 17% slower). Every larger kernel gets parts
# whatever its width: unfolding a 16- or 32-channel 3×3 conv's input cost more than its parts (ResNet-56
# capture 35% faster, MNIST ResNet-20 8%).
PARTS_MIN_FEATURES = 512
# Convs whose input may be negative get their four parts (False: only nonnegative inputs get parts, as
# before issue 24; benchmarks/bench_compress.py compares the two).
SIGNED_PARTS = True
# The 1×1 limit for convs whose input may be negative. Measured layer by layer, each alone on its real inputs
# (onnxruntime's pass and the scoring together, parts ÷ numpy path, 2 busy cores): on the trained YOLOv8n
# (1024×1024 pages) every 3×3 conv, 16 to 256 channels, took 0.24–0.93× the time with parts; its 1×1 convs
# over 256–512 channels 0.19–0.91×, over 96–192 0.89–1.36×, over 32–64 1.00–1.19×; on the trained PP-LCNet
# (224×224) 1×1 convs over 256–512 channels took 0.46–0.74× (one over 256 with a single position 1.4×, of
# 0.05 s), over 128 0.86–1.10×, over 16–64 0.67–1.29×. Whole captures (fastest of 2–4 interleaved runs):
# YOLOv8n 6 pages 23.3 s → 20.3 s with the 3×3 convs' parts → 20.1 s with the 1×1 convs' from 256 channels;
# bench_compress's yolov8n-style 7.06 → 5.99 → 5.67 s (5.56 s from 128 channels); PP-LCNet 160 points, CPU
# seconds, 22.0 → 19.8 s from 256 channels (21.9 s from 512, 20.8 s from 128).
SIGNED_PARTS_MIN_FEATURES = 256
NONNEGATIVE_OPS = ("Relu",)
PASS_THROUGH_OPS = ("MaxPool",)  # nonnegative when their input is


def with_conv_parts(model: onnx.ModelProto,
                    layers: Iterable[Layer]) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """A copy of `model` in which each eligible conv of `layers` is computed from its sign parts, and per
    such layer (by node name) the names of its part tensors ([N, F, *out] each, no bias): (z⁺, |z⁻|) when
    its input is nonnegative by construction, else (z⁺(a⁺), |z⁻|(a⁺), z⁺(a⁻), |z⁻|(a⁻)), the parts of the
    input's positive and negative halves as two points.

    Eligible: a group-1 Conv with a float32 initializer weight (small enough for its scorer to keep |W±|
    whole) whose kernel is larger than 1×1 or, for a 1×1 conv, that reads at least PARTS_MIN_FEATURES
    channels (SIGNED_PARTS_MIN_FEATURES when its input may be negative). Depthwise and other grouped convs
    are not scored (or have no scorer) and keep their conv. The rest of the graph, the model's outputs and
    everything else stay as they are; with no eligible layer the model itself is returned."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    by_name = dict(zip(node_names(model), range(len(graph.node))))
    chosen: dict[int, tuple[Layer, bool]] = {}  # node index → (layer, whether its input is nonnegative)
    for layer in layers:
        index = by_name.get(layer.node)
        if index is None:
            continue
        nonnegative = _nonnegative(graph.node[index].input[0], producers, initializers) \
            if graph.node[index].input else False
        if _eligible(graph.node[index], layer, initializers, nonnegative=nonnegative):
            chosen[index] = (layer, nonnegative)
    if not chosen:
        return model, {}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    del result.graph.node[:]
    parts: dict[str, tuple[str, ...]] = {}
    halves: dict[str, tuple[str, str]] = {}  # a signed input → its a⁺ and a⁻, made once
    for index, node in enumerate(nodes):
        if index not in chosen:
            result.graph.node.append(node)
            continue
        layer, nonnegative = chosen[index]
        weight = numpy_helper.to_array(initializers[node.input[1]])
        prefix = f"{node.output[0]}/pfp_onnx"
        weights = f"{prefix}/w_plus", f"{prefix}/w_minus"
        result.graph.initializer.extend([numpy_helper.from_array(np.maximum(weight, 0), weights[0]),
                                         numpy_helper.from_array(np.maximum(-weight, 0), weights[1])])

        def conv(source: str, weight_name: str, output: str) -> str:
            made = helper.make_node("Conv", [source, weight_name], [output], name=output)
            made.attribute.extend(node.attribute)
            result.graph.node.append(made)
            return output

        def combine(op: str, inputs: list[str], output: str) -> str:
            result.graph.node.append(helper.make_node(op, inputs, [output], name=output))
            return output

        has_bias = len(node.input) > 2 and node.input[2]
        value = f"{prefix}/z" if has_bias else node.output[0]
        if nonnegative:
            plus, minus = (conv(node.input[0], name, f"{prefix}/z_{sign}")
                           for name, sign in zip(weights, ("plus", "minus")))
            combine("Sub", [plus, minus], value)
            parts[layer.node] = (plus, minus)
        else:
            if node.input[0] not in halves:
                source = node.input[0]
                positive = combine("Relu", [source], f"{source}/pfp_onnx/positive")
                negated = combine("Neg", [source], f"{source}/pfp_onnx/negated")
                halves[source] = positive, combine("Relu", [negated], f"{source}/pfp_onnx/negative")
            names = tuple(conv(half, name, f"{prefix}/z_{sign}_of_{half_name}")
                          for half, half_name in zip(halves[node.input[0]], ("positive", "negative"))
                          for name, sign in zip(weights, ("plus", "minus")))
            plus_of_positive, minus_of_positive, plus_of_negative, minus_of_negative = names
            positive_products = combine("Add", [plus_of_positive, minus_of_negative], f"{prefix}/positive_products")
            negative_products = combine("Add", [minus_of_positive, plus_of_negative], f"{prefix}/negative_products")
            combine("Sub", [positive_products, negative_products], value)
            parts[layer.node] = names
        if has_bias:  # b [F] broadcast over [N, F, *spatial]
            shape = f"{prefix}/bias_shape"
            result.graph.initializer.append(
                numpy_helper.from_array(np.array([-1] + [1] * (weight.ndim - 2), dtype=np.int64), shape))
            combine("Reshape", [node.input[2], shape], f"{prefix}/bias")
            result.graph.node.append(helper.make_node("Add", [value, f"{prefix}/bias"], [node.output[0]],
                                                      name=f"{prefix}/add_bias"))
    # The replaced weights go unless another node still reads them (a weight shared between convs).
    used = {name for node in result.graph.node for name in node.input}
    replaced = {nodes[index].input[1] for index in chosen} - used
    kept = [init for init in result.graph.initializer if init.name not in replaced]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    return result, parts


def parts_per_conv(model: onnx.ModelProto, layers: Iterable[Layer]) -> dict[str, int]:
    """How many output-sized parts each conv of `layers` (by node name; transposed ones have none) gets
    where it is eligible: 2 when its input is nonnegative by construction, else 4 (what a capture batch holds
    for it beside its input, pfp_onnx.memory)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {init.name: init for init in model.graph.initializer}
    return {layer.node: 2 if _nonnegative(layer.input, producers, initializers) else 4 for layer in layers
            if layer.conv is not None and not layer.conv.transposed}


def _eligible(node: onnx.NodeProto, layer: Layer, initializers: dict, *, nonnegative: bool) -> bool:
    if node.op_type != "Conv" or layer.conv is None or layer.conv.transposed or not layer.sensitivity_probe:
        return False
    if len(node.input) < 2 or node.input[0] != layer.input or node.input[1] not in initializers:
        return False
    if any(attribute.name == "group" and attribute.i != 1 for attribute in node.attribute):
        return False
    weight = initializers[node.input[1]]
    if weight.data_type != onnx.TensorProto.FLOAT or weight.HasField("data_location") and \
            weight.data_location == onnx.TensorProto.EXTERNAL:
        return False
    if 4 * int(np.prod(weight.dims, dtype=np.int64)) > STACKED_CACHE_BYTES:  # the scorer's own limit
        return False
    if not nonnegative and not SIGNED_PARTS:
        return False
    if int(np.prod(weight.dims[2:], dtype=np.int64)) == 1:
        return weight.dims[1] >= (PARTS_MIN_FEATURES if nonnegative else SIGNED_PARTS_MIN_FEATURES)
    return True


def _nonnegative(tensor: str, producers: dict, initializers: dict, depth: int = 0) -> bool:
    """Whether a tensor cannot hold negative values whatever the input: made by a Relu, a Clip whose
    lower bound is a constant ≥ 0, or a MaxPool of such a tensor."""
    node = producers.get(tensor)
    if node is None or depth > 16:
        return False
    if node.op_type in NONNEGATIVE_OPS:
        return True
    if node.op_type == "Clip":
        return _clip_floor(node, producers, initializers) >= 0
    if node.op_type in PASS_THROUGH_OPS and node.output[0] == tensor:
        return _nonnegative(node.input[0], producers, initializers, depth + 1)
    return False


def _clip_floor(node: onnx.NodeProto, producers: dict, initializers: dict) -> float:
    """A Clip's lower bound when it is a constant (an attribute before opset 11, an initializer or a
    Constant node's output after); -inf otherwise."""
    for attribute in node.attribute:
        if attribute.name == "min":
            return float(attribute.f)
    if len(node.input) < 2 or not node.input[1]:
        return -np.inf
    values = None
    if node.input[1] in initializers:
        values = numpy_helper.to_array(initializers[node.input[1]])
    elif (source := producers.get(node.input[1])) is not None and source.op_type == "Constant":
        values = next((numpy_helper.to_array(a.t) for a in source.attribute if a.name == "value"), None)
    return float(values.min()) if values is not None and values.size else -np.inf
