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

Attention (docs/heads.md): a Reshape that splits the channel axis into [heads, head_dim] makes the group's
unit a head; one that splits a fused projection into [3, E] couples the q, k and v parts position by
position; a MatMul of two activations couples the heads of q and k, and of the weights and v.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from pfp_onnx.groups import MAX_SHAPE_ENTRIES, Channels, ChannelTracer, ConvGeometry, Dim, Layer, WeightSlice

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
    return replace(channels, axis=axis, rank=rank, block=channels.block if block is None else block)


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
        if incoming is not None and incoming.axis == 1 and incoming.block == incoming.unit == 1:
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
        elif incoming.unit != 1:
            tracer.freeze(incoming, f"{node.op} '{node.name}' reads one entry per head")
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
        elif incoming.unit != 1:
            tracer.freeze(incoming, f"{node.op} '{node.name}' reads one entry per head")
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
        _activation_product(node, tracer)
        return
    _dense(node, tracer, in_by_out=True, bias_index=None)


def _activation_product(node: gs.Node, tracer: ChannelTracer) -> None:
    """A MatMul of two activations, [..., M, K] · [..., K, P]: attention's q · kᵀ and weights · v. Channels on
    a batch axis of both (the heads) are coupled and go on; channels on the rows of the first or the columns
    of the second go on alone. Contracted channels, or channels facing an untracked axis of the same size,
    freeze."""
    first, second = (tracer.channels(tensor) for tensor in node.inputs[:2])
    if first is None and second is None:
        return
    ranks = [_rank(tracer, tensor, channels.rank if channels else 0) for tensor, channels
             in zip(node.inputs[:2], (first, second))]
    reason = f"MatMul '{node.name}' multiplies two activations"
    if min(ranks) < 2:
        tracer.freeze_inputs(node, reason)
        return
    rank = max(ranks)
    from_end = [None if channels is None else channels.axis - operand_rank
                for channels, operand_rank in zip((first, second), ranks)]
    if first is not None and second is not None:
        if from_end[0] != from_end[1] or from_end[0] > -3 or (first.block, first.unit) != (second.block, second.unit):
            tracer.freeze_inputs(node, f"{reason} along their channel axes")
            return
        carried, place = tracer.couple(first, second, f"MatMul '{node.name}'"), from_end[0]
    else:
        index = 0 if first is not None else 1
        carried, place = (first, second)[index], from_end[index]
        other = node.inputs[1 - index]
        if place == (-1 if index == 0 else -2):
            tracer.freeze_inputs(node, f"{reason} and contracts the channels")
            return
        if place < -2 and _size_at(tracer, other, place) != 1:  # a batch axis: the other must broadcast there
            tracer.freeze_inputs(node, f"{reason} and meets the channels with '{other.name}'")
            return
    tracer.follow(node.outputs[0], _moved(carried, rank + place, rank))


def _size_at(tracer: ChannelTracer, tensor: gs.Tensor, from_end: int) -> int | None:
    """The size of `tensor` at an axis counted from its end; 1 where it has no such axis (it broadcasts)."""
    shape = tracer.shape(tensor)
    if shape is None:
        return None
    return shape[from_end] if len(shape) >= -from_end else 1


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


