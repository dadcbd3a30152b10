"""Sequential reconstruction: re-fit each layer on the inputs it really receives in the pruned model.

One-pass least squares (pfp_onnx.refit) fits every consuming layer as if the layers before it were intact,
so the errors of a deep network add up. Here a layer L is re-fitted to reproduce the original's
pre-activation y = W x + b0 from the activations x' of the pruned, already re-fitted prefix (channel
pruning by reconstruction, He et al. 2017; ThiNet):

    min_{A, c}  Σ_rows ‖A x' + c − y‖²  +  λ ‖A − A0‖²_F,     λ = ridge · mean(diag S),

with S the centred scatter of x'. The anchor A0 is the layer's one-pass solution as the pruned model holds
it, so the re-fit's error on the calibration data is never above one-pass least squares' (A0 is feasible
and the penalty vanishes there), and it reproduces the original exactly when nothing upstream changed.
Solving: (S + λI) Aᵀ = C + λ A0ᵀ with C = Σ (x' − μx)(y − μy)ᵀ, then c = μy − A μx. A and c are in the
node's own units (Gemm's alpha and beta folded in), so y is read straight off the original's output.

Schedule: a layer's depth is the most re-fitted layers on a path from the inputs to it. Depths are cut
into `passes` consecutive chunks; each chunk costs one streamed pass of the pruned prefix and the
original's prefix over the sensitivity points, and sees the chunks before it re-fitted sequentially and
its own layers with their one-pass weights. passes = the number of depths is fully sequential.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.data import model_feeds
from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.model import prefix, to_graph
from pfp_onnx.recover import CHUNK_BYTES, FeatureStatistics, accumulate_features, layer_features
from pfp_onnx.refit import (as_out_by_features, bias_site, from_out_by_features, kept_features, patches,
                            recoverable_layers)
from pfp_onnx.rewrite import rewrite
from pfp_onnx.runtime import Device, create_session
from pfp_onnx.select import Selection

ALL_DEPTHS = 1 << 30  # passes enough for one per depth: fully sequential
Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
Replacements = dict[tuple[str, int], np.ndarray]


@dataclass(frozen=True)
class RefitLayer:
    """A layer to re-fit, where its target is read, and how its node scales weight and bias."""

    layer: Layer
    target: str  # the original's pre-activation: the output of the layer's bias site (W x + b0)
    alpha: float  # output = alpha · (weight · x) + beta · bias (Gemm; 1 and 1 elsewhere)
    beta: float
    depth: int


class TargetMoments:
    """Running Σ(x − sx)(y − sy)ᵀ, Σx and Σy of a layer's input features x and target rows y, about fixed
    shifts (each side's first-chunk mean), formed in float32 and summed in float64, as FeatureStatistics'
    fast mode does."""

    def __init__(self, features: int, outputs: int) -> None:
        self.count = 0
        self._x_shift: np.ndarray | None = None
        self._y_shift: np.ndarray | None = None
        self._x_sum = np.zeros(features, np.float64)
        self._y_sum = np.zeros(outputs, np.float64)
        self._cross = np.zeros((features, outputs), np.float64)

    def update(self, features: np.ndarray, targets: np.ndarray) -> None:
        """Fold matching [rows, F] features and [rows, outputs] targets."""
        if features.shape[0] != targets.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows against {targets.shape[0]} target rows")
        if features.shape[0] == 0:
            return
        if self._x_shift is None:
            self._x_shift = features.mean(axis=0, dtype=np.float64).astype(np.float32)
            self._y_shift = targets.mean(axis=0, dtype=np.float64).astype(np.float32)
        x = np.subtract(features, self._x_shift, dtype=np.float32)
        y = np.subtract(targets, self._y_shift, dtype=np.float32)
        self.count += x.shape[0]
        self._x_sum += x.sum(axis=0, dtype=np.float64)
        self._y_sum += y.sum(axis=0, dtype=np.float64)
        self._cross += x.T @ y

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no calibration rows were accumulated")
        return (self._x_shift + self._x_sum / self.count, self._y_shift + self._y_sum / self.count)

    def cross_scatter(self) -> np.ndarray:
        """Σ (x − μx)(y − μy)ᵀ, [F, outputs]."""
        x_mean, y_mean = self.means()
        return self._cross - self.count * np.outer(x_mean - self._x_shift, y_mean - self._y_shift)


def refit_to_targets(scatter: np.ndarray, cross: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray,
                     anchor: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """A [outputs, F] and c [outputs] minimising Σ‖A x + c − y‖² + λ‖A − anchor‖² (module docstring)."""
    penalty = ridge * float(np.mean(np.diag(scatter))) if scatter.size else 0.0
    if ridge > 0 and penalty <= 0:  # every feature is constant: nothing to explain, stay at the anchor
        penalty = 1.0
    system = scatter.copy()
    system[np.diag_indices_from(system)] += penalty
    right = cross + penalty * anchor.T
    try:
        weights = np.linalg.solve(system, right).T
    except np.linalg.LinAlgError:  # only with ridge 0 and a singular scatter
        weights = np.linalg.lstsq(system, right, rcond=None)[0].T
    return weights, y_mean - weights @ x_mean


def refit_layers(model: onnx.ModelProto, analysis: ChannelAnalysis, selections: Mapping[int, Selection],
                 changes: Mapping[tuple[str, int], np.ndarray]) -> list[RefitLayer]:
    """The recoverable layers whose input the pruning changes, with their depth (module docstring)."""
    graph = to_graph(model)
    candidates = {layer.node: layer for layer in recoverable_layers(analysis)}
    touched = {weight_slice.node for group_id, selection in selections.items()
               if len(selection.kept) < analysis.group(group_id).width
               for weight_slice in analysis.group(group_id).slices}
    touched |= {node for node, _ in changes}
    changed: set[str] = set()
    depth: dict[str, int] = {}
    found = []
    for node in graph.nodes:  # to_graph keeps the model's topological order
        inputs = [tensor.name for tensor in node.inputs if isinstance(tensor, gs.Variable)]
        level = max((depth.get(name, 0) for name in inputs), default=0)
        layer = candidates.get(node.name)
        if layer is not None and layer.input in changed and bias_site(node) is not None:
            site, _ = bias_site(node)
            alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
            beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            found.append(RefitLayer(layer, site.outputs[0].name, alpha, beta, level))
            level += 1
        for tensor in node.outputs:
            depth[tensor.name] = level
            if node.name in touched or changed.intersection(inputs):
                changed.add(tensor.name)
    return found


def chunks(layers: list[RefitLayer], passes: int) -> list[list[RefitLayer]]:
    """Consecutive depths cut into at most `passes` chunks of about equally many layers (a depth is never
    split: its layers read tensors no other layer of it writes)."""
    if not layers:
        return []
    by_depth: dict[int, list[RefitLayer]] = {}
    for layer in layers:
        by_depth.setdefault(layer.depth, []).append(layer)
    depths = sorted(by_depth)
    count = max(1, min(passes, len(depths)))
    result: list[list[RefitLayer]] = []
    index = 0
    for chunk in range(count):
        later = count - chunk - 1  # chunks still to fill, one depth each at least
        target = sum(len(by_depth[depth]) for depth in depths[index:]) / (later + 1)
        layers_here: list[RefitLayer] = []
        while index < len(depths) - later and (
                not layers_here or len(layers_here) + len(by_depth[depths[index]]) / 2 <= target):
            layers_here.extend(by_depth[depths[index]])
            index += 1
        result.append(layers_here)
    return result


def sequential_replacements(model: onnx.ModelProto, original: onnx.ModelProto, analysis: ChannelAnalysis,
                            selections: Mapping[int, Selection], changes: Mapping[tuple[str, int], np.ndarray],
                            batches: Batches, device: Device, *, passes: int, ridge: float = 1e-3,
                            on_pass: Callable[[int, int], Callable[[int], None] | None] | None = None
                            ) -> Replacements:
    """`changes` (one-pass replacements) with every affected layer re-fitted, chunk by chunk.

    `model` is the analysed model (with the biases recovery added), `original` the user's model whose
    outputs are the targets; `batches()` streams the sensitivity points afresh for each pass. on_pass(i, n)
    may return a function told the points of each batch of pass i of n.
    """
    result: Replacements = dict(changes)
    schedule = chunks(refit_layers(model, analysis, selections, changes), passes)
    for index, chunk in enumerate(schedule):
        pruned = rewrite(model, analysis, selections, result)
        inputs = sorted({item.layer.input for item in chunk})
        targets = sorted({item.target for item in chunk})
        pruned_session = create_session(prefix(pruned, inputs), device)
        original_session = create_session(prefix(original, targets), device)
        del pruned
        weights = _current_weights(model, result, chunk, analysis, selections)
        statistics = {item.layer.node: FeatureStatistics(len(weights[item.layer.node][1]), gram=True, fast=True)
                      for item in chunk}
        moments = {item.layer.node: TargetMoments(len(weights[item.layer.node][1]),
                                                  weights[item.layer.node][0].shape[0]) for item in chunk}
        advance = on_pass(index, len(schedule)) if on_pass is not None else None
        for batch in batches():
            feeds = model_feeds(batch)
            received = dict(zip(inputs, pruned_session.run(inputs, feeds)))
            wanted = dict(zip(targets, original_session.run(targets, feeds)))
            for item in chunk:
                node = item.layer.node
                accumulate_features(statistics[node], received[item.layer.input], conv=patches(item.layer))
                _accumulate_targets(moments[node], received[item.layer.input], wanted[item.target], item.layer)
            if advance is not None:
                advance(len(next(iter(feeds.values()))))
        for item in chunk:
            node = item.layer.node
            matrix, kept, scale, bias_key, bias_shape = weights[node]
            anchor = item.alpha * matrix[:, kept] * scale
            x_mean, y_mean = moments[node].means()
            fitted, offset = refit_to_targets(statistics[node].scatter, moments[node].cross_scatter(), x_mean,
                                              y_mean, anchor, ridge)
            full = np.zeros_like(matrix)
            full[:, kept] = fitted / item.alpha / scale
            original_weight = np.asarray(_node(model, node).inputs[1].values)
            result[(node, 1)] = from_out_by_features(full, original_weight, item.layer).astype(original_weight.dtype)
            result[bias_key] = (offset / item.beta).reshape(bias_shape).astype(original_weight.dtype)
    return result


def _node(model: onnx.ModelProto, name: str) -> gs.Node:
    return next(node for node in to_graph(model).nodes if node.name == name)


def _current_weights(model: onnx.ModelProto, result: Replacements, chunk: list[RefitLayer],
                     analysis: ChannelAnalysis, selections: Mapping[int, Selection]):
    """Per layer of the chunk: its [outputs, features] matrix as the rewrite will install it, the kept
    feature indices (ascending, as the pruned input holds them), their selection scales, and where its
    bias goes (key and shape)."""
    nodes = {node.name: node for node in to_graph(model).nodes}
    weights = {}
    for item in chunk:
        node = nodes[item.layer.node]
        original = np.asarray(node.inputs[1].values)
        current = result.get((node.name, 1), original)
        kept, scale = kept_features(analysis, selections, item.layer)
        order = np.argsort(kept, kind="stable")
        site, index = bias_site(node)
        bias_shape = np.asarray(site.inputs[index].values).shape
        weights[node.name] = (as_out_by_features(np.asarray(current), item.layer), kept[order], scale[order],
                              (site.name, index), bias_shape)
    return weights


def _accumulate_targets(moments: TargetMoments, activation: np.ndarray, target: np.ndarray, layer: Layer) -> None:
    """Fold one batch: the layer's input features in chunks of about CHUNK_BYTES against its target rows."""
    if layer.conv is None:
        moments.update(layer_features(activation, conv=None), target.reshape(-1, target.shape[-1]))
        return
    rows = np.moveaxis(target, 1, -1)  # [N, *out, outputs]: rows ordered (n, position) as the features are
    per_sample = max(1, int(np.prod(rows.shape[1:-1])) * (activation.shape[1] * layer.kernel) * 4)
    step = max(1, CHUNK_BYTES // per_sample)
    for start in range(0, activation.shape[0], step):
        features = layer_features(activation[start:start + step], conv=patches(layer))
        moments.update(features, rows[start:start + step].reshape(-1, rows.shape[-1]))
