"""Sequential reconstruction: re-fit each layer on the inputs it really receives in the pruned model.

One-pass least squares (pfp_onnx.recovery.refit) fits every consuming layer as if the layers before it were intact,
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
from onnx import helper, numpy_helper

from pfp_onnx.data import model_feeds
from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.model import LAYER_OPS, LAYOUT_OPS, to_graph
from pfp_onnx.conv_geometry import padded_and_out, tap_window, zero_padded
from pfp_onnx.recovery.least_squares import ConvPatches, FeatureStatistics, accumulate_features, layer_features
from pfp_onnx.recovery.refit import (as_out_by_features, bias_site, from_out_by_features, kept_features, patches,
                            recoverable_layers)
from pfp_onnx.rewrite import cut_constant, rewrite
from pfp_onnx.runtime import Device, create_session
from pfp_onnx.recovery.segments import ActivationCache, backward_closure, element_types, segment
from pfp_onnx.select import Selection

# A layer re-fitted on fewer rows (points × output positions) than this many per kept feature fits the
# calibration points rather than the model: it keeps its one-pass weights (a text-line classifier's 200 → 2
# head on 240 points lost 16 points of held-out agreement to its sequential re-fit; docs/performance.md).
MIN_ROWS_PER_FEATURE = 2
# Least squares predicts E[y | x'], whose spread is R·σ(y) for a fit of correlation R: an output layer's
# scores shrink towards their mean, and a detector's sink below its confidence threshold (a real YOLOv8n at
# 1.3×: recall 59% at precision 98%). So an output layer (one whose result reaches a model output through no
# other layer) gets, per output channel, the original's mean and standard deviation on the calibration points:
# its re-fitted weights are scaled by σ(y)/σ(ŷ), never below 1 and at most this (a fit with R ≥ 0.5).
# The YOLOv8n's F1 went 73.6% → 85.8% (recall 79.6%, precision 93.1%); two real classifiers' top-1 did not
# move (docs/method.md §7). recovery "sequential-ls" leaves the least-squares fit as it is.
OUTPUT_STRETCH_LIMIT = 2.0
# An output layer whose values all become probabilities through a Sigmoid (a detector's class scores) is
# judged by those probabilities, not by its logits: the KL divergence between Bernoulli(σ(y)) and
# Bernoulli(σ(ŷ)) is ½ σ'(y)(ŷ − y)² to second order, so each output is fitted by least squares with its row
# weighted by σ'(y) (y the original's logit), plus this floor, which keeps the rows far from the
# decision (nearly every anchor of a detector, σ' ≈ 0) from drifting towards it. On the real YOLOv8n at a
# MAC budget of 0.649 (64 test pages): F1 of the original's detections 89.4% (stretched least squares) →
# 95.4%. On half the pages and points, floor 0 made false detections (precision 51%) and 0.01 gained
# nothing over the stretch (docs/method.md §7).
SCORE_WEIGHT_FLOOR = 1e-3
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
    """Running Σ x (y − sy)ᵀ, Σx and Σ(y − sy) of a layer's input features x and target rows y, with sy the
    first batch's target means: the targets are centred, so the cross moment Σ(x − μx)(y − μy)ᵀ follows
    without cancellation whatever the features' mean. Products in float32, sums in float64 (the precision
    of FeatureStatistics' fast mode). A conv's features are never unfolded: each kernel tap's window of the
    padded input is multiplied with the targets in place of its rows of the patch matrix."""

    def __init__(self, features: int, outputs: int, *, spread: bool = False) -> None:
        self.count = 0
        self._y_shift: np.ndarray | None = None
        self._x_sum = np.zeros(features, np.float64)
        self._y_sum = np.zeros(outputs, np.float64)
        self._cross = np.zeros((features, outputs), np.float64)
        self._y_square = np.zeros(outputs, np.float64) if spread else None  # for target_variance

    def _centred(self, targets: np.ndarray, axis: int) -> np.ndarray:
        """Targets less the shift along their outputs `axis` (the shift taken from the first batch)."""
        if self._y_shift is None:
            other = tuple(index for index in range(targets.ndim) if index != axis)
            self._y_shift = targets.mean(axis=other, dtype=np.float64).astype(np.float32)
        shape = [1] * targets.ndim
        shape[axis] = -1
        centred = np.subtract(targets, self._y_shift.reshape(shape), dtype=np.float32)
        other = tuple(index for index in range(targets.ndim) if index != axis)
        self._y_sum += centred.sum(axis=other, dtype=np.float64)
        if self._y_square is not None:
            self._y_square += np.square(centred, dtype=np.float32).sum(axis=other, dtype=np.float64)
        return centred

    def update(self, features: np.ndarray, targets: np.ndarray) -> None:
        """Fold matching [rows, F] features and [rows, outputs] targets (a dense layer's)."""
        if features.shape[0] != targets.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows against {targets.shape[0]} target rows")
        if features.shape[0] == 0:
            return
        centred = self._centred(targets, 1)
        features = np.asarray(features, np.float32)
        self.count += features.shape[0]
        self._x_sum += features.sum(axis=0, dtype=np.float64)
        self._cross += features.T @ centred

    def update_conv(self, activation: np.ndarray, targets: np.ndarray, conv: ConvPatches) -> None:
        """Fold a conv's input [N, C, *spatial] and its targets [N, outputs, *out]; feature c·K + k is tap k
        of channel c, as layer_features orders them."""
        strides, pads, dilations, kernel_shape = (tuple(int(v) for v in field) for field in conv)
        samples, channels = activation.shape[:2]
        _, out_shape = padded_and_out(activation.shape[2:], pads, dilations, kernel_shape, strides)
        if samples == 0 or min(out_shape, default=1) <= 0:
            return
        centred = self._centred(targets, 1).reshape(samples, targets.shape[1], -1)
        padded = zero_padded(np.asarray(activation, np.float32), pads) if any(pads) else np.asarray(
            activation, np.float32)
        taps = list(np.ndindex(*kernel_shape))
        cross = self._cross.reshape(channels, len(taps), -1)
        sums = self._x_sum.reshape(channels, len(taps))
        for index, tap in enumerate(taps):
            window = padded[(slice(None), slice(None), *tap_window(tap, dilations, strides, out_shape))]
            window = window.reshape(samples, channels, -1)  # a copy only where the window is strided
            cross[:, index, :] += np.einsum("ncp,nfp->cf", window, centred, optimize=True)
            sums[:, index] += window.sum(axis=(0, 2), dtype=np.float64)
        self.count += samples * int(np.prod(out_shape))

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no calibration rows were accumulated")
        return self._x_sum / self.count, self._y_shift + self._y_sum / self.count

    def target_variance(self) -> np.ndarray:
        """Per output, the variance of the targets over the rows (kept only with `spread`)."""
        if self._y_square is None:
            raise ValueError("target spreads were not accumulated (TargetMoments(spread=True))")
        mean = self._y_sum / self.count
        return np.maximum(self._y_square / self.count - mean * mean, 0.0)

    def cross_scatter(self) -> np.ndarray:
        """Σ (x − μx)(y − μy)ᵀ, [F, outputs]."""
        x_mean, y_mean = self.means()
        return self._cross - self.count * np.outer(x_mean, y_mean - self._y_shift)


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


def by_depth(layers: list[RefitLayer]) -> list[list[RefitLayer]]:
    """One pass per depth, shallowest first: the layers of a depth read no tensor another of them writes."""
    depths: dict[int, list[RefitLayer]] = {}
    for layer in layers:
        depths.setdefault(layer.depth, []).append(layer)
    return [depths[depth] for depth in sorted(depths)]


def sequential_replacements(model: onnx.ModelProto, original: onnx.ModelProto, analysis: ChannelAnalysis,
                            selections: Mapping[int, Selection], changes: Mapping[tuple[str, int], np.ndarray],
                            batches: Batches, device: Device, *, ridge: float = 1e-3,
                            on_start: Callable[[int], Callable[[int], None] | None] | None = None,
                            memory_limit: int | None = None, notes: list[str] | None = None,
                            points: int | None = None, match_outputs: bool = True) -> Replacements:
    """`changes` (one-pass replacements) with every affected layer re-fitted, depth after depth.

    `model` is the analysed model (with the biases recovery added), `original` the user's model whose
    outputs are the targets; `batches()` streams the sensitivity points afresh, in the same order, for each
    pass. Each pass runs only the segments of the pruned and the original model between the tensors earlier
    passes kept (pfp_onnx.recovery.segments) and what it reads. on_start(passes) may return a function told the
    points of every batch of every pass. A depth whose statistics would take more than `memory_limit` bytes
    leaves its largest layers at their one-pass weights, and says so in `notes`; so does a layer that would
    see fewer than MIN_ROWS_PER_FEATURE rows per feature over the `points` (when their number is known).
    With `match_outputs`, the output layers are given the original's spread (OUTPUT_STRETCH_LIMIT).
    """
    result: Replacements = dict(changes)
    layers = refit_layers(model, analysis, selections, changes)
    if points is not None:
        layers = [item for item in layers if points * (item.layer.positions or 1)
                  >= MIN_ROWS_PER_FEATURE * len(kept_features(analysis, selections, item.layer)[0])]
    schedule = by_depth(layers)
    if memory_limit is not None:
        schedule = _fitting(schedule, analysis, selections, memory_limit, notes if notes is not None else [])
    if not schedule:
        return result
    nodes = {node.name: node for node in to_graph(model).nodes}
    stretched = output_layers(model) if match_outputs else set()
    scored = _fitting_scores(sigmoid_scored(model) & stretched, layers, analysis, selections, memory_limit, notes)
    sides = {"pruned": (element_types(model), [[item.layer.input for item in chunk] for chunk in schedule]),
             "original": (element_types(original), [[item.target for item in chunk] for chunk in schedule])}
    # what passes from the k-th on read, per side: a kept tensor outside it is never read again
    later = {side: [backward_closure(model if side == "pruned" else original,
                                     [name for names in wanted[index:] for name in names])
                    for index in range(len(schedule) + 1)] for side, (_, wanted) in sides.items()}
    caches = {side: ActivationCache() for side in sides}
    advance = on_start(len(schedule)) if on_start is not None else None
    pruned = rewrite(model, analysis, selections, result, check=False)
    try:
        for index, chunk in enumerate(schedule):
            runners = {side: _Segment(pruned if side == "pruned" else original, caches[side], wanted[index],
                                      later[side][index + 1], types, device)
                       for side, (types, wanted) in sides.items()}
            weights = _current_weights(nodes, result, chunk, analysis, selections)
            statistics = {item.layer.node: FeatureStatistics(len(weights[item.layer.node][1]), gram=True, fast=True)
                          for item in chunk}
            moments = {item.layer.node: TargetMoments(len(weights[item.layer.node][1]),
                                                      weights[item.layer.node][0].shape[0],
                                                      spread=item.layer.node in stretched) for item in chunk}
            weighted = {item.layer.node: ScoreMoments(len(weights[item.layer.node][1]),
                                                      weights[item.layer.node][0].shape[0])
                        for item in chunk if item.layer.node in scored}
            for batch_index, batch in enumerate(batches()):
                feeds = model_feeds(batch)
                received = runners["pruned"].run(batch_index, feeds)
                wanted = runners["original"].run(batch_index, feeds)
                for item in chunk:
                    node = item.layer.node
                    if node in weighted:
                        weighted[node].update(layer_features(received[item.layer.input], conv=patches(item.layer)),
                                              _target_rows(wanted[item.target], item.layer))
                        continue
                    accumulate_features(statistics[node], received[item.layer.input], conv=patches(item.layer))
                    _accumulate_targets(moments[node], received[item.layer.input], wanted[item.target], item.layer)
                if advance is not None:
                    advance(len(next(iter(feeds.values()))))
            for side, cache in caches.items():
                cache.forget(cache.names - later[side][index + 1])
            for item in chunk:
                refitted = _refitted(item, weights[item.layer.node], statistics[item.layer.node],
                                     moments[item.layer.node], nodes[item.layer.node], ridge,
                                     item.layer.node in stretched, weighted.get(item.layer.node))
                result.update(refitted)
                _install(pruned, analysis, selections, refitted)
    finally:
        for cache in caches.values():
            cache.close()
    return result


class _Segment:
    """One pass's piece of a model: runs what the cache does not hold yet, keeps what later passes read."""

    def __init__(self, model: onnx.ModelProto, cache: ActivationCache, wanted: list[str], keep: set[str],
                 types: Mapping[str, int], device: Device) -> None:
        self.cache, self.wanted, self.keep = cache, list(dict.fromkeys(wanted)), keep
        piece, self.reads, self.outputs = segment(model, cache.names, self.wanted, keep, types)
        self.inputs = [info.name for info in piece.graph.input if info.name not in self.reads] if piece else []
        self.session = create_session(piece, device) if piece is not None else None
        self.cached = [name for name in self.wanted if name in cache.names]

    def run(self, batch: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {name: feeds[name] for name in self.wanted if name in feeds} | self.cache.read(batch, self.cached)
        if self.session is not None:
            given = {name: feeds[name] for name in self.inputs} | self.cache.read(batch, self.reads)
            computed = dict(zip(self.outputs, self.session.run(self.outputs, given)))
            self.cache.write(batch, {name: value for name, value in computed.items() if name in self.keep})
            values.update(computed)
        return values


def statistics_bytes(layer: Layer, analysis: ChannelAnalysis, selections: Mapping[int, Selection]) -> int:
    """What re-fitting one layer holds at once: its kept features' float64 Gram with the scatter and the
    solve's copies of it (four [F', F'] matrices), and the cross moments with their scatter ([F', outputs])."""
    features = len(kept_features(analysis, selections, layer)[0])
    return 8 * (4 * features * features + 2 * features * _out_width(layer))


def _out_width(layer: Layer) -> int:
    """The outputs a layer's fit solves for (a dense head's width is its units times its kernel)."""
    return layer.out_units if layer.conv is not None else layer.out_units * layer.kernel


def _fitting(schedule: list[list[RefitLayer]], analysis: ChannelAnalysis, selections: Mapping[int, Selection],
             limit: int, notes: list[str]) -> list[list[RefitLayer]]:
    """Each depth without its largest layers while its statistics exceed `limit` bytes."""
    fitting, skipped, needed = [], [], 0
    for chunk in schedule:
        sizes = {item.layer.node: statistics_bytes(item.layer, analysis, selections) for item in chunk}
        kept = sorted(chunk, key=lambda item: sizes[item.layer.node])
        while kept and sum(sizes[item.layer.node] for item in kept) > limit:
            largest = kept.pop()
            skipped.append(largest.layer.node)
            needed = max(needed, sizes[largest.layer.node])
        if kept:
            fitting.append([item for item in chunk if item in kept])
    if skipped:
        notes.append(f"{len(skipped)} layer(s) kept their one-pass least-squares weights ({', '.join(skipped[:3])}"
                     f"{', …' if len(skipped) > 3 else ''}): re-fitting them on the pruned model's activations needs "
                     f"up to {needed / 2**30:.1f} GB at once, more than the {limit / 2**30:.1f} GB it may take here")
    return fitting


def _install(pruned: onnx.ModelProto, analysis: ChannelAnalysis, selections: Mapping[int, Selection],
             updates: Replacements) -> None:
    """Put re-fitted full-shaped values into the pruned model's constants, cut as rewrite cuts them: later
    passes run the pruned model without rewriting it whole."""
    inputs = {node.name: node.input for node in pruned.graph.node}
    positions = {init.name: index for index, init in enumerate(pruned.graph.initializer)}
    for (node, index), values in updates.items():
        name = inputs[node][index]
        current = pruned.graph.initializer[positions[name]]
        values = cut_constant(analysis, selections, node, index, values)
        dtype = helper.tensor_dtype_to_np_dtype(current.data_type)
        current.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))


