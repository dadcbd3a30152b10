"""The capture model computes z⁺ and |z⁻| of the convs it scores, in place of the convs themselves.

PFP's sensitivity needs both sign parts of every neuron's pre-activation at every point (docs/method.md §1): twice
a conv's multiply-adds, which numpy would pay on the unfolded patches after onnxruntime has already run
the conv once. Where a conv's input is nonnegative by construction (it comes from a Relu, a Clip at ≥ 0,
or a MaxPool of one), the capture model runs Conv(x, W⁺) and Conv(x, |W⁻|) instead and feeds the network
z⁺ − |z⁻| + b, which is W·x + b up to float32 rounding (summed in another order). The two parts become extra
outputs: onnxruntime does the conv work twice in all instead of 1 + 2 times, and on CUDA when the session
runs there.

Both parts are sums of nonnegative products, free of cancellation as long as the convolution really is a
sum of products: on CUDA the capture session asks cuDNN for its implicit-GEMM algorithm and no TF32
(CUDA_OPTIONS), never Winograd or FFT, which an exhaustive algorithm search may pick.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pfp_onnx.groups import Layer
from pfp_onnx.sensitivity.max_times import STACKED_CACHE_BYTES
from pfp_onnx.model import node_names

__all__ = ["CUDA_OPTIONS", "PARTS_MIN_FEATURES", "with_conv_parts"]

# cuDNN's implicit precomputed GEMM and no TF32: sums of float32 products, as on the CPU.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": "0"}
# 1×1 convs over fewer input channels than this keep the numpy path: their patches are their input (no
# unfolding to save), and the parts write, reorder and read two more output tensors (measured: a
# ResNet-50's 1×1 convs over 64-256 channels made its capture 17% slower). Every larger kernel gets parts
# whatever its width: unfolding a 16- or 32-channel 3×3 conv's input cost more than its parts (ResNet-56
# capture 35% faster, MNIST ResNet-20 8%).
PARTS_MIN_FEATURES = 512
NONNEGATIVE_OPS = ("Relu",)
PASS_THROUGH_OPS = ("MaxPool",)  # nonnegative when their input is


def with_conv_parts(model: onnx.ModelProto,
                    layers: Iterable[Layer]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of `model` in which each eligible conv of `layers` is computed from its two sign parts, and
    per such layer (by node name) the names of its z⁺ and |z⁻| tensors ([N, F, *out], no bias).

    Eligible: a group-1 Conv with a float32 initializer weight (small enough for its scorer to keep |W±|
    whole; a 1×1 conv over at least PARTS_MIN_FEATURES channels) whose input is nonnegative by construction.
    The rest of the graph, the model's outputs and everything else stay as they are; with no eligible
    layer the model itself is returned."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    by_name = dict(zip(node_names(model), range(len(graph.node))))
    chosen: dict[int, Layer] = {}
    for layer in layers:
        index = by_name.get(layer.node)
        if index is not None and _eligible(graph.node[index], layer, initializers, producers):
            chosen[index] = layer
    if not chosen:
        return model, {}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    del result.graph.node[:]
    parts: dict[str, tuple[str, str]] = {}
    for index, node in enumerate(nodes):
        if index not in chosen:
            result.graph.node.append(node)
            continue
        layer = chosen[index]
        weight = numpy_helper.to_array(initializers[node.input[1]])
        prefix = f"{node.output[0]}/pfp_onnx"
        plus, minus = f"{prefix}/z_plus", f"{prefix}/z_minus"
        result.graph.initializer.extend([numpy_helper.from_array(np.maximum(weight, 0), f"{prefix}/w_plus"),
                                         numpy_helper.from_array(np.maximum(-weight, 0), f"{prefix}/w_minus")])
        for output, weight_name in ((plus, f"{prefix}/w_plus"), (minus, f"{prefix}/w_minus")):
            conv = helper.make_node("Conv", [node.input[0], weight_name], [output], name=output)
            conv.attribute.extend(node.attribute)
            result.graph.node.append(conv)
        has_bias = len(node.input) > 2 and node.input[2]
        difference = f"{prefix}/z" if has_bias else node.output[0]
        result.graph.node.append(helper.make_node("Sub", [plus, minus], [difference], name=difference))
        if has_bias:  # b [F] broadcast over [N, F, *spatial]
            shape = f"{prefix}/bias_shape"
            result.graph.initializer.append(
                numpy_helper.from_array(np.array([-1] + [1] * (weight.ndim - 2), dtype=np.int64), shape))
            result.graph.node.append(helper.make_node("Reshape", [node.input[2], shape], [f"{prefix}/bias"],
                                                      name=f"{prefix}/bias"))
            result.graph.node.append(helper.make_node("Add", [difference, f"{prefix}/bias"], [node.output[0]],
                                                      name=f"{prefix}/add_bias"))
        parts[layer.node] = (plus, minus)
    # The replaced weights go unless another node still reads them (a weight shared between convs).
    used = {name for node in result.graph.node for name in node.input}
    replaced = {nodes[index].input[1] for index in chosen} - used
    kept = [init for init in result.graph.initializer if init.name not in replaced]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    return result, parts


def _eligible(node: onnx.NodeProto, layer: Layer, initializers: dict, producers: dict) -> bool:
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
    if int(np.prod(weight.dims[2:], dtype=np.int64)) == 1 and weight.dims[1] < PARTS_MIN_FEATURES:
        return False
    return _nonnegative(node.input[0], producers, initializers)


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
