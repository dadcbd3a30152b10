"""Each prunable layer's latency as a function of its kept widths, measured on the runtime that will run it.

FLOPs fall and latency need not: a width the kernels do not block well, a layer bound by memory rather than
arithmetic, a model whose time goes to the layers pruning cannot touch. So every layer with a prunable side
is cut out of the graph as a one-node model (its real attributes and input size, at the deployment's batch
and thread count) and timed at a few widths per side: the output side at full input width, the input side
at full output width. A layer's latency at (kept in, kept out) is the product of the two interpolated
curves over its full latency: exact on either axis, and for the arithmetic-bound bulk of a network,
proportional in both. Then one layer's output widths are timed one by one near its full width: the
staircase the kernels draw there (widths that are multiples of 8 or 16 running as fast as the next larger
multiple) gives the step widths snap to.

The table is cached in a file keyed by the model's layer shapes, the provider, batch, threads, onnxruntime
version and machine, so a sweep or a re-run measures once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pfp_onnx.allocate import AUTO_MULTIPLE, LayerSize
from pfp_onnx.groups import ChannelAnalysis, Layer
from pfp_onnx.latency.timing import fastest_ms, timing_session
from pfp_onnx.model import LAYER_OPS
from pfp_onnx.runtime import Device

__all__ = ["LatencyTable", "LayerCurve", "cache_folder", "measure_table"]

GRID_POINTS = 8  # widths timed per prunable side: 1/8, 2/8, …, all of it
STEP_CHOICES = (16, 8, 4, 2)  # staircase steps tried, coarsest first
STEP_WINDOW = 32  # output widths timed one by one below the full width to find the step
# A step is taken when rounding every width of the window up to it costs at most this share of what the
# channels it adds would cost at the window's average slope: the kernels run the rounded widths about as
# fast, so the widths in between buy little.
STEP_SHARE = 0.5
# The staircase can only make widths coarser than 8: one layer timed alone, small or bound by overheads,
# can look linear in its width while the whole model still runs widths of 8k on its fast kernels (a
# MobileNetV3 text-line classifier pruned at widths of 1 measured 1.18x at 37% of its MACs, against 1.53x at
# 51% with widths of 8).
MIN_STEP = AUTO_MULTIPLE
REPEATS = 5  # runs per timed width (the fastest counts)
RUN_SECONDS = 0.5  # fewer repeats for a layer whose runs take longer than this in all
CACHE_VERSION = 2


@dataclass(frozen=True)
class LayerCurve:
    """One layer's latency (ms) at the widths timed on each prunable side; the other side at full width."""

    node: str
    full_ms: float
    in_units: int
    out_units: int
    in_widths: tuple[int, ...] = ()
    in_ms: tuple[float, ...] = ()
    out_widths: tuple[int, ...] = ()
    out_ms: tuple[float, ...] = ()

    def ms(self, kept_in: int, kept_out: int) -> float:
        """The latency at these kept unit counts: the two curves, interpolated, over the full latency."""
        along_in = float(np.interp(kept_in, self.in_widths, self.in_ms)) if self.in_widths else self.full_ms
        along_out = float(np.interp(kept_out, self.out_widths, self.out_ms)) if self.out_widths else self.full_ms
        return along_in * along_out / self.full_ms if self.full_ms > 0 else 0.0


@dataclass(frozen=True)
class LatencyTable:
    """What one model costs on one provider, batch and thread count."""

    provider: str
    batch: int
    threads: int | None
    model_ms: float  # the whole model, as deployed
    curves: dict[str, LayerCurve]  # layers with a prunable side, by node name
    step: int  # the staircase step widths snap to (1: no staircase seen)
    seconds: float  # what measuring took (0 when read from the cache)
    cached: bool = False
    path: str | None = None  # the cache file, when one could be written or read
    notes: tuple[str, ...] = field(default=())

    def predictor(self, layers: Sequence[LayerSize]) -> Callable[[Mapping[str, int]], float]:
        """kept channels per group → the model's predicted latency (ms).

        The timed layers' change is taken from their curves; everything else (layers that cannot be pruned,
        activations, pooling) keeps its time. Timed alone, layers also pay for reordering their input and
        output, which a whole model does once: where their sum exceeds the model's latency, their change is
        scaled down to the model's."""
        timed = [(layer, self.curves[layer.name]) for layer in layers if layer.name in self.curves]
        full = sum(curve.full_ms for _, curve in timed)
        scale = min(1.0, self.model_ms / full) if full > 0 else 0.0

        def units(total: int, groups: tuple[tuple[str, int], ...], kept: Mapping[str, int]) -> int:
            return total - sum(width - kept.get(name, width) for name, width in groups)

        def predict(kept: Mapping[str, int]) -> float:
            now = sum(curve.ms(units(layer.in_units, layer.in_groups, kept), units(layer.out_units, layer.out_groups,
                                                                                   kept)) for layer, curve in timed)
            return self.model_ms - scale * (full - now)

        return predict

    def to_dict(self) -> dict:
        return asdict(self)


