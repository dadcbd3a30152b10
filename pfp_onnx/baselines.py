"""Data-free channel scores to compare PFP against: filter norms (Li et al. 2016; He et al. 2018) and random.

A group's channel c is made by the filters c of all its producers (a residual group has several), so its
norm is the norm of those filters taken together.
"""

from __future__ import annotations

import numpy as np
import onnx

from pfp_onnx.groups import ChannelAnalysis
from pfp_onnx.model import to_graph


def norm_scores(model: onnx.ModelProto, analysis: ChannelAnalysis, order: int) -> dict[int, np.ndarray]:
    """Per prunable group, the L1 (order 1) or L2 (order 2) norm of each channel's producer filters."""
    nodes = {node.name: node for node in to_graph(model).nodes}
    scores = {}
    for group in analysis.prunable_groups:
        total = np.zeros(group.width, dtype=np.float64)
        for piece in group.slices:
            if piece.role != "producer":
                continue
            weight = np.asarray(nodes[piece.node].inputs[piece.input_index].values, dtype=np.float64)
            rows = np.moveaxis(weight, piece.axis, 0)[piece.offset:piece.offset + group.width]
            rows = rows.reshape(group.width, -1)
            total += np.abs(rows).sum(axis=1) if order == 1 else np.square(rows).sum(axis=1)
        scores[group.id] = total if order == 1 else np.sqrt(total)
    return scores


def random_scores(analysis: ChannelAnalysis, rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {group.id: rng.random(group.width) for group in analysis.prunable_groups}
