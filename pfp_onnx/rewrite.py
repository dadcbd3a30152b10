"""Emit the smaller, dense model: the only place where the graph is modified.

Every change is one of three kinds recorded by the analysis: cut a constant along an axis (producer
filters, biases, BatchNorm and other per-channel constants, consumer input slices), rescale kept consumer
slices (randomised PFP), and rewrite a constant that counts channels (Reshape widths, Split sizes, Slice
bounds, Resize sizes). All slices of one constant along one axis are applied together, because after a
Concat several groups share that axis at different offsets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.groups import ChannelAnalysis, SizeFix, WeightSlice
from pfp_onnx.model import check_model, free_graph_weights, from_graph, infer_shapes, to_graph
from pfp_onnx.select import Selection


def block_indices(kept: np.ndarray, block: int, offset: int = 0) -> np.ndarray:
    """Positions owned by the kept channels when channel c sits at (offset + c) and owns `block` entries."""
    kept = np.asarray(kept, dtype=np.int64) + offset
    if block == 1:
        return kept
    return (kept[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)


def kept_count(analysis: ChannelAnalysis, selections: Mapping[int, Selection], group_id: int) -> int:
    selection = selections.get(group_id)
    return analysis.group(group_id).width if selection is None else len(selection.kept)


def rewrite(model: onnx.ModelProto, analysis: ChannelAnalysis, selections: Mapping[int, Selection],
            replacements: Mapping[tuple[str, int], np.ndarray] | None = None, *, check: bool = True) -> onnx.ModelProto:
    """The pruned model. `selections` maps prunable group ids to the channels they keep.

    `replacements` ((node, input index) → full-shaped values, from training-free recovery) are installed
    before anything is cut. check=False skips strict shape inference and the full checker, for a model
    that only pfp-onnx runs in between (sequential reconstruction's passes); the model it returns is
    checked.
    """
    for group_id in selections:
        if not analysis.group(group_id).prunable:
            raise ValueError(f"group {group_id} is frozen and cannot be pruned")
    graph = to_graph(model)
    _own_attribute_tensors(graph)
    nodes = {node.name: node for node in graph.nodes}
    for (node_name, input_index), values in (replacements or {}).items():
        _replace_input(nodes[node_name], input_index, np.asarray(values))
    for (node_name, input_index, axis), pieces in _cuts(analysis, selections).items():
        node = nodes[node_name]
        _replace_input(node, input_index, _cut(np.asarray(node.inputs[input_index].values), axis, pieces))
    counts: dict[str, list[tuple[SizeFix, int, int]]] = {}
    for fix in analysis.size_fixes:
        value = fix.block * sum(kept_count(analysis, selections, group) for group in fix.groups)
        full = fix.block * sum(analysis.group(group).width for group in fix.groups)
        counts.setdefault(fix.node, []).append((fix, value, full))
    for node_name, fixes in counts.items():
        # A Split whose parts all keep their widths is left as it was (implicit sizes stay implicit). Not so
        # a Slice: its negative bounds count from the end, which moves when later channels go.
        if nodes[node_name].op == "Split" and all(value == full for _, value, full in fixes):
            continue
        for fix, value, full in fixes:
            if value != full or not _computed_count(nodes[node_name], fix):  # one the graph computes stays
                _write_count(nodes[node_name], fix, value, graph.opset)
    input_names = {tensor.name for tensor in graph.inputs}
    output_names = {tensor.name for tensor in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in input_names | output_names:
            tensor.shape = None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    # Strict inference re-derives every shape from the new weights: a cut that missed a consumer fails here.
    pruned = from_graph(graph, model)
    del graph, nodes
    free_graph_weights(model)  # the original's weight arrays
    if check:
        pruned.graph.value_info.extend(infer_shapes(pruned, strict=True).graph.value_info)
        check_model(pruned, what="the pruned model", full=True)
    return pruned


def cut_constant(analysis: ChannelAnalysis, selections: Mapping[int, Selection], node: str, input_index: int,
                 values: np.ndarray) -> np.ndarray:
    """What rewrite installs for one constant input given its full-shaped `values`: every cut along every
    axis (a pass of sequential reconstruction updates a few layers of an already pruned model this way)."""
    for (node_name, index, axis), pieces in _cuts(analysis, selections).items():
        if (node_name, index) == (node, input_index):
            values = _cut(np.asarray(values), axis, pieces)
    return values


def _cuts(analysis: ChannelAnalysis, selections: Mapping[int, Selection]
          ) -> dict[tuple[str, int, int], list[tuple[WeightSlice, Selection, int]]]:
    """Per (node, input, axis), the slices of every selected group that cut it."""
    cuts: dict[tuple[str, int, int], list[tuple[WeightSlice, Selection, int]]] = defaultdict(list)
    for group_id, selection in selections.items():
        group = analysis.group(group_id)
        for weight_slice in group.slices:
            cuts[(weight_slice.node, weight_slice.input_index, weight_slice.axis)].append(
                (weight_slice, selection, group.width))
    return cuts


def _own_attribute_tensors(graph: gs.Graph) -> None:
    """graphsurgeon exports a tensor attribute (ConstantOfShape's value, in torch's class-token expand) by
    renaming the input model's own TensorProto; a copy of each keeps the input model as it was."""
    for node in graph.nodes:
        for key, value in node.attrs.items():
            if isinstance(value, gs.Constant):
                node.attrs[key] = gs.Constant(value.name, np.array(value.values))


def _cut(values: np.ndarray, axis: int, pieces: list[tuple[WeightSlice, Selection, int]]) -> np.ndarray:
    """Drop every removed channel of every group sharing this axis; scale kept consumer slices."""
    keep = np.ones(values.shape[axis], dtype=bool)
    scale = np.ones(values.shape[axis], dtype=np.float64)
    for weight_slice, selection, width in pieces:
        group_positions = block_indices(np.arange(width), weight_slice.block, weight_slice.offset)
        keep[group_positions] = False
        kept_positions = block_indices(selection.kept, weight_slice.block, weight_slice.offset)
        keep[kept_positions] = True
        if weight_slice.role == "consumer":
            scale[kept_positions] = np.repeat(np.asarray(selection.scale, dtype=np.float64), weight_slice.block)
    cut = np.compress(keep, values, axis=axis)
    if np.all(scale == 1):
        return cut
    shape = [1] * cut.ndim
    shape[axis] = -1
    return (cut * scale[keep].reshape(shape)).astype(values.dtype)


def _replace_input(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give `node` new constant values; a constant other nodes also read is copied, never changed."""
    tensor = node.inputs[index]
    if len(tensor.outputs) <= 1:
        tensor.values = values
        return
    node.inputs[index] = gs.Constant(f"{tensor.name}__{node.name}", values)


def _write_count(node: gs.Node, fix: SizeFix, value: int, opset: int) -> None:
    """Set one entry of a channel-counting constant.

    Split sizes may be implicit (equal parts) or an attribute (before opset 13); the first fix makes
    them explicit and every output's own fix then writes its entry. A count the graph computes (a Concat's
    one-entry piece read off another tensor's shape) becomes a constant.
    """
    if fix.attribute is not None:
        node.attrs[fix.attribute] = int(value)
        return
    if _computed_count(node, fix):
        node.inputs[fix.input_index] = gs.Constant(f"{node.name}__count{fix.input_index}",
                                                   np.array([value], dtype=_count_type(node)))
        return
    if node.op == "Split" and (len(node.inputs) <= fix.input_index or node.inputs[fix.input_index].is_empty()):
        if opset < 13:
            sizes = list(node.attrs.get("split", [0] * len(node.outputs)))
            sizes[fix.position] = value
            node.attrs["split"] = sizes
            return
        node.attrs.pop("num_outputs", None)
        while len(node.inputs) <= fix.input_index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[fix.input_index] = gs.Constant(f"{node.name}__split", np.zeros(len(node.outputs), np.int64))
    target = np.array(node.inputs[fix.input_index].values, copy=True)
    target.reshape(-1)[fix.position] = value  # a scalar too (the heads of N · heads)
    _replace_input(node, fix.input_index, target)


def _computed_count(node: gs.Node, fix: SizeFix) -> bool:
    """Whether the count is a piece of a shape the graph computes (read off another tensor's shape)."""
    return fix.attribute is None and node.op == "Concat" and not isinstance(node.inputs[fix.input_index], gs.Constant)


def _count_type(node: gs.Node) -> np.dtype:
    """The integer type a Concat of shape pieces uses: its constant pieces', else int64."""
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values).dtype
        if getattr(tensor, "dtype", None) is not None:
            return np.dtype(tensor.dtype)
    return np.dtype(np.int64)