def _current_weights(nodes: Mapping[str, gs.Node], result: Replacements, chunk: list[RefitLayer],
                     analysis: ChannelAnalysis, selections: Mapping[int, Selection]):
    """Per layer of the chunk: its [outputs, features] matrix as the rewrite will install it, the kept
    feature indices (ascending, as the pruned input holds them), their selection scales, and where its
    bias goes (key and shape)."""
    weights = {}
    for item in chunk:
        node = nodes[item.layer.node]
        current = result.get((node.name, 1), np.asarray(node.inputs[1].values))
        kept, scale = kept_features(analysis, selections, item.layer)
        order = np.argsort(kept, kind="stable")
        site, index = bias_site(node)
        bias_shape = np.asarray(site.inputs[index].values).shape
        weights[node.name] = (as_out_by_features(np.asarray(current), item.layer), kept[order], scale[order],
                              (site.name, index), bias_shape)
    return weights


def _refitted(item: RefitLayer, weights, statistics: FeatureStatistics, moments: TargetMoments, node: gs.Node,
              ridge: float, stretch: bool, scores: ScoreMoments | None = None) -> Replacements:
    """The layer's new full-shaped weight (removed columns 0, kept ones divided by their selection scale,
    which the rewrite multiplies back) and bias, from one pass's statistics; an output layer's fitted to its
    `scores` where a Sigmoid makes its values probabilities (SCORE_WEIGHT_FLOOR), else `stretch`ed to the
    original's spread (OUTPUT_STRETCH_LIMIT)."""
    matrix, kept, scale, bias_key, bias_shape = weights
    anchor = item.alpha * matrix[:, kept] * scale
    if scores is not None:
        fitted, offset = scores.refit(anchor, ridge)
    else:
        x_mean, y_mean = moments.means()
        fitted, offset = refit_to_targets(statistics.scatter, moments.cross_scatter(), x_mean, y_mean, anchor, ridge)
        if stretch:
            fitted = fitted * output_stretch(fitted, statistics.scatter, moments)[:, None]
            offset = y_mean - fitted @ x_mean
    full = np.zeros_like(matrix)
    full[:, kept] = fitted / item.alpha / scale
    original = np.asarray(node.inputs[1].values)
    return {(node.name, 1): from_out_by_features(full, original, item.layer).astype(original.dtype),
            bias_key: (offset / item.beta).reshape(bias_shape).astype(original.dtype)}


