"""verify(): a model against itself is exact; a changed model shows its error and agreement."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from pfp_onnx.data import validate
from pfp_onnx.runtime import choose_device
from pfp_onnx.verify import verify
from test_cli import DATA, MODEL


def test_identical_models_agree_exactly():
    model = onnx.load(str(MODEL))
    data = validate(dict(np.load(DATA)), model)
    result = verify(model, model, data.batches(64), choose_device("cpu"), epsilon=0.1)
    assert result.points == 500
    assert result.max_relative_error == 0 and result.top1_agreement == 1.0 and result.within_epsilon == 1.0
    assert result.accuracy_original == result.accuracy_pruned > 0.95


def test_perturbed_model_reports_error():
    model = onnx.load(str(MODEL))
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for init in changed.graph.initializer:
        if init.name.endswith("fc.bias") or init.name == "fc.bias":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 5.0 * np.eye(10)[0].astype(np.float32),
                                                  init.name))
    data = validate(dict(np.load(DATA)), model)
    result = verify(model, changed, data.batches(100), choose_device("cpu"), epsilon=1e-6)
    assert result.max_relative_error > 0.01
    assert result.within_epsilon < 1.0
    assert result.top1_agreement < 1.0
    assert result.outputs[0].name == "logits" and result.outputs[0].max_abs_error > 1
