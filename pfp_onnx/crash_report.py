"""What a user attaches to a bug report when pfp-onnx itself fails: never a bare traceback on their screen.

The report holds the traceback, the command line, the versions, and a summary of the model's operators and
tensor shapes, but none of its weights (a model may be confidential; its structure is what reproduces a bug).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Sequence

from pfp_onnx.version import __version__

SHAPE_LINES = 40  # value infos listed in the summary; the operator counts are always complete


def versions() -> str:
    """pfp-onnx's version and those of the libraries that run its numbers."""
    found = [f"pfp-onnx {__version__}", f"Python {platform.python_version()}"]
    for module in ("onnx", "onnxruntime", "onnx_graphsurgeon", "numpy", "numba"):
        loaded = sys.modules.get(module)
        found.append(f"{module} {getattr(loaded, '__version__', 'not loaded')}")
    return ", ".join(found)


def model_summary(path: str | None) -> str:
    """Opset, producer, operator counts and the inputs', outputs' and first inferred shapes of the model at
    `path`, read without its external weights; a line saying why where it cannot be read."""
    if not path:
        return "model: none given"
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # the summary must never hide the original failure
        return f"model: {path} could not be read ({type(exc).__name__}: {exc})"
    graph = model.graph
    opsets = ", ".join(f"{entry.domain or 'ai.onnx'} {entry.version}" for entry in model.opset_import)
    operators = Counter(node.op_type for node in graph.node)
    lines = [f"model: {path}", f"producer: {model.producer_name} {model.producer_version}; opsets: {opsets}; "
             f"{len(graph.node)} nodes, {len(graph.initializer)} initializers",
             "operators: " + ", ".join(f"{op} {count}" for op, count in operators.most_common())]
    for kind, infos in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for info in list(infos)[:SHAPE_LINES]:
            lines.append(f"{kind} {info.name}: {_shape(info)}")
    return "\n".join(lines)


def write_crash_report(error: BaseException, argv: Sequence[str], model_path: str | None) -> Path:
    """Write the report to a new file in the temporary folder and return its path."""
    text = "\n\n".join([
        "pfp-onnx crash report: please attach this file to a bug report.",
        "command: " + " ".join(argv),
        "versions: " + versions() + f"; {platform.platform()}",
        model_summary(model_path),
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    ])
    handle = tempfile.NamedTemporaryFile("w", prefix="pfp-onnx-crash-", suffix=".txt", delete=False)
    with handle:
        handle.write(text + "\n")
    return Path(handle.name)


def _shape(info) -> str:
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return "shape unknown"
    dims = [str(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?")
            for dim in tensor_type.shape.dim]
    return f"[{', '.join(dims)}] (elem type {tensor_type.elem_type})"
