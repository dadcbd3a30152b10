"""Channel groups: which tensors share a channel axis and must be pruned together.

The graph is walked once in topological order. A prunable layer (Conv, ConvTranspose, Gemm, MatMul with
a constant weight) starts a group for its output channels; per-operator rules (op_rules.RULES) carry
groups through operators that keep channels independent, couple groups that meet (residual Add), and
freeze groups that reach anything the rules cannot prove safe.

A tensor's channel axis is an ordered list of groups: one group after a layer, several after a Concat.
A Split (or an Add aligning two differently composed tensors) *refines* a group: its channels are cut
into two groups at a boundary, and every slice recorded so far is cut with it. Shape-valued tensors
(a reshape target computed from Shape) are followed entry by entry (Dim): a channel count read as a
number must be proved to follow the pruned width, or its groups freeze. The result, a ChannelAnalysis,
is the one model of the graph that capture, allocation and rewrite all use.

A group can also be cut in *units* of several channels: a Reshape that splits the channel axis into
[heads, head_dim] coarsens the group so that a head — its channels in every Q, K and V projection, and the
out-projection's columns they feed — goes as a whole (docs/heads.md). The walk counts channels; the
result counts units (a group's width is its head count, each slice's block a head's entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from pfp_onnx.errors import OptionError
from pfp_onnx.model import infer_shapes, static_dims, to_graph, with_input_shapes

Shape = tuple  # of int | None
MAX_SHAPE_ENTRIES = 16  # integer constants up to this size take part in shape arithmetic
SHAPE_PASSES = 3  # walks at most: each may compute reshape targets that ONNX's inference leaves open


@dataclass(frozen=True)
class WeightSlice:
    """One constant input of one node that is cut along `axis` when its group loses channels.

    The group's channel c sits at position (offset + c) of that axis (offset > 0 after a Concat), and
    owns `block` consecutive entries there (H·W features per channel after a Flatten). Roles: "producer"
    (the filters that make the channels), "consumer" (a layer's input slice, where randomised PFP also
    applies its reweighting) and "param" (bias, BatchNorm, PRelu, depthwise filters, other constants).
    """

    node: str
    input_index: int
    axis: int
    role: str
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class SizeFix:
    """A number that counts channels (Reshape width, Split sizes, Slice bounds, Resize sizes, the group
    attribute of a depthwise conv).

    After pruning it becomes block · Σ kept channels of `groups`. It is entry `position` of constant input
    `input_index` of `node`, or, when `attribute` is set, that integer attribute of `node`.
    """

    node: str
    input_index: int
    position: int
    groups: tuple[int, ...]
    block: int = 1
    attribute: str | None = None


@dataclass(frozen=True)
class ConvGeometry:
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    kernel_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layer:
    """A prunable-layer weight tensor (Conv/ConvTranspose/Gemm/MatMul) and the groups on its two sides.

    Weights of the layer = in_units · in_block · kernel · out_units. A side with no groups keeps its full
    width whatever is pruned; a side with groups has exactly their channels, in order.
    """

    node: str
    op: str
    input: str
    weight: str
    in_groups: tuple[int, ...]
    in_units: int
    in_block: int
    out_groups: tuple[int, ...]
    out_units: int
    kernel: int  # weights per input feature and output unit: a conv's kernel elements; a head's width
    #              for a projection whose output units are attention heads
    positions: int | None  # output positions per point (conv: output pixels; dense: rows)
    conv: ConvGeometry | None = None
    weight_is_in_by_out: bool = False  # dense weight stored [in, out] (MatMul, Gemm transB=0)
    sensitivity_probe: bool = True  # False for depthwise convs: one channel per filter says nothing

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
    frozen: tuple[str, ...]
    unit: int = 1  # channels per prunable unit: a head's width where the group counts heads

    @property
    def prunable(self) -> bool:
        return not self.frozen


@dataclass(frozen=True)
class ChannelAnalysis:
    groups: tuple[ChannelGroup, ...]
    layers: tuple[Layer, ...]
    size_fixes: tuple[SizeFix, ...]
    shapes: dict[str, Shape]

    def group(self, group_id: int) -> ChannelGroup:
        return self.groups[group_id]

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(group for group in self.groups if group.prunable)

    @property
    def weights_total(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def weights_in_prunable_groups(self) -> int:
        """Weights of layers with at least one prunable side: what pruning can reach at all."""
        return self.weights_losing_outputs + self.weights_losing_inputs_only

    @property
    def weights_losing_outputs(self) -> int:
        """Weights of layers that can lose output channels (filters, neurons): the channels pruning removes."""
        prunable = {group.id for group in self.prunable_groups}
        return sum(layer.weights for layer in self.layers if prunable & set(layer.out_groups))

    @property
    def weights_losing_inputs_only(self) -> int:
        """Weights of layers whose outputs are frozen but whose inputs can lose channels: they shrink only
        with the layers before them (a classifier reading a prunable feature map, say)."""
        prunable = {group.id for group in self.prunable_groups}
        return sum(layer.weights for layer in self.layers
                   if prunable & set(layer.in_groups) and not prunable & set(layer.out_groups))

    @property
    def weights_untouched(self) -> int:
        """Weights of layers with no prunable side: whatever the budget, they stay whole."""
        return self.weights_total - self.weights_losing_outputs - self.weights_losing_inputs_only

    def group_weights(self, group_id: int) -> int:
        """The layer weights that make or read this group's channels: its filters and its input slices."""
        width = self.groups[group_id].width
        held = 0
        for layer in self.layers:
            if group_id in layer.out_groups:
                held += layer.weights // layer.out_units * width
            if group_id in layer.in_groups:
                held += layer.weights // layer.in_units * width
        return held

    def largest_frozen_groups(self) -> list[ChannelGroup]:
        """Frozen groups that hold layer weights, most weights first: where a rule would win the most."""
        held = {group.id: self.group_weights(group.id) for group in self.groups if group.frozen}
        return sorted((self.groups[group_id] for group_id, weights in held.items() if weights),
                      key=lambda group: (-held[group.id], group.id))


