"""Channel groups: which tensors share a channel axis and must be pruned together.

The graph is walked once in topological order. A prunable layer (Conv, Gemm, MatMul with a constant
weight) starts a group for its output channels; per-operator rules (op_rules.RULES) carry a group through
the operators that keep channels independent, couple groups that meet (residual Add), and freeze groups
that reach anything the rules cannot prove safe. The result, a ChannelAnalysis, is the one model of the
graph that capture, allocation and rewrite all use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.model import to_graph, with_input_shapes, infer_shapes

Shape = tuple  # of int | None


@dataclass(frozen=True)
class WeightSlice:
    """One constant input of one node that is cut along `axis` when its group loses channels.

    `block` consecutive entries belong to one channel (H·W features per channel after a Flatten).
    Roles: "producer" (the filters that make the channels), "consumer" (a layer's input slice, where
    randomised PFP also applies its reweighting) and "param" (bias, BatchNorm, PRelu, per-channel
    constants).
    """

    node: str
    input_index: int
    axis: int
    role: str
    block: int = 1


@dataclass(frozen=True)
class ShapeFix:
    """A Reshape whose constant target shape spells out the flattened width at `position`."""

    node: str
    position: int
    block: int


@dataclass(frozen=True)
class ConvGeometry:
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """A prunable-layer weight tensor (Conv/Gemm/MatMul) and the groups on its two sides.

    Weights of the layer = in_units · in_block · kernel · out_units. A side whose group is None keeps its
    full width whatever is pruned.
    """

    node: str
    op: str
    input: str
    weight: str
    in_group: int | None
    in_units: int
    in_block: int
    out_group: int | None
    out_units: int
    kernel: int
    positions: int | None  # output positions per point (conv: output pixels; dense: rows)
    conv: ConvGeometry | None = None
    weight_is_in_by_out: bool = False  # dense weight stored [in, out] (MatMul, Gemm transB=0)

    @property
    def weights(self) -> int:
        return self.in_units * self.in_block * self.kernel * self.out_units


@dataclass(frozen=True)
class ChannelGroup:
    id: int
    width: int
    tensors: tuple[str, ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    slices: tuple[WeightSlice, ...]
    shape_fixes: tuple[ShapeFix, ...]
    frozen: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.frozen


@dataclass(frozen=True)
class ChannelAnalysis:
    groups: tuple[ChannelGroup, ...]
    layers: tuple[Layer, ...]
    shapes: dict[str, Shape]

    def group(self, group_id: int) -> ChannelGroup:
        return self._by_id[group_id]

    @property
    def _by_id(self) -> dict[int, ChannelGroup]:
        return {group.id: group for group in self.groups}

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(group for group in self.groups if group.prunable)

    @property
    def weights_total(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def weights_in_prunable_groups(self) -> int:
        """Weights of layers with at least one prunable side: what pruning can reach at all."""
        prunable = {group.id for group in self.prunable_groups}
        return sum(layer.weights for layer in self.layers
                   if layer.in_group in prunable or layer.out_group in prunable)


@dataclass(frozen=True)
class Channels:
    """How one tensor carries a group's channels."""

    group: int
    axis: int
    rank: int
    block: int = 1


@dataclass
class _GroupState:
    width: int
    tensors: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    slices: list[WeightSlice] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


