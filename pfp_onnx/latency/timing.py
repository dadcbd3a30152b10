"""Wall-clock latency of onnxruntime sessions, on the provider and thread count that will run the model.

A shared machine only ever adds time to a run, so the fastest of a few runs is the estimate that others'
load moves least; two models compared are run alternately, so that a change of load hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from pfp_onnx.runtime import Device

__all__ = ["compare", "fastest_ms", "timing_session"]

WARM_UP_RUNS = 2  # the first runs allocate buffers and, on CUDA, pick kernels


def timing_session(model: onnx.ModelProto, device: Device, threads: int | None = None) -> ort.InferenceSession:
    """A session as a deployment would create it (full graph optimisation, `threads` intra-op threads; None:
    onnxruntime's default, one per physical core), except that idle threads do not spin."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads spin by default: with two sessions run alternately, one's spinning threads steal
    # the cores of the other (4× slower on 2 cores). Both sessions alike lose only the spin's head start.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(device.providers))


def fastest_ms(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], *, repeats: int = 5,
               seconds: float | None = None) -> float:
    """The fastest of `repeats` runs after warm-up, in milliseconds; a run that takes longer than `seconds`
    in all stops the repeats early (at least two are kept)."""
    for _ in range(WARM_UP_RUNS):
        session.run(None, feed)
    best, started = float("inf"), time.perf_counter()
    for done in range(repeats):
        tick = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - tick)
        if seconds is not None and done >= 1 and time.perf_counter() - started > seconds:
            break
    return 1000 * best


def compare(original: ort.InferenceSession, candidate: ort.InferenceSession, feed: Mapping[str, np.ndarray], *,
            pairs: int = 7, seconds: float = 3.0) -> tuple[float, float]:
    """The fastest run of each of two sessions, run alternately: at least `pairs` pairs, and more while
    `seconds` last, in milliseconds."""
    for session in (original, candidate) * WARM_UP_RUNS:
        session.run(None, feed)
    best = [float("inf"), float("inf")]
    started, done = time.perf_counter(), 0
    while done < pairs or time.perf_counter() - started < seconds:
        for slot, session in enumerate((original, candidate)):
            tick = time.perf_counter()
            session.run(None, feed)
            best[slot] = min(best[slot], time.perf_counter() - tick)
        done += 1
        if done >= 4 * pairs:
            break
    return 1000 * best[0], 1000 * best[1]
