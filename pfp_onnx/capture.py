"""Stream calibration batches through one augmented session and reduce them into running sensitivities.

Like onnxruntime's quantization calibrator: a copy of the model whose extra graph outputs are the inputs
of every consuming layer; each batch's activations are folded into per-group running maxima at once and
then dropped, so memory is bounded by one batch, not by the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.model import infer_shapes, to_graph
from pfp_onnx.runtime import Device, create_session
from pfp_onnx.sensitivity import conv_sensitivity, dense_sensitivity


@dataclass(frozen=True)
class ConsumerProbe:
    """What one consuming layer contributes to its group's sensitivity."""

    layer: Layer
    group: int
    weight: np.ndarray  # conv: [F, C, k...]; dense: [F, C·block]


def consumer_probes(model: onnx.ModelProto, analysis: ChannelAnalysis) -> list[ConsumerProbe]:
    """One probe per (prunable group, consuming layer); weights read once from the model."""
    constants = {name: tensor for name, tensor in to_graph(model).tensors().items()
                 if isinstance(tensor, gs.Constant)}
    prunable = {group.id for group in analysis.prunable_groups}
    probes = []
    for layer in analysis.layers:
        if layer.in_group not in prunable:
            continue
        weight = np.asarray(constants[layer.weight].values, dtype=np.float32)
        if layer.conv is None and layer.weight_is_in_by_out:
            weight = weight.T
        probes.append(ConsumerProbe(layer, layer.in_group, np.ascontiguousarray(weight)))
    return probes


def augmented_model(model: onnx.ModelProto, tensor_names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    known = {info.name: info for info in infer_shapes(model).graph.value_info}
    existing = {output.name for output in augmented.graph.output}
    for name in tensor_names:
        if name in existing:
            continue
        info = known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        augmented.graph.output.append(info)
    return augmented


def capture_sensitivities(model: onnx.ModelProto, analysis: ChannelAnalysis,
                          batches: Iterable[Mapping[str, np.ndarray]], device: Device,
                          progress: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
    """Sensitivity s_c of every prunable group's channels: the max over its consumers and all points."""
    probes = consumer_probes(model, analysis)
    sensitivity = {group.id: np.zeros(group.width, dtype=np.float32) for group in analysis.prunable_groups}
    if not probes:
        return sensitivity
    names = sorted({probe.layer.input for probe in probes})
    session = create_session(augmented_model(model, names), device)
    for batch in batches:
        activations = dict(zip(names, session.run(names, dict(batch))))
        for probe in probes:
            channel_scores = _probe_batch(probe, activations[probe.layer.input])
            np.maximum(sensitivity[probe.group], channel_scores, out=sensitivity[probe.group])
        if progress is not None:
            progress(len(next(iter(batch.values()))))
        del activations
    return sensitivity


def _probe_batch(probe: ConsumerProbe, activation: np.ndarray) -> np.ndarray:
    activation = np.asarray(activation, dtype=np.float32)
    layer = probe.layer
    if layer.conv is not None:
        return conv_sensitivity(activation, probe.weight, strides=layer.conv.strides,
                                pads=layer.conv.pads, dilations=layer.conv.dilations)
    features = dense_sensitivity(activation, probe.weight)
    return features.reshape(layer.in_units, layer.in_block).max(axis=1)
