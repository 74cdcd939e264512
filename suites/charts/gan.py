"""The gan suite's charts.

`chart` (runs of `genbench gan`): the generated samples on each mixture, one
panel per objective (from the `samples` column, "x,y;x,y;..."), the
mixture's modes marked, titled with the modes covered and the high-quality
share; under them the step time per objective.

`vq_chart` (runs of `genbench gan --vq`): nearest-code search time against
the codebook size K, a line per search and dtype, one panel per (N, D).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run

MODE_ORDER = ("eager", "compile", "cudagraph")  # suites.gan.MODES: the first one present is drawn
# The modes of impls/gan.MIXTURES, written out so that a chart needs no torch
# (tests/suites/test_gan.py keeps them equal): 8 on a circle of radius 2, a 5 x 5 grid at spacing 2.
MIXTURE_MODES = {
    "8gaussians": np.array([(2 * np.cos(2 * np.pi * i / 8), 2 * np.sin(2 * np.pi * i / 8)) for i in range(8)]),
    "25gaussians": np.array([(float(i), float(j)) for i in (-4, -2, 0, 2, 4) for j in (-4, -2, 0, 2, 4)]),
}


def parse_points(text: str) -> np.ndarray:
    """A `samples` cell, 'x,y;x,y;...', as suites.gan.format_points writes it: (n, 2)."""
    if not isinstance(text, str) or not text:
        return np.zeros((0, 2))
    return np.array([[float(v) for v in p.split(",")] for p in text.split(";")])


def chart(run: Run) -> Figure:
    df = plot.ok_rows(run)
    with_samples = df[df["samples"].astype(str).str.len() > 0] if "samples" in df.columns else df.iloc[:0]
    if not with_samples.empty:  # one mode per (objective, data): the first of eager, compile, cudagraph
        rank = with_samples["mode"].map({m: i for i, m in enumerate(MODE_ORDER)}).fillna(len(MODE_ORDER))
        with_samples = with_samples.assign(_rank=rank).sort_values("_rank").drop_duplicates(["objective", "data"])
    datasets = list(dict.fromkeys(with_samples["data"])) if not with_samples.empty else []
    objectives = list(dict.fromkeys(df[run.label])) if not df.empty else []
    cols = max(1, len(objectives))
    fig = Figure(figsize=(2.6 * cols + 1, 2.6 * len(datasets) + 3.5), layout="constrained")
    grid = fig.add_gridspec(len(datasets) + 1, cols, height_ratios=[*([2.6] * len(datasets)), 3])
    colors = plot.label_colors(objectives)
    for r, data in enumerate(datasets):
        for c, objective in enumerate(objectives):
            ax = fig.add_subplot(grid[r, c])
            rows = with_samples[(with_samples["data"] == data) & (with_samples[run.label] == objective)]
            if rows.empty:
                plot.no_data(ax, "no samples")
                continue
            row = rows.iloc[0]
            points = parse_points(row["samples"])
            ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color=colors[objective])
            modes = MIXTURE_MODES.get(data)
            if modes is not None:  # the modes, and the mixture's extent: a collapse shows as empty crosses
                ax.scatter(modes[:, 0], modes[:, 1], marker="+", s=40, color="0.2", linewidths=1)
                reach = np.abs(modes).max() * 1.4
                ax.set_xlim(-reach, reach)
                ax.set_ylim(-reach, reach)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            ax.set_title(f"{objective} on {data}\n{_coverage(row)} ({row['mode']})", fontsize=8)
    ax_time = fig.add_subplot(grid[len(datasets), :])
    time = run.primary or "median_ms"
    if time in df.columns and df[time].notna().any():
        names = plot.row_names(run, df)
        plot.bars(ax_time, names, df[time], [colors[v] for v in df[run.label]],
                  f"step time, {time}{plot.direction(run, time)}")
    else:
        plot.no_data(ax_time, "no step times")
    fig.suptitle(plot.title(run, "samples and step time per objective", df))
    return fig


def _coverage(row: pd.Series) -> str:
    try:
        return f"{int(row['modes_covered'])}/{int(row['modes'])} modes, {float(row['high_quality']):.0%} HQ"
    except (KeyError, TypeError, ValueError):
        return ""


def vq_chart(run: Run) -> Figure:
    df = plot.ok_rows(run)
    search = df[df["op"] == "search"] if "op" in df.columns else df.iloc[:0]
    shapes = list(dict.fromkeys(zip(search["N"], search["D"]))) if not search.empty else []
    fig = Figure(figsize=(6.5 * max(1, len(shapes)), 5), layout="constrained")
    axes = fig.subplots(1, max(1, len(shapes)), squeeze=False)[0]
    time = run.primary or "median_ms"
    if not shapes:
        plot.no_data(axes[0], "no search rows in this run")
    for ax, (n, d) in zip(axes, shapes):
        part = search[(search["N"] == n) & (search["D"] == d)]
        part = part.assign(line=part[run.label].astype(str) + " " + part["dtype"].astype(str))
        colors = plot.label_colors(part["line"])
        if not plot.lines(ax, part, "K", time, "line", colors):
            plot.no_data(ax, "no timed searches")
            continue
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(f"{time}{plot.direction(run, time)}")
        ax.set_title(plot.describe(["N", "D"], (n, d)), fontsize=9)
    fig.suptitle(plot.title(run, "nearest-code search time against K", search if not search.empty else df,
                            skip=("K", "N", "D", "dtype", "op")))
    return fig