@dataclass(frozen=True)
class Channels:
    """How one tensor carries channels: the groups along `axis` (in order), its rank, and the block.

    With unit > 1 the axis counts runs of `unit` channels (heads of [N, heads, T, head_dim]), each owning
    `block` entries there; the channels within a run lie on other axes, which only the run's own entries
    use."""

    groups: tuple[int, ...]
    axis: int
    rank: int
    block: int = 1
    unit: int = 1


@dataclass(frozen=True)
class Dim:
    """One entry of a shape the graph computes (Shape → Slice/Gather → Concat → a Reshape's target).

    Pruning changes such an entry only where it is the size of a channel axis: `channels` names that axis
    (the entry follows the pruned width by itself, block · Σ kept). An entry copied from a constant keeps
    the constant's `source`, (node, input index, position), where a count of channels can be rewritten;
    None once the value has passed through a tensor that something else also reads.
    """

    value: int | None
    channels: Channels | None = None
    source: tuple[str, int, int] | None = None
    # (tensor, reader) for every tensor with several readers the entry passed on its way: a rewrite of the
    # source reaches them all, so it stands only if every reader asks for the same count (_check_shared)
    shared: tuple[tuple[str, str], ...] = ()


@dataclass
class _GroupState:
    width: int
    tensors: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    slices: list[WeightSlice] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    unit: int = 1  # channels pruned together: a head's width once a Reshape has split the axis into heads


@dataclass(frozen=True)
class _Fix:
    """A SizeFix as the walk records it: its block counts entries per `unit` channels of the groups."""

    fix: SizeFix
    unit: int = 1
    shared: tuple[tuple[str, str], ...] = ()


