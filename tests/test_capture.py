"""Capture: streaming batches gives the same sensitivities as one batch, and as a direct computation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pfp_onnx import capture
from pfp_onnx.sensitivity import conv_parts as capture_parts
from pfp_onnx.capture import capture_sensitivities, consumer_probes
from pfp_onnx.data import validate
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.model import with_outputs
from pfp_onnx.runtime import choose_device
from pfp_onnx.sensitivity.scorers import conv_sensitivity, dense_sensitivity
from test_cli import DATA, MODEL


@pytest.fixture(scope="module")
def setting():
    model = onnx.load(str(MODEL))
    data = validate({"input": np.load(DATA)["input"][:40]}, model)
    return model, data, analyse_channel_groups(model, data.point_shapes()), choose_device("cpu")


def test_batch_size_does_not_change_sensitivities(setting):
    model, data, analysis, device = setting
    results = [capture_sensitivities(model, analysis, data.batches(size), device) for size in (1, 7, 40)]
    # Identical up to float rounding: onnxruntime and BLAS may order sums differently per batch size.
    for group in analysis.prunable_groups:
        np.testing.assert_allclose(results[0][group.id], results[1][group.id], rtol=1e-5)
        np.testing.assert_allclose(results[0][group.id], results[2][group.id], rtol=1e-5)


@pytest.mark.parametrize("conv_parts", [False, True])
def test_matches_direct_computation(setting, conv_parts, monkeypatch):
    """Group sensitivity = max over the group's consumers of each consumer's own sensitivity. With z± by
    BLAS the capture computes exactly what the direct computation does; with the capture model's sign-part
    convs (pfp_onnx.sensitivity.conv_parts) z± and the activations are the same sums in another order, so equal up
    to float32 rounding (as different batch sizes are)."""
    model, data, analysis, device = setting
    if conv_parts:  # every Relu-fed conv of the small fixture, whatever its size
        monkeypatch.setattr(capture_parts, "PARTS_MIN_FEATURES", 0)
    else:
        monkeypatch.setattr(capture, "with_conv_parts", lambda model, layers: (model, {}))
    captured = capture_sensitivities(model, analysis, data.batches(16), device)
    probes = consumer_probes(model, analysis)
    names = sorted({probe.layer.input for probe in probes})
    session = ort.InferenceSession(with_outputs(model, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    activations = dict(zip(names, session.run(names, {"input": data.inputs["input"]})))
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    for group in analysis.prunable_groups:
        expected = np.zeros(group.width, np.float32)
        for probe in probes:
            spans = [(start, width) for group_id, start, width in probe.groups if group_id == group.id]
            if not spans:
                continue
            layer = probe.layer
            weight = weights[layer.weight]
            if layer.conv is not None:
                scores = conv_sensitivity(activations[layer.input], weight, strides=layer.conv.strides,
                                          pads=layer.conv.pads, dilations=layer.conv.dilations)
            else:
                scores = dense_sensitivity(activations[layer.input], weight.T if layer.weight_is_in_by_out else weight)
            for start, width in spans:
                expected = np.maximum(expected, scores[start:start + width])
        np.testing.assert_allclose(captured[group.id], expected, rtol=1e-5 if conv_parts else 1e-6)
        assert np.all(captured[group.id] >= 0) and np.all(captured[group.id] <= 1 + 1e-6)


def test_consumers_cover_every_prunable_group(setting):
    model, _, analysis, _ = setting
    covered = {group_id for probe in consumer_probes(model, analysis) for group_id, _, _ in probe.groups}
    assert covered == {group.id for group in analysis.prunable_groups}