def output_stretch(fitted: np.ndarray, scatter: np.ndarray, moments: TargetMoments) -> np.ndarray:
    """Per output of a fitted [outputs, F] map: σ(y)/σ(ŷ) on the calibration rows, within [1, OUTPUT_STRETCH_LIMIT]
    (1 where the fit is constant)."""
    fitted_variance = np.einsum("of,fg,og->o", fitted, scatter, fitted) / moments.count
    wanted = moments.target_variance()
    ratio = np.sqrt(wanted / np.where(fitted_variance > 0, fitted_variance, np.inf))
    return np.clip(np.where(fitted_variance > 0, ratio, 1.0), 1.0, OUTPUT_STRETCH_LIMIT)


def output_layers(model: onnx.ModelProto) -> set[str]:
    """The Conv, ConvTranspose, Gemm and MatMul nodes whose result reaches a model output through no other one."""
    layers = {node.name for node in model.graph.node if node.op_type in LAYER_OPS}
    reaching = {output.name for output in model.graph.output}  # tensors known to reach an output
    for node in reversed(list(model.graph.node)):  # topological order: consumers are decided first
        if node.name not in layers and any(name in reaching for name in node.output):
            reaching.update(node.input)
    return {node.name for node in model.graph.node
            if node.name in layers and any(name in reaching for name in node.output)}


