"""verify(): a model against itself is exact; a changed model shows its error and agreement, and every
reported number agrees with numpy computed from the two models' raw onnxruntime outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pfp_onnx.data import validate
from pfp_onnx.runtime import choose_device
from pfp_onnx.verify import ReferenceOutputs, verify
from test_cli import DATA, MODEL

FEATURES, CLASSES, AUX = 6, 5, 3
POINTS, BATCH = 61, 8  # a short last batch: statistics are concatenated across batches


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


def _two_output_model(logits_weight: np.ndarray, aux_weight: np.ndarray) -> onnx.ModelProto:
    """x [N, 6] → logits = x·A [N, 5] (a classifier's first output) and aux = x·B [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["logits"]), helper.make_node("MatMul", ["x", "B"], ["aux"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", AUX])],
        initializer=[numpy_helper.from_array(logits_weight.astype(np.float32), "A"),
                     numpy_helper.from_array(aux_weight.astype(np.float32), "B")])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def perturbed_pair():
    """An original and a copy perturbed by known amounts: the aux output's error is larger than the
    logits' on most points but not on all, so the worst over outputs differs from either output alone."""
    rng = np.random.default_rng(2020)
    logits_weight, aux_weight = rng.normal(size=(FEATURES, CLASSES)), rng.normal(size=(FEATURES, AUX))
    original = _two_output_model(logits_weight, aux_weight)
    pruned = _two_output_model(logits_weight + 0.3 * rng.normal(size=logits_weight.shape),
                               aux_weight + 0.6 * rng.normal(size=aux_weight.shape))
    inputs = rng.normal(size=(POINTS, FEATURES)).astype(np.float32)
    raw = {}
    for role, model in (("original", original), ("pruned", pruned)):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        raw[role] = dict(zip(["logits", "aux"], session.run(["logits", "aux"], {"x": inputs})))
    # Labels: the original's class on two thirds of the points, a shifted class elsewhere.
    labels = raw["original"]["logits"].argmax(axis=1).astype(np.int64)
    labels[::3] = (labels[::3] + 1) % CLASSES
    return original, pruned, inputs, labels, raw


def _batches(inputs: np.ndarray, labels: np.ndarray | None = None):
    for start in range(0, len(inputs), BATCH):
        batch = {"x": inputs[start:start + BATCH]}
        if labels is not None:
            batch["labels"] = labels[start:start + BATCH]
        yield batch


def _relative_errors(raw: dict, name: str) -> np.ndarray:
    """Per point ‖y' − y‖ / ‖y‖, y the original's output, in float64."""
    want, got = (np.asarray(raw[role][name], np.float64) for role in ("original", "pruned"))
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)


def test_every_field_matches_numpy_on_a_two_output_model(perturbed_pair):
    original, pruned, inputs, labels, raw = perturbed_pair
    logits_errors, aux_errors = _relative_errors(raw, "logits"), _relative_errors(raw, "aux")
    worst = np.maximum(logits_errors, aux_errors)
    # The case is informative only if each output is the worst on some points, and the worst over
    # outputs has a larger maximum than the first output.
    assert np.any(logits_errors > aux_errors) and np.any(aux_errors > logits_errors)
    assert worst.max() > logits_errors.max()
    epsilon = float(np.median(worst)) * 1.01
    epsilons = (float(np.percentile(worst, 25)), float(np.percentile(worst, 80)))

    result = verify(original, pruned, _batches(inputs, labels), choose_device("cpu"),
                    epsilon=epsilon, epsilons=epsilons)

    assert result.points == POINTS
    assert result.max_relative_error == pytest.approx(worst.max(), rel=1e-12)
    assert result.mean_relative_error == pytest.approx(worst.mean(), rel=1e-12)
    assert result.percentiles == pytest.approx({f"p{q}": np.percentile(worst, q) for q in (50, 90, 99)}, rel=1e-12)
    assert result.epsilon == epsilon
    assert result.within_epsilon == pytest.approx(np.mean(worst <= epsilon))
    assert 0 < result.within_epsilon < 1
    assert result.outside == pytest.approx({f"{value:g}": np.mean(worst > value) for value in epsilons})
    assert list(result.outside.values()) == pytest.approx([0.75, 0.2], abs=1 / POINTS)

    want_class = raw["original"]["logits"].argmax(axis=1)
    got_class = raw["pruned"]["logits"].argmax(axis=1)
    assert result.top1_agreement == pytest.approx(np.mean(want_class == got_class))
    assert 0 < result.top1_agreement < 1
    assert result.accuracy_original == pytest.approx(np.mean(want_class == labels))
    assert result.accuracy_pruned == pytest.approx(np.mean(got_class == labels))
    assert result.accuracy_original != result.accuracy_pruned

    assert [output.name for output in result.outputs] == ["logits", "aux"]
    for output, errors in zip(result.outputs, (logits_errors, aux_errors)):
        difference = np.asarray(raw["pruned"][output.name], np.float64) - raw["original"][output.name]
        assert output.max_abs_error == pytest.approx(np.abs(difference).max(), rel=1e-12)
        assert output.max_relative_error == pytest.approx(errors.max(), rel=1e-12)
        assert output.mean_relative_error == pytest.approx(errors.mean(), rel=1e-12)


def test_error_is_relative_to_the_original(perturbed_pair):
    """Swapping the models changes the denominator: each direction divides by its own first argument."""
    original, pruned, inputs, _, raw = perturbed_pair
    forward = verify(original, pruned, _batches(inputs), choose_device("cpu"))
    backward = verify(pruned, original, _batches(inputs), choose_device("cpu"))
    swapped = {"original": raw["pruned"], "pruned": raw["original"]}
    expected_backward = np.maximum(_relative_errors(swapped, "logits"), _relative_errors(swapped, "aux"))
    assert backward.max_relative_error == pytest.approx(expected_backward.max(), rel=1e-12)
    assert backward.max_relative_error != pytest.approx(forward.max_relative_error, rel=1e-3)


def test_without_labels_or_epsilon_those_fields_are_empty(perturbed_pair):
    original, pruned, inputs, _, _ = perturbed_pair
    result = verify(original, pruned, _batches(inputs), choose_device("cpu"))
    assert result.epsilon is None and result.within_epsilon is None and result.outside == {}
    assert result.accuracy_original is None and result.accuracy_pruned is None
    assert result.top1_agreement is not None


def test_a_point_exactly_at_epsilon_is_within_it(perturbed_pair):
    """(ε, δ) reads ‖y' − y‖ ≤ ε‖y‖: a point whose error equals ε is inside, so a model against itself is
    entirely within ε = 0 and none of it is outside."""
    original, _, inputs, _, _ = perturbed_pair
    result = verify(original, original, _batches(inputs), choose_device("cpu"), epsilon=0.0, epsilons=(0.0,))
    assert result.within_epsilon == 1.0 and result.outside == {"0": 0.0}

def test_kept_reference_gives_the_same_result(perturbed_pair):
    """A sweep's later rows read the original's outputs from a ReferenceOutputs instead of rerunning it."""
    original, pruned, inputs, labels, _ = perturbed_pair
    reference = ReferenceOutputs()
    first = verify(original, pruned, _batches(inputs, labels), choose_device("cpu"), epsilon=0.1,
                   reference=reference)
    assert reference.batches is not None and len(reference.batches) == -(-POINTS // BATCH)
    again = verify(original, pruned, _batches(inputs, labels), choose_device("cpu"), epsilon=0.1,
                   reference=reference)
    assert again == first
