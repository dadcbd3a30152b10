"""Emit the smaller, dense model: the only place where the graph is modified.

Every change is one of three kinds recorded by the analysis: cut a constant along an axis (producer
filters, biases, BatchNorm and other per-channel constants, consumer input slices), rescale kept consumer
slices (randomised PFP), and rewrite a Reshape's explicit flattened width.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.groups import ChannelAnalysis, WeightSlice
from pfp_onnx.model import check_model, from_graph, infer_shapes, to_graph
from pfp_onnx.select import Selection


def block_indices(kept: np.ndarray, block: int) -> np.ndarray:
    """Indices of the entries owned by the kept channels when each channel owns `block` of them."""
    kept = np.asarray(kept, dtype=np.int64)
    if block == 1:
        return kept
    return (kept[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)


def rewrite(model: onnx.ModelProto, analysis: ChannelAnalysis,
            selections: Mapping[int, Selection]) -> onnx.ModelProto:
    """The pruned model. `selections` maps prunable group ids to the channels they keep."""
    graph = to_graph(model)
    nodes = {node.name: node for node in graph.nodes}
    for group_id, selection in selections.items():
        group = analysis.group(group_id)
        if not group.prunable:
            raise ValueError(f"group {group_id} is frozen and cannot be pruned")
        for weight_slice in group.slices:
            _cut(nodes[weight_slice.node], weight_slice, selection)
        for fix in group.shape_fixes:
            node = nodes[fix.node]
            target = np.array(node.inputs[1].values, copy=True)
            target[fix.position] = len(selection.kept) * fix.block
            _replace_input(node, 1, target)
    input_names = {tensor.name for tensor in graph.inputs}
    output_names = {tensor.name for tensor in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in input_names | output_names:
            tensor.shape = None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    pruned = infer_shapes(from_graph(graph, model))
    check_model(pruned, what="the pruned model")
    return pruned


def _cut(node: gs.Node, weight_slice: WeightSlice, selection: Selection) -> None:
    values = np.asarray(node.inputs[weight_slice.input_index].values)
    index = block_indices(selection.kept, weight_slice.block)
    cut = np.take(values, index, axis=weight_slice.axis)
    if weight_slice.role == "consumer" and not np.all(selection.scale == 1):
        factors = np.repeat(np.asarray(selection.scale, dtype=np.float64), weight_slice.block)
        shape = [1] * cut.ndim
        shape[weight_slice.axis] = len(factors)
        cut = (cut * factors.reshape(shape)).astype(values.dtype)
    _replace_input(node, weight_slice.input_index, cut)


def _replace_input(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give `node` new constant values; a constant other nodes also read is copied, never changed."""
    tensor = node.inputs[index]
    if len(tensor.outputs) <= 1:
        tensor.values = values
        return
    copy = gs.Constant(f"{tensor.name}__{node.name}", values)
    node.inputs[index] = copy
