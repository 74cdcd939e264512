"""The DDP suite's chart: scaling efficiency against world size, and busbw
against message size, a colour per label and a line style per world size; a
bar chart when a run has neither.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bench import plot
from bench.compare import Run

_MESSAGE_SIZE = ("size_bytes", "message_bytes", "nbytes", "bytes", "size", "msg_bytes", "message_MiB", "size_MiB")


def chart(run: Run) -> Figure:
    """Scaling efficiency against world size; busbw against message size."""
    df = plot.ok_rows(run)
    label = run.label
    size = next((c for c in _MESSAGE_SIZE if c in df.columns), None)
    panels = []
    if {"world_size", "efficiency"} <= set(df.columns) and df["efficiency"].notna().any():
        panels.append("efficiency")
    if size and "busbw_GBps" in df.columns and df["busbw_GBps"].notna().any():
        panels.append("busbw")
    if not panels:
        return plot.bar_chart(run)
    fig = Figure(figsize=(6.5 * len(panels), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colors = plot.label_colors(df[label])
    for ax, panel in zip(axes, panels):
        if panel == "efficiency":
            plot.lines(ax, df, "world_size", "efficiency", label, colors, log=False)
            ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)  # perfect weak scaling
            ax.set_xlabel("world size (GPUs)")
            ax.set_ylabel("scaling efficiency (higher is better; 1 = linear)")
            ax.set_xticks(sorted(df["world_size"].dropna().unique()))
        else:
            _busbw(ax, df, size, label, colors)
    plot.legend(fig, axes[:1])
    fig.suptitle(plot.title(run, "data-parallel scaling", df, skip=("world_size",)))
    return fig


def _busbw(ax: Axes, df: pd.DataFrame, size: str, label: str, colors: dict) -> None:
    """busbw against message size: a colour per label as in the efficiency
    panel, a line style per world size (busbw depends on both)."""
    worlds = sorted(df["world_size"].dropna().unique()) if "world_size" in df.columns else []
    if len(worlds) > 1:
        styles = dict(zip(worlds, ["-", "--", "-.", ":"] * 4))
        name = df[label].astype(str) + " n=" + df["world_size"].map(lambda n: f"{n:g}")
        data = df.assign(_series=name)
        series_color = {s: colors[lab] for s, lab in zip(name, df[label])}
        series_style = {s: styles[n] for s, n in zip(name, df["world_size"])}
        plot.lines(ax, data, size, "busbw_GBps", "_series", series_color, linestyles=series_style)
        ax.legend([Line2D([], [], color="0.3", linestyle=styles[n]) for n in worlds],
                  [f"world size {n:g}" for n in worlds], fontsize=8, loc="lower right")
    else:
        plot.lines(ax, df, size, "busbw_GBps", label, colors)
    ax.set_xlabel(f"message size ({size})")
    ax.set_ylabel("bus bandwidth, GB/s (higher is better)")
