"""Stream calibration batches through one augmented session and reduce them into running sensitivities.

Like onnxruntime's quantization calibrator: a copy of the model whose extra graph outputs are the inputs
of every consuming layer; each batch's activations are folded into per-group running maxima at once and
then dropped, so memory is bounded by one batch, not by the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.data import model_feeds
from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.model import free_graph_weights, model_bytes, to_graph
from pfp_onnx.recovery import FeatureStatistics, accumulate_features, patches
from pfp_onnx.runtime import SESSION_BYTES_LIMIT, Device, create_session
from pfp_onnx.sensitivity import (CUDA_OPTIONS, ConvScorer, ConvTransposeScorer, DenseScorer, UnfoldBuffer,
                                  with_conv_parts)


@dataclass(frozen=True)
class ConsumerProbe:
    """What one consuming layer contributes to the sensitivity of the groups it reads."""

    layer: Layer
    groups: tuple[tuple[int, int, int], ...]  # (prunable group, first channel, width) along the input
    scorer: ConvScorer | ConvTransposeScorer | DenseScorer  # running max over the batches it is fed

    def channel_sensitivity(self) -> np.ndarray:
        """Per input channel: after a Flatten a channel owns in_block features and scores their max."""
        return self.scorer.sensitivity.reshape(self.layer.in_units, self.layer.in_block).max(axis=1)


def scored_layers(analysis: ChannelAnalysis) -> list[Layer]:
    """The layers whose inputs capture reads: every layer that reads a prunable group, but depthwise convs
    (one channel per filter says nothing of a channel's share)."""
    prunable = {group.id for group in analysis.prunable_groups}
    return [layer for layer in analysis.layers if layer.sensitivity_probe and prunable & set(layer.in_groups)]


def consumer_probes(model: onnx.ModelProto, analysis: ChannelAnalysis) -> list[ConsumerProbe]:
    """One probe per layer that reads a prunable group; each weight is prepared once for all batches."""
    constants = {name: tensor for name, tensor in to_graph(model).tensors().items()
                 if isinstance(tensor, gs.Constant)}
    prunable = {group.id for group in analysis.prunable_groups}
    probes = []
    buffer = UnfoldBuffer()  # one for every conv: they unfold one after the other
    for layer in scored_layers(analysis):
        spans, start = [], 0
        for group_id in layer.in_groups:
            width = analysis.group(group_id).width
            if group_id in prunable:
                spans.append((group_id, start, width))
            start += width
        probes.append(ConsumerProbe(layer, tuple(spans), _scorer(layer, constants[layer.weight].values, buffer)))
    del constants
    free_graph_weights(model)  # the graph's other weight arrays go now that scorers hold theirs
    return probes


def _scorer(layer: Layer, weight, buffer: UnfoldBuffer) -> ConvScorer | ConvTransposeScorer | DenseScorer:
    weight = np.asarray(weight, dtype=np.float32)
    geometry = layer.conv
    if geometry is not None and geometry.transposed:
        return ConvTransposeScorer(weight, strides=geometry.strides, pads=geometry.pads,
                                   dilations=geometry.dilations, output_padding=geometry.output_padding,
                                   buffer=buffer)
    if geometry is not None:
        return ConvScorer(weight, strides=geometry.strides, pads=geometry.pads, dilations=geometry.dilations,
                          buffer=buffer)
    return DenseScorer(weight.T if layer.weight_is_in_by_out else weight)


def capture_sensitivities(model: onnx.ModelProto, analysis: ChannelAnalysis,
                          batches: Iterable[Mapping[str, np.ndarray]], device: Device, *, sensitivity: bool = True,
                          statistics: Mapping[str, FeatureStatistics] | None = None) -> dict[int, np.ndarray] | None:
    """Sensitivity s_c of every prunable group's channels: the max over its consumers and all points.

    The session runs the model with every conv that pays for it computed from its sign parts (two for a
    Relu-fed conv, four for one whose input may be negative), which are also outputs
    (pfp_onnx.sensitivity.conv_parts): their scorers take z± from there instead of a BLAS pass of their own.
    In the same pass, `statistics` (consuming layer → FeatureStatistics) collect the input moments that
    training-free recovery needs. With sensitivity=False only those are collected and None is returned.
    """
    probes = consumer_probes(model, analysis) if sensitivity else []
    statistics = dict(statistics or {})
    scores = {group.id: np.zeros(group.width, dtype=np.float32) for group in analysis.prunable_groups}
    layers = {layer.node: layer for layer in analysis.layers}
    names = sorted({probe.layer.input for probe in probes} | {layers[node].input for node in statistics})
    parts: dict[str, tuple[str, ...]] = {}
    if names:
        session_model = model
        if probes and model_bytes(model) <= SESSION_BYTES_LIMIT:  # a copy of the model is made
            session_model, parts = with_conv_parts(model, [probe.layer for probe in probes])
        outputs = names + [name for pair in parts.values() for name in pair]
        session = create_session(session_model, device, outputs=outputs, cuda_options=CUDA_OPTIONS)
        del session_model
        for batch in batches:
            activations = _run_bound(session, outputs, model_feeds(batch))
            for probe in probes:
                if probe.layer.node in parts:
                    probe.scorer.update(activations[probe.layer.input],
                                        [activations[name] for name in parts[probe.layer.node]])
                else:
                    probe.scorer.update(activations[probe.layer.input])
            for node, moments in statistics.items():
                accumulate_features(moments, activations[layers[node].input], conv=patches(layers[node]))
            del activations
    for probe in probes:
        channel_scores = probe.channel_sensitivity()
        for group_id, start, width in probe.groups:
            np.maximum(scores[group_id], channel_scores[start:start + width], out=scores[group_id])
    return scores if sensitivity else None


def _run_bound(session, names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with IO binding: inputs are read in place and the outputs land in host buffers that numpy
    views without copying (on CUDA, one device-to-host copy per output, which the numpy scoring needs)."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for name in names:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return {name: value.numpy() for name, value in zip(names, binding.get_outputs())}
