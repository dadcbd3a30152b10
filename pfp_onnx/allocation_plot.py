"""The picture of an allocation, as PFP's paper draws it for VGG16: per layer in graph order, the share of
its output channels kept, beside the share of the latency (or, without a latency table, of the MACs) it
held before pruning, so that one sees where the budget went and where the time was."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pfp_onnx.errors import OptionError
from pfp_onnx.report import LayerRow

__all__ = ["plot_allocation"]


def plot_allocation(series: Sequence[tuple[str, Sequence[LayerRow]]], path: str | os.PathLike, *,
                    title: str = "") -> None:
    """One line of kept output channels per (label, layers) (a sweep's budgets; compress draws one), and bars
    of each layer's share of the original's layer latency (or weights, where nothing was timed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("Plotting needs matplotlib: pip install 'pfp-onnx[plot]', or leave out the plot "
                          "option.") from None
    layers = series[0][1]
    shares, share_label = layer_shares(layers)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) + 3), 4))
    positions = range(len(layers))
    axes.bar(positions, shares, color="0.8", label=share_label)
    for label, rows in series:
        axes.plot(positions, [100 * row.out_kept / row.out_units for row in rows], marker=".", label=label)
    axes.set_xlabel("layer (graph order)")
    axes.set_ylabel("output channels kept / share (%)")
    axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def layer_shares(layers: Sequence[LayerRow]) -> tuple[list[float], str]:
    """Each layer's share (%) of the original's timed latency, and the bars' label; a layer the table did not
    time (its channels cannot be pruned) draws no bar and is counted in the label. Without any timing, the
    shares of the layers' weights."""
    untimed = sum(row.ms_before is None for row in layers)
    if untimed < len(layers):
        costs = [row.ms_before or 0.0 for row in layers]
        label = "share of layer latency" + (f" ({untimed} layer(s) not timed)" if untimed else "")
    else:
        costs = [float(row.in_units * row.out_units) for row in layers]
        label = "share of layer weights (in × out units)"
    total = sum(costs) or 1.0
    return [100 * cost / total for cost in costs], label
