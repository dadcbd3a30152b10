"""onnxruntime sessions and the choice of execution provider (CUDA when it really loads, else CPU).

onnxruntime-gpu lists CUDAExecutionProvider as available even when CUDA or cuDNN libraries are missing,
and then silently falls back to CPU at session creation. So availability is decided by a probe session,
once per process, and the answer is said once to the user.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from pfp_onnx.errors import OptionError
from pfp_onnx.options import DEVICES
from pfp_onnx.model import externalized, model_bytes, with_outputs

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Above this, sessions are created from a temporary file rather than from serialised bytes.
SESSION_BYTES_LIMIT = 256 * 2**20
# What onnxruntime raises when it cannot load or run a model: its own types (none derives from another),
# and RuntimeError, which run_with_iobinding raises instead.
ONNXRUNTIME_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_state, name) for name in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
                                       "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
                                       "InvalidGraph", "EPFail") if hasattr(_state, name)) + (RuntimeError,)


@dataclass(frozen=True)
class Device:
    providers: tuple[str, ...]
    note: str  # one line for the user: what runs where, and why

    @property
    def name(self) -> str:
        """cuda or cpu: what the report's JSON says."""
        return "cuda" if CUDA in self.providers else "cpu"


@functools.lru_cache(maxsize=None)
def cuda_loads() -> bool:
    """True if a session on CUDAExecutionProvider really gets CUDA (not a silent CPU fallback)."""
    if CUDA not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):
        # Best effort: it prints a line per missing library, and the probe below decides anyway.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                ort.preload_dlls()
            except Exception:
                pass
    probe_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe_output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    probe = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [probe_input], [probe_output]),
        ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2
    ort.set_default_logger_severity(4)  # the failed CUDA load otherwise prints an error banner
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
        return CUDA in session.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(previous)


def choose_device(device: str = "auto") -> Device:
    if device not in DEVICES:
        raise OptionError(f"Unknown device '{device}'; use one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return Device((CPU,), "running on CPU (as requested)")
    if cuda_loads():
        return Device((CUDA, CPU), "running on CUDA (onnxruntime CUDAExecutionProvider)")
    if device == "cuda":
        raise OptionError(
            "--device cuda was requested but onnxruntime cannot use CUDA here (onnxruntime-gpu with "
            "CUDA 13 and cuDNN 9 libraries is needed). Install them, or use --device auto or cpu.")
    return Device((CPU,), "running on CPU (CUDA is not available to onnxruntime)")


def create_session(model: onnx.ModelProto, device: Device, *, outputs: Iterable[str] = (),
                   cuda_options: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """A session for an in-memory model that also outputs the named intermediate tensors; cuda_options
    go to the CUDA provider when the device has it.

    Small models go over as bytes. Large ones are written to a temporary file whose weights go to an
    external-data file one tensor at a time, straight from the caller's proto: the weights are never held
    twice by pfp-onnx, and the caller's model is not changed.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure reaches the user once, in pfp-onnx's words (pfp_onnx.verify.blame)
    providers = [(name, dict(cuda_options)) if name == CUDA and cuda_options else name for name in device.providers]
    outputs = list(outputs)
    if outputs:
        # A memory pattern planned on the first run puts a capture's many extra outputs in fresh blocks
        # for the next runs too (ResNet-50: batches 2 and 3 took 2.3× the steady time, 3 s in all);
        # without one, every batch after the first costs what a plain forward pass does.
        options.enable_mem_pattern = False
    if model_bytes(model) <= SESSION_BYTES_LIMIT:
        return ort.InferenceSession((with_outputs(model, outputs) if outputs else model).SerializeToString(),
                                    options, providers=providers)
    # Prepacking would keep a second, reordered copy of every large weight; for a few passes it is not
    # worth the memory.
    options.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        shell = externalized(model, path + ".data", "model.onnx.data")
        onnx.save(with_outputs(shell, outputs) if outputs else shell, path)
        return ort.InferenceSession(path, options, providers=providers)
