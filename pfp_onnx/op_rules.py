"""Per-operator channel rules: the one table to extend when a new operator must be understood.

A rule receives the node and the ChannelTracer. It may start a group (prunable layers), let an output
carry an input's channels (pass-through), couple two groups, record constants to slice, or freeze. Any
input carrying channels that a rule does not claim freezes its group, so forgetting a case is always
safe. Operators absent from RULES freeze every group they touch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from pfp_onnx.groups import Channels, ChannelTracer, ConvGeometry, Layer, ShapeFix, WeightSlice

Rule = Callable[[gs.Node, ChannelTracer], None]


# ---- helpers ---------------------------------------------------------------------------------------
def _positions(shape, leading: int, trailing: int = 0) -> int | None:
    """Product of shape[leading:len-trailing], or None when a dim is unknown."""
    if shape is None:
        return None
    dims = shape[leading:len(shape) - trailing]
    if any(dim is None for dim in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _conv_geometry(node: gs.Node, input_shape, kernel: tuple[int, ...]) -> ConvGeometry | None:
    spatial = len(kernel)
    strides = tuple(node.attrs.get("strides", [1] * spatial))
    dilations = tuple(node.attrs.get("dilations", [1] * spatial))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = tuple(node.attrs.get("pads", [0] * 2 * spatial))
    elif auto_pad == "VALID":
        pads = (0,) * 2 * spatial
    else:
        if input_shape is None or any(dim is None for dim in input_shape[2:]):
            return None
        begin, end = [], []
        for size, k, s, d in zip(input_shape[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begin + end)
    return ConvGeometry(strides, pads, dilations)


# ---- prunable layers -------------------------------------------------------------------------------
def conv(node: gs.Node, tracer: ChannelTracer) -> None:
    data, weight_tensor = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    weight = tracer.constant(weight_tensor)
    incoming = tracer.channels(data)
    if weight is None:
        if incoming is not None:
            tracer.claim(node, 0)
            tracer.freeze(incoming, f"Conv '{node.name}' has a non-constant weight")
        return
    out_units, in_per_group = weight.shape[0], weight.shape[1]
    kernel = tuple(int(k) for k in weight.shape[2:])
    group_count = int(node.attrs.get("group", 1))
    geometry = _conv_geometry(node, tracer.shape(data), kernel)
    output_shape = tracer.shape(node.outputs[0])
    supported = group_count == 1 and geometry is not None
    tracer.claim(node, 0)
    if incoming is not None and not supported:
        tracer.freeze(incoming, f"Conv '{node.name}' (group={group_count}) is not prunable on its input")
    if incoming is not None and incoming.axis != 1:
        tracer.freeze(incoming, f"Conv '{node.name}' reads channels on axis {incoming.axis}, not 1")
    in_group = incoming.group if incoming is not None and supported else None
    if in_group is not None:
        tracer.add_consumer(incoming, node, WeightSlice(node.name, 1, 1, "consumer", incoming.block))
    out_group = None
    bias_values = tracer.constant(bias) if bias is not None else None
    if supported and (bias is None or bias_values is not None):
        slices = [WeightSlice(node.name, 1, 0, "producer")]
        if bias is not None:
            slices.append(WeightSlice(node.name, 2, 0, "param"))
        out_group = tracer.start_group(node.outputs[0], 1, 2 + len(kernel), out_units, node.name, slices).group
    # A grouped conv's weight holds C_in / group input channels per filter: in_units counts those.
    tracer.add_layer(Layer(
        node=node.name, op="Conv", input=data.name, weight=weight_tensor.name,
        in_group=in_group, in_units=in_per_group, in_block=1, out_group=out_group, out_units=out_units,
        kernel=int(np.prod(kernel, dtype=np.int64)), positions=_positions(output_shape, 2), conv=geometry))


def _dense(node: gs.Node, tracer: ChannelTracer, *, weight_index: int, in_by_out: bool,
           bias_index: int | None) -> None:
    data, weight_tensor = node.inputs[0], node.inputs[weight_index]
    weight = tracer.constant(weight_tensor)
    incoming = tracer.channels(data)
    tracer.claim(node, 0)
    data_shape = tracer.shape(data)
    if weight is None or weight.ndim != 2:
        if incoming is not None:
            tracer.freeze(incoming, f"{node.op} '{node.name}' has no constant 2-D weight")
        return
    in_features, out_units = (weight.shape if in_by_out else weight.shape[::-1])
    in_axis, out_axis = (0, 1) if in_by_out else (1, 0)
    in_group = None
    block = 1
    if incoming is not None:
        rank = len(data_shape) if data_shape is not None else incoming.rank
        if incoming.axis != rank - 1:
            tracer.freeze(incoming, f"{node.op} '{node.name}' contracts axis {rank - 1}, "
                                    f"not the channel axis {incoming.axis}")
        else:
            in_group, block = incoming.group, incoming.block
            tracer.add_consumer(incoming, node, WeightSlice(node.name, weight_index, in_axis, "consumer", block))
    slices = [WeightSlice(node.name, weight_index, out_axis, "producer")]
    output = node.outputs[0]
    if bias_index is not None and len(node.inputs) > bias_index and not node.inputs[bias_index].is_empty():
        bias = tracer.constant(node.inputs[bias_index])
        if bias is None:
            slices = None
        elif bias.ndim >= 1 and bias.shape[-1] == out_units and out_units > 1:
            slices.append(WeightSlice(node.name, bias_index, bias.ndim - 1, "param"))
    output_shape = tracer.shape(output)
    out_group = None
    if slices is not None:
        rank = len(output_shape) if output_shape is not None else (len(data_shape) if data_shape else 2)
        out_group = tracer.start_group(output, rank - 1, rank, out_units, node.name, slices).group
    tracer.add_layer(Layer(
        node=node.name, op=node.op, input=data.name, weight=weight_tensor.name, in_group=in_group,
        in_units=in_features // block, in_block=block, out_group=out_group, out_units=out_units, kernel=1,
        positions=_positions(output_shape, 1, 1), weight_is_in_by_out=in_by_out))


def gemm(node: gs.Node, tracer: ChannelTracer) -> None:
    if node.attrs.get("transA", 0):
        tracer.freeze_inputs(node, f"Gemm '{node.name}' transposes its input (transA=1)")
        tracer.claim(node, 0, 1, 2)
        return
    _dense(node, tracer, weight_index=1, in_by_out=not node.attrs.get("transB", 0), bias_index=2)


def matmul(node: gs.Node, tracer: ChannelTracer) -> None:
    if tracer.constant(node.inputs[1]) is None:
        tracer.freeze_inputs(node, f"MatMul '{node.name}' multiplies two activations")
        tracer.claim(node, 0, 1)
        return
    _dense(node, tracer, weight_index=1, in_by_out=True, bias_index=None)


# ---- channel-preserving operators ------------------------------------------------------------------
def passthrough(node: gs.Node, tracer: ChannelTracer) -> None:
    """Element-wise unary operators, Dropout, Identity: output channel c depends on input channel c."""
    incoming = tracer.channels(node.inputs[0])
    tracer.claim(node, 0)
    if incoming is not None:
        tracer.follow(node.outputs[0], incoming)


def spatial(node: gs.Node, tracer: ChannelTracer) -> None:
    """Pooling: works within each channel of an NC... tensor."""
    incoming = tracer.channels(node.inputs[0])
    tracer.claim(node, 0)
    if incoming is None:
        return
    if incoming.axis != 1 or incoming.block != 1:
        tracer.freeze(incoming, f"{node.op} '{node.name}' pools a tensor whose channels are not on axis 1")
        return
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        tracer.freeze(incoming, f"{node.op} '{node.name}' exposes pooling indices")
        return
    tracer.follow(node.outputs[0], incoming)


def batch_normalization(node: gs.Node, tracer: ChannelTracer) -> None:
    incoming = tracer.channels(node.inputs[0])
    tracer.claim(node, 0, 1, 2, 3, 4)
    if incoming is None:
        return
    params = [tracer.constant(tensor) for tensor in node.inputs[1:5]]
    if incoming.axis != 1 or any(p is None or p.ndim != 1 for p in params):
        tracer.freeze(incoming, f"BatchNormalization '{node.name}' has non-constant parameters")
        return
    for index in range(1, 5):
        tracer.add_slice(incoming, WeightSlice(node.name, index, 0, "param"))
    tracer.follow(node.outputs[0], incoming)


def _broadcast_constant(tracer: ChannelTracer, node: gs.Node, incoming: Channels, index: int,
                        values: np.ndarray) -> bool:
    """Record a slice of a constant broadcast against a channel tensor; False if it mixes channels."""
    axis_from_right = incoming.rank - incoming.axis
    position = values.ndim - axis_from_right
    if position < 0 or values.shape[position] == 1:
        return True
    if values.shape[position] == tracer.width(incoming) * incoming.block:
        tracer.add_slice(incoming, WeightSlice(node.name, index, position, "param", incoming.block))
        return True
    return False


def _output_channels(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> Channels:
    output_shape = tracer.shape(node.outputs[0])
    rank = len(output_shape) if output_shape is not None else incoming.rank
    return Channels(incoming.group, rank - (incoming.rank - incoming.axis), rank, incoming.block)


def elementwise_binary(node: gs.Node, tracer: ChannelTracer) -> None:
    """Add/Sub/Mul/Div/PRelu: couple two channel tensors, or slice a per-channel constant."""
    tracer.claim(node, 0, 1)
    first, second = node.inputs[0], node.inputs[1]
    channels = [tracer.channels(first), tracer.channels(second)]
    tracked = [c for c in channels if c is not None]
    if not tracked:
        return
    if len(tracked) == 2:
        a, b = tracked
        if (a.rank - a.axis) != (b.rank - b.axis) or a.block != b.block:
            reason = f"{node.op} '{node.name}' combines channels on different axes"
            tracer.freeze(a, reason)
            tracer.freeze(b, reason)
            return
        coupled = tracer.couple(a, b, f"{node.op} '{node.name}' combines groups of different widths")
        tracer.follow(node.outputs[0], _output_channels(node, tracer, coupled))
        return
    incoming = tracked[0]
    other_index = 1 if channels[0] is not None else 0
    other = node.inputs[other_index]
    values = tracer.constant(other)
    if values is not None:
        if not _broadcast_constant(tracer, node, incoming, other_index, values):
            tracer.freeze(incoming, f"{node.op} '{node.name}' mixes channels with a constant of shape "
                                    f"{tuple(values.shape)}")
            return
    elif not _broadcasts_over_channels(tracer.shape(other), incoming):
        tracer.freeze(incoming, f"{node.op} '{node.name}' combines the channels with '{other.name}', "
                                "whose channels are not tracked")
        return
    tracer.follow(node.outputs[0], _output_channels(node, tracer, incoming))


def _broadcasts_over_channels(shape, incoming: Channels) -> bool:
    """True when a tensor has size 1 (or no axis) where the channels are: e.g. a spatial attention map."""
    if shape is None:
        return False
    position = len(shape) - (incoming.rank - incoming.axis)
    return position < 0 or shape[position] == 1


# ---- flattening into a dense layer -----------------------------------------------------------------
def _flattened(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> Channels | None:
    """[N, C, H, W] → [N, C·H·W]: channel c then owns H·W consecutive features."""
    input_shape = tracer.shape(node.inputs[0])
    if incoming.axis != 1 or input_shape is None:
        return None
    inner = _positions(input_shape, 2)
    if inner is None:
        return None
    return Channels(incoming.group, 1, 2, incoming.block * inner)


def flatten(node: gs.Node, tracer: ChannelTracer) -> None:
    incoming = tracer.channels(node.inputs[0])
    tracer.claim(node, 0)
    if incoming is None:
        return
    flat = _flattened(node, tracer, incoming) if node.attrs.get("axis", 1) == 1 else None
    if flat is None:
        tracer.freeze(incoming, f"Flatten '{node.name}' does not flatten [N, C, ...] from axis 1 with known sizes")
        return
    tracer.follow(node.outputs[0], flat)


def reshape(node: gs.Node, tracer: ChannelTracer) -> None:
    incoming = tracer.channels(node.inputs[0])
    tracer.claim(node, 0, 1)
    if incoming is None:
        return
    target = tracer.constant(node.inputs[1])
    output_shape = tracer.shape(node.outputs[0])
    flat = _flattened(node, tracer, incoming)
    width = tracer.width(incoming)
    if (target is None or target.ndim != 1 or len(target) != 2 or flat is None or output_shape is None
            or len(output_shape) != 2 or output_shape[1] != width * flat.block
            or node.attrs.get("allowzero", 0)):
        tracer.freeze(incoming, f"Reshape '{node.name}' is not a flatten of [N, C, ...] into [N, C·...]")
        return
    if int(target[1]) == width * flat.block:
        tracer.add_shape_fix(incoming, ShapeFix(node.name, 1, flat.block))
    elif int(target[1]) != -1:
        tracer.freeze(incoming, f"Reshape '{node.name}' has a target shape pfp-onnx cannot rewrite")
        return
    tracer.follow(node.outputs[0], flat)


ELEMENTWISE_UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                     "Selu", "Softplus", "Dropout", "Identity")
POOLING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")

RULES: dict[str, Rule] = {
    "Conv": conv,
    "Gemm": gemm,
    "MatMul": matmul,
    "BatchNormalization": batch_normalization,
    "Flatten": flatten,
    "Reshape": reshape,
    "Add": elementwise_binary,
    "Sub": elementwise_binary,
    "Mul": elementwise_binary,
    "Div": elementwise_binary,
    "PRelu": elementwise_binary,
    **{op: passthrough for op in ELEMENTWISE_UNARY},
    **{op: spatial for op in POOLING},
}
