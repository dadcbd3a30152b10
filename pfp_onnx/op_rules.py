"""Per-operator channel rules: the one table to extend when a new operator must be understood.

A rule receives the node and the ChannelTracer. It may start a group (prunable layers), let an output
carry an input's channels (pass-through, possibly moving the channel axis), couple groups, record
constants to slice or counts to rewrite, or freeze. Any input carrying channels that a rule does not
claim freezes its groups, so forgetting a case is always safe. Operators absent from RULES freeze every
group they touch.

Shape and the integer arithmetic exporters build reshape targets with (Gather, Slice, Cast, Unsqueeze,
Concat) compute values, not channels: their entries wrap the channel rule (_computes_shapes) and record
each entry's origin (groups.Dim). An entry that is a channel axis' size and reaches anything but a
Reshape that proves it right freezes that axis' groups, just as an unclaimed input does.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from pfp_onnx.groups import Channels, ChannelTracer, ConvGeometry, Dim, Layer, WeightSlice

Rule = Callable[[gs.Node, ChannelTracer], None]
# Shape arithmetic: the entries of a node's shape-valued inputs (None for an empty input) → its output's.
ShapeArithmetic = Callable[[gs.Node, ChannelTracer, list], tuple[Dim, ...] | None]


# ---- helpers ---------------------------------------------------------------------------------------
def _product(dims) -> int | None:
    """Product of dims, or None when one is unknown."""
    if dims is None or any(dim is None for dim in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _positions(shape, leading: int, trailing: int = 0) -> int | None:
    return None if shape is None else _product(shape[leading:len(shape) - trailing])


def _rows_per_point(shape, batch: int | None) -> int | None:
    """A dense layer's output rows per point: all rows over the points per run when those are known (an
    exporter that folds tokens into the batch, [N·T, F], gives T rows per point, not 1), else the dims
    between a leading batch dim and the features."""
    if shape is None or not shape:
        return None
    rows = _product(shape[:-1])
    if batch is not None and rows is not None and rows % batch == 0:
        return rows // batch
    return _positions(shape, 1, 1)


def _rank(tracer: ChannelTracer, tensor: gs.Tensor, fallback: int) -> int:
    shape = tracer.shape(tensor)
    return len(shape) if shape is not None else fallback


def _moved(channels: Channels, axis: int, rank: int, block: int | None = None) -> Channels:
    return Channels(channels.groups, axis, rank, channels.block if block is None else block)


def _extra_outputs_used(node: gs.Node, tracer: ChannelTracer) -> bool:
    return any(tracer.is_used(tensor) for tensor in node.outputs[1:])


def _int_list(tracer: ChannelTracer, node: gs.Node, input_index: int, attribute: str | None) -> list[int] | None:
    """An integer list given as a constant input (newer opsets) or as an attribute (older ones)."""
    if len(node.inputs) > input_index and not node.inputs[input_index].is_empty():
        values = tracer.constant(node.inputs[input_index])
        return None if values is None else [int(v) for v in np.asarray(values).reshape(-1)]
    if attribute is not None and attribute in node.attrs:
        return [int(v) for v in node.attrs[attribute]]
    return []


def _reads_channels(*claimed: int):
    """For rules whose channels enter through input 0: claim the inputs they handle (all when none are
    named), and call the rule only when that input carries channels."""
    def wrap(rule: Callable[[gs.Node, ChannelTracer, Channels], None]) -> Rule:
        @functools.wraps(rule)
        def apply(node: gs.Node, tracer: ChannelTracer) -> None:
            tracer.claim(*(claimed or range(len(node.inputs))))
            incoming = tracer.channels(node.inputs[0])
            if incoming is not None:
                rule(node, tracer, incoming)
        return apply
    return wrap


def _produce(tracer: ChannelTracer, node: gs.Node, output: gs.Tensor, axis: int, rank: int, width: int,
             slices: list[tuple[int, int, str]]) -> Channels:
    """A prunable layer's output: a new group whose filters are cut by (input, axis, role) slices."""
    group = tracer.new_group(width, node.name, [WeightSlice(node.name, index, cut_axis, role)
                                                for index, cut_axis, role in slices])
    return tracer.follow(output, Channels((group,), axis, rank))


