"""Attention heads as PFP prunes them (docs/heads.md): what a head's sensitivity is, and that a head goes as
a whole with its Q, K and V columns and the out-projection's rows, in hand-built graphs and as pipelines
compress them. The structure of head groups is in test_groups.py; the zero-head oracle over the zoo's
attention graphs in test_rewrite.py."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pfp_onnx
from pfp_onnx.capture import capture_sensitivities
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.model import with_outputs
from pfp_onnx.runtime import choose_device
from pfp_onnx.sensitivity.scorers import dense_sensitivity
from pfp_onnx.select import Selection
from test_rewrite import prune_and_check
from zoo import ZOO, input_shapes, random_inputs

ATTENTION = ("hf_attention", "timm_attention", "torch_multihead_attention")
OUT_PROJECTION = {"hf_attention": ("merged", "dense"), "timm_attention": ("merged", "proj"),
                  "torch_multihead_attention": ("flat", "out_proj")}


def heads_of(analysis):
    (heads,) = [group for group in analysis.groups if group.unit > 1]
    return heads


@pytest.mark.parametrize("name", ATTENTION)
def test_a_heads_sensitivity_is_the_out_projections_over_its_channels(name):
    """PFP's sensitivity of the out-projection's inputs (the V part, mixed by the softmax), maxed over the
    head's head_dim channels; Q and K add nothing of their own."""
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    heads = heads_of(analysis)
    data = random_inputs(model, 6, 0)
    scores = capture_sensitivities(model, analysis, [data], choose_device("cpu"))
    tensor, node = OUT_PROJECTION[name]
    session = ort.InferenceSession(with_outputs(model, [tensor]).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (inputs,) = session.run([tensor], data)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    weight = weights[f"{node}.weight"]
    weight = weight if name == "torch_multihead_attention" else weight.T  # Gemm transB=1, MatMul [in, out]
    per_channel = dense_sensitivity(inputs, weight)
    np.testing.assert_allclose(scores[heads.id], per_channel.reshape(heads.width, heads.unit).max(axis=1),
                               rtol=1e-6)


@pytest.mark.parametrize("name", ATTENTION)
def test_one_head_left_runs_and_equals_the_oracle(name):
    """The harshest cut: every head but the last, every other channel group to one channel."""
    model = ZOO[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    selections = {group.id: Selection(np.array([group.width - 1]), np.array([1.5], np.float32))
                  for group in analysis.prunable_groups}
    pruned = prune_and_check(model, analysis, selections, [random_inputs(model, 2, 0), random_inputs(model, 1, 1)])
    weights = {init.name: numpy_helper.to_array(init).shape for init in pruned.graph.initializer}
    projection = {"hf_attention": "query.weight", "timm_attention": "qkv.weight",
                  "torch_multihead_attention": "in_proj.weight"}[name]
    parts = 3 if name != "hf_attention" else 1
    assert weights[projection][1] == parts * heads_of(analysis).unit  # one head of each part is left


def test_compress_prunes_heads_and_mlp_alike():
    """hf_attention through the pipeline: PFP allocates heads and MLP channels from one ε, and the
    budget counts a head as its Q, K, V columns and out-projection rows."""
    model = ZOO["hf_attention"]()
    data = random_inputs(model, 64, 3)
    result = pfp_onnx.compress(model, data, budget=0.5, recovery="none", holdout=0.25, round_to=1)
    heads = heads_of(result.analysis)
    kept = len(result.selections[heads.id].kept)
    totals = result.report.totals
    assert kept < heads.width and totals.layer_weights_after <= 0.5 * totals.layer_weights_before
    shapes = {init.name: tuple(init.dims) for init in result.model.graph.initializer}
    assert [shapes[f"{name}.weight"] for name in ("query", "key", "value", "dense")] == \
        [(12, 4 * kept)] * 3 + [(4 * kept, 12)]
