"""The collectives' chart (`genbench ddp --collectives`, suites/collectives.py):
bus bandwidth against message size, a line per collective, as nccl-tests'
results are drawn; a panel per world size (and dtype) the run varied, and the
link's line rate as a dashed line when the run was given one.

    genbench plot results/ddp-collectives-20261128-215725.csv -o collectives.png

The line rate is what the user gave with --line-rate-gbps (a datasheet's
number: genbench measures no link). The suite keeps it in pct_of_line_rate
= 100 x busbw / line rate, and the chart reads it back from there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from bench import plot
from bench.compare import Run

# At most this many labelled ticks on the size axis: 1K .. 1G is 21 powers of two.
MAX_SIZE_TICKS = 11


def chart(run: Run) -> Figure:
    """busbw against message size, a line per collective."""
    df = plot.ok_rows(run)
    if not {"collective", "size_bytes", "busbw_GBps"} <= set(df.columns) or df["busbw_GBps"].isna().all():
        return plot.bar_chart(run)
    panel_keys = [p for p in plot.varying(df, run.params) if p not in ("size", "collective")]
    groups = list(df.groupby(panel_keys, sort=True)) if panel_keys else [((), df)]
    colors = plot.label_colors(df["collective"])
    fig = Figure(figsize=(2.5 + 6 * len(groups), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(groups), sharey=True))
    rate = line_rate(df)
    top = 1.05 * max(df["busbw_GBps"].max(), rate or 0)
    for ax, (key, part) in zip(axes, groups):
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, top)  # before the lines: their names are placed within these limits
        if rate is not None:
            ax.axhline(rate, color="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"line rate {rate:.4g} GB/s (--line-rate-gbps)", (0.01, rate),
                        xycoords=("axes fraction", "data"), xytext=(0, -3), textcoords="offset points",
                        va="top", fontsize=8, color="0.3")
        plot.lines(ax, part, "size_bytes", "busbw_GBps", "collective", colors, log=False)
        _size_ticks(ax, part["size_bytes"])
        ax.set_xlabel("message size (bytes; K = 1024)")
        ax.set_title(plot.describe(panel_keys, key), fontsize=10, loc="left")
    axes[0].set_ylabel("bus bandwidth, GB/s (higher is better)")
    plot.legend(fig, axes)
    what = "bus bandwidth against message size"
    fig.suptitle(plot.title(run, what, df, skip=("size", "collective")), wrap=True)
    return fig


def line_rate(df: pd.DataFrame) -> float | None:
    """The line rate the run was given, from pct_of_line_rate = 100 x busbw /
    line rate (see the module docstring); None when it was given none."""
    if "pct_of_line_rate" not in df.columns:
        return None
    rates = (100 * df["busbw_GBps"] / pd.to_numeric(df["pct_of_line_rate"], errors="coerce")).dropna()
    return float(rates.median()) if not rates.empty else None


def size_label(n: float) -> str:
    """1024 -> '1K', 1048576 -> '1M', 2**30 -> '1G', 512 -> '512'."""
    for scale, suffix in ((2**30, "G"), (2**20, "M"), (2**10, "K")):
        if n >= scale:
            return f"{n / scale:g}{suffix}"
    return f"{n:g}"


def _size_ticks(ax: Axes, sizes: pd.Series) -> None:
    """Labelled ticks at powers of two over the measured sizes, every 2nd or
    4th ... so that at most MAX_SIZE_TICKS carry a label, the rest unlabelled."""
    lo, hi = int(np.floor(np.log2(sizes.min()))), int(np.ceil(np.log2(sizes.max())))
    powers = np.arange(lo, hi + 1)
    stride = int(np.ceil(len(powers) / MAX_SIZE_TICKS))
    ax.xaxis.set_major_locator(FixedLocator([2.0**p for p in powers[::stride]]))
    ax.xaxis.set_minor_locator(FixedLocator([2.0**p for p in powers]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: size_label(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