# ---- prunable layers -------------------------------------------------------------------------------
def _conv_geometry(node: gs.Node, input_shape, kernel: tuple[int, ...], transposed: bool) -> ConvGeometry | None:
    spatial = len(kernel)
    strides = tuple(node.attrs.get("strides", [1] * spatial))
    dilations = tuple(node.attrs.get("dilations", [1] * spatial))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    output_padding = tuple(node.attrs.get("output_padding", [0] * spatial)) if transposed else ()
    if auto_pad in ("NOTSET", ""):
        if transposed and "output_shape" in node.attrs:
            return None  # pads are implied by output_shape; not worth modelling
        return ConvGeometry(strides, tuple(node.attrs.get("pads", [0] * 2 * spatial)), dilations, transposed,
                            output_padding, kernel)
    if auto_pad == "VALID":
        return ConvGeometry(strides, (0,) * 2 * spatial, dilations, transposed, output_padding, kernel)
    if transposed or input_shape is None or any(dim is None for dim in input_shape[2:]):
        return None
    begin, end = [], []
    for size, k, s, d in zip(input_shape[2:], kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return ConvGeometry(strides, tuple(begin + end), dilations, kernel_shape=kernel)


def conv(node: gs.Node, tracer: ChannelTracer) -> None:
    """Conv and ConvTranspose. Depthwise convs carry channels; other grouped convs freeze (whole-group
    pruning is possible but rarely worth its complexity)."""
    tracer.claim(0, 1, 2)
    transposed = node.op == "ConvTranspose"
    data, weight_tensor = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    weight = tracer.constant(weight_tensor)
    incoming = tracer.channels(data)
    if weight is None or (bias is not None and tracer.constant(bias) is None):
        if incoming is not None:
            tracer.freeze(incoming, f"{node.op} '{node.name}' has non-constant weights")
        return
    kernel = tuple(int(k) for k in weight.shape[2:])
    kernel_size = int(np.prod(kernel, dtype=np.int64))
    group_count = int(node.attrs.get("group", 1))
    in_per_filter, out_units = ((weight.shape[0] // group_count, weight.shape[1] * group_count) if transposed
                                else (weight.shape[1], weight.shape[0]))
    in_units = in_per_filter * group_count
    weight_in_axis, weight_out_axis = (0, 1) if transposed else (1, 0)
    geometry = _conv_geometry(node, tracer.shape(data), kernel, transposed)
    positions = _positions(tracer.shape(node.outputs[0]), 2)
    rank = 2 + len(kernel)
    layer = dict(node=node.name, op=node.op, input=data.name, weight=weight_tensor.name, kernel=kernel_size,
                 positions=positions, conv=geometry)

    if group_count > 1 and group_count == in_units == out_units and not transposed:
        # Depthwise: filter c reads only channel c, so the channels pass through with their filters.
        groups = ()
        if incoming is not None and incoming.axis == 1 and incoming.block == 1:
            tracer.add_slice(incoming, node, 1, 0, "param")
            if bias is not None:
                tracer.add_slice(incoming, node, 2, 0, "param")
            tracer.add_size_fix(node, -1, -1, incoming.groups, attribute="group")
            groups = tracer.follow(node.outputs[0], _moved(incoming, 1, rank)).groups
        elif incoming is not None:
            tracer.freeze(incoming, f"depthwise {node.op} '{node.name}' reads channels off axis 1")
        tracer.add_layer(Layer(**layer, in_groups=(), in_units=1, in_block=1, out_groups=groups,
                               out_units=out_units, sensitivity_probe=False))
        return

    supported = group_count == 1 and geometry is not None
    in_groups: tuple[int, ...] = ()
    if incoming is not None:
        if not supported:
            tracer.freeze(incoming, f"{node.op} '{node.name}' (group={group_count}) is not prunable on its input")
        elif incoming.axis != 1 or incoming.block != 1:
            tracer.freeze(incoming, f"{node.op} '{node.name}' reads channels on axis {incoming.axis}, not 1")
        else:
            tracer.add_slice(incoming, node, 1, weight_in_axis, "consumer")
            in_groups = incoming.groups
    out_groups: tuple[int, ...] = ()
    if supported:
        slices = [(1, weight_out_axis, "producer")] + ([(2, 0, "param")] if bias is not None else [])
        out_groups = _produce(tracer, node, node.outputs[0], 1, rank, out_units, slices).groups
    # A grouped conv's weight holds C_in / group input channels per filter: in_units counts those.
    tracer.add_layer(Layer(**layer, in_groups=in_groups, in_units=in_per_filter, in_block=1,
                           out_groups=out_groups, out_units=out_units))


def _dense(node: gs.Node, tracer: ChannelTracer, *, in_by_out: bool, bias_index: int | None) -> None:
    data, weight_tensor = node.inputs[0], node.inputs[1]
    weight = tracer.constant(weight_tensor)
    incoming = tracer.channels(data)
    data_shape = tracer.shape(data)
    if weight is None or weight.ndim != 2:
        if incoming is not None:
            tracer.freeze(incoming, f"{node.op} '{node.name}' has no constant 2-D weight")
        return
    in_features, out_units = weight.shape if in_by_out else weight.shape[::-1]
    in_axis, out_axis = (0, 1) if in_by_out else (1, 0)
    in_groups: tuple[int, ...] = ()
    block = 1
    if incoming is not None:
        rank = len(data_shape) if data_shape is not None else incoming.rank
        if incoming.axis != rank - 1:
            tracer.freeze(incoming, f"{node.op} '{node.name}' contracts axis {rank - 1}, "
                                    f"not the channel axis {incoming.axis}")
        else:
            in_groups, block = incoming.groups, incoming.block
            tracer.add_slice(incoming, node, 1, in_axis, "consumer")
    slices = [(1, out_axis, "producer")]
    if bias_index is not None and len(node.inputs) > bias_index and not node.inputs[bias_index].is_empty():
        bias = tracer.constant(node.inputs[bias_index])
        if bias is None:
            slices = None
        elif bias.ndim >= 1 and bias.shape[-1] == out_units and out_units > 1:
            slices.append((bias_index, bias.ndim - 1, "param"))
    output = node.outputs[0]
    output_shape = tracer.shape(output)
    if output_shape is None and data_shape is not None:
        output_shape = tuple(data_shape[:-1]) + (out_units,)
    out_groups: tuple[int, ...] = ()
    if slices is not None:
        rank = _rank(tracer, output, len(data_shape) if data_shape else 2)
        out_groups = _produce(tracer, node, output, rank - 1, rank, out_units, slices).groups
    tracer.add_layer(Layer(
        node=node.name, op=node.op, input=data.name, weight=weight_tensor.name, in_groups=in_groups,
        in_units=in_features // block, in_block=block, out_groups=out_groups, out_units=out_units, kernel=1,
        positions=_rows_per_point(output_shape, tracer.batch), weight_is_in_by_out=in_by_out))


def gemm(node: gs.Node, tracer: ChannelTracer) -> None:
    tracer.claim(0, 1, 2)
    if node.attrs.get("transA", 0):
        tracer.freeze_inputs(node, f"Gemm '{node.name}' transposes its input (transA=1)")
        return
    _dense(node, tracer, in_by_out=not node.attrs.get("transB", 0), bias_index=2)


def matmul(node: gs.Node, tracer: ChannelTracer) -> None:
    tracer.claim(0, 1)
    if tracer.constant(node.inputs[1]) is None:
        tracer.freeze_inputs(node, f"MatMul '{node.name}' multiplies two activations")
        return
    _dense(node, tracer, in_by_out=True, bias_index=None)


# ---- channel-preserving operators ------------------------------------------------------------------
@_reads_channels()
def passthrough(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Element-wise unary operators, Dropout, Identity, Cast: output channel c depends on input channel c.

    Extra inputs (Clip bounds, Dropout ratio) are scalars."""
    if _extra_outputs_used(node, tracer) or any(tracer.channels(t) for t in node.inputs[1:]):
        tracer.freeze(incoming, f"{node.op} '{node.name}' exposes or mixes the channels elsewhere")
        return
    tracer.follow(node.outputs[0], incoming)


@_reads_channels(0)
def spatial(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Pooling: works within each channel of an NC... tensor."""
    if incoming.axis != 1 or incoming.block != 1:
        tracer.freeze(incoming, f"{node.op} '{node.name}' pools a tensor whose channels are not on axis 1")
    elif _extra_outputs_used(node, tracer):
        tracer.freeze(incoming, f"{node.op} '{node.name}' exposes pooling indices")
    else:
        tracer.follow(node.outputs[0], incoming)


@_reads_channels()
def channel_normalization(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """BatchNormalization and InstanceNormalization: per-channel statistics and affine parameters on
    axis 1, each a constant [C] vector cut with the channels."""
    params = [tracer.constant(tensor) for tensor in node.inputs[1:]]
    if incoming.axis != 1 or incoming.block != 1 or any(p is None or p.ndim != 1 for p in params):
        tracer.freeze(incoming, f"{node.op} '{node.name}' has non-constant parameters")
        return
    if _extra_outputs_used(node, tracer):
        tracer.freeze(incoming, f"{node.op} '{node.name}' exposes training statistics")
        return
    for index in range(1, len(node.inputs)):
        tracer.add_slice(incoming, node, index, 0, "param")
    tracer.follow(node.outputs[0], incoming)


def _channel_position(channels: Channels, rank: int) -> int:
    """Where a tensor of `rank` broadcast against `channels` holds the channel axis (may be < 0)."""
    return rank - (channels.rank - channels.axis)


def elementwise(node: gs.Node, tracer: ChannelTracer) -> None:
    """Add/Sub/Mul/Div/PRelu/Sum/Max/Min/Mean: couple channel tensors, slice per-channel constants.

    Inputs of size 1 on the channel axis (a scalar, a spatial attention map) broadcast and need nothing.
    """
    tracer.claim(*range(len(node.inputs)))
    tracked = [(index, tracer.channels(tensor)) for index, tensor in enumerate(node.inputs)]
    tracked = [(index, channels) for index, channels in tracked if channels is not None]
    if not tracked:
        return
    widths = {index: tracer.width(channels) for index, channels in tracked}
    broad = [channels for index, channels in tracked if widths[index] == 1 and max(widths.values()) > 1
             and (tracer.shape(node.inputs[index]) or (None,) * channels.rank)[channels.axis] == 1]
    for channels in broad:
        tracer.freeze(channels, f"{node.op} '{node.name}' broadcasts this single channel over others")
    tracked = [(index, channels) for index, channels in tracked if channels not in broad]
    main = tracked[0][1]
    for _, other in tracked[1:]:
        if (other.rank - other.axis) != (main.rank - main.axis) or other.block != main.block:
            reason = f"{node.op} '{node.name}' combines channels on different axes"
            tracer.freeze(main, reason)
            tracer.freeze(other, reason)
            return
        main = tracer.couple(main, other, f"{node.op} '{node.name}'")
    width = tracer.width(main) * main.block
    tracked_indices = {index for index, _ in tracked} | {i for i, t in enumerate(node.inputs)
                                                          if tracer.channels(t) in broad}
    for index, tensor in enumerate(node.inputs):
        if index in tracked_indices or tensor.is_empty():
            continue
        values = tracer.constant(tensor)
        shape = values.shape if values is not None else tracer.shape(tensor)
        position = None if shape is None else _channel_position(main, len(shape))
        if shape is not None and (position < 0 or shape[position] == 1):
            continue
        if values is not None and shape[position] == width:
            tracer.add_slice(main, node, index, position, "param")
            continue
        if values is None and shape is not None and _reshaped_constant(tracer, main, tensor, position, width):
            continue
        what = f"a constant of shape {tuple(shape)}" if values is not None else f"untracked '{tensor.name}'"
        tracer.freeze(main, f"{node.op} '{node.name}' combines the channels with {what}")
        return
    output_rank = _rank(tracer, node.outputs[0], main.rank)
    tracer.follow(node.outputs[0], _moved(main, _channel_position(main, output_rank), output_rank))


def _reshaped_constant(tracer: ChannelTracer, channels: Channels, tensor: gs.Tensor, position: int,
                       width: int) -> bool:
    """A per-channel constant that the graph reshapes before using it (Paddle and tf2onnx write a conv
    bias as Reshape(bias [C], [1, C, 1, 1])): cut it as a parameter, rewrite the count in the target if
    there is one. False, recording nothing, for any other tensor."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op != "Reshape" or len(tensor.outputs) != 1 or tensor.name in tracer.graph_outputs:
        return False
    source, target, shape = tracer.constant(producer.inputs[0]), tracer.dims(producer, 1), tracer.shape(tensor)
    if source is None or source.ndim != 1 or source.size != width or target is None or len(target) != len(shape) \
            or _product(shape) != width or any(entry.channels is not None for entry in target):
        return False
    entry = target[position]
    if entry.value == width and entry.source is not None:
        tracer.add_size_fix(*entry.source, channels.groups, channels.block)
    elif entry.value != -1:
        return False
    tracer.add_slice(channels, producer, 0, 0, "param")
    return True


# ---- operators that move, select or combine channels -----------------------------------------------
def concat(node: gs.Node, tracer: ChannelTracer) -> None:
    """Each input's groups occupy a range of the output's channels; untracked inputs add frozen groups."""
    tracer.claim(*range(len(node.inputs)))
    tracked = [tracer.channels(tensor) for tensor in node.inputs]
    if all(channels is None for channels in tracked):  # e.g. the pieces of a shape: nothing to follow
        return
    output_rank = _rank(tracer, node.outputs[0], 0)
    axis = int(node.attrs.get("axis", 0)) % output_rank if output_rank else None
    if axis is None:
        tracer.freeze_inputs(node, f"Concat '{node.name}' has an unknown rank")
        return
    if any(c is not None and (c.axis != axis or c.block != 1) for c in tracked):
        tracer.freeze_inputs(node, f"Concat '{node.name}' joins along axis {axis}, not the channel axis")
        return
    groups: list[int] = []
    for tensor, channels in zip(node.inputs, tracked):
        if channels is not None:
            groups.extend(channels.groups)
            continue
        shape = tracer.shape(tensor)
        if shape is None or shape[axis] is None:
            tracer.freeze_inputs(node, f"Concat '{node.name}' joins an input of unknown width")
            return
        if shape[axis]:
            groups.append(tracer.new_group(shape[axis], frozen=f"comes from '{tensor.name}', an input of "
                                                               f"Concat '{node.name}' that is not tracked"))
    tracer.follow(node.outputs[0], Channels(tuple(groups), axis, output_rank))


@_reads_channels(0, 1)
def split(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    axis = int(node.attrs.get("axis", 0)) % incoming.rank
    if axis != incoming.axis:
        for output in node.outputs:
            tracer.follow(output, incoming)
        return
    sizes = _int_list(tracer, node, 1, "split")
    width = tracer.width(incoming)
    if sizes == [] and width % len(node.outputs) == 0:
        sizes = [width // len(node.outputs)] * len(node.outputs)
    if not sizes or sum(sizes) != width or incoming.block != 1:
        tracer.freeze(incoming, f"Split '{node.name}' has sizes pfp-onnx cannot read")
        return
    start = 0
    for position, (output, size) in enumerate(zip(node.outputs, sizes)):
        part = tracer.sub(incoming, start, start + size)
        tracer.follow(output, part)
        tracer.add_size_fix(node, 1, position, part.groups)
        start += size


@_reads_channels()
def slice_(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    starts, ends = _int_list(tracer, node, 1, "starts"), _int_list(tracer, node, 2, "ends")
    axes = _int_list(tracer, node, 3, "axes") or list(range(len(starts or [])))
    steps = _int_list(tracer, node, 4, None) or [1] * len(axes)
    if len(node.inputs) < 3:
        tracer.freeze(incoming, f"Slice '{node.name}' gives its bounds as attributes (before opset 10)")
        return
    if starts is None or ends is None or axes is None or steps is None:
        tracer.freeze(incoming, f"Slice '{node.name}' has non-constant bounds")
        return
    output_rank = _rank(tracer, node.outputs[0], incoming.rank)
    hits = [i for i, axis in enumerate(axes) if axis % incoming.rank == incoming.axis]
    if not hits:
        tracer.follow(node.outputs[0], incoming)
        return
    (hit,) = hits
    width = tracer.width(incoming)
    start, stop = (max(0, min(width, value + width if value < 0 else value)) for value in (starts[hit], ends[hit]))
    if steps[hit] != 1 or stop <= start or incoming.block != 1:
        tracer.freeze(incoming, f"Slice '{node.name}' takes channels with a step or an empty range")
        return
    before = tracer.sub(incoming, 0, start).groups
    part = tracer.sub(incoming, start, stop)
    tracer.add_size_fix(node, 1, hit, before)
    tracer.add_size_fix(node, 2, hit, before + part.groups)
    tracer.follow(node.outputs[0], _moved(part, incoming.axis, output_rank))


@_reads_channels()
def resize(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Resize/Upsample: fine while the channel axis keeps its size (scale 1, or a size we rewrite)."""
    axes = [a % incoming.rank for a in node.attrs.get("axes", range(incoming.rank))]
    # Upsample and opset-10 Resize read (X, scales); Resize from opset 11 (X, roi, scales, sizes).
    scale_index, size_index = (1, None) if node.op == "Upsample" or _opset(tracer) < 11 else (2, 3)
    scales = tracer.constant(node.inputs[scale_index]) if len(node.inputs) > scale_index \
        and not node.inputs[scale_index].is_empty() else None
    if scales is None and "scales" in node.attrs:  # Upsample before opset 9
        scales = np.asarray(node.attrs["scales"], dtype=np.float32)
    sizes = tracer.constant(node.inputs[size_index]) if size_index is not None and len(node.inputs) > size_index \
        and not node.inputs[size_index].is_empty() else None
    if incoming.axis not in axes:
        tracer.follow(node.outputs[0], incoming)
    elif scales is not None and scales.size == len(axes) and scales[axes.index(incoming.axis)] == 1:
        tracer.follow(node.outputs[0], incoming)
    elif sizes is not None and sizes.size == len(axes) and sizes[axes.index(incoming.axis)] == tracer.width(incoming):
        tracer.add_size_fix(node, size_index, axes.index(incoming.axis), incoming.groups)
        tracer.follow(node.outputs[0], incoming)
    else:
        tracer.freeze(incoming, f"{node.op} '{node.name}' may resize the channel axis")


@_reads_channels()
def pad(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    pads = _int_list(tracer, node, 1, "pads")
    axes = _int_list(tracer, node, 3, None) or list(range(incoming.rank))
    if pads is None or len(pads) != 2 * len(axes):
        tracer.freeze(incoming, f"Pad '{node.name}' has non-constant pads")
        return
    axes = [a % incoming.rank for a in axes]
    if incoming.axis in axes and (pads[axes.index(incoming.axis)] or pads[len(axes) + axes.index(incoming.axis)]):
        tracer.freeze(incoming, f"Pad '{node.name}' pads the channel axis")
        return
    tracer.follow(node.outputs[0], incoming)


@_reads_channels(0)
def softmax(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """From opset 13 (Log)Softmax normalises along its axis; before, over every axis from its axis on (the
    input flattened to 2-D there), so channels anywhere in that block are normalised together."""
    legacy = _opset(tracer) < 13
    axis = int(node.attrs.get("axis", 1 if legacy else -1)) % incoming.rank
    if incoming.axis == axis or legacy and incoming.axis > axis:
        tracer.freeze(incoming, f"{node.op} '{node.name}' normalises across the channels")
    else:
        tracer.follow(node.outputs[0], incoming)


@_reads_channels(0, 1)
def reduce(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    axes = _int_list(tracer, node, 1, "axes")
    if axes is None or not axes:
        tracer.freeze(incoming, f"{node.op} '{node.name}' reduces over unknown or all axes")
        return
    axes = sorted({a % incoming.rank for a in axes})
    if incoming.axis in axes:
        tracer.freeze(incoming, f"{node.op} '{node.name}' reduces over the channels")
        return
    if node.attrs.get("keepdims", 1):
        tracer.follow(node.outputs[0], incoming)
    else:
        shift = sum(1 for a in axes if a < incoming.axis)
        tracer.follow(node.outputs[0], _moved(incoming, incoming.axis - shift, incoming.rank - len(axes)))


@_reads_channels(0)
def transpose(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """NHWC ↔ NCHW and friends: the channels simply move to another axis."""
    perm = [int(p) for p in node.attrs.get("perm", range(incoming.rank - 1, -1, -1))]
    tracer.follow(node.outputs[0], _moved(incoming, perm.index(incoming.axis), incoming.rank))


@_reads_channels(0, 1)
def squeeze(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    axes = _int_list(tracer, node, 1, "axes")
    if axes == []:  # every axis that is 1 when it runs: a channel axis pruned to width 1 would go too
        tracer.freeze(incoming, f"Squeeze '{node.name}' has no axes, so a pruned width of 1 would be squeezed")
        return
    if axes is None:
        tracer.freeze(incoming, f"Squeeze '{node.name}' has unknown axes")
        return
    axes = {a % incoming.rank for a in axes}
    if incoming.axis in axes:
        tracer.freeze(incoming, f"Squeeze '{node.name}' removes the channel axis")
        return
    shift = sum(1 for a in axes if a < incoming.axis)
    tracer.follow(node.outputs[0], _moved(incoming, incoming.axis - shift, incoming.rank - len(axes)))


@_reads_channels(0, 1)
def unsqueeze(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    axes = _int_list(tracer, node, 1, "axes")
    if not axes:
        tracer.freeze(incoming, f"Unsqueeze '{node.name}' has unknown axes")
        return
    rank = incoming.rank + len(axes)
    inserted = {a % rank for a in axes}
    kept_positions = [p for p in range(rank) if p not in inserted]
    tracer.follow(node.outputs[0], _moved(incoming, kept_positions[incoming.axis], rank))


@_reads_channels(0)
def flatten(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Flatten is a reshape to [d0 ⋯ d(axis−1), the rest]: from the channel axis on, channel c owns the
    block of features after it; from before it, only when the axes in between have size 1 (tf2onnx's
    NHWC [N, 1, 1, C])."""
    shape = tracer.shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    axis = axis + incoming.rank if axis < 0 else axis
    output_shape = tracer.shape(node.outputs[0])
    if output_shape is None and shape is not None:
        output_shape = (_product(shape[:axis]), _product(shape[axis:]))
    landing = _channel_landing(shape, output_shape, incoming, tracer.width(incoming))
    if landing is None:
        tracer.freeze(incoming, f"Flatten '{node.name}' does not keep the channels in whole blocks")
        return
    tracer.follow(node.outputs[0], Channels(incoming.groups, landing[0], 2, landing[1]))


@_reads_channels(0, 1)
def reshape(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Reshapes that keep each channel's entries one run along one axis: flattening from the channel axis
    on, merging the axes after it, dropping or adding size-1 axes (Paddle's and tf2onnx's flatten after a
    global pool). The target, constant or computed from Shape, must follow the pruned width."""
    input_shape, target = tracer.shape(node.inputs[0]), tracer.dims(node, 1)
    output_shape = tracer.shape(node.outputs[0])
    if output_shape is None:  # ONNX's data propagation leaves computed targets open before opset 13
        output_shape = _target_shape(input_shape, target, node.attrs.get("allowzero", 0))
        tracer.learn_shape(node.outputs[0], output_shape)
    landing = _channel_landing(input_shape, output_shape, incoming, tracer.width(incoming))
    if landing is None:
        tracer.freeze(incoming, f"Reshape '{node.name}' does not keep the channels in whole blocks")
        return
    axis, block = landing
    problem = _target_problem(tracer, node, target, output_shape, incoming, axis, block)
    if problem is not None:
        tracer.freeze(incoming, problem)
        return
    entry = target[axis]
    if entry.channels is None and entry.value == tracer.width(incoming) * block:
        tracer.add_size_fix(*entry.source, incoming.groups, block)
    tracer.read_dims(1)
    tracer.follow(node.outputs[0], Channels(incoming.groups, axis, len(output_shape), block))


def _target_shape(input_shape, target: tuple[Dim, ...] | None, allowzero: int):
    """The shape a Reshape's target gives its output (0 copies the input's size, -1 takes what is left;
    None where the target's entry is unknown, a dynamic batch read by Shape)."""
    if input_shape is None or target is None:
        return None
    sizes = [entry.value for entry in target]
    if not allowzero:
        sizes = [input_shape[position] if size == 0 and position < len(input_shape) else size
                 for position, size in enumerate(sizes)]
    if sizes.count(-1) > 1 or -1 in sizes and None in sizes:
        return None
    if -1 in sizes:
        total, known = _product(input_shape), _product([size for size in sizes if size != -1])
        if total is None or not known or total % known:
            return None
        sizes[sizes.index(-1)] = total // known
    return tuple(sizes)


def _channel_landing(input_shape, output_shape, incoming: Channels, width: int) -> tuple[int, int] | None:
    """(output axis, entries per channel along it) when a reshape leaves channel c's entries at positions
    c·block … c·block + block − 1 of one output axis; None when they spread over several axes."""
    if input_shape is None or output_shape is None:
        return None
    per_channel = _product(input_shape[incoming.axis + 1:])
    if per_channel is None:
        return None
    per_channel *= incoming.block
    for axis in range(len(output_shape)):
        after = _product(output_shape[axis + 1:])
        if after is None or per_channel % after or output_shape[axis] != width * (per_channel // after):
            continue
        if _same_product(input_shape[:incoming.axis], output_shape[:axis]):
            return axis, per_channel // after
    return None


def _same_product(first, second) -> bool:
    """Whether two runs of leading dims hold as many entries (an unknown batch leading both cancels)."""
    if first and second and first[0] is None and second[0] is None:
        first, second = first[1:], second[1:]
    size = _product(first)
    return size is not None and size == _product(second)


def _target_problem(tracer: ChannelTracer, node: gs.Node, target: tuple[Dim, ...] | None, output_shape,
                    incoming: Channels, axis: int, block: int) -> str | None:
    """Why a Reshape's target would not give the pruned shape, or None when it does: its entry for the
    channel axis is -1, a 0 copying that same axis, the axis' size read by Shape, or a constant count that
    can be rewritten; every other entry stays what it is."""
    name = f"Reshape '{node.name}'"
    if target is None or len(target) != len(output_shape):
        return f"{name} has a target shape pfp-onnx cannot follow"
    copies = not node.attrs.get("allowzero", 0)  # 0 copies the input's size there
    for position, entry in enumerate(target):
        if position != axis and (entry.channels is not None or copies and entry.value == 0
                                 and position == incoming.axis):
            return f"{name} has a target entry {position} that counts channels but is not the channel axis"
    entry = target[axis]
    if entry.channels is not None:
        if tracer.same_channels(entry.channels, incoming) and entry.channels.block == block:
            return None
        return f"{name} takes the width of its channel axis from another tensor's channels"
    if entry.value == -1 or copies and entry.value == 0 and axis == incoming.axis and block == incoming.block:
        return None
    sources = [other.source for other in target]
    if entry.value == tracer.width(incoming) * block and entry.source is not None and sources.count(entry.source) == 1:
        return None
    return f"{name} has a target shape pfp-onnx cannot rewrite"


# ---- shape arithmetic ------------------------------------------------------------------------------
# Exporters compute reshape targets from Shape: torch's `x.view(x.size(0), -1)` is Shape → Gather → Unsqueeze
# → Concat, Paddle's flatten Shape → Slice → Concat with the width as a constant, tf2onnx's the same behind
# Casts. These rules compute such values entry by entry (groups.Dim), so that Reshape can check them.
def shape_of(node: gs.Node, tracer: ChannelTracer) -> None:
    """Shape reads no values: its input's channels go on, and its entries are the input's sizes, the
    channel axis' among them (whose readers must follow the pruned width, or freeze it)."""
    tracer.claim(0)
    incoming = tracer.channels(node.inputs[0])
    shape = tracer.shape(node.inputs[0])
    if shape is None and incoming is not None:
        shape = (None,) * incoming.rank
    if shape is None:
        return
    dims = [Dim(size, incoming if incoming is not None and axis == incoming.axis else None)
            for axis, size in enumerate(shape)]
    # opset 15's start and end clamp as Python's slices do
    tracer.follow_dims(node.outputs[0], tuple(dims[node.attrs.get("start", 0):node.attrs.get("end", len(dims))]))


def _computes_shapes(arithmetic: ShapeArithmetic, rule: Rule | None = None) -> Rule:
    """An operator that also does shape arithmetic. Where every input is a shape value or a small integer
    constant, `arithmetic` gives the output's entries (None when it cannot: then the channel counts those
    inputs hold freeze); otherwise `rule` handles channels, or, without one, the channels freeze."""
    def apply(node: gs.Node, tracer: ChannelTracer) -> None:
        inputs = [None if tensor.is_empty() else tracer.dims(node, index) for index, tensor in enumerate(node.inputs)]
        if all(dims is not None for dims, tensor in zip(inputs, node.inputs) if not tensor.is_empty()) \
                and not any(tracer.channels(tensor) for tensor in node.inputs):
            tracer.claim(*range(len(node.inputs)))
            result = arithmetic(node, tracer, inputs)
            if result is not None:
                tracer.follow_dims(node.outputs[0], result)
                tracer.read_dims(*range(len(node.inputs)))
        elif rule is not None:
            rule(node, tracer)
        else:
            tracer.freeze_inputs(node, f"{node.op} '{node.name}' has no channel rule")
    return apply


INTEGER_TYPES = (2, 3, 4, 5, 6, 7, 12, 13)  # onnx.TensorProto's (u)int8 … (u)int64


def _same_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """Identity, and Cast to an integer type (tf2onnx and Paddle cast shapes to int32 and back)."""
    return inputs[0] if node.op != "Cast" or node.attrs.get("to") in INTEGER_TYPES else None


def _gather_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    indices = tracer.constant(node.inputs[1])
    if indices is None or indices.ndim > 1 or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    if any(not -len(inputs[0]) <= index < len(inputs[0]) for index in indices.reshape(-1)):
        return None
    return tuple(inputs[0][int(index)] for index in indices.reshape(-1))  # negative indices wrap, as in ONNX


def _slice_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    starts, ends = _int_list(tracer, node, 1, "starts"), _int_list(tracer, node, 2, "ends")
    axes, steps = _int_list(tracer, node, 3, "axes") or [0], _int_list(tracer, node, 4, None) or [1]
    if not starts or not ends or len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
        return None
    return inputs[0][starts[0]:ends[0]:steps[0]]  # ONNX clamps the bounds as Python's slices do


def _unsqueeze_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """A scalar made a 1-element vector (the pieces torch's exporter concatenates)."""
    return inputs[0] if tracer.shape(node.inputs[0]) == () and tracer.shape(node.outputs[0]) == (1,) else None


def _squeeze_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    return inputs[0] if tracer.shape(node.inputs[0]) == (1,) and tracer.shape(node.outputs[0]) == () else None


def _concat_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    if any(len(tracer.shape(tensor) or ()) != 1 for tensor in node.inputs):
        return None
    return tuple(dim for dims in inputs for dim in dims)


def _opset(tracer: ChannelTracer) -> int:
    return int(tracer.graph.opset or 13)


ELEMENTWISE_UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                     "Softplus", "Softsign", "Celu", "ThresholdedRelu", "Mish", "Gelu", "Erf", "Abs", "Neg",
                     "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Dropout")
POOLING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
ELEMENTWISE_NARY = ("Add", "Sub", "Mul", "Div", "PRelu", "Sum", "Max", "Min", "Mean", "Pow")
REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare")

RULES: dict[str, Rule] = {
    "Conv": conv,
    "ConvTranspose": conv,
    "Gemm": gemm,
    "MatMul": matmul,
    "BatchNormalization": channel_normalization,
    "InstanceNormalization": channel_normalization,
    "Flatten": flatten,
    "Reshape": reshape,
    "Concat": _computes_shapes(_concat_values, concat),
    "Split": split,
    "Slice": _computes_shapes(_slice_values, slice_),
    "Resize": resize,
    "Upsample": resize,
    "Pad": pad,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Transpose": transpose,
    "Squeeze": _computes_shapes(_squeeze_values, squeeze),
    "Unsqueeze": _computes_shapes(_unsqueeze_values, unsqueeze),
    "Identity": _computes_shapes(_same_values, passthrough),
    "Cast": _computes_shapes(_same_values, passthrough),
    "Shape": shape_of,
    "Gather": _computes_shapes(_gather_values),
    **{op: elementwise for op in ELEMENTWISE_NARY},
    **{op: passthrough for op in ELEMENTWISE_UNARY},
    **{op: spatial for op in POOLING},
    **{op: reduce for op in REDUCTIONS},
}
