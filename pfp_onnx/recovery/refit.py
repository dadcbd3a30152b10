"""Training-free recovery wired to the graph: which layers to collect statistics for, and their new weights.

The numerics live in recover.py; this module maps a ChannelAnalysis and a selection to feature indices
and weight layouts, and returns replacement constants for rewrite() to install before it cuts.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.model import from_graph, to_graph
from pfp_onnx.recovery.least_squares import ConvPatches, FeatureStatistics, compensate_bias, reconstruct
from pfp_onnx.select import Selection

# The recoveries that start from one-pass least squares (sequential re-fits its weights further).
LEAST_SQUARES = ("lstsq", "sequential", "sequential-ls")
# Above this many input features (C·K) a layer's Gram matrix ((C·K+1)² float64, 32 MB at 2048) is not
# collected, and least squares falls back to bias compensation for that layer; all Gram matrices
# together stay under GRAM_TOTAL_BYTES (the first layers in graph order get theirs).
GRAM_FEATURE_LIMIT = 2048
GRAM_TOTAL_BYTES = 1 << 30


def recoverable_layers(analysis: ChannelAnalysis) -> list[Layer]:
    """Consumers of prunable groups that recovery can re-fit: Conv (group 1), Gemm and MatMul."""
    prunable = {group.id for group in analysis.prunable_groups}
    return [layer for layer in analysis.layers
            if prunable & set(layer.in_groups) and layer.op in ("Conv", "Gemm", "MatMul") and layer.sensitivity_probe]


def bias_site(node: gs.Node) -> tuple[gs.Node, int] | None:
    """Where a layer's per-filter bias lives: its own input 2 when that is a constant of one value per
    filter, or for MatMul the constant of the Add that alone consumes its output (a [F] vector). None when
    there is none yet, or only a broadcast one (with_zero_biases makes it per-filter)."""
    filters = _filters(node)
    if node.op != "MatMul":
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.size == filters:
            return node, 2
        return None
    users = node.outputs[0].outputs
    if len(users) == 1 and users[0].op == "Add":
        for index, tensor in enumerate(users[0].inputs):
            if isinstance(tensor, gs.Constant) and tuple(tensor.shape) == (filters,):
                return users[0], index
    return None


def _filters(node: gs.Node) -> int:
    weight = np.asarray(node.inputs[1].values)
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return weight.shape[0]
    return weight.shape[-1]


def new_statistics(analysis: ChannelAnalysis, recovery: str) -> dict[str, FeatureStatistics]:
    """Per recoverable layer, the moments to collect: means always, Gram matrices for lstsq within limits."""
    statistics, gram_bytes = {}, 0
    for layer in recoverable_layers(analysis):
        features = layer.in_units * layer.in_block * layer.kernel
        size = 8 * (features + 1) ** 2
        gram = recovery in LEAST_SQUARES and features <= GRAM_FEATURE_LIMIT and gram_bytes + size <= GRAM_TOTAL_BYTES
        gram_bytes += size if gram else 0
        statistics[layer.node] = FeatureStatistics(features, gram=gram, fast=True)
    return statistics


def patches(layer: Layer) -> ConvPatches | None:
    if layer.conv is None:
        return None
    return ConvPatches(layer.conv.strides, layer.conv.pads, layer.conv.dilations, layer.conv.kernel_shape)


def replacements(model: onnx.ModelProto, analysis: ChannelAnalysis, selections: Mapping[int, Selection],
                 statistics: Mapping[str, FeatureStatistics], recovery: str,
                 ridge: float = 1e-3) -> dict[tuple[str, int], np.ndarray]:
    """New full-shaped weights and biases of the layers reading pruned channels.

    Removed input columns are zero (rewrite cuts them anyway); kept columns are divided by the selection's
    scale, because rewrite multiplies consumer slices by it and the re-fit already is the final weight.
    Every layer here has a bias site (pipeline adds zero biases before the analysis when recovering).
    """
    nodes = {node.name: node for node in to_graph(model).nodes}
    layers = {layer.node: layer for layer in analysis.layers}
    result = {}
    for name, stats in statistics.items():
        layer, node = layers[name], nodes[name]
        kept, scale = kept_features(analysis, selections, layer)
        features = layer.in_units * layer.in_block * layer.kernel
        if len(kept) == features:
            continue
        site = bias_site(node)
        if site is None:  # no per-filter bias to correct (with_zero_biases found none it could add)
            continue
        weight = np.asarray(node.inputs[1].values)
        matrix = as_out_by_features(weight, layer)
        bias_node, bias_index = site
        old_bias = np.asarray(bias_node.inputs[bias_index].values)
        bias = old_bias.astype(np.float64).reshape(-1)
        if recovery in LEAST_SQUARES and stats.has_gram:
            matrix, bias = reconstruct(matrix, bias, stats, kept, ridge=ridge)
        else:
            removed = np.setdiff1d(np.arange(features), kept)
            bias = compensate_bias(matrix, bias, stats.mean, removed)
            matrix = matrix.copy()
            matrix[:, removed] = 0
        matrix = np.array(matrix, dtype=np.float64)
        matrix[:, kept] /= scale
        result[(name, 1)] = from_out_by_features(matrix, weight, layer).astype(weight.dtype)
        result[(bias_node.name, bias_index)] = bias.reshape(old_bias.shape).astype(old_bias.dtype)
    return result


def kept_features(analysis: ChannelAnalysis, selections: Mapping[int, Selection],
                   layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Feature indices (c·block·K + j) the pruned layer still reads, and each one's selection scale."""
    per_channel = layer.in_block * layer.kernel
    kept, scales, offset = [], [], 0
    for group_id in layer.in_groups:
        width = analysis.group(group_id).width
        selection = selections.get(group_id)
        channels = np.arange(width) if selection is None else np.asarray(selection.kept)
        factor = np.ones(width) if selection is None else np.asarray(selection.scale, dtype=np.float64)
        kept.append(((offset + channels)[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1))
        scales.append(np.repeat(factor, per_channel))
        offset += width
    if offset < layer.in_units:  # untracked input channels past the groups (not expected, kept whole)
        rest = np.arange(offset * per_channel, layer.in_units * per_channel)
        kept.append(rest)
        scales.append(np.ones(len(rest)))
    return np.concatenate(kept), np.concatenate(scales)


def as_out_by_features(weight: np.ndarray, layer: Layer) -> np.ndarray:
    if layer.conv is not None:
        return weight.reshape(weight.shape[0], -1).astype(np.float64)
    return (weight.T if layer.weight_is_in_by_out else weight).astype(np.float64)


def from_out_by_features(matrix: np.ndarray, weight: np.ndarray, layer: Layer) -> np.ndarray:
    if layer.conv is not None:
        return matrix.reshape(weight.shape)
    return matrix.T if layer.weight_is_in_by_out else matrix


def with_zero_biases(model: onnx.ModelProto, layer_names: set[str]) -> onnx.ModelProto:
    """A copy where the named layers have an explicit per-filter bias, so a correction has a place to go:
    a zero bias input for Conv/Gemm, a following Add of zeros for a MatMul without one."""
    graph = to_graph(model)
    changed = False
    for node in list(graph.nodes):
        if node.name not in layer_names or bias_site(node) is not None:
            continue
        weight = np.asarray(node.inputs[1].values)
        filters = _filters(node)
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            existing = node.inputs[2]
            if not (isinstance(existing, gs.Constant) and existing.values.size == 1):
                continue  # a bias per row, or computed: no per-filter place for a correction (replacements skip it)
            values = np.full(filters, existing.values.reshape(-1)[0], dtype=existing.values.dtype)
            node.inputs[2] = gs.Constant(f"{node.name}.pfp_bias", values)  # a broadcast bias, one per filter
            changed = True
            continue
        bias = gs.Constant(f"{node.name}.pfp_bias", np.zeros(filters, dtype=weight.dtype))
        if node.op == "MatMul":
            product = gs.Variable(f"{node.outputs[0].name}.pfp_unbiased", dtype=node.outputs[0].dtype)
            output = node.outputs[0]
            node.outputs[0] = product
            graph.nodes.append(gs.Node("Add", f"{node.name}.pfp_bias_add", inputs=[product, bias], outputs=[output]))
        else:
            node.inputs.append(bias)
        changed = True
    if not changed:
        return model
    graph.toposort()
    return from_graph(graph, model)
