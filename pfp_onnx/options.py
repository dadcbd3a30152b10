"""The choices of the command line's options and the API's arguments, in one light module.

`pfp-onnx --help` builds every option before any command runs: these tuples live here, importable without
onnx, onnxruntime or numpy, and the modules that implement them import them from here.
"""

from __future__ import annotations

MODES = ("deterministic", "randomized", "hybrid")  # pfp_onnx.select
ALLOCATIONS = ("pfp", "uniform")  # pfp_onnx.pipeline
# What --budget counts: the prunable layers' weights, their multiply-accumulates per point (each weight
# counted once per output position), or the model's latency measured on the runtime (pfp_onnx.latency).
BUDGET_OF = ("weights", "macs", "latency")  # pfp_onnx.pipeline
CRITERIA = ("pfp", "l1", "l2", "random")  # pfp_onnx.baselines
# In increasing order of what they collect and cost (prepare collects for the costliest one asked for).
RECOVERIES = ("none", "bias", "lstsq", "sequential", "sequential-ls")  # pfp_onnx.recovery
# Re-fitting each layer on the pruned model's own activations kept the most fidelity on every real model
# measured (docs/performance.md), at a cost compress can afford.
DEFAULT_RECOVERY = "sequential"
METRICS = ("auto", "top1", "error", "detections")  # pfp_onnx.fidelity
DEVICES = ("auto", "cuda", "cpu")  # pfp_onnx.runtime
ROUND_TO_AUTO = "auto"  # pfp_onnx.allocate

# pfp_onnx.calibration_images (defined here only)
IMAGE_PRESETS = ("imagenet", "yolo")
RESIZES = ("crop", "letterbox", "stretch")
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
