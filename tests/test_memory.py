"""The capture batch is lowered, and the user told, when it would not fit in the memory left."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import pfp_onnx
from pfp_onnx import memory, pipeline
from pfp_onnx.capture import _run_bound, consumer_probes
from pfp_onnx.sensitivity.conv_parts import parts_per_conv, with_conv_parts
from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.runtime import choose_device, create_session
from architectures import ARCHITECTURES
from test_cli import DATA, MODEL
from zoo import chain, input_shapes, random_inputs


def test_bytes_per_point_of_a_small_chain():
    """zoo.chain's prunable groups are read by conv2 (pool1, [8, 6, 6]), conv3 (leaky2, [10, 3, 3]), gemm1
    (flatten, [54]), gemm2 (relu4, [12]) and logits (relu5, [10]); conv2, whose input is a max pool of a Relu,
    may get two sign parts of its output ([10, 3, 3]), conv3, after a LeakyRelu, four ([6, 3, 3]). Without
    the model every conv is counted with four."""
    model = chain()
    analysis = analyse_channel_groups(model, input_shapes(model))
    inputs = 8 * 6 * 6 + 10 * 3 * 3 + 54 + 12 + 10
    parts = 2 * 10 * 3 * 3 + 4 * 6 * 3 * 3
    assert memory.capture_bytes_per_point(analysis, model) == 4 * (inputs + parts)
    assert memory.capture_bytes_per_point(analysis) == 4 * (inputs + 4 * 10 * 3 * 3 + 4 * 6 * 3 * 3)


def _returned_and_missing_parts(model: onnx.ModelProto, feeds: dict[str, np.ndarray], analysis) -> tuple[int, int]:
    """Bytes a point of the capture session really returns, and the parts of the convs it gave none."""
    probes = consumer_probes(onnx.ModelProto.FromString(model.SerializeToString()), analysis)
    capture_model, parts = with_conv_parts(model, [probe.layer for probe in probes])
    names = sorted({probe.layer.input for probe in probes}) + [name for pair in parts.values() for name in pair]
    session = create_session(capture_model, choose_device("cpu"), outputs=names)
    points = len(next(iter(feeds.values())))
    returned = sum(value.nbytes for value in _run_bound(session, names, feeds).values()) // points
    counts = parts_per_conv(model, [probe.layer for probe in probes])
    assert all(counts[node] == len(names) for node, names in parts.items())
    missing = sum(counts[layer.node] * 4 * layer.out_units * layer.positions
                  for layer in (probe.layer for probe in probes)
                  if layer.conv is not None and not layer.conv.transposed and layer.node not in parts)
    return returned, missing


def test_bytes_per_point_are_what_the_capture_session_returns():
    """On the digits ResNet, the estimate is what the capture session really hands back a point, plus the
    parts of the convs that do not get them (1×1 convs over few channels); without the model it is higher."""
    model = onnx.load(str(MODEL))
    arrays = dict(np.load(DATA))
    analysis = analyse_channel_groups(model, {"input": (1, *arrays["input"].shape[1:])})
    returned, missing = _returned_and_missing_parts(model, {"input": arrays["input"][:4]}, analysis)
    assert memory.capture_bytes_per_point(analysis, model) == returned + missing
    assert memory.capture_bytes_per_point(analysis) > returned + missing


@pytest.mark.parametrize("name", ["mobilenet_v2", "convtranspose_head", "unet_fpn", "densenet", "nhwc_tf2onnx",
                                  "efficientnet_mbconv"])
def test_bytes_per_point_on_other_architectures(name):
    """Depthwise convs (not captured), a ConvTranspose (captured, no parts), concatenations, an NHWC export
    and convs of signed inputs (four parts): the same account holds, and without the model the estimate is
    no lower."""
    model = ARCHITECTURES[name]()
    analysis = analyse_channel_groups(model, input_shapes(model))
    returned, missing = _returned_and_missing_parts(model, random_inputs(model, 3, seed=0), analysis)
    assert memory.capture_bytes_per_point(analysis, model) == returned + missing
    assert memory.capture_bytes_per_point(analysis) >= returned + missing


@pytest.mark.parametrize("batch, per_point, available, expected", [
    (32, 100, None, 32),          # memory unknown: as asked
    (32, 100, 10_000, 32),        # 50 would fit
    (32, 1_000, 10_000, 5),       # half of 10,000 holds 5 points
    (32, 10**9, 10_000, 1),       # not even one: one at a time
    (32, 0, 10_000, 32),
])
def test_fitting_batch_size(batch, per_point, available, expected):
    assert memory.fitting_batch_size(batch, per_point, available) == expected


def test_available_bytes_reads_the_machine():
    available = memory.available_bytes()
    assert available is None or available > 0


def _fake_root(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


@pytest.mark.parametrize("cgroup, expected", [
    ({}, 20_000_000 * 1024),                                                        # no cgroup: MemAvailable
    ({"sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "5000\n"}, 20_000_000 * 1024),
    ({"sys/fs/cgroup/memory.max": "4294967296\n", "sys/fs/cgroup/memory.current": "1073741824\n"},
     3 * 2**30),                                                                    # a v2 container limit of 4 GiB
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "10106851328\n"}, 20_000_000 * 1024),  # v1, unlimited
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "2147483648\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "3000000000\n"}, 0),         # v1, over its limit already
    ({"sys/fs/cgroup/memory.max": "oops\n", "sys/fs/cgroup/memory.current": "1\n"}, 20_000_000 * 1024),
])
def test_available_bytes_heeds_a_container_limit(tmp_path, cgroup, expected):
    """Inside a container, MemAvailable is the host's: a cgroup memory limit leaves the process less."""
    root = _fake_root(tmp_path, {"proc/meminfo": MEMINFO, **cgroup})
    assert memory.available_bytes(root) == expected


