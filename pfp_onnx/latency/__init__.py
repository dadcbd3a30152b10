"""Latency-targeted pruning: per-layer latency measured on the runtime that will run the model, a cost the
allocation spends instead of weights or MACs, and a closed loop that lands the measured speed-up on target."""

from pfp_onnx.latency.table import LatencyTable, LayerCurve, measure_table
from pfp_onnx.latency.target import SpeedTrial, calibrate
from pfp_onnx.latency.timing import compare, fastest_ms, timing_session

__all__ = ["LatencyTable", "LayerCurve", "SpeedTrial", "calibrate", "compare", "fastest_ms", "measure_table",
           "timing_session"]
