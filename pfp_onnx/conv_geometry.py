"""Where a conv's taps read its input (ONNX conventions: pads are (x1_begin, x2_begin, …, x1_end, …)):
padded and output sizes, the zero-padded input, and the window of the padded input that one tap reads.
Shared by the sensitivity scorers, the grid screen and the recovery statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["padded_and_out", "tap_window", "zero_padded"]


def padded_and_out(spatial: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
                   kernel_shape: Sequence[int], strides: Sequence[int] | None = None
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Padded input and output sizes per spatial axis (stride 1 unless `strides` are given)."""
    rank = len(kernel_shape)
    strides = strides if strides is not None else (1,) * rank
    padded = tuple(int(size) + int(pads[axis]) + int(pads[axis + rank]) for axis, size in enumerate(spatial))
    return padded, tuple((size - int(dilations[axis]) * (int(kernel_shape[axis]) - 1) - 1) // int(strides[axis]) + 1
                         for axis, size in enumerate(padded))


def zero_padded(activation: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    """activation [N, C, *spatial] with its spatial axes zero-padded (a new array)."""
    rank = activation.ndim - 2
    return np.pad(activation, [(0, 0), (0, 0)] + [(int(pads[d]), int(pads[d + rank])) for d in range(rank)])


def tap_window(tap: Sequence[int], dilations: Sequence[int], strides: Sequence[int],
               out_shape: Sequence[int]) -> tuple[slice, ...]:
    """Per spatial axis of the padded input, the slice that tap (its kernel offset per axis) reads for
    every output position."""
    return tuple(slice(k * d, k * d + s * (n - 1) + 1, s) for k, d, s, n in zip(tap, dilations, strides, out_shape))