class ChannelTracer:
    """The mutable state of one walk; op rules read and extend it through these methods."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, Shape], exclude_nodes: set[str] = frozenset(),
                 exclude_ops: set[str] = frozenset()):
        self.graph = graph
        self.shapes = shapes
        self.exclude_nodes, self.exclude_ops = exclude_nodes, exclude_ops
        self.graph_outputs = {tensor.name for tensor in graph.outputs}
        self._layers: list[Layer] = []
        self._fixes: list[_Fix] = []
        self._states: dict[int, _GroupState] = {}
        self._parent: dict[int, int] = {}
        self._parts: dict[int, tuple[int, int]] = {}  # a refined group → its two halves
        self._channels: dict[str, Channels] = {}
        self._claimed: set[int] = set()
        self._dims: dict[str, tuple[Dim, ...]] = {}  # shape-valued tensors, entry by entry
        self._dims_read: set[int] = set()

    # ---- reading the graph -------------------------------------------------------------------------
    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.get(tensor.name)

    @property
    def batch(self) -> int | None:
        """Points per run as the shapes were resolved: 1 with calibration shapes, the exported batch of a
        fixed-batch model, None when the inputs' leading dims disagree or are symbolic."""
        leading = {shape[0] for tensor in self.graph.inputs if (shape := self.shape(tensor))}
        batch = leading.pop() if len(leading) == 1 else None
        return int(batch) if isinstance(batch, (int, np.integer)) and batch > 0 else None

    def learn_shape(self, tensor: gs.Tensor, shape: Shape | None) -> None:
        """Record a shape a rule computed where ONNX inference left it open (a Reshape's computed target)."""
        if shape is not None and self.shapes.get(tensor.name) is None:
            self.shapes[tensor.name] = tuple(shape)

    def channels(self, tensor: gs.Tensor) -> Channels | None:
        found = self._channels.get(tensor.name)
        if found is None:
            return None
        return replace(found, groups=self._resolve(found.groups))

    def same_channels(self, first: Channels, second: Channels) -> bool:
        """Whether two records name the same groups, in the same order, as they stand now."""
        return self._resolve(first.groups) == self._resolve(second.groups)

    def width(self, channels: Channels) -> int:
        """Channels (not units) the record's groups hold."""
        return sum(self._states[group].width for group in self._resolve(channels.groups))

    def dims(self, node: gs.Node, input_index: int) -> tuple[Dim, ...] | None:
        """The entries of a shape-valued input: a small integer constant, or what shape arithmetic computed."""
        tensor = node.inputs[input_index]
        values = self.constant(tensor)
        if values is not None:
            if values.dtype.kind not in "iu" or values.ndim > 1 or values.size > MAX_SHAPE_ENTRIES:
                return None
            return tuple(Dim(int(value), source=(node.name, input_index, position))
                         for position, value in enumerate(values.reshape(-1)))
        found = self._dims.get(tensor.name)
        if found is not None and tensor.name in self.graph_outputs:
            found = tuple(replace(dim, source=None) for dim in found)  # a rewrite would change the output
        elif found is not None and len(tensor.outputs) > 1:  # a rewrite would reach the other readers too
            found = tuple(replace(dim, shared=dim.shared + ((tensor.name, node.name),)) if dim.source else dim
                          for dim in found)
        return found

    def computed_values(self) -> dict[str, list[int]]:
        """Shape-valued tensors whose every entry the walk computed (for shape inference to use)."""
        return {name: [dim.value for dim in dims] for name, dims in self._dims.items()
                if all(dim.value is not None for dim in dims)}

    def measured_channels(self, tensor: gs.Tensor) -> list[Channels]:
        """The channel axes whose sizes a shape-valued tensor holds: they change when channels are pruned."""
        return [dim.channels for dim in self._dims.get(tensor.name, ()) if dim.channels is not None]

    def is_used(self, tensor: gs.Tensor) -> bool:
        return bool(tensor.outputs) or tensor.name in self.graph_outputs

    # ---- building groups ---------------------------------------------------------------------------
    def claim(self, *input_indices: int) -> None:
        """Mark inputs the rule has handled; unclaimed channel inputs freeze their groups."""
        self._claimed.update(input_indices)

    def read_dims(self, *input_indices: int) -> None:
        """Mark shape-valued inputs the rule has followed; any other that holds a channel count freezes it."""
        self._dims_read.update(input_indices)

    def follow_dims(self, tensor: gs.Tensor, dims: tuple[Dim, ...]) -> None:
        """Record the entries of a shape-valued output."""
        self._dims[tensor.name] = tuple(dims)

    def new_group(self, width: int, producer: str | None = None, slices: list[WeightSlice] = (),
                  frozen: str | None = None) -> int:
        group_id = len(self._parent)
        self._parent[group_id] = group_id
        self._states[group_id] = _GroupState(width=width, producers=[producer] if producer else [],
                                             slices=list(slices), frozen=[frozen] if frozen else [])
        return group_id

    def follow(self, tensor: gs.Tensor, channels: Channels) -> Channels:
        """Record that `tensor` carries these channels (as single channels where each run of a unit owns a
        whole number of entries per channel: [T, heads · head_dim] after the heads are merged back)."""
        carried = replace(channels, groups=self._resolve(channels.groups))
        if carried.unit > 1 and carried.block % carried.unit == 0:
            carried = replace(carried, block=carried.block // carried.unit, unit=1)
        self._channels[tensor.name] = carried
        for group in carried.groups:
            self._states[group].tensors.append(tensor.name)
        return carried

    def sub(self, channels: Channels, start: int, stop: int) -> Channels:
        """The channels at positions [start, stop) of a tensor, refining groups cut by the bounds."""
        self._boundary(channels, start)
        self._boundary(channels, stop)
        groups, position = [], 0
        for group in self._resolve(channels.groups):
            if start <= position < stop:
                groups.append(group)
            position += self._states[group].width
        return replace(channels, groups=tuple(groups))

    def couple(self, first: Channels, second: Channels, where: str) -> Channels:
        """Channel c of one tensor is channel c of the other: align the group boundaries, then merge. `where`
        names the node, for the reason when they cannot be coupled."""
        if first.unit != second.unit:
            self.freeze(first, f"{where} combines heads with single channels")
            self.freeze(second, f"{where} combines heads with single channels")
            return first
        if self.width(first) != self.width(second):
            self.freeze(first, f"{where} combines groups of different widths")
            self.freeze(second, f"{where} combines groups of different widths")
            return first
        # Cutting one operand can move boundaries in the other when they share groups: repeat until both
        # have the same boundaries (at most one pass per channel).
        for _ in range(self.width(first)):
            for channels in (first, second):
                for position in self._offsets(first)[1:-1] + self._offsets(second)[1:-1]:
                    self._boundary(channels, position)
            if self._offsets(first) == self._offsets(second):
                break
        ones, others = self._resolve(first.groups), self._resolve(second.groups)
        if any(group in others and others.index(group) != index for index, group in enumerate(ones)):
            # overlapping windows of one tensor (h[0:5] + h[1:6]): channel c would be channel c + 1 of itself
            self.freeze(first, f"{where} combines overlapping channel windows of one tensor")
            self.freeze(second, f"{where} combines overlapping channel windows of one tensor")
            return first
        for a, b in zip(ones, others):
            self._union(a, b)
        return replace(first, groups=self._resolve(first.groups))

    def coarsen(self, channels: Channels, factor: int, where: str) -> Channels | None:
        """Prune these channels in runs of `factor` units of the record (a Reshape splits the axis into
        [heads, head_dim]): every group's unit becomes a multiple of the run, for good. None, freezing them,
        when a group's width is not a whole number of runs."""
        unit = channels.unit * factor
        groups = self._resolve(channels.groups)
        if any(self._states[group].width % unit for group in groups):
            self.freeze(channels, f"{where} splits the channels into runs of {unit} that the groups do not align with")
            return None
        for group in groups:
            self._states[group].unit = math.lcm(self._states[group].unit, unit)
        return replace(channels, groups=groups, unit=unit)

    def add_slice(self, channels: Channels, node: gs.Node, input_index: int, axis: int, role: str) -> None:
        """Constant input `input_index` of `node` holds these channels along `axis`."""
        if channels.unit > 1:  # one entry per head: a constant per head, which nothing here cuts
            self.freeze(channels, f"{node.op} '{node.name}' reads a constant with one entry per head")
            return
        offset = 0
        for group in self._resolve(channels.groups):
            state = self._states[group]
            state.slices.append(WeightSlice(node.name, input_index, axis, role, channels.block, offset))
            if role == "consumer" and node.name not in state.consumers:
                state.consumers.append(node.name)
            offset += state.width

    def add_size_fix(self, node: gs.Node | str, input_index: int, position: int, groups: tuple[int, ...],
                     block: int = 1, attribute: str | None = None, *, unit: int = 1,
                     shared: tuple[tuple[str, str], ...] = ()) -> None:
        """The count becomes block · Σ kept runs of `unit` channels of `groups`; `shared` as in Dim."""
        name = node if isinstance(node, str) else node.name
        self._fixes.append(_Fix(SizeFix(name, input_index, position, groups, block, attribute), unit, shared))

    def add_layer(self, layer: Layer) -> None:
        self._layers.append(layer)

    def freeze(self, channels: Channels, reason: str) -> None:
        for group in self._resolve(channels.groups):
            if reason not in self._states[group].frozen:
                self._states[group].frozen.append(reason)

    def _freeze_group(self, group: int, reason: str) -> None:
        if reason not in self._states[group].frozen:
            self._states[group].frozen.append(reason)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            found = self.channels(tensor)
            if found is not None:
                self.freeze(found, reason)

    # ---- the walk ----------------------------------------------------------------------------------
    def run(self, rules: dict) -> ChannelAnalysis:
        for node in self.graph.nodes:
            self._claimed, self._dims_read = set(), set()
            rule = rules.get(node.op) if node.domain in (None, "", "ai.onnx") else None
            if rule is None:
                self.freeze_inputs(node, f"{node.op} '{node.name}' has no channel rule")
            else:
                rule(node, self)
                for index, tensor in enumerate(node.inputs):
                    found = self.channels(tensor)
                    if found is not None and index not in self._claimed:
                        self.freeze(found, f"used as input {index} of {node.op} '{node.name}'")
            for index, tensor in enumerate(node.inputs):
                for measured in self.measured_channels(tensor) if index not in self._dims_read else ():
                    self.freeze(measured, f"{node.op} '{node.name}' reads the size of the channel axis "
                                          f"(input {index}), which pfp-onnx does not follow")
            if node.name in self.exclude_nodes or node.op in self.exclude_ops:
                for tensor in list(node.inputs) + list(node.outputs):
                    self._freeze_all(tensor, f"{node.op} '{node.name}' is excluded by the user")
            # Subgraphs (If/Loop/Scan) read outer tensors implicitly, outside node.inputs.
            for subgraph in node.subgraphs(recursive=True):
                for inner in subgraph.nodes:
                    for tensor in inner.inputs:
                        self._freeze_all(tensor, f"read inside a subgraph of {node.op} '{node.name}'")
        for output in self.graph.outputs:
            self._freeze_all(output, f"reaches graph output '{output.name}'")
        return self._result()

    def _freeze_all(self, tensor: gs.Tensor, reason: str) -> None:
        """Freeze the channels a tensor carries and those whose count it holds as a value."""
        found = self.channels(tensor)
        for channels in ([found] if found is not None else []) + self.measured_channels(tensor):
            self.freeze(channels, reason)

    def _result(self) -> ChannelAnalysis:
        leaves = sorted(group for group, state in self._states.items()
                        if group not in self._parts and self._parent[group] == group)
        number = {group: index for index, group in enumerate(leaves)}

        def renumber(groups: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(number[group] for group in self._resolve(groups))

        for group in leaves:
            if not self._states[group].consumers and not self._states[group].frozen:
                self._freeze_group(group, "no prunable layer consumes these channels")
        self._check_aligned(leaves)
        self._check_shared()
        self._check_head_inputs()
        units = self._units(leaves)
        layers = tuple(self._in_units(layer, units) for layer in self._layers)
        fixes = self._in_unit_fixes(units)
        groups = []
        for group in leaves:
            state, unit = self._states[group], units[group]
            slices = (replace(piece, block=piece.block * unit, offset=piece.offset // unit) for piece in state.slices)
            groups.append(ChannelGroup(
                id=number[group], width=state.width // unit, tensors=tuple(dict.fromkeys(state.tensors)),
                producers=tuple(dict.fromkeys(state.producers)), consumers=tuple(state.consumers),
                slices=tuple(dict.fromkeys(slices)), frozen=tuple(state.frozen), unit=unit))
        layers = tuple(replace(layer, in_groups=renumber(layer.in_groups), out_groups=renumber(layer.out_groups))
                       for layer in layers)
        fixes = tuple(replace(fix, groups=renumber(fix.groups)) for fix in fixes)
        return ChannelAnalysis(groups=tuple(groups), layers=layers, size_fixes=fixes, shapes=dict(self.shapes))

    # ---- heads: from channels to units -------------------------------------------------------------
    def _check_aligned(self, leaves: list[int]) -> None:
        """A group pruned in heads must hold whole heads, and so must every slice of it (a Split or a Concat
        elsewhere may have cut one)."""
        for group in leaves:
            state = self._states[group]
            unit = state.unit
            if unit > 1 and (state.width % unit or any(piece.offset % unit for piece in state.slices)):
                self._freeze_group(group, f"its channels are cut inside a head of {unit}")

    def _check_shared(self) -> None:
        """A count rewritten through a tensor with several readers must be asked for, identically, by all of
        them: otherwise the groups it counts freeze (their fixes then write the counts as they were)."""
        asked: dict[str, list[tuple[str, _Fix]]] = {}
        for fix in self._fixes:
            for tensor, reader in fix.shared:
                asked.setdefault(tensor, []).append((reader, fix))
        tensors = self.graph.tensors()
        for name, claims in asked.items():
            readers = {node.name for node in tensors[name].outputs}
            requests = {(fix.fix.node, fix.fix.input_index, fix.fix.position, self._resolve(fix.fix.groups),
                         fix.fix.block, fix.unit) for _, fix in claims}
            if {reader for reader, _ in claims} != readers or len(requests) > 1:
                for _, fix in claims:
                    for group in self._resolve(fix.fix.groups):
                        self._freeze_group(group, f"'{name}' counts these channels for other readers too")

    def _check_head_inputs(self) -> None:
        """A projection whose outputs are heads holds a head's width per input feature and head (its kernel);
        capture and recovery count an input feature once per kernel element, so its inputs freeze."""
        for layer in self._layers:
            if any(self._states[group].unit > 1 for group in self._resolve(layer.out_groups)):
                for group in self._resolve(layer.in_groups):
                    self._freeze_group(group, f"{layer.op} '{layer.node}' makes attention heads from them")

    def _units(self, leaves: list[int]) -> dict[int, int]:
        """Each group's unit in the result: its head's width while it can be pruned, 1 once frozen (a frozen
        group is reported in channels). A layer side or a count that would mix units freezes its prunable
        groups, which may mix others: repeated until nothing more freezes."""
        while True:
            units = {group: 1 if self._states[group].frozen else self._states[group].unit for group in leaves}
            mixed = [(groups, f"{layer.op} '{layer.node}' mixes heads with single channels")
                     for layer in self._layers
                     for groups, count in ((layer.in_groups, layer.in_units), (layer.out_groups, layer.out_units))
                     if (unit := self._unit_of(groups, units, 1)) is None or count % unit]
            mixed += [(fix.fix.groups, f"'{fix.fix.node}' counts heads and single channels together")
                      for fix in self._fixes if self._fix_block(fix, units) is None]
            frozen = [(group, reason) for groups, reason in mixed for group in self._resolve(groups)
                      if not self._states[group].frozen]
            if not frozen:
                return units
            for group, reason in frozen:
                self._freeze_group(group, reason)

    def _unit_of(self, groups: tuple[int, ...], units: dict[int, int], default: int) -> int | None:
        """The one unit these groups count in (`default` for none); None when they disagree."""
        found = {units[group] for group in self._resolve(groups)} or {default}
        return found.pop() if len(found) == 1 else None

    def _fix_block(self, recorded: _Fix, units: dict[int, int]) -> int | None:
        """The count's entries per unit of its groups; None when its groups disagree or a unit is not whole
        runs of the record's (a frozen group, counted in channels, of a count recorded in heads)."""
        unit = self._unit_of(recorded.fix.groups, units, recorded.unit)
        if unit is None or recorded.fix.block * unit % recorded.unit:
            return None
        return recorded.fix.block * unit // recorded.unit

    def _in_units(self, layer: Layer, units: dict[int, int]) -> Layer:
        """The layer with its sides counted in its groups' units; a head's width per output unit goes to the
        kernel, so that the layer's weights stay in_units · in_block · kernel · out_units."""
        into, out = self._unit_of(layer.in_groups, units, 1), self._unit_of(layer.out_groups, units, 1)
        if into == out == 1:
            return layer
        return replace(layer, in_units=layer.in_units // into, in_block=layer.in_block * into,
                       out_units=layer.out_units // out, kernel=layer.kernel * out)

    def _in_unit_fixes(self, units: dict[int, int]) -> list[SizeFix]:
        """Every count with its block per unit of its groups. One left inconvertible counts only frozen
        groups (heads counted in channels): it is dropped, leaving the count as it was."""
        return [replace(recorded.fix, block=block) for recorded in self._fixes
                if (block := self._fix_block(recorded, units)) is not None]

    # ---- group algebra -----------------------------------------------------------------------------
    def _find(self, group: int) -> int:
        while self._parent[group] != group:
            self._parent[group] = self._parent[self._parent[group]]
            group = self._parent[group]
        return group

    def _resolve(self, groups: tuple[int, ...]) -> tuple[int, ...]:
        """Current leaf groups, following merges and refinements."""
        resolved: list[int] = []
        for group in groups:
            root = self._find(group)
            if root in self._parts:
                resolved.extend(self._resolve(self._parts[root]))
            else:
                resolved.append(root)
        return tuple(resolved)

    def _offsets(self, channels: Channels) -> list[int]:
        offsets = [0]
        for group in self._resolve(channels.groups):
            offsets.append(offsets[-1] + self._states[group].width)
        return offsets

    def _boundary(self, channels: Channels, position: int) -> None:
        """Make `position` of the tensor's channel axis fall between two groups."""
        start = 0
        for group in self._resolve(channels.groups):
            width = self._states[group].width
            if start < position < start + width:
                self._refine(group, position - start)
                return
            start += width

    def _refine(self, group: int, cut: int) -> None:
        """Split a group's channels [0, cut) and [cut, width) into two groups, cutting every slice too."""
        state = self._states.pop(group)
        left = self.new_group(cut)
        right = self.new_group(state.width - cut)
        for part, shift in ((left, 0), (right, cut)):
            target = self._states[part]
            target.unit = state.unit
            target.tensors = list(state.tensors)
            target.producers = list(state.producers)
            target.consumers = list(state.consumers)
            target.frozen = list(state.frozen)
            target.slices = [replace(piece, offset=piece.offset + shift) for piece in state.slices]
        self._states[group] = _GroupState(width=state.width)  # placeholder; resolution skips it
        self._parts[group] = (left, right)

    def _union(self, first: int, second: int) -> None:
        a, b = self._find(first), self._find(second)
        if a == b:
            return
        keep, gone = min(a, b), max(a, b)
        self._parent[gone] = keep
        kept_state, gone_state = self._states[keep], self._states[gone]
        for name in ("tensors", "producers", "consumers", "slices", "frozen"):
            getattr(kept_state, name).extend(getattr(gone_state, name))
        kept_state.unit = math.lcm(kept_state.unit, gone_state.unit)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Static shapes (None for unknown dims) of every value the model's shape information covers."""
    shapes: dict[str, Shape] = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = static_dims(tensor_type)
    return shapes


def analyse_channel_groups(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, *,
                           exclude_nodes: Iterable[str] = (), exclude_ops: Iterable[str] = ()) -> ChannelAnalysis:
    """Find every channel group of `model`.

    `input_shapes` (one calibration point each, batch 1) makes spatial sizes concrete where the model
    declares them dynamic; without it, whatever static shape inference yields is used. Excluded nodes
    (by name or op type) keep every channel they read or write: their groups freeze.
    """
    from pfp_onnx.op_rules import RULES

    graph = to_graph(model)
    exclude_nodes, exclude_ops = set(exclude_nodes), set(exclude_ops)
    unknown = sorted(exclude_nodes - {node.name for node in graph.nodes})
    if unknown:
        raise OptionError(f"--exclude names node(s) {', '.join(map(repr, unknown))} that the model does not have; "
                          "`pfp-onnx analyze --json` lists the node names (producers and consumers).")
    present = {node.op for node in graph.nodes}
    if exclude_ops - present:
        raise OptionError(f"--exclude-op names op type(s) {', '.join(map(repr, sorted(exclude_ops - present)))} "
                          f"that the model does not contain; it has {', '.join(sorted(present))}.")
    shaped = with_input_shapes(model, input_shapes) if input_shapes else infer_shapes(model)
    shapes = tensor_shapes(shaped)
    for _ in range(SHAPE_PASSES):
        tracer = ChannelTracer(graph, dict(shapes), exclude_nodes, exclude_ops)
        analysis = tracer.run(RULES)
        refined = _with_computed_shapes(shaped, tracer.computed_values(), shapes)
        if refined is None:
            break
        shaped, shapes = refined
    return analysis


def _with_computed_shapes(shaped: onnx.ModelProto, values: dict[str, list[int]],
                          shapes: dict[str, Shape]) -> tuple[onnx.ModelProto, dict[str, Shape]] | None:
    """Shapes inferred again with the shape values one walk computed put in as constants, where ONNX's own
    data propagation stopped (it does not divide: torch's attention reshapes to embed_dim / heads); None
    when every shape is known already, or nothing new is learnt."""
    if all(shape is not None and None not in shape for shape in shapes.values()):
        return None
    types = {info.name: info.type.tensor_type.elem_type for info in shaped.graph.value_info}
    constants = {name: np.asarray(found, dtype=onnx.helper.tensor_dtype_to_np_dtype(types.get(name, 7)))
                 .reshape(() if shapes.get(name) == () else -1)
                 for name, found in values.items() if shapes.get(name) is not None and len(shapes[name]) <= 1}
    if not constants:
        return None
    refined = onnx.ModelProto()
    refined.CopyFrom(shaped)
    del refined.graph.value_info[:]
    for node in refined.graph.node:
        for index, name in enumerate(node.input):
            if name in constants:
                node.input[index] = f"{name}__computed"
    refined.graph.initializer.extend(onnx.numpy_helper.from_array(array, f"{name}__computed")
                                     for name, array in constants.items())
    try:
        refined = infer_shapes(refined)
    except Exception:  # noqa: BLE001 - the first inference stands
        return None
    found = tensor_shapes(refined)
    learnt = {name: shape for name, shape in found.items()
              if shapes.get(name) != shape and not name.endswith("__computed")}
    return (refined, {**shapes, **learnt}) if learnt else None
