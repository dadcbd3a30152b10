"""pfp-onnx: Provable Filter Pruning (Liebenwein et al., ICLR 2020) for ONNX models.

    result = pfp_onnx.compress("model.onnx", "calib.npz", budget=0.4)
    onnx.save(result.model, "model.pruned.onnx"); print(result.report.totals)

The pipeline's names load on first use (PEP 562): importing the package, or the command line's --help,
does not pay for onnx, onnxruntime and numba.
"""

from __future__ import annotations

import importlib

from pfp_onnx.version import __version__
from pfp_onnx.errors import BudgetError, DataError, ModelError, OptionError, OutputError, PfpError
from pfp_onnx.sweep import sweep  # light; bound here so that the submodule pfp_onnx.sweep never shadows it

_LAZY = {name: "pfp_onnx.pipeline" for name in
         ("compress", "analyze", "evaluate", "prepare", "prune", "smallest_budgets", "Method", "CompressResult")}
_LAZY["calibration_set"] = "pfp_onnx.calibration_images"

__all__ = ["compress", "analyze", "evaluate", "sweep", "prepare", "prune", "smallest_budgets", "calibration_set",
           "Method", "CompressResult", "PfpError", "BudgetError", "DataError", "ModelError", "OptionError",
           "OutputError"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pfp_onnx' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
