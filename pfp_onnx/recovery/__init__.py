"""Training-free recovery: after channels are removed, re-fit the layers that read them (and, sequentially,
every layer after them) to reproduce the original's pre-activations on the calibration data.

    least_squares  running feature moments and the closed-form re-fits (bias compensation, ridge lstsq)
    conv_gram      a stride-1 conv's patch moments from shifted products, without unfolding
    refit          which layers are re-fitted, their weight layouts and bias sites, one-pass replacements
    sequential     the re-fit on the pruned model's own activations, depth after depth
    segments       running a model piece by piece, with what crosses between pieces kept on disk
"""

from pfp_onnx.recovery.least_squares import FeatureStatistics, accumulate_features
from pfp_onnx.recovery.refit import new_statistics, patches, recoverable_layers, replacements, with_zero_biases
from pfp_onnx.recovery.sequential import sequential_replacements

__all__ = ["FeatureStatistics", "accumulate_features", "new_statistics", "patches", "recoverable_layers",
           "replacements", "sequential_replacements", "with_zero_biases"]
