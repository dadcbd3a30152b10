"""Fuzzing the channel analysis and the rewrite with random graphs built from the operators they support.

Any graph the analysis accepts must prune to exactly what the zero-channel oracle computes, whatever the
kept channels and scales are. The zoo checks one hand-made graph per pattern; here hypothesis wires the same
operators into random chains with branches (residual Add, Concat, Split, Slice, layout Transposes, depthwise
convs, dense heads...) so that the patterns meet in orders nobody wrote down, then prunes every prunable
group (down to a single channel, to a random subset with random scales, or not at all) and holds the result
to test_rewrite.prune_and_check. Graphs are drawn at opsets 17, 13 and 11 (axes and split sizes as inputs or
attributes, Softmax over one axis or from its axis on). One test draws every step at random; one case per kind
of step makes sure each kind is in every run. Each generated graph must itself pass the full checker and run
in onnxruntime (else the generator is wrong, not pfp-onnx). Bounded and derandomized: CI is deterministic and
fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from pfp_onnx.groups import ChannelAnalysis, analyse_channel_groups
from pfp_onnx.select import Selection
from test_rewrite import prune_and_check, run
from zoo import _GraphBuilder, input_shapes, random_inputs

OPSETS = (17, 13, 11)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEATURED = settings(FUZZ, max_examples=25)
MAX_SIDE = 16  # spatial sizes stay small: Resize and Pad grow them
INT64_MAX = np.iinfo(np.int64).max
# Every kind of step. Hypothesis leans towards the first options (and shrinks to them): structural ones first.
STEPS = ("split", "concat", "residual", "slice", "slice_negative", "slice_pair", "transpose", "conv", "depthwise",
         "squeeze_excite", "pad", "resize", "conv_transpose", "to_vector", "to_map", "reduce", "unsqueeze",
         "constant", "layer", "pool", "normalization", "activation", "softmax", "tap")
# Only ever the featured step of its own test case: a graph-output tap freezes what it taps.
FEATURED_ONLY = {"tap"}
RANDOM_STEPS = tuple(kind for kind in STEPS if kind not in FEATURED_ONLY)


@dataclass
class _State:
    """The running tensor: its name, width, and spatial size (`spatial` False: a [N, C] feature vector)."""

    name: str
    width: int
    height: int = 1
    side: int = 1  # width along W (named so as not to clash with the channel width)
    spatial: bool = True


class _Network:
    """Draws one network step by step; every choice goes through hypothesis so failures shrink."""

    def __init__(self, data: st.DataObject, seed: int):
        self.data = data
        self.b = _GraphBuilder("fuzz", seed, constant_nodes=self.flag("constant nodes"))
        self.dynamic = self.flag("dynamic H, W")  # then the analysis and the feeds take zoo.DYNAMIC_SIZE = 8
        # Older opsets spell axes and split sizes as attributes and read Softmax's axis differently.
        self.opset = self.pick(OPSETS, "opset")
        self.count = 0
        self.steps: list[str] = []
        self.shared: dict[tuple, str] = {}  # integer constants and conv weights, for reuse by later nodes
        self.zero_padded: set[str] = set()  # outputs of zero Pads (see pad)

    # ---- drawing helpers ---------------------------------------------------------------------------
    def draw(self, strategy: st.SearchStrategy, label: str):
        return self.data.draw(strategy, label=label)

    def flag(self, label: str) -> bool:
        return self.draw(st.booleans(), label)

    def pick(self, options, label: str):
        return self.draw(st.sampled_from(list(options)), label)

    def fresh(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def channels(self, label: str) -> int:
        return self.draw(st.integers(2, 8), label)

    def ints(self, name: str, values) -> str:
        """An int64 constant; now and then the same one an earlier node reads (exporters share them)."""
        key = ("ints", tuple(np.asarray(values).reshape(-1).tolist()), np.ndim(values))
        if key in self.shared and self.flag(f"share {name}"):
            return self.shared[key]
        self.shared[key] = self.b.constant(self.fresh(name), values, dtype=np.int64)
        return self.shared[key]

    def with_axes(self, op: str, data: str, axes: list[int], label: str, **attrs) -> str:
        """Squeeze, Unsqueeze or ReduceSum: axes an input from opset 13, an attribute before."""
        if self.opset < 13:
            return self.b.node(op, [data], self.fresh(label), axes=axes, **attrs)
        return self.b.node(op, [data, self.ints(f"{label}_axes", axes)], self.fresh(label), **attrs)

    def conv_weight(self, name: str, shape: tuple[int, ...]) -> str:
        """A conv weight; now and then one an earlier conv of the same shape reads too."""
        key = ("weight", shape)
        if key in self.shared and self.flag("share weight"):
            return self.shared[key]
        self.shared[key] = self.b.weight(f"{name}.weight", shape)
        return self.shared[key]

    # ---- building blocks ---------------------------------------------------------------------------
    def layer(self, state: _State, out: int) -> _State:
        """A prunable layer that keeps the spatial size: Conv (1×1 or 3×3 same-padded) or Gemm/MatMul."""
        if state.spatial:
            kernel = self.pick([1, 3], "kernel")
            name = self.fresh("conv")
            self.b.conv(name, state.name, state.width, out, kernel, bias=self.flag("conv bias"),
                        weight=self.conv_weight(name, (out, state.width, kernel, kernel)), pads=[kernel // 2] * 4)
            return _State(name, out, state.height, state.side)
        return self.dense(state, out)

    def dense(self, state: _State, out: int) -> _State:
        kind = self.pick(["gemm", "matmul", "matmul+bias"], "dense kind")
        if kind == "gemm":
            trans_b = self.pick([0, 1], "transB")
            bias_shape = self.pick([(out,), (1, out), (1,), ()], "gemm bias shape")
            name = self.b.gemm(self.fresh("gemm"), state.name, state.width, out, trans_b=trans_b,
                               bias_shape=bias_shape, alpha=self.pick([1.0, 0.5], "alpha"),
                               beta=self.pick([1.0, 2.0], "beta"))
        else:
            name = self.b.matmul(self.fresh("matmul"), state.name, state.width, out)
            if kind == "matmul+bias":
                bias = self.b.bias(self.fresh("bias"), (out,))
                inputs = [name, bias] if self.flag("bias second") else [bias, name]
                name = self.b.node("Add", inputs, self.fresh("add_bias"))
        return _State(name, out, spatial=False)

    def activation(self, state: _State) -> _State:
        """A continuous unary op; (Log)Softmax along some axis (before opset 13: over every axis from it on),
        which carries or freezes the channels."""
        ops = ["Relu", "LeakyRelu", "Sigmoid", "Clip", "Tanh", "HardSwish", "HardSigmoid", "Softplus", "Softsign",
               "Elu", "Selu", "Celu", "Erf", "Abs", "Neg", "Identity", "Dropout", "Cast", "Softmax", "LogSoftmax"]
        since = {"HardSwish": 14, "Celu": 12}
        op = self.pick([op for op in ops if since.get(op, 0) <= self.opset], "activation")
        name = self.fresh(op.lower())
        if op == "LeakyRelu":
            self.b.node(op, [state.name], name, alpha=0.1)
        elif op == "Cast":
            self.b.node(op, [state.name], name, to=onnx.TensorProto.FLOAT)
        elif op in ("Softmax", "LogSoftmax"):
            rank = 4 if state.spatial else 2
            self.b.node(op, [state.name], name, axis=self.pick([-1, 1, 0, rank - 2], "softmax axis"))
        elif op == "Clip":
            bounds = [self.b.constant(self.fresh("clip_min"), -0.5), self.b.constant(self.fresh("clip_max"), 1.0)]
            self.b.node(op, [state.name] + bounds[:self.pick([0, 1, 2], "clip bounds")], name)
        else:
            self.b.node(op, [state.name], name)
        return _State(name, state.width, state.height, state.side, state.spatial)

    def softmax(self, state: _State) -> _State:
        """(Log)Softmax along a drawn axis, of the tensor or (maps) of its NHWC transpose: before opset 13 it
        normalises every axis from its axis on, so whether the channels are among them depends on both."""
        op = self.pick(["Softmax", "LogSoftmax"], "softmax op")
        nhwc = state.spatial and self.flag("softmax over NHWC")
        name = self.b.node("Transpose", [state.name], self.fresh("to_nhwc"), perm=[0, 2, 3, 1]) if nhwc else state.name
        rank = 4 if state.spatial else 2
        name = self.b.node(op, [name], self.fresh(op.lower()), axis=self.draw(st.integers(-rank, rank - 1), "axis"))
        if nhwc:
            name = self.b.node("Transpose", [name], self.fresh("to_nchw"), perm=[0, 3, 1, 2])
        return _State(name, state.width, state.height, state.side, state.spatial)

    def rejoin(self, state: _State, left: _State, right: _State, label: str) -> _State:
        """Add two branches (widths permitting) or Concat them along the channel axis."""
        if left.width == right.width and self.flag(f"{label}: add"):
            inputs = [left.name, right.name] if self.flag(f"{label}: order") else [right.name, left.name]
            return _State(self.b.node("Add", inputs, self.fresh("add")), left.width, state.height, state.side,
                          state.spatial)
        axis = self.pick([1, -3] if state.spatial else [1, -1], f"{label}: concat axis")
        name = self.b.node("Concat", [left.name, right.name], self.fresh("concat"), axis=axis)
        return _State(name, left.width + right.width, state.height, state.side, state.spatial)

    # ---- steps on [N, C, H, W] -----------------------------------------------------------------------
    def conv(self, state: _State) -> _State:
        """Conv, 1×1 or 3×3 (dilated or not) padded to keep the size, optionally with stride 2."""
        kernel = self.pick([1, 3], "kernel")
        stride = 2 if state.height >= 4 and state.side >= 4 and self.flag("stride 2") else 1
        out = self.channels("conv width")
        padding = self.pick(["pads", "SAME_UPPER", "SAME_LOWER"] if kernel == 3 else ["pads", "VALID"], "padding")
        # onnxruntime runs no dilation with SAME padding
        dilation = 2 if kernel == 3 and padding == "pads" and self.flag("dilation 2") else 1
        attrs = {"pads": [dilation * (kernel // 2)] * 4} if padding == "pads" else {"auto_pad": padding}
        name = self.fresh("conv")
        self.b.conv(name, state.name, state.width, out, kernel, bias=self.flag("conv bias"),
                    weight=self.conv_weight(name, (out, state.width, kernel, kernel)), strides=[stride, stride],
                    dilations=[dilation, dilation], **attrs)
        size = lambda n: (n - 1) // stride + 1  # noqa: E731
        return _State(name, out, size(state.height), size(state.side))

    def conv_transpose(self, state: _State) -> _State:
        """ConvTranspose: 2×2 stride 2 (doubles the size) or 3×3 padded (keeps it); weight [C_in, C_out, k, k]."""
        double = state.height * state.side <= 16 and self.flag("upsample")
        kernel, attrs = (2, {"strides": [2, 2]}) if double else (3, {"pads": [1] * 4})
        out = self.channels("conv transpose width")
        name = self.fresh("convT")
        inputs = [state.name, self.b.weight(f"{name}.weight", (state.width, out, kernel, kernel))]
        if self.flag("conv transpose bias"):
            inputs.append(self.b.bias(f"{name}.bias", (out,)))
        self.b.node("ConvTranspose", inputs, name, kernel_shape=[kernel, kernel], **attrs)
        factor = 2 if double else 1
        return _State(name, out, state.height * factor, state.side * factor)

    def normalization(self, state: _State) -> _State:
        """BatchNormalization, InstanceNormalization (maps only) or PRelu: per-channel constants on axis 1."""
        ops = ["BatchNormalization", "InstanceNormalization", "PRelu"] if state.spatial else ["BatchNormalization",
                                                                                              "PRelu"]
        op = self.pick(ops, "normalization")
        if op == "BatchNormalization":
            name = self.b.batch_norm(self.fresh("bn"), state.name, state.width)
        elif op == "InstanceNormalization":
            name = self.fresh("in")
            scale = self.b.constant(f"{name}.scale", self.b.rng.uniform(0.5, 1.5, state.width))
            shift = self.b.constant(f"{name}.shift", self.b.rng.normal(0.0, 0.3, state.width))
            # A map constant over space (a 1×1 map resized) has zero variance: ε = 1e-5 would scale float
            # rounding by 1/√ε ≈ 316 and the oracle comparison would measure noise (a long fuzz run found one);
            # 1e-2 scales it by 10 and still normalises.
            self.b.node(op, [state.name, scale, shift], name, epsilon=1e-2)
        else:
            name = self.fresh("prelu")
            shape = (state.width, 1, 1) if state.spatial else (state.width,)
            slope = self.b.constant(f"{name}.slope", self.b.rng.uniform(0.05, 0.3, shape))
            self.b.node(op, [state.name, slope], name)
        return _State(name, state.width, state.height, state.side, state.spatial)

    def pool(self, state: _State) -> _State:
        """MaxPool, AveragePool or LpPool, 2×2 with stride 2."""
        op = self.pick(["MaxPool", "AveragePool", "LpPool"], "pool")
        name = self.b.node(op, [state.name], self.fresh(op.lower()), kernel_shape=[2, 2], strides=[2, 2])
        return _State(name, state.width, state.height // 2, state.side // 2)

    def residual(self, state: _State) -> _State:
        """The tensor and a same-width layer branch (maybe normalised, activated) combined element-wise."""
        branch = self.layer(state, state.width)
        if self.flag("residual bn"):
            branch = self.normalization(branch)
        if self.flag("residual activation"):
            branch = self.activation(branch)
        op = self.pick(["Add", "Mul", "Sub", "Max", "Sum", "Mean"], "residual op")
        inputs = [state.name, branch.name] if self.flag("residual order") else [branch.name, state.name]
        if op in ("Sum", "Mean") and self.flag("three inputs"):
            inputs.append(self.pick([state.name, branch.name], "third input"))
        return _State(self.b.node(op, inputs, self.fresh("residual")), state.width, state.height, state.side,
                      state.spatial)

    def constant(self, state: _State, after: int | None = None) -> _State:
        """Mul/Add/Sub/Div by a per-channel constant or a scalar broadcast over everything (`after`: how many
        axes follow the channel axis, when not the usual)."""
        op = self.pick(["Mul", "Add", "Sub", "Div"], "constant op")
        trailing = (1,) * (after if after is not None else 2 if state.spatial else 0)
        shape = self.pick([(state.width,) + trailing, (1, state.width) + trailing, (), (1,)], "constant shape")
        gain = self.b.constant(self.fresh("gain"), self.b.rng.uniform(0.5, 2.0, shape))
        inputs = [state.name, gain] if op == "Div" or self.flag("constant second") else [gain, state.name]
        return _State(self.b.node(op, inputs, self.fresh(op.lower())), state.width, state.height, state.side,
                      state.spatial)

    def concat(self, state: _State) -> _State:
        """Concat of one or two layer branches with the tensor itself none, one or two times (DenseNet)."""
        parts = [self.layer(state, self.channels("concat branch")) for _ in range(self.pick([1, 2], "branches"))]
        parts += [state] * self.pick([0, 1, 2] if len(parts) > 1 else [1, 2], "self inputs")
        parts = [parts[index] for index in self.draw(st.permutations(range(len(parts))), "concat order")]
        axis = self.pick([1, -3] if state.spatial else [1, -1], "concat axis")
        name = self.b.node("Concat", [part.name for part in parts], self.fresh("concat"), axis=axis)
        return _State(name, sum(part.width for part in parts), state.height, state.side, state.spatial)

    def split(self, state: _State) -> _State:
        """Split along the channels into 2 or 3 parts (sizes given or implicit), a layer or nothing on each
        part, then rejoin by Add (equal widths) or Concat, in either order."""
        parts = self.pick([2, 3] if state.width >= 3 else [2], "parts")
        implicit = state.width % parts == 0 and self.flag("implicit sizes")
        if implicit:
            sizes = [state.width // parts] * parts
        else:
            cuts = sorted(self.draw(st.sets(st.integers(1, state.width - 1), min_size=parts - 1,
                                            max_size=parts - 1), "cuts"))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [state.width])]
        name = self.fresh("split")
        outputs = [f"{name}_{index}" for index in range(parts)]
        axis = self.pick([1, -3] if state.spatial else [1, -1], "split axis")
        if implicit or self.opset < 13:
            attrs = {} if implicit else {"split": sizes}
            self.b.nodes.append(onnx.helper.make_node("Split", [state.name], outputs, name=name, axis=axis, **attrs))
        else:
            self.b.nodes.append(onnx.helper.make_node("Split", [state.name, self.ints("split_sizes", sizes)], outputs,
                                                      name=name, axis=axis))
        branches = [_State(output, size, state.height, state.side, state.spatial)
                    for output, size in zip(outputs, sizes)]
        common = self.channels("rejoin width")
        for index, branch in enumerate(branches):
            choice = self.pick(["layer", "activation", "none"], f"part {index}")
            if choice == "layer":
                branches[index] = self.layer(branch, common)
            elif choice == "activation":
                branches[index] = self.activation(branch)
        order = self.draw(st.permutations(range(parts)), "rejoin order")
        if self.flag("one part unused"):
            order = order[1:]
        joined = branches[order[0]]
        for index in order[1:]:
            joined = self.rejoin(state, joined, branches[index], "rejoin")
        return joined

    def slice_(self, state: _State, negative: bool = False) -> _State:
        """Slice along the channels with constant bounds, past the end or (`negative`) counted from the end;
        sometimes also on H, sometimes beside a layer that reads the whole tensor."""
        if state.spatial and state.height >= 2 and not negative and self.flag("slice H only"):
            inputs = [state.name, self.ints("starts", [1]), self.ints("ends", [INT64_MAX]), self.ints("axes", [2])]
            return _State(self.b.node("Slice", inputs, self.fresh("slice")), state.width, state.height - 1,
                          state.side)
        width = state.width
        start = self.draw(st.integers(-width - 2, -1) if negative else st.integers(0, width - 1), "slice start")
        low = max(0, start + width) if start < 0 else start
        # negative: mostly two channels or more after the window, so that the end counts from the end as well
        stop = self.draw(st.integers(low + 1, max(low + 1, width - 2) if negative else width), "slice stop")
        if stop < width:
            end = stop - width if negative else stop
        else:
            end = self.pick([width, width + 5, INT64_MAX], "slice end")
        starts, ends = [start], [end]
        axes = [self.pick([1, -3] if state.spatial else [1, -1], "slice axis")]
        height = state.height
        if state.spatial and state.height >= 2 and not negative and self.flag("slice H too"):
            starts, ends, axes = starts + [0], ends + [-1], axes + [2]
            height -= 1
            if self.flag("axes reversed"):
                starts, ends, axes = starts[::-1], ends[::-1], axes[::-1]
        spelling = self.pick(["axes", "axes+steps", "no axes"] if axes == [1] else ["axes", "axes+steps"],
                             "slice spelling")
        if spelling == "no axes":  # the bounds then cover axes 0, 1 in order
            starts, ends = [0] + starts, [INT64_MAX] + ends
        inputs = [state.name, self.ints("starts", starts), self.ints("ends", ends)]
        if spelling != "no axes":
            inputs.append(self.ints("axes", axes))
        if spelling == "axes+steps":
            inputs.append(self.ints("steps", [1] * len(axes)))
        sliced = _State(self.b.node("Slice", inputs, self.fresh("slice")), stop - low, height, state.side,
                        state.spatial)
        if height == state.height and (negative or self.flag("whole tensor read too")):
            # a layer reading every channel beside the window keeps the channels outside it prunable
            out = self.channels("beside width")
            return self.rejoin(state, self.layer(sliced, out), self.layer(state, out), "beside")
        return sliced

    def slice_pair(self, state: _State) -> _State:
        """Two equally wide, possibly overlapping channel windows of one tensor, combined element-wise:
        channel c of one window is coupled with channel c of the other (overlaps chain channels together)."""
        if self.flag("widen first"):
            state = self.layer(state, self.draw(st.integers(5, 8), "widened"))
        width = state.width
        size = width - self.draw(st.integers(1, width - 1), "window shift")
        first, second = (self.draw(st.integers(0, width - size), f"window {index} start") for index in (1, 2))
        axis = self.pick([1, -3] if state.spatial else [1, -1], "window axis")
        windows = [self.b.node("Slice", [state.name, self.ints("starts", [start]), self.ints("ends", [start + size]),
                                         self.ints("axes", [axis])], self.fresh("window"))
                   for start in (first, second)]
        name = self.b.node(self.pick(["Add", "Mul", "Max"], "window op"), windows, self.fresh("windows"))
        return _State(name, size, state.height, state.side, state.spatial)

    def pad(self, state: _State) -> _State:
        """Pad H and W: constant (zero or 0.25), reflect or edge."""
        top, bottom, left, right = (self.draw(st.integers(0, 2), f"pad {side}") for side in "tblr")
        mode = self.pick(["constant", "reflect", "edge"], "pad mode")
        # onnxruntime fuses zero Pads (merged when in a row) into a following pool and then rejects pads ≥ its
        # kernel: a zero Pad pads by 1 at most, and never right after another
        value = mode == "constant" and (state.name in self.zero_padded or self.flag("pad value"))
        limit = {"reflect": (state.height - 1, state.side - 1),  # reflect pads stay below the padded size
                 "constant": (1, 1) if not value else (2, 2), "edge": (2, 2)}[mode]
        top, bottom = min(top, limit[0]), min(bottom, limit[0])
        left, right = min(left, limit[1]), min(right, limit[1])
        inputs = [state.name, self.ints("pads", [0, 0, top, left, 0, 0, bottom, right])]
        if value:
            inputs.append(self.b.constant(self.fresh("pad_value"), 0.25))
        name = self.b.node("Pad", inputs, self.fresh("pad"), mode=mode)
        if mode == "constant" and not value:
            self.zero_padded.add(name)
        return _State(name, state.width, state.height + top + bottom, state.side + left + right)

    def resize(self, state: _State) -> _State:
        """Resize ×2 (nearest) given scales; the channel scale is 1."""
        scales = self.b.constant(self.fresh("scales"), [1.0, 1.0, 2.0, 2.0])
        empty = self.opset >= 13 and self.flag("empty roi name")  # roi is optional from opset 13
        roi = "" if empty else self.b.constant(self.fresh("roi"), [], dtype=np.float32)
        name = self.b.node("Resize", [state.name, roi, scales], self.fresh("resize"), mode="nearest")
        return _State(name, state.width, state.height * 2, state.side * 2)

    def transpose(self, state: _State) -> _State:
        """To NHWC, an op on the last axis (per-channel constant, activation, dense layer), back to NCHW."""
        if self.flag("swap H and W"):
            name = self.b.node("Transpose", [state.name], self.fresh("swap_hw"), perm=[0, 1, 3, 2])
            return _State(name, state.width, state.side, state.height)
        name = self.b.node("Transpose", [state.name], self.fresh("to_nhwc"), perm=[0, 2, 3, 1])
        width = state.width
        inner = self.pick(["none", "activation", "constant", "matmul"], "nhwc op")
        if inner == "activation":
            name = self.activation(_State(name, width)).name
        elif inner == "constant":
            shape = self.pick([(width,), (1, 1, 1, width)], "nhwc constant shape")
            constant = self.b.constant(self.fresh("nhwc_gain"), self.b.rng.uniform(0.5, 2.0, shape))
            name = self.b.node(self.pick(["Mul", "Add"], "nhwc constant op"), [name, constant], self.fresh("nhwc"))
        elif inner == "matmul":
            out = self.channels("nhwc matmul width")
            name = self.b.matmul(self.fresh("nhwc_matmul"), name, width, out)
            width = out
        name = self.b.node("Transpose", [name], self.fresh("to_nchw"), perm=[0, 3, 1, 2])
        return _State(name, width, state.height, state.side)

    def depthwise(self, state: _State) -> _State:
        """Depthwise conv (group = C; carries the channels), or one with a channel multiplier of 2 or a
        grouped conv with group 2 (both freeze)."""
        kernel = self.pick([1, 3], "depthwise kernel")
        name = self.fresh("dwconv")
        kinds = ["depthwise", "multiplier"] + (["group 2"] if state.width % 2 == 0 else [])
        kind = self.pick(kinds, "grouping")
        group, out = {"depthwise": (state.width, state.width), "multiplier": (state.width, 2 * state.width),
                      "group 2": (2, state.width)}[kind]
        weight = self.conv_weight(name, (out, state.width // group, kernel, kernel))
        self.b.conv(name, state.name, state.width, out, kernel, bias=self.flag("depthwise bias"),
                    weight=weight, group=group, pads=[kernel // 2] * 4)
        return _State(name, out, state.height, state.side)

    def to_vector(self, state: _State) -> _State:
        """[N, F]: GlobalAveragePool then Flatten → Gemm or Squeeze(2, 3) → MatMul; or the whole map
        flattened (Flatten, Reshape [0, -1] or [-1, C·H·W]: H·W features per channel), maybe no layer yet."""
        kinds = ["gap+flatten", "gap+squeeze"] + (["flatten map"] if state.height * state.side <= 16 else [])
        kind = self.pick(kinds, "to vector")
        if kind == "flatten map":
            features = state.width * state.height * state.side
            if self.flag("flatten op"):
                flat = self.b.node("Flatten", [state.name], self.fresh("flatten"))
            else:
                target = self.ints("shape", self.pick([[0, -1], [-1, features]], "flatten target"))
                flat = self.b.node("Reshape", [state.name, target], self.fresh("reshape"))
            flat_state = _State(flat, features, spatial=False)
            return flat_state if self.flag("no layer") else self.dense(flat_state, self.channels("dense width"))
        pooled = self.b.node(self.pick(["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"], "global pool"),
                             [state.name], self.fresh("gap"))
        out = self.channels("dense width")
        if kind == "gap+flatten":
            flat = self.b.node("Flatten", [pooled], self.fresh("flatten"))
            name = self.b.gemm(self.fresh("gemm"), flat, state.width, out, trans_b=self.pick([0, 1], "transB"))
        else:
            flat = self.with_axes("Squeeze", pooled, self.pick([[2, 3], [-1, -2]], "sq"), "squeeze")
            name = self.b.matmul(self.fresh("matmul"), flat, state.width, out)
        return _State(name, out, spatial=False)

    def reduce(self, state: _State) -> _State:
        """A reduction over H and/or W: axes an attribute (before opset 18), or an input (ReduceSum from 13)."""
        op = self.pick(["ReduceMean", "ReduceMax", "ReduceL2", "ReduceSum", "ReduceL1", "ReduceLogSumExp",
                        "ReduceSumSquare"], "reduction")
        axes = self.pick([[2, 3], [2], [3], [-1], [-2, -1]], "reduce axes")
        keep = self.flag("keepdims") or sorted(a % 4 for a in axes) != [2, 3]
        if op == "ReduceSum":
            name = self.with_axes(op, state.name, axes, "sum", keepdims=int(keep))
        else:
            name = self.b.node(op, [state.name], self.fresh(op.lower()), axes=axes, keepdims=int(keep))
        if not keep:
            return _State(name, state.width, spatial=False)
        reduced = {a % 4 for a in axes}
        return _State(name, state.width, 1 if 2 in reduced else state.height, 1 if 3 in reduced else state.side)

    def squeeze_excite(self, state: _State) -> _State:
        """tensor · gate(conv(relu(conv(GlobalAveragePool(tensor))))): Mul couples [N, C, H, W], [N, C, 1, 1]."""
        gate = self.b.node("GlobalAveragePool", [state.name], self.fresh("se_gap"))
        hidden = self.channels("se hidden")
        gate = self.b.conv(self.fresh("se_squeeze"), gate, state.width, hidden, 1)
        gate = self.b.node("Relu", [gate], self.fresh("se_relu"))
        gate = self.b.conv(self.fresh("se_excite"), gate, hidden, state.width, 1)
        gate = self.b.node(self.pick(["Sigmoid", "HardSigmoid"], "se gate"), [gate], self.fresh("se_gate"))
        inputs = [state.name, gate] if self.flag("se order") else [gate, state.name]
        return _State(self.b.node("Mul", inputs, self.fresh("se_mul")), state.width, state.height, state.side)

    def unsqueeze(self, state: _State) -> _State:
        """Unsqueeze a size-1 axis in, maybe a per-channel op at that rank, Squeeze it out again."""
        rank = 4 if state.spatial else 2
        axis = self.pick([0, 2, rank, -1], "unsqueeze axis")
        name = self.with_axes("Unsqueeze", state.name, [axis], "unsq")
        if self.flag("op at the higher rank"):
            after = rank - 1 if axis % (rank + 1) > 1 else rank - 2
            name = self.constant(_State(name, state.width, state.height, state.side, state.spatial), after).name
        name = self.with_axes("Squeeze", name, [axis], "squeeze")
        return _State(name, state.width, state.height, state.side, state.spatial)

    def tap(self, state: _State) -> _State:
        """The running tensor also becomes a graph output (its channels must freeze)."""
        spatial = [None, None] if self.dynamic else [state.height, state.side]
        self.b.output(state.name, ["N", state.width] + (spatial if state.spatial else []))
        return state

    # ---- steps on [N, F] -----------------------------------------------------------------------------
    def to_map(self, state: _State) -> _State:
        """Back to [N, F, 1, 1]: Unsqueeze(2, 3) or Reshape [0|-1, F|-1, 1, 1]."""
        if self.flag("unsqueeze"):
            name = self.with_axes("Unsqueeze", state.name, [2, 3], "unsq")
        else:
            target = self.pick([[0, state.width, 1, 1], [-1, state.width, 1, 1], [0, -1, 1, 1]], "reshape target")
            name = self.b.node("Reshape", [state.name, self.ints("shape", target)], self.fresh("reshape"))
        return _State(name, state.width, 1, 1)

    # ---- the whole network ---------------------------------------------------------------------------
    def options(self, state: _State) -> dict[str, Callable[[_State], _State]]:
        """The steps that fit the running tensor."""
        options = {"layer": lambda s: self.layer(s, self.channels("layer width")), "activation": self.activation,
                   "residual": self.residual, "constant": self.constant, "concat": self.concat, "slice": self.slice_,
                   "slice_negative": lambda s: self.slice_(s, negative=True), "unsqueeze": self.unsqueeze,
                   "tap": self.tap, "normalization": self.normalization, "softmax": self.softmax}
        if state.spatial:
            options.update(conv=self.conv, conv_transpose=self.conv_transpose,
                           transpose=self.transpose, depthwise=self.depthwise, to_vector=self.to_vector,
                           reduce=self.reduce, squeeze_excite=self.squeeze_excite)
            if state.height >= 2 and state.side >= 2:
                options["pool"] = self.pool
            if state.height * state.side <= 16:
                options["resize"] = self.resize
            if state.height + 4 <= MAX_SIDE and state.side + 4 <= MAX_SIDE:
                options["pad"] = self.pad
        else:
            options["to_map"] = self.to_map
        if state.width >= 2:
            options.update(split=self.split, slice_pair=self.slice_pair)
        return options

    def bridge(self, state: _State, kind: str) -> str:
        """The step that brings the running tensor closer to one where `kind` fits."""
        if kind == "to_map":
            return "to_vector"
        if not state.spatial:
            return "to_map" if kind not in ("split", "slice_pair") else "layer"
        if kind == "pool":
            return "resize"
        return "pool" if kind in ("resize", "pad") else "layer"

    def step(self, state: _State, kind: str | None = None) -> _State:
        """One step of the given kind, or of a drawn one among those that fit."""
        options = self.options(state)
        if kind is None:
            kind = self.pick([kind for kind in RANDOM_STEPS if kind in options], "step")
        self.steps.append(kind)
        return options[kind](state)

    def head(self, state: _State) -> None:
        """GlobalAveragePool → Flatten, a Flatten of the whole map, or nothing (features): Gemm to 3 classes."""
        if state.spatial:
            kind = self.pick(["gap", "flatten"] if state.height * state.side <= 16 else ["gap"], "head")
            name = state.name
            features = state.width
            if kind == "gap":
                name = self.b.node("GlobalAveragePool", [name], self.fresh("head_gap"))
            else:
                features *= state.height * state.side
            name = self.b.node("Flatten", [name], self.fresh("head_flatten"))
            state = _State(name, features, spatial=False)
        self.b.gemm("logits", state.name, state.width, 3, trans_b=self.pick([0, 1], "head transB"))
        self.b.output("logits", ["N", 3])

    def build(self, featured: str | None = None) -> onnx.ModelProto:
        """3–8 random steps after a stem conv (mostly); `featured`, if given, is among them at a drawn place."""
        state = _State(self.b.input("x", ["N", 3, "H", "W"] if self.dynamic else ["N", 3, 8, 8]), 3, 8, 8)
        if not self.flag("no stem"):  # without the stem the first step reads the untracked input
            state = self.step(state, "conv")
        count = self.draw(st.integers(3, 8), "steps")
        place = self.draw(st.integers(0, count - 1), "featured place") if featured else count
        for index in range(count):
            if index == place:
                while featured not in self.options(state):
                    state = self.step(state, self.bridge(state, featured))
                state = self.step(state, featured)
            else:
                state = self.step(state)
        self.head(state)
        return self.b.build(self.opset)


def _selections(data: st.DataObject, analysis: ChannelAnalysis) -> dict[int, Selection]:
    """Per prunable group: keep one channel, a random subset with random scales, all of them, or leave it out."""
    every_one = data.draw(st.booleans(), label="one channel everywhere")
    selections = {}
    for group in analysis.prunable_groups:
        kind = "one" if every_one else data.draw(st.sampled_from(["subset", "one", "all", "absent"]),
                                                 label=f"group {group.id}")
        if kind == "absent":
            continue
        if kind == "one":
            kept = [data.draw(st.integers(0, group.width - 1), label=f"group {group.id} channel")]
        elif kind == "all":
            kept = list(range(group.width))
        else:
            kept = sorted(data.draw(st.sets(st.integers(0, group.width - 1), min_size=1, max_size=group.width),
                                    label=f"group {group.id} channels"))
        scale = data.draw(st.lists(st.floats(0.25, 3.0, width=32), min_size=len(kept), max_size=len(kept)),
                          label=f"group {group.id} scales")
        selections[group.id] = Selection(np.array(kept, np.int64), np.array(scale, np.float32))
    return selections


def _prune_random_graph(data: st.DataObject, seed: int, featured: str | None) -> None:
    network = _Network(data, seed)
    model = network.build(featured)
    note(f"opset {network.opset}, steps: {network.steps}")
    feeds = [random_inputs(model, 3, seed), random_inputs(model, 1, seed + 1)]
    run(model, feeds[0])  # the generated graph itself must run: if not, the generator is wrong
    analysis = analyse_channel_groups(model, input_shapes(model))
    assume(analysis.prunable_groups)
    selections = _selections(data, analysis)
    prune_and_check(model, analysis, selections, feeds)


@FUZZ
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_random_graph_prunes_to_the_zeroed_oracle(data: st.DataObject, seed: int):
    _prune_random_graph(data, seed, None)


@pytest.mark.parametrize("featured", STEPS)
@FEATURED
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_random_graph_with_each_step_prunes_to_the_zeroed_oracle(featured: str, data: st.DataObject, seed: int):
    """The same with one kind of step always in the graph, so that every operator is covered in every run."""
    _prune_random_graph(data, seed, featured)