def cache_folder() -> Path:
    """$PFP_ONNX_CACHE, else $XDG_CACHE_HOME/pfp-onnx, else ~/.cache/pfp-onnx."""
    if os.environ.get("PFP_ONNX_CACHE"):
        return Path(os.environ["PFP_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pfp-onnx"


@dataclass(frozen=True)
class _Timed:
    """A layer as its one-node model needs it: the node, its weight and bias shapes, its input's shape at
    the batch timed, and the dtype."""

    layer: Layer
    node: onnx.NodeProto
    data_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    dtype: int

    def describe(self) -> list:
        attributes = sorted((attribute.name, str(helper.get_attribute_value(attribute)))
                            for attribute in self.node.attribute)
        return [self.node.op_type, attributes, self.data_shape, self.weight_shape, self.bias_shape, self.dtype]


def measure_table(model: onnx.ModelProto, analysis: ChannelAnalysis, layers: Sequence[LayerSize], device: Device, *,
                  feed: Mapping[str, np.ndarray], batch: int, fixed_batch: bool = False, threads: int | None = None,
                  cache: str | os.PathLike | None = None,
                  progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """The latency table of `model`'s prunable layers at `batch` (the whole model timed on `feed`), from the
    cache folder when it was measured before with the same shapes, provider, batch, threads and machine.

    `layers` are the allocation's layer sizes (which sides hold prunable groups); a model exported with a
    fixed batch is timed at that batch (fixed_batch). Raises ValueError when a prunable layer's input size is
    open even with the calibration data's shapes."""
    started = time.perf_counter()
    varying = {layer.name for layer in layers if layer.in_groups or layer.out_groups}
    timed = _timed_layers(model, analysis, varying, batch, fixed_batch)
    provider = device.providers[0]
    key = _cache_key(model, timed, provider, batch, threads)
    folder = Path(cache) if cache is not None else cache_folder()
    path = folder / f"latency-{key[:24]}.json"
    known = _read(path, key)
    if known is not None:
        return known
    sizes = {layer.name: layer for layer in layers}
    total = 1 + STEP_WINDOW + sum(1 + sum(len(_grid(units)) - 1 for units, groups in (
        (sizes[item.layer.node].in_units, sizes[item.layer.node].in_groups),
        (sizes[item.layer.node].out_units, sizes[item.layer.node].out_groups)) if groups) for item in timed)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)

    model_ms = fastest_ms(timing_session(model, device, threads), feed, repeats=REPEATS, seconds=4 * RUN_SECONDS)
    tick()
    curves, step_layer = {}, None
    for item in timed:
        size = sizes[item.layer.node]
        curves[item.layer.node] = _curve(item, size, device, threads, tick)
        if size.out_groups and size.out_units >= STEP_WINDOW and (
                step_layer is None or curves[item.layer.node].full_ms > curves[step_layer.layer.node].full_ms):
            step_layer = item
    done[0] = total - STEP_WINDOW  # the window is timed only where a layer is wide enough
    measured = 1 if step_layer is None else _staircase_step(step_layer, sizes[step_layer.layer.node], device,
                                                            threads, tick)
    step = max(MIN_STEP, measured)
    if progress is not None and done[0] < total:
        progress(total, total)
    table = LatencyTable(provider=provider, batch=batch, threads=threads, model_ms=model_ms, curves=curves,
                         step=step, seconds=round(time.perf_counter() - started, 3))
    return _written(table, path, key)


def _timed_layers(model: onnx.ModelProto, analysis: ChannelAnalysis, varying: set[str], batch: int,
                  fixed_batch: bool) -> list[_Timed]:
    nodes = {node.name: node for node in model.graph.node}
    constants = _constant_shapes(model)
    timed, open_sizes = [], []
    for layer in analysis.layers:
        node = nodes.get(layer.node)
        if layer.node not in varying or node is None or node.op_type not in LAYER_OPS:
            continue
        data_shape = analysis.shapes.get(layer.input)
        weight_shape = constants.get(node.input[1]) or analysis.shapes.get(node.input[1])
        has_bias = len(node.input) > 2 and node.input[2]
        bias_shape = (constants.get(node.input[2]) or analysis.shapes.get(node.input[2])) if has_bias else None
        if (data_shape is None or None in data_shape or weight_shape is None or None in weight_shape
                or (has_bias and (bias_shape is None or None in bias_shape))):
            open_sizes.append(layer.node)
            continue
        if not fixed_batch and data_shape:
            data_shape = (data_shape[0] * batch, *data_shape[1:])
        timed.append(_Timed(layer, node, tuple(data_shape), tuple(weight_shape),
                            tuple(bias_shape) if has_bias else None, _dtype(model, node.input[1])))
    if open_sizes:
        raise ValueError(f"{len(open_sizes)} prunable layer(s) have an input size the analysis leaves open "
                         f"({', '.join(open_sizes[:3])}{', …' if len(open_sizes) > 3 else ''})")
    return timed


def _curve(item: _Timed, size: LayerSize, device: Device, threads: int | None, tick) -> LayerCurve:
    full_ms = _time_widths(item, size, device, threads, size.in_units, size.out_units)
    tick()
    sides = {}
    for side, units in (("in", size.in_units), ("out", size.out_units)):
        if not (size.in_groups if side == "in" else size.out_groups):
            continue
        widths = _grid(units)
        times = []
        for width in widths:
            if width == units:
                times.append(full_ms)
                continue
            kept = (width, size.out_units) if side == "in" else (size.in_units, width)
            times.append(_time_widths(item, size, device, threads, *kept))
            tick()
        sides[f"{side}_widths"], sides[f"{side}_ms"] = tuple(widths), tuple(times)
    return LayerCurve(node=item.layer.node, full_ms=full_ms, in_units=size.in_units, out_units=size.out_units,
                      **sides)


def _grid(units: int) -> list[int]:
    return sorted({max(1, math.ceil(units * point / GRID_POINTS)) for point in range(1, GRID_POINTS + 1)})


def _staircase_step(item: _Timed, size: LayerSize, device: Device, threads: int | None, tick) -> int:
    """The coarsest step whose rounding-up costs at most STEP_TOLERANCE on the window of output widths
    below the full width of `item` (the slowest layer whose outputs can be pruned)."""
    top = size.out_units
    widths = list(range(top - STEP_WINDOW + 1, top + 1))
    times = {}
    for width in widths:
        times[width] = _time_widths(item, size, device, threads, size.in_units, width)
        tick()
    return staircase_step(times)


def staircase_step(times: Mapping[int, float]) -> int:
    """From latencies by width: the coarsest step in STEP_CHOICES whose rounding-up costs at most
    STEP_SHARE of what the channels it adds cost at the window's average slope, else 1. Where the window shows
    no slope at all (a layer bound by memory or overheads) nothing says where the steps are: 1."""
    widths = sorted(times)
    low, top = widths[0], widths[-1]
    slope = (times[top] - times[low]) / (top - low) if top > low else 0.0
    if not slope > 0:
        return 1
    for step in STEP_CHOICES:
        rounded_up = [(-(-width // step) * step, width) for width in widths if -(-width // step) * step <= top]
        added = sum(up - width for up, width in rounded_up)
        extra = sum(times[up] - times[width] for up, width in rounded_up)
        if added and extra <= STEP_SHARE * slope * added:
            return step
    return 1


def _time_widths(item: _Timed, size: LayerSize, device: Device, threads: int | None, kept_in: int,
                 kept_out: int) -> float:
    model, feed = _one_node_model(item, size, kept_in, kept_out)
    return fastest_ms(timing_session(model, device, threads), feed, repeats=REPEATS, seconds=RUN_SECONDS)


def _scaled(dim: int, kept: int, units: int) -> int:
    return max(1, dim * kept // units) if units else dim


def _one_node_model(item: _Timed, size: LayerSize, kept_in: int, kept_out: int
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The layer alone at these widths: its op and attributes, random weights and input."""
    node, op = item.node, item.node.op_type
    weight, data, bias = list(item.weight_shape), list(item.data_shape), item.bias_shape
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    out_dim = original_out = None
    if op == "Conv":
        group = int(attributes.get("group", 1))
        original_out = weight[0]
        if group > 1 and group == weight[0] == data[1]:  # depthwise: a group per kept channel
            weight[0] = data[1] = attributes["group"] = _scaled(weight[0], kept_out, size.out_units)
        else:
            weight[0] = _scaled(weight[0], kept_out, size.out_units)
            weight[1] = _scaled(weight[1], kept_in, size.in_units)
            data[1] = weight[1] * group
        out_dim = weight[0]
    elif op == "ConvTranspose":
        group = int(attributes.get("group", 1))
        original_out = weight[1] * group
        weight[0] = data[1] = _scaled(weight[0], kept_in, size.in_units)
        weight[1] = _scaled(weight[1], kept_out, size.out_units)
        out_dim = weight[1] * group
    else:  # Gemm / MatMul: [in, out], or [out, in] for Gemm with transB
        in_axis, out_axis = (1, 0) if op == "Gemm" and attributes.get("transB", 0) else (0, 1)
        original_out = weight[out_axis]
        weight[in_axis] = data[-1] = _scaled(weight[in_axis], kept_in, size.in_units)
        weight[out_axis] = out_dim = _scaled(weight[out_axis], kept_out, size.out_units)
    dtype = helper.tensor_dtype_to_np_dtype(item.dtype)
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal(weight).astype(dtype), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        bias = [*bias[:-1], out_dim] if bias and bias[-1] == original_out else list(bias)
        initializers.append(numpy_helper.from_array(rng.standard_normal(bias).astype(dtype), "b"))
        inputs.append("b")
    one = helper.make_node(op, inputs, ["y"], **attributes)
    graph = helper.make_graph([one], "layer", [helper.make_tensor_value_info("x", item.dtype, data)],
                              [helper.make_tensor_value_info("y", item.dtype, [None] * len(data))], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"x": rng.standard_normal(data).astype(dtype)}


def _constant_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {init.name: tuple(int(d) for d in init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attribute.t.dims)
    return shapes


def _dtype(model: onnx.ModelProto, name: str) -> int:
    for init in model.graph.initializer:
        if init.name == name:
            return init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return attribute.t.data_type
    return TensorProto.FLOAT


def _machine() -> str:
    """The processor, for the cache key: a table measured on one machine says nothing of another."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} x{os.cpu_count()}"


def _cache_key(model: onnx.ModelProto, timed: Sequence[_Timed], provider: str, batch: int,
               threads: int | None) -> str:
    """The model's structure (every node, its attributes, every initializer's shape: not the weights' values,
    which do not change dense kernels' speed), the timed layers, and where they run."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(f"{node.op_type}|{list(node.input)}|{list(node.output)}|".encode())
        for attribute in node.attribute:
            if attribute.type != onnx.AttributeProto.TENSOR:
                digest.update(attribute.SerializeToString())
    for init in model.graph.initializer:
        digest.update(f"{init.name}|{list(init.dims)}|{init.data_type}".encode())
    for info in model.graph.input:
        digest.update(info.SerializeToString())
    description = [CACHE_VERSION, digest.hexdigest(), [item.describe() for item in timed], provider, batch,
                   threads, ort.__version__, _machine(), GRID_POINTS, STEP_WINDOW]
    return hashlib.sha256(json.dumps(description, default=str).encode()).hexdigest()


def _read(path: Path, key: str) -> LatencyTable | None:
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") != key:
            return None
        table = stored["table"]
        curves = {name: LayerCurve(**{field_name: tuple(value) if isinstance(value, list) else value
                                      for field_name, value in curve.items()})
                  for name, curve in table.pop("curves").items()}
        table.update(curves=curves, cached=True, seconds=0.0, path=str(path), notes=tuple(table.get("notes", ())))
        return LatencyTable(**table)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _written(table: LatencyTable, path: Path, key: str) -> LatencyTable:
    """The table, saved whole or not at all; a folder that cannot be written gets a note, not an error."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "table": table.to_dict()}, indent=1))
        os.replace(partial, path)
    except OSError as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        return LatencyTable(**{**table.__dict__, "notes": (
            f"the latency table could not be cached in {path.parent} ({exc.strerror or exc}); set "
            "PFP_ONNX_CACHE or --latency-cache to a writable folder to measure it once",)})
    return LatencyTable(**{**table.__dict__, "path": str(path)})