def test_available_bytes_from_a_cgroup_alone(tmp_path):
    root = _fake_root(tmp_path, {"proc/meminfo": "MemTotal: 1 kB\n", "sys/fs/cgroup/memory.max": "1000\n",
                                 "sys/fs/cgroup/memory.current": "400\n"})
    assert memory.available_bytes(root) == 600


def _with_room_for(points: int, monkeypatch) -> int:
    """Make the machine report memory for `points` capture points (CAPTURE_SHARE of it); return the
    digits model's bytes per point."""
    model = onnx.load(str(MODEL))
    arrays = dict(np.load(DATA))
    per_point = memory.capture_bytes_per_point(
        analyse_channel_groups(model, {"input": (1, *arrays["input"].shape[1:])}), model)  # as compress counts
    monkeypatch.setattr(pipeline, "available_bytes", lambda: int(points * per_point / memory.CAPTURE_SHARE))
    return per_point


def test_a_batch_that_does_not_fit_is_lowered_with_a_note(monkeypatch):
    """With room for 10 points, capture runs batches of 10 (not the 32 asked for), says so, and prunes
    exactly what compress with --batch-size 10 prunes."""
    expected = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, recovery="none", batch_size=10)
    _with_room_for(10, monkeypatch)
    events = []
    result = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, recovery="none", batch_size=32,
                               progress=lambda stage, done, total: events.append((stage, done)))
    assert any("so 32 points would take about" in note and "batches of 10 points are used instead" in note
               for note in result.notes)
    captured = [done for stage, done in events if stage == "capture"]
    assert captured[:3] == [0, 10, 20]  # the start, then every batch of 10
    assert {group: selection.kept.tolist() for group, selection in result.selections.items()} == \
        {group: selection.kept.tolist() for group, selection in expected.selections.items()}
    assert result.model.SerializeToString() == expected.model.SerializeToString()


def test_a_batch_that_fits_is_kept_without_a_note(monkeypatch):
    _with_room_for(32, monkeypatch)
    result = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, recovery="none", batch_size=32)
    assert not any("a capture batch holds" in note for note in result.notes)


def test_a_fixed_batch_that_may_not_fit_is_kept_and_said(monkeypatch):
    """A model exported with a batch of 8 can only run 8 points at once: the batch stays, with a warning."""
    model = onnx.load(str(MODEL))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 8
    _with_room_for(2, monkeypatch)
    events = []
    result = pfp_onnx.compress(model, str(DATA), budget=0.5, recovery="none",
                               progress=lambda stage, done, total: events.append((stage, done)))
    assert any("runs batches of exactly 8: it may run out of memory" in note for note in result.notes)
    assert [done for stage, done in events if stage == "capture"][:2] == [0, 8]


def test_no_capture_no_check(monkeypatch):
    """A norm baseline without recovery captures nothing, so no batch is lowered."""
    _with_room_for(1, monkeypatch)
    result = pfp_onnx.compress(str(MODEL), str(DATA), budget=0.5, criterion="l1", allocation="uniform",
                               recovery="none")
    assert not any("a capture batch holds" in note for note in result.notes)
    assert result.report.verification.points == 100