@_reads_channels()
def layer_normalization(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """LayerNormalization keeps the input's channels where they were; over the channel axis (a
    transformer's residual stream) every output reads them all, so they freeze — but go on, so that a
    shape read off the output still knows its width is theirs."""
    if _extra_outputs_used(node, tracer):
        tracer.freeze(incoming, f"{node.op} '{node.name}' exposes its statistics")
        return
    if incoming.axis >= int(node.attrs.get("axis", -1)) % incoming.rank:
        tracer.freeze(incoming, f"{node.op} '{node.name}' normalises across the channels")
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
    width = tracer.width(main) // main.unit * main.block
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
        break  # frozen, they still go on: a shape read off the output knows its width is theirs
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
    if all(c is None or c.axis != axis for c in tracked):
        _join_beside(node, tracer, tracked)
        return
    if any(c is not None and (c.axis != axis or c.block != 1) for c in tracked):
        tracer.freeze_inputs(node, f"Concat '{node.name}' joins along axis {axis}, not the channel axis")
        return
    if any(c is not None and c.unit != 1 for c in tracked):
        tracer.freeze_inputs(node, f"Concat '{node.name}' joins heads")
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


def _join_beside(node: gs.Node, tracer: ChannelTracer, tracked: list[Channels | None]) -> None:
    """A Concat along another axis (a class token before the patch tokens): channel c of every input is
    channel c of the output, so the inputs' channels are coupled; an untracked input's cannot go, and
    freezes them."""
    present = [channels for channels in tracked if channels is not None]
    main = present[0]
    for other in present[1:]:
        if (other.rank, other.axis, other.block, other.unit) != (main.rank, main.axis, main.block, main.unit):
            tracer.freeze_inputs(node, f"Concat '{node.name}' joins tensors with channels on different axes")
            return
        main = tracer.couple(main, other, f"Concat '{node.name}'")
    if len(present) < len([tensor for tensor in node.inputs if not tensor.is_empty()]):
        tracer.freeze(main, f"Concat '{node.name}' joins the channels with an untracked tensor")
    tracer.follow(node.outputs[0], main)


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
    if not sizes or sum(sizes) != width or incoming.block != 1 or incoming.unit != 1:
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
    if steps[hit] != 1 or stop <= start or incoming.block != 1 or incoming.unit != 1:
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
def gather(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Gather along another axis (a token, or q, k and v out of a fused projection): the channels move with
    the axes the indices remove or add."""
    axis = int(node.attrs.get("axis", 0)) % incoming.rank
    indices = tracer.shape(node.inputs[1])
    if axis == incoming.axis or indices is None:
        tracer.freeze(incoming, f"Gather '{node.name}' selects along the channel axis, or by indices of unknown rank")
        return
    rank = incoming.rank - 1 + len(indices)
    tracer.follow(node.outputs[0], _moved(incoming, incoming.axis if incoming.axis < axis
                                          else incoming.axis - 1 + len(indices), rank))


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
    landing = _channel_landing(shape, output_shape, incoming, tracer.width(incoming) // incoming.unit)
    if landing is None:
        tracer.freeze(incoming, f"Flatten '{node.name}' does not keep the channels in whole blocks")
        return
    tracer.follow(node.outputs[0], Channels(incoming.groups, landing[0], 2, landing[1], incoming.unit))


@_reads_channels(0, 1)
def reshape(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Reshapes that keep each channel's entries one run along one axis: flattening from the channel axis
    on, merging the axes after it, dropping or adding size-1 axes (Paddle's and tf2onnx's flatten after a
    global pool). Failing that, attention's: [.., E] → [.., heads, head_dim] prunes whole heads, and a
    fused projection's [.., 3E] → [.., 3, E] (or [.., 3, heads, head_dim]) couples its q, k and v parts
    (_split_landing). The target, constant or computed from Shape, must follow the pruned width."""
    input_shape, target = tracer.shape(node.inputs[0]), tracer.dims(node, 1)
    output_shape = tracer.shape(node.outputs[0])
    if output_shape is None:  # ONNX's data propagation leaves computed targets open before opset 13
        output_shape = _target_shape(input_shape, target, node.attrs.get("allowzero", 0))
        tracer.learn_shape(node.outputs[0], output_shape)
    landed = _landed(tracer, node, input_shape, output_shape, incoming)
    if landed is None:
        tracer.freeze(incoming, f"Reshape '{node.name}' does not keep the channels in whole blocks")
        return
    problem = _target_problem(tracer, node, target, output_shape, incoming, landed)
    if problem is not None:
        tracer.freeze(incoming, problem)
        return
    entry = target[landed.axis]
    if not _follows(tracer, entry, landed) and entry.value == _extent(tracer, landed):
        tracer.add_size_fix(*entry.source, landed.groups, landed.block, unit=landed.unit, shared=entry.shared)
    tracer.read_dims(1)
    tracer.follow(node.outputs[0], landed)


def _landed(tracer: ChannelTracer, node: gs.Node, input_shape, output_shape, incoming: Channels) -> Channels | None:
    """Where a Reshape puts the channels: the plain landing, else attention's split of the channel axis."""
    units = tracer.width(incoming) // incoming.unit
    landing = _channel_landing(input_shape, output_shape, incoming, units)
    if landing is not None:
        return Channels(incoming.groups, landing[0], len(output_shape), landing[1], incoming.unit)
    split = _split_landing(tracer, node, input_shape, output_shape, incoming, units)
    if split is None:
        return None
    channels = incoming if split.parts == 1 else _coupled_parts(tracer, node, incoming, split.parts)
    if split.factor > 1:
        channels = tracer.coarsen(channels, split.factor, f"Reshape '{node.name}'")
    if channels is None:
        return None
    return Channels(channels.groups, split.axis, len(output_shape), split.block, channels.unit)


@dataclass(frozen=True, order=True)
class _Split:
    """A Reshape that cuts the channel axis: into `parts` equal parts along the axes before `axis` (q, k, v),
    each part's units merged `factor` at a time (a head of head_dim channels) on `axis`, `block` entries
    each."""

    parts: int
    factor: int
    axis: int
    block: int


def _split_landing(tracer: ChannelTracer, node: gs.Node, input_shape, output_shape, incoming: Channels,
                   units: int) -> _Split | None:
    """How a Reshape splits the channel axis into several. The sizes alone leave two readings of
    [.., 3, 32]: three heads of 32, or 32 channels of three coupled parts; the graph decides. Parts are
    what its readers take one index at a time (Gather, Slice, Split: q, k, v), heads what they do not.
    Of the readings left, the one with the fewest parts, then the smallest heads, is taken."""
    if input_shape is None or output_shape is None:
        return None
    per_unit = _product(input_shape[incoming.axis + 1:])
    if per_unit is None:
        return None
    per_unit *= incoming.block
    output, found = node.outputs[0], []
    for axis, size in enumerate(output_shape):
        after = _product(output_shape[axis + 1:])
        first = _leading_end(output_shape[:axis], input_shape[:incoming.axis])
        if size is None or size == 1 or after is None or first is None:  # a lone head is the batch's axis too
            continue
        parts = _product(output_shape[first:axis])
        if parts is None or units % parts:
            continue
        factor = after // math.gcd(after, per_unit)
        if units // parts % factor or size != units // parts // factor * (factor * per_unit // after):
            continue
        part_axes = [part for part in range(first, axis) if output_shape[part] != 1]
        if parts > 1 and not all(_selects_each(tracer, output, part) for part in part_axes):
            continue
        if _selects_each(tracer, output, axis):
            continue
        found.append(_Split(parts, factor, axis, factor * per_unit // after))
    return min(found, default=None)


def _leading_end(before, leading) -> int | None:
    """The last position p with product(before[:p]) = product(leading): where the axes that the Reshape
    keeps in front of the channels end."""
    matches = [position for position in range(len(before) + 1) if _same_product(before[:position], leading)]
    return matches[-1] if matches else None


def _coupled_parts(tracer: ChannelTracer, node: gs.Node, incoming: Channels, parts: int) -> Channels:
    """Channel c of every part is pruned together: the parts' groups are coupled position by position."""
    size = tracer.width(incoming) // parts
    first = tracer.sub(incoming, 0, size)
    for index in range(1, parts):
        first = tracer.couple(first, tracer.sub(incoming, index * size, (index + 1) * size), f"Reshape '{node.name}'")
    return first


def _selects_each(tracer: ChannelTracer, tensor: gs.Tensor, axis: int) -> bool:
    """Whether every reader of `tensor` takes one index at a time along `axis` — Gather, a one-wide Slice,
    a Split into ones — looking through Transpose, Unsqueeze, Squeeze and Identity."""
    if not tensor.outputs or tensor.name in tracer.graph_outputs:
        return False
    shape = tracer.shape(tensor)
    if shape is None:
        return False
    for reader in tensor.outputs:
        if reader.inputs[0] is not tensor:
            return False
        if reader.op == "Gather":
            indices = tracer.constant(reader.inputs[1])
            if indices is None or indices.size != 1 or int(reader.attrs.get("axis", 0)) % len(shape) != axis:
                return False
        elif reader.op == "Slice":
            if not _takes_one(tracer, reader, shape, axis):
                return False
        elif reader.op == "Split":
            sizes = _int_list(tracer, reader, 1, "split")
            if int(reader.attrs.get("axis", 0)) % len(shape) != axis or set(sizes or [len(reader.outputs)]) != {1} \
                    or len(reader.outputs) != shape[axis]:
                return False
        else:
            moved = _axis_after(tracer, reader, axis, len(shape))
            if moved is None or not _selects_each(tracer, reader.outputs[0], moved):
                return False
    return True


def _takes_one(tracer: ChannelTracer, node: gs.Node, shape, axis: int) -> bool:
    """A Slice that keeps exactly one index of `axis` (and may cut others)."""
    starts, ends = _int_list(tracer, node, 1, "starts"), _int_list(tracer, node, 2, "ends")
    axes = _int_list(tracer, node, 3, "axes") or list(range(len(starts or [])))
    steps = _int_list(tracer, node, 4, None) or [1] * len(axes)
    if not starts or not ends or shape[axis] is None:
        return False
    hits = [index for index, other in enumerate(axes) if other % len(shape) == axis]
    return len(hits) == 1 and len(range(shape[axis])[starts[hits[0]]:ends[hits[0]]:steps[hits[0]]]) == 1


def _axis_after(tracer: ChannelTracer, node: gs.Node, axis: int, rank: int) -> int | None:
    """Where `axis` of the input lands in the output of a node that only moves axes; None otherwise."""
    if node.op == "Identity":
        return axis
    if node.op == "Transpose":
        return [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1))].index(axis)
    axes = _int_list(tracer, node, 1, "axes") if node.op in ("Squeeze", "Unsqueeze") else None
    if not axes:
        return None
    if node.op == "Unsqueeze":
        inserted = {a % (rank + len(axes)) for a in axes}
        return [p for p in range(rank + len(axes)) if p not in inserted][axis]
    removed = {a % rank for a in axes}
    return None if axis in removed else axis - sum(1 for a in removed if a < axis)


def _follows(tracer: ChannelTracer, entry: Dim, landed: Channels) -> bool:
    """Whether a target entry is the size of the very axis it sets (read off a tensor with these channels)."""
    return entry.channels is not None and tracer.same_channels(entry.channels, landed) and \
        (entry.channels.block, entry.channels.unit) == (landed.block, landed.unit)


def _extent(tracer: ChannelTracer, channels: Channels) -> int:
    """The size of the channel axis: block entries per unit."""
    return tracer.width(channels) // channels.unit * channels.block


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
                    incoming: Channels, landed: Channels) -> str | None:
    """Why a Reshape's target would not give the pruned shape, or None when it does: its entry for the
    channel axis is -1, a 0 copying that same axis, the axis' size read by Shape, or a count that can be
    rewritten (a constant, or one read off another tensor's channel axis and replaced by a constant);
    every other entry stays what it is."""
    name = f"Reshape '{node.name}'"
    axis, block = landed.axis, landed.block
    if target is None or len(target) != len(output_shape):
        return f"{name} has a target shape pfp-onnx cannot follow"
    copies = not node.attrs.get("allowzero", 0)  # 0 copies the input's size there
    for position, entry in enumerate(target):
        if position != axis and (entry.channels is not None or copies and entry.value == 0
                                 and position == incoming.axis):
            return f"{name} has a target entry {position} that counts channels but is not the channel axis"
    entry = target[axis]
    if _follows(tracer, entry, landed):
        return None
    if entry.channels is not None and entry.source is None:
        return f"{name} takes the width of its channel axis from another tensor's channels"
    same_axis = tracer.width(landed) == tracer.width(incoming) and (block, landed.unit) == (incoming.block,
                                                                                          incoming.unit)
    if entry.value == -1 or copies and entry.value == 0 and axis == incoming.axis and same_axis:
        return None
    sources = [other.source for other in target]
    if entry.value == _extent(tracer, landed) and entry.source is not None and sources.count(entry.source) == 1:
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
    starts, ends = (_computed_list(tracer, node, inputs, index, name) for index, name in ((1, "starts"), (2, "ends")))
    axes, steps = _int_list(tracer, node, 3, "axes") or [0], _int_list(tracer, node, 4, None) or [1]
    if not starts or not ends or len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
        return None
    return inputs[0][starts[0]:ends[0]:steps[0]]  # ONNX clamps the bounds as Python's slices do


def _unsqueeze_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """A scalar made a 1-element vector (the pieces torch's exporter concatenates)."""
    return inputs[0] if tracer.shape(node.inputs[0]) == () and tracer.shape(node.outputs[0]) == (1,) else None


def _squeeze_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    return inputs[0] if tracer.shape(node.inputs[0]) == (1,) and tracer.shape(node.outputs[0]) == () else None


def _computed_list(tracer: ChannelTracer, node: gs.Node, inputs: list, index: int, attribute: str) -> list[int] | None:
    """An integer list given as a constant or attribute, or computed by shape arithmetic (torch's unflatten
    slices Shape up to −1 mod rank)."""
    found = _int_list(tracer, node, index, attribute)
    computed = inputs[index] if found is None and index < len(inputs) else None
    if computed is not None and all(dim.value is not None for dim in computed):
        return [dim.value for dim in computed]
    return found


def _concat_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """The pieces in order. A computed one-entry piece that is another tensor's channel count (torch reads
    embed_dim off the input's shape for the reshape back from heads) can be replaced by a constant."""
    if any(len(shape) != 1 for tensor in node.inputs if (shape := tracer.shape(tensor)) is not None):
        return None
    return tuple(replace(dim, source=(node.name, index, 0)) if len(dims) == 1 and dim.channels is not None
                 and dim.source is None and tracer.constant(node.inputs[index]) is None else dim
                 for index, dims in enumerate(inputs) for dim in dims)


def _reshape_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """A shape value reshaped to a vector or a scalar keeps its entries."""
    values, target = inputs[0], [dim.value for dim in inputs[1]]
    return values if len(target) <= 1 and all(size in (len(values), -1) for size in target) and \
        (target or len(values) == 1) else None


def _constant_of_shape_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """A short integer vector of one value (torch's repeat builds its ones this way)."""
    value = node.attrs.get("value")
    value = np.asarray(value.values if isinstance(value, gs.Constant) else 0.0 if value is None else value)
    sizes = [dim.value for dim in inputs[0]]
    if value.dtype.kind not in "iu" or len(sizes) != 1 or sizes[0] is None or sizes[0] > MAX_SHAPE_ENTRIES:
        return None
    return (Dim(int(value.reshape(-1)[0])),) * sizes[0]


def _divide(numerator: int, denominator: int) -> int:
    """ONNX's integer Div truncates towards zero."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator < 0) == (denominator < 0) else -quotient


ARITHMETIC = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _divide, "Mod": operator.mod}


def _arithmetic_values(node: gs.Node, tracer: ChannelTracer, inputs: list) -> tuple[Dim, ...] | None:
    """Integer arithmetic on shape values (torch's nn.MultiheadAttention: batch · heads, embed_dim / heads,
    −1 mod rank). The result counts no channels: an operand that does freezes them, since what follows
    would not track the pruned width. A product by a constant whose other factor is 1 (the batch, as the
    analysis sees it) keeps the constant's source: rewriting it scales the count (N · heads → N · kept)."""
    operands = [dims for dims in inputs if dims is not None]
    if len(operands) != 2 or node.op == "Mod" and node.attrs.get("fmod", 0):
        return None
    first, second = operands
    if len(first) != len(second) and 1 not in (len(first), len(second)):
        return None
    if node.op in ("Div", "Mod") and any(dim.value == 0 for dim in second):
        return None
    for dim in first + second:
        if dim.channels is not None:
            tracer.freeze(dim.channels, f"{node.op} '{node.name}' computes with the size of a channel axis")
    length = max(len(first), len(second))
    result = []
    for a, b in zip(first * (length // len(first)), second * (length // len(second))):
        value = None if a.value is None or b.value is None else int(ARITHMETIC[node.op](a.value, b.value))
        scaled = [dim for dim, other in ((a, b), (b, a)) if dim.source and not other.source and other.value == 1]
        kept = scaled[0] if node.op == "Mul" and len(scaled) == 1 else None
        result.append(Dim(value, source=kept.source if kept else None, shared=kept.shared if kept else ()))
    return tuple(result)


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
    "LayerNormalization": layer_normalization,
    "Flatten": flatten,
    "Reshape": _computes_shapes(_reshape_values, reshape),
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
    "Gather": _computes_shapes(_gather_values, gather),
    **{op: elementwise for op in ELEMENTWISE_NARY},
    **{op: _computes_shapes(_arithmetic_values, elementwise) for op in ("Add", "Sub", "Mul", "Div")},
    "Mod": _computes_shapes(_arithmetic_values),
    "ConstantOfShape": _computes_shapes(_constant_of_shape_values),
    **{op: passthrough for op in ELEMENTWISE_UNARY},
    **{op: spatial for op in POOLING},
    **{op: reduce for op in REDUCTIONS},
}
