"""How many calibration points fit in one capture batch.

A capture batch holds, for every point at once, the input of every layer that reads a prunable group and
the sign parts of each scored conv's output (pfp_onnx.sensitivity.conv_parts; two output-sized parts for a
conv of a nonnegative input, four for one whose input may be negative): about 20 MB a point for a 224×224
ResNet-18, GBs for a segmentation model at full resolution. At the default batch size such a model would
be killed by the operating system without a word, so the batch is lowered, and the user told, when it
would not fit in the memory left (on the machine, or under the container's cgroup limit: inside a container
MemAvailable is the host's).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from pfp_onnx.capture import scored_layers
from pfp_onnx.groups import ChannelAnalysis
from pfp_onnx.sensitivity.conv_parts import parts_per_conv

__all__ = ["CAPTURE_SHARE", "available_bytes", "capture_bytes_per_point", "fitting_batch_size"]

# The share of the available memory one capture batch may take: onnxruntime's own activations, its copy of
# the weights and the scorers' temporaries need the rest.
CAPTURE_SHARE = 0.5
FLOAT_BYTES = 4
# cgroup v1 spells "no limit" as the largest page-aligned 64-bit value; anything this large is no limit.
UNLIMITED = 2**60


def capture_bytes_per_point(analysis: ChannelAnalysis, model: onnx.ModelProto | None = None) -> int:
    """An upper estimate of what one point adds to a capture batch: each captured layer input once, and the
    output-sized parts of every conv that may get them: with the model, two for a conv whose input is
    nonnegative by construction and four for the others (pfp_onnx.sensitivity.conv_parts.parts_per_conv);
    without it, four for every conv."""
    scored = scored_layers(analysis)
    counts = parts_per_conv(model, scored) if model is not None else {}
    inputs: dict[str, int] = {}
    parts = 0
    for layer in scored:
        shape = analysis.shapes.get(layer.input)
        if shape and all(dim is not None for dim in shape[1:]):
            inputs[layer.input] = int(np.prod(shape[1:], dtype=np.int64))
        else:  # rows of unknown length: count the channels the layer reads, once per output position
            inputs[layer.input] = layer.in_units * layer.in_block * (layer.positions or 1)
        if layer.conv is not None and not layer.conv.transposed:
            parts += counts.get(layer.node, 4) * layer.out_units * (layer.positions or 1)
    return FLOAT_BYTES * (sum(inputs.values()) + parts)


def available_bytes(root: Path = Path("/")) -> int | None:
    """Memory this process can still take: what the system has free without swapping (Linux's MemAvailable),
    or less where a container's memory limit (cgroup v2 or v1) leaves less; None where nothing says."""
    candidates = [_meminfo_available(root / "proc/meminfo"),
                  _cgroup_room(root / "sys/fs/cgroup/memory.max", root / "sys/fs/cgroup/memory.current"),
                  _cgroup_room(root / "sys/fs/cgroup/memory/memory.limit_in_bytes",
                               root / "sys/fs/cgroup/memory/memory.usage_in_bytes")]
    known = [value for value in candidates if value is not None]
    if known:
        return min(known)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    return None


def _cgroup_room(limit_path: Path, usage_path: Path) -> int | None:
    """limit − usage of a cgroup, or None when it has no limit ("max", or v1's near-2⁶³ "unlimited")."""
    try:
        limit, usage = limit_path.read_text().strip(), int(usage_path.read_text().strip())
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        return max(0, int(limit) - usage)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def fitting_batch_size(batch_size: int, per_point: int, available: int | None) -> int:
    """batch_size, or the largest batch (at least 1) whose capture fits in CAPTURE_SHARE of `available`."""
    if available is None or per_point <= 0:
        return batch_size
    return max(1, min(batch_size, int(CAPTURE_SHARE * available) // per_point))
