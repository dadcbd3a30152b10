"""The report's rendering: node names shortened from the left in tables (whole in JSON), and MACs that the
analysis cannot count shown as unknown, never as 0."""

from __future__ import annotations

import json

import onnx

from pfp_onnx.groups import analyse_channel_groups
from pfp_onnx.pipeline import _totals
from pfp_onnx.report import CompressReport, GroupRow, _names, render_table, write_json
from pfp_onnx.sweep import SweepRow, table_line
from test_cli import MODEL

LONG = "/model.22/cv3.2/cv3.2.0/conv/Conv"


def test_names_keep_their_distinctive_tail():
    assert _names(("/block_a/conv1/Conv",), 34) == "/block_a/conv1/Conv"
    assert _names((LONG,), 24) == "…/cv3.2.0/conv/Conv"  # whole path parts, from a separator
    assert _names(("/a/Conv", "/b/Conv", "/c/Conv"), 34) == "/a/Conv, /b/Conv +1"
    assert _names((LONG, LONG, LONG), 24) == "…/cv3.2.0/conv/Conv +2"
    assert _names(("x" * 40,), 10) == "…" + "x" * 9  # no separator: the last characters
    assert _names((), 10) == ""
    assert all(len(_names((LONG,) * count, width)) <= width for count in (1, 2, 5) for width in (12, 20, 30))


def _open_size_model() -> onnx.ModelProto:
    """The digits fixture with its height and width left open: no layer's output size is known."""
    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def _report(totals, groups=()) -> CompressReport:
    return CompressReport(model="m.onnx", budget=0.5, method="pfp/pfp/lstsq", mode="deterministic", seed=0,
                          round_to="auto", epsilon=None, device="cpu", sensitivity_points=10,
                          recommended_sensitivity_points=100, groups=groups, totals=totals, verification=None,
                          seconds={"total": 1.0})


def test_macs_are_unknown_when_a_layer_size_is_open(tmp_path):
    model = _open_size_model()
    unknown = _totals(model, model, analyse_channel_groups(model, None), {})
    assert unknown.macs_before is None and unknown.macs_after is None
    assert unknown.layer_weights_before == unknown.layer_weights_after > 0
    known = _totals(model, model, analyse_channel_groups(model, {"input": (1, 1, 8, 8)}), {})
    assert known.macs_before == known.macs_after > 0

    table = render_table(_report(unknown))
    assert "MACs / point            n/a → n/a          (   n/a kept)" in table
    write_json(_report(unknown), tmp_path / "report.json")
    totals = json.loads((tmp_path / "report.json").read_text())["totals"]
    assert totals["macs_before"] is None and totals["macs_after"] is None
    row = SweepRow("pfp/pfp/lstsq", 0.5, 0.5, 0.6, None, 0.9, 0.95, 0.1, 0.2)
    assert table_line(row).split()[3] == "n/a"


def test_table_names_are_shortened_and_json_keeps_them(tmp_path):
    group = GroupRow(group=0, producers=(LONG, LONG + "2"), consumers=(), channels_before=8, channels_after=4,
                     sensitivity_kept=0.9, frozen=())
    model = onnx.load(str(MODEL))
    totals = _totals(model, model, analyse_channel_groups(model, {"input": (1, 1, 8, 8)}), {})
    line = render_table(_report(totals, (group,))).splitlines()[3]
    assert "…/cv3.2/cv3.2.0/conv/Conv +1" in line and "8 → 4" in line
    write_json(_report(totals, (group,)), tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["groups"][0]["producers"] == [LONG, LONG + "2"]