def sigmoid_scored(model: onnx.ModelProto) -> set[str]:
    """The Conv, ConvTranspose, Gemm and MatMul nodes whose every value meets a Sigmoid first, with only
    layout ops (LAYOUT_OPS) between: their outputs are logits of probabilities (of an output layer, the
    model's scores; of another, a gate)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in model.graph.output}

    def squashed(name: str) -> bool:
        readers = consumers.get(name, [])
        if name in outputs or not readers:
            return False
        return all(reader.op_type == "Sigmoid" or (reader.op_type in LAYOUT_OPS and all(
            squashed(result) for result in reader.output)) for reader in readers)

    return {node.name for node in model.graph.node if node.op_type in LAYER_OPS and squashed(node.output[0])}


class ScoreMoments:
    """Per output o, the σ'(y_o)-weighted moments of a layer's input features x and target logits y
    (SCORE_WEIGHT_FLOOR): Σw, Σw·x, Σw·y, Σw·x xᵀ and Σw·x y, products in float32, sums in float64. One
    [F, F] Gram per output: only a narrow output layer (a detector's classes) is fitted this way."""

    def __init__(self, features: int, outputs: int) -> None:
        self._weight = np.zeros(outputs)
        self._x = np.zeros((outputs, features))
        self._y = np.zeros(outputs)
        self._xx = np.zeros((outputs, features, features))
        self._xy = np.zeros((outputs, features))

    def update(self, features: np.ndarray, logits: np.ndarray) -> None:
        """Fold matching [rows, F] features and [rows, outputs] target logits."""
        logits, features = np.asarray(logits, np.float32), np.asarray(features, np.float32)
        probability = 1.0 / (1.0 + np.exp(-logits))
        weight = probability * (1.0 - probability) + np.float32(SCORE_WEIGHT_FLOOR)
        self._weight += weight.sum(axis=0, dtype=np.float64)
        self._x += weight.T @ features
        self._y += (weight * logits).sum(axis=0, dtype=np.float64)
        self._xy += (weight * logits).T @ features
        for output in range(self._y.size):
            self._xx[output] += (features * weight[:, output:output + 1]).T @ features

    def refit(self, anchor: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """Each output's weighted ridge re-fit towards its row of `anchor` (refit_to_targets)."""
        fitted, offset = np.zeros(anchor.shape), np.zeros(self._y.size)
        for output in range(self._y.size):
            total = self._weight[output]
            x_mean, y_mean = self._x[output] / total, self._y[output] / total
            scatter = self._xx[output] - total * np.outer(x_mean, x_mean)
            cross = self._xy[output] - total * x_mean * y_mean
            row, bias = refit_to_targets(scatter, cross[:, None], x_mean, np.array([y_mean]),
                                         anchor[output:output + 1], ridge)
            fitted[output], offset[output] = row[0], bias[0]
        return fitted, offset


def _fitting_scores(scored: set[str], layers: list[RefitLayer], analysis: ChannelAnalysis,
                    selections: Mapping[int, Selection], limit: int | None, notes: list[str] | None) -> set[str]:
    """The scored layers whose per-output Grams (8 · outputs · F² bytes) take at most a quarter of `limit`;
    the others keep the stretched least-squares fit, with a note."""
    if limit is None:
        return scored
    fitting = set()
    for item in layers:
        if item.layer.node in scored:
            features, outputs = len(kept_features(analysis, selections, item.layer)[0]), _out_width(item.layer)
            if 8 * outputs * features * features <= limit / 4:
                fitting.add(item.layer.node)
            elif notes is not None:
                notes.append(f"{item.layer.node} is fitted by least squares on its logits, not weighted by its "
                             f"Sigmoid: {outputs} weighted Grams of {features} features would not fit in memory")
    return fitting


def _target_rows(target: np.ndarray, layer: Layer) -> np.ndarray:
    """A target pre-activation as [rows, outputs], rows ordered as layer_features orders them."""
    if layer.conv is None:
        return target.reshape(-1, target.shape[-1])
    return np.moveaxis(target, 1, -1).reshape(-1, target.shape[1])


def _accumulate_targets(moments: TargetMoments, activation: np.ndarray, target: np.ndarray, layer: Layer) -> None:
    """Fold one batch of a layer's input and its target pre-activation."""
    if layer.conv is None:
        moments.update(layer_features(activation, conv=None), _target_rows(target, layer))
    else:
        moments.update_conv(activation, target, patches(layer))
