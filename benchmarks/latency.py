"""Speed-up of a pruned model over its original on onnxruntime's CPU provider, measured side by side.

Both sessions use the same number of intra-op threads and one fixed batch; runs alternate original,
pruned, original, … after a warm-up, so that a shared machine's load moves both medians alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from pfp_onnx.latency.timing import timing_session
from pfp_onnx.runtime import CPU, Device

CPU_DEVICE = Device((CPU,), "running on CPU")


def cpu_session(model: str | onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    """A CPU session as compress times one (pfp_onnx.latency.timing: full optimisation, idle threads not
    spinning, so that alternating runs do not steal each other's cores)."""
    return timing_session(model if isinstance(model, onnx.ModelProto) else onnx.load(model), CPU_DEVICE, threads)


@dataclass(frozen=True)
class Timing:
    original_ms: float
    pruned_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms


def interleaved(original: ort.InferenceSession, pruned: ort.InferenceSession, feed: dict[str, np.ndarray],
                seconds: float = 4.0, min_pairs: int = 7) -> Timing:
    """Median latencies of alternating runs: at least `min_pairs` pairs and about `seconds` of runs."""
    for session in (original, pruned, original, pruned):
        session.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    started = time.perf_counter()
    while len(times[1]) < min_pairs or time.perf_counter() - started < seconds:
        for slot, session in enumerate((original, pruned)):
            tick = time.perf_counter()
            session.run(None, feed)
            times[slot].append(time.perf_counter() - tick)
    return Timing(1000 * statistics.median(times[0]), 1000 * statistics.median(times[1]))