class ChannelTracer:
    """The mutable state of one walk; op rules read and extend it through these methods."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, Shape]):
        self.graph = graph
        self.shapes = shapes
        self.layers: list[Layer] = []
        self._states: dict[int, _GroupState] = {}
        self._parent: dict[int, int] = {}
        self._channels: dict[str, Channels] = {}
        self._claimed: set[int] = set()

    # ---- reading the graph -------------------------------------------------------------------------
    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    def channels(self, tensor: gs.Tensor) -> Channels | None:
        found = self._channels.get(tensor.name)
        if found is None:
            return None
        return Channels(self._find(found.group), found.axis, found.rank, found.block)

    def width(self, channels: Channels) -> int:
        return self._states[self._find(channels.group)].width

    # ---- building groups ---------------------------------------------------------------------------
    def claim(self, node: gs.Node, *input_indices: int) -> None:
        """Mark inputs the rule has handled; unclaimed channel inputs freeze their groups."""
        for index in input_indices:
            self._claimed.add(index)

    def start_group(self, tensor: gs.Tensor, axis: int, rank: int, width: int, producer: str,
                    slices: list[WeightSlice]) -> Channels:
        """A prunable layer's output: a new group whose filters are cut by `slices`."""
        group_id = len(self._parent)
        self._parent[group_id] = group_id
        self._states[group_id] = _GroupState(width=width, producers=[producer], slices=list(slices))
        return self.follow(tensor, Channels(group_id, axis, rank))

    def follow(self, tensor: gs.Tensor, channels: Channels) -> Channels:
        """Record that `tensor` carries the same channels (at the given axis/rank/block)."""
        root = self._find(channels.group)
        carried = Channels(root, channels.axis, channels.rank, channels.block)
        self._channels[tensor.name] = carried
        self._states[root].tensors.append(tensor.name)
        return carried

    def couple(self, first: Channels, second: Channels, reason_if_impossible: str) -> Channels:
        a, b = self._find(first.group), self._find(second.group)
        if a == b:
            return first
        if self._states[a].width != self._states[b].width:
            self.freeze(first, reason_if_impossible)
            self.freeze(second, reason_if_impossible)
            return first
        keep, gone = min(a, b), max(a, b)
        self._parent[gone] = keep
        kept_state, gone_state = self._states[keep], self._states.pop(gone)
        for name in ("tensors", "producers", "consumers", "slices", "shape_fixes", "frozen"):
            getattr(kept_state, name).extend(getattr(gone_state, name))
        return Channels(keep, first.axis, first.rank, first.block)

    def add_consumer(self, channels: Channels, node: gs.Node, weight_slice: WeightSlice) -> None:
        state = self._states[self._find(channels.group)]
        state.consumers.append(node.name)
        state.slices.append(weight_slice)

    def add_slice(self, channels: Channels, weight_slice: WeightSlice) -> None:
        self._states[self._find(channels.group)].slices.append(weight_slice)

    def add_shape_fix(self, channels: Channels, fix: ShapeFix) -> None:
        self._states[self._find(channels.group)].shape_fixes.append(fix)

    def add_layer(self, layer: Layer) -> None:
        self.layers.append(layer)

    def freeze(self, channels: Channels, reason: str) -> None:
        reasons = self._states[self._find(channels.group)].frozen
        if reason not in reasons:
            reasons.append(reason)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            found = self.channels(tensor)
            if found is not None:
                self.freeze(found, reason)

    # ---- the walk ----------------------------------------------------------------------------------
    def run(self, rules: dict) -> ChannelAnalysis:
        for node in self.graph.nodes:
            self._claimed = set()
            rule = rules.get(node.op) if node.domain in (None, "", "ai.onnx") else None
            if rule is None:
                self.freeze_inputs(node, f"{node.op} '{node.name}' has no channel rule")
                continue
            rule(node, self)
            for index, tensor in enumerate(node.inputs):
                found = self.channels(tensor)
                if found is not None and index not in self._claimed:
                    self.freeze(found, f"used as input {index} of {node.op} '{node.name}'")
        for output in self.graph.outputs:
            found = self.channels(output)
            if found is not None:
                self.freeze(found, f"reaches graph output '{output.name}'")
        return self._result()

    def _result(self) -> ChannelAnalysis:
        roots = sorted(self._states)
        renumber = {root: index for index, root in enumerate(roots)}
        groups = []
        for root in roots:
            state = self._states[root]
            frozen = list(state.frozen)
            if not state.consumers and not frozen:
                frozen.append("no prunable layer consumes these channels")
            groups.append(ChannelGroup(
                id=renumber[root], width=state.width, tensors=tuple(state.tensors),
                producers=tuple(state.producers), consumers=tuple(state.consumers),
                slices=tuple(state.slices), shape_fixes=tuple(state.shape_fixes), frozen=tuple(frozen)))

        def remap(group_id: int | None) -> int | None:
            return None if group_id is None else renumber[self._find(group_id)]

        layers = tuple(
            Layer(**{**layer.__dict__, "in_group": remap(layer.in_group), "out_group": remap(layer.out_group)})
            for layer in self.layers)
        return ChannelAnalysis(groups=tuple(groups), layers=layers, shapes=dict(self.shapes))

    def _find(self, group_id: int) -> int:
        while self._parent[group_id] != group_id:
            self._parent[group_id] = self._parent[self._parent[group_id]]
            group_id = self._parent[group_id]
        return group_id


def tensor_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Static shapes (None for unknown dims) of every value the model's shape information covers."""
    shapes: dict[str, Shape] = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(dim.dim_value if dim.HasField("dim_value") else None
                                  for dim in tensor_type.shape.dim)
    return shapes


def analyse_channel_groups(model: onnx.ModelProto,
                           input_shapes: dict[str, tuple[int, ...]] | None = None) -> ChannelAnalysis:
    """Find every channel group of `model`.

    `input_shapes` (one calibration point each, batch 1) makes spatial sizes concrete where the model
    declares them dynamic; without it, whatever static shape inference yields is used.
    """
    from pfp_onnx.op_rules import RULES

    shaped = with_input_shapes(model, input_shapes) if input_shapes else infer_shapes(model)
    graph = to_graph(model)
    return ChannelTracer(graph, tensor_shapes(shaped)).run(RULES)
