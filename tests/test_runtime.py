"""Execution-provider choice, including onnxruntime's silent fallback to CPU."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from pfp_onnx import runtime
from pfp_onnx.errors import OptionError


@pytest.fixture(autouse=True)
def fresh_probe():
    runtime.cuda_loads.cache_clear()
    yield
    runtime.cuda_loads.cache_clear()


def test_cpu_is_always_possible():
    assert runtime.choose_device("cpu").providers == (runtime.CPU,)


def test_unknown_device_rejected():
    with pytest.raises(OptionError, match="auto, cuda, cpu"):
        runtime.choose_device("tpu")


def test_silent_cuda_fallback_is_detected(monkeypatch):
    """CUDA listed as available but the session ends up on CPU: treat CUDA as absent."""

    class FallbackSession:
        def __init__(self, *args, **kwargs):
            pass

        def get_providers(self):
            return [runtime.CPU]

    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    assert runtime.cuda_loads() is False
    assert runtime.choose_device("auto").providers == (runtime.CPU,)
    with pytest.raises(OptionError, match="cannot use CUDA"):
        runtime.choose_device("cuda")


def test_cuda_chosen_when_it_loads(monkeypatch):
    class CudaSession:
        def __init__(self, *args, **kwargs):
            pass

        def get_providers(self):
            return [runtime.CUDA, runtime.CPU]

    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(ort, "InferenceSession", CudaSession)
    device = runtime.choose_device("auto")
    assert device.providers == (runtime.CUDA, runtime.CPU) and "CUDA" in device.note


def test_no_cuda_provider_at_all(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CPU])
    assert runtime.choose_device("auto").providers == (runtime.CPU,)
    assert "not available" in runtime.choose_device("auto").note


def test_real_probe_on_this_machine():
    """Whatever the machine, the probe answers without raising and auto picks a working provider."""
    device = runtime.choose_device("auto")
    assert runtime.CPU in device.providers


def test_large_model_sessions_go_through_external_data_untouched(monkeypatch):
    """Above the size limit a session is built from a temporary file with external data, written tensor by
    tensor from the caller's proto: same outputs (extra ones included), and the model is not changed."""
    import numpy as np
    import onnx

    from test_cli import MODEL

    model = onnx.load(str(MODEL))
    before = model.SerializeToString()
    feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    inner = model.graph.node[1].output[0]
    device = runtime.choose_device("cpu")
    small = runtime.create_session(model, device, outputs=[inner]).run(None, feeds)
    monkeypatch.setattr(runtime, "SESSION_BYTES_LIMIT", 0)
    large_session = runtime.create_session(model, device, outputs=[inner])
    assert [output.name for output in large_session.get_outputs()][-1] == inner
    for expected, got in zip(small, large_session.run(None, feeds)):
        np.testing.assert_array_equal(got, expected)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("limit", [runtime.SESSION_BYTES_LIMIT, 0], ids=["in-memory", "external-data"])
def test_capture_sessions_plan_no_memory_pattern(monkeypatch, limit):
    """A session with extra outputs (capture's) runs without onnxruntime's memory pattern, which kept its
    outputs in fresh blocks for several batches; a plain session keeps onnxruntime's default."""
    import onnx

    from test_cli import MODEL

    model = onnx.load(str(MODEL))
    device = runtime.choose_device("cpu")
    monkeypatch.setattr(runtime, "SESSION_BYTES_LIMIT", limit)
    capture = runtime.create_session(model, device, outputs=[model.graph.node[1].output[0]])
    assert capture.get_session_options().enable_mem_pattern is False
    assert runtime.create_session(model, device).get_session_options().enable_mem_pattern is True


# ---- whose fault an onnxruntime failure is ---------------------------------------------------------------
def _fixture_and_points():
    import numpy as np
    import onnx

    from test_cli import DATA, MODEL

    with np.load(DATA) as archive:
        return onnx.load(str(MODEL)), {"input": archive["input"][:24]}


@pytest.mark.parametrize("broken, holdout", [("capture", 0.25), ("pruned", 0.25), ("pruned", 0.0)])
def test_a_derived_model_failing_where_the_original_runs_is_reported_as_a_bug(monkeypatch, broken, holdout):
    """When onnxruntime fails on a model pfp-onnx made (the capture model, the pruned model) while the user's
    model runs on the same points, the error is a RuntimeError that asks for a bug report, not a user error.
    A pruned model is first run by verification, or without held-out points by a check of its own."""
    import onnx
    from onnx import helper

    import pfp_onnx
    from pfp_onnx import capture, pipeline
    from pfp_onnx.errors import PfpError

    def spoiled(model: onnx.ModelProto) -> onnx.ModelProto:
        """A model onnxruntime cannot load: its first node becomes an unknown operator."""
        copied = onnx.ModelProto()
        copied.CopyFrom(model)
        copied.graph.node[0].op_type, copied.graph.node[0].domain = "Unknown", "com.example"
        copied.opset_import.append(helper.make_opsetid("com.example", 1))
        return copied

    if broken == "capture":
        with_parts = capture.with_conv_parts
        monkeypatch.setattr(capture, "with_conv_parts", lambda model, layers: (spoiled(with_parts(model, layers)[0]), {}))
    else:
        rewrite = pipeline.rewrite
        monkeypatch.setattr(pipeline, "rewrite", lambda *args, **kwargs: spoiled(rewrite(*args, **kwargs)))
    model, data = _fixture_and_points()
    with pytest.raises(RuntimeError, match="bug in pfp-onnx") as raised:
        pfp_onnx.compress(model, data, budget=0.6, holdout=holdout, recovery="none")
    assert not isinstance(raised.value, PfpError)
