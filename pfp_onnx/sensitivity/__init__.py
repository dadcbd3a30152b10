"""PFP's sensitivity engine: every channel's largest relative contribution to any neuron, over all points.

    scorers      the per-layer running maxima that capture feeds (conv, transposed conv, dense)
    conv_parts   the capture model's sign-part convs, so onnxruntime computes z⁺ and z⁻ of most convs
    max_times    the exact max-of-products kernels and the bounds that skip most products
    grid_screen  a coarse screen over positions and filters before the exact products
    max_tiles    compiled (numba) tiles for the blocks the screens cannot thin out
"""

from pfp_onnx.sensitivity.conv_parts import CUDA_OPTIONS, with_conv_parts
from pfp_onnx.sensitivity.scorers import ConvScorer, ConvTransposeScorer, DenseScorer, UnfoldBuffer

__all__ = ["CUDA_OPTIONS", "ConvScorer", "ConvTransposeScorer", "DenseScorer", "UnfoldBuffer", "with_conv_parts"]
