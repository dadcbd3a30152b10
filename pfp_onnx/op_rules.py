"""Per-operator channel rules: the one table to extend when a new operator must be understood.

A rule receives the node and the ChannelTracer. It may start a group (prunable layers), let an output
carry an input's channels (pass-through, possibly moving the channel axis), couple groups, record
constants to slice or counts to rewrite, or freeze. Any input carrying channels that a rule does not
claim freezes its groups, so forgetting a case is always safe. Operators absent from RULES freeze every
group they touch.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from pfp_onnx.groups import Channels, ChannelTracer, ConvGeometry, Layer, WeightSlice

Rule = Callable[[gs.Node, ChannelTracer], None]


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
        what = f"a constant of shape {tuple(shape)}" if values is not None else f"untracked '{tensor.name}'"
        tracer.freeze(main, f"{node.op} '{node.name}' combines the channels with {what}")
        return
    output_rank = _rank(tracer, node.outputs[0], main.rank)
    tracer.follow(node.outputs[0], _moved(main, _channel_position(main, output_rank), output_rank))


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


def _flatten_from_channel_axis(tracer: ChannelTracer, node: gs.Node, incoming: Channels) -> Channels | None:
    """[..., C, d1, d2] → [..., C·d1·d2]: channel c then owns d1·d2 consecutive features."""
    shape = tracer.shape(node.inputs[0])
    inner = None if shape is None else _product(shape[incoming.axis + 1:])
    if inner is None:
        return None
    return Channels(incoming.groups, incoming.axis, incoming.axis + 1, incoming.block * inner)


@_reads_channels(0)
def flatten(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    axis = int(node.attrs.get("axis", 1)) % max(incoming.rank, 1)
    flat = _flatten_from_channel_axis(tracer, node, incoming) if axis == incoming.axis else None
    if flat is None:
        tracer.freeze(incoming, f"Flatten '{node.name}' does not start at the channel axis with known sizes")
        return
    tracer.follow(node.outputs[0], _moved(flat, 1, 2))


@_reads_channels(0, 1)
def reshape(node: gs.Node, tracer: ChannelTracer, incoming: Channels) -> None:
    """Reshapes that flatten from the channel axis on, or append size-1 axes after it."""
    target = tracer.constant(node.inputs[1])
    input_shape, output_shape = tracer.shape(node.inputs[0]), tracer.shape(node.outputs[0])
    axis, width = incoming.axis, tracer.width(incoming)
    fine = (target is not None and target.ndim == 1 and input_shape is not None and output_shape is not None
            and None not in output_shape[1:] and not (node.attrs.get("allowzero", 0) and 0 in target)
            and tuple(input_shape[:axis])[1:] == tuple(output_shape[:axis])[1:] and len(output_shape) > axis)
    carried = None
    if fine and len(output_shape) == axis + 1:
        carried = _flatten_from_channel_axis(tracer, node, incoming)
    elif fine and output_shape[axis] == width * incoming.block and _product(output_shape[axis + 1:]) == 1 \
            and _product(input_shape[axis + 1:]) == 1:
        carried = _moved(incoming, axis, len(output_shape))
    if carried is None or output_shape[axis] != width * carried.block:
        tracer.freeze(incoming, f"Reshape '{node.name}' does not keep the channels in whole blocks")
        return
    entry = int(target[axis])
    if entry == width * carried.block:
        tracer.add_size_fix(node, 1, axis, incoming.groups, carried.block)
    elif entry != -1 and not (entry == 0 and carried.block == incoming.block):
        tracer.freeze(incoming, f"Reshape '{node.name}' has a target shape pfp-onnx cannot rewrite")
        return
    tracer.follow(node.outputs[0], carried)


def _opset(tracer: ChannelTracer) -> int:
    return int(tracer.graph.opset or 13)


ELEMENTWISE_UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                     "Softplus", "Softsign", "Celu", "ThresholdedRelu", "Mish", "Gelu", "Erf", "Abs", "Neg",
                     "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Dropout", "Identity",
                     "Cast")
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
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Resize": resize,
    "Upsample": resize,
    "Pad": pad,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    **{op: elementwise for op in ELEMENTWISE_NARY},
    **{op: passthrough for op in ELEMENTWISE_UNARY},
    **{op: spatial for op in POOLING},
    **{op: reduce for op in REDUCTIONS},
}
