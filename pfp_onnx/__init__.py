"""pfp-onnx: Provable Filter Pruning (Liebenwein et al., ICLR 2020) for ONNX models.

    result = pfp_onnx.compress("model.onnx", "calib.npz", budget=0.4)
    onnx.save(result.model, "model.pruned.onnx"); print(result.report.totals)
"""

from pfp_onnx.version import __version__
from pfp_onnx.errors import BudgetError, DataError, ModelError, OptionError, OutputError, PfpError
from pfp_onnx.pipeline import CompressResult, Method, analyze, compress, evaluate, prepare, prune, smallest_budgets
from pfp_onnx.sweep import sweep

__all__ = ["compress", "analyze", "evaluate", "sweep", "prepare", "prune", "smallest_budgets", "Method", "CompressResult", "PfpError", "BudgetError", "DataError", "ModelError",
           "OptionError", "OutputError"]
