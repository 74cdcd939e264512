"""The DDP suite's chart: scaling efficiency against world size, a line per
set of DDP knobs the run varied, against the no-ddp baseline's 1 (linear
scaling); a bar chart when a run has no efficiency. The collectives
(`genbench ddp --collectives`) have their own chart, suites/charts/collectives.py.

    genbench plot results/ddp-20261128-215557.csv -o ddp.png
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run


def chart(run: Run) -> Figure:
    """Scaling efficiency against world size."""
    df = plot.ok_rows(run)
    if not ({"world_size", "efficiency"} <= set(df.columns) and df["efficiency"].notna().any()):
        return plot.bar_chart(run)
    # The baseline's efficiency is 1 by definition: it is the dashed line, not a point.
    base = run.meta.get("baseline")
    rows = df[df[run.label] != base] if base else df
    rows = rows.assign(_series=series_names(run, rows))
    colors = plot.label_colors(rows["_series"])
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)  # drawn first: the line ends are named in final limits
    baseline = f"world size x {base}'s throughput" if base else "world size x one device's"
    ax.annotate(f"1 = linear scaling: {baseline}", (0.01, 1.0), xycoords=("axes fraction", "data"), xytext=(0, 3),
                textcoords="offset points", fontsize=8, color="0.3")
    if not plot.lines(ax, rows, "world_size", "efficiency", "_series", colors, log=False):
        plot.no_data(ax, f"no rows but {base}: nothing to scale")
    ax.set_xlabel(f"world size ({processes(run)})")
    ax.set_ylabel("scaling efficiency (higher is better)")
    ax.set_xticks(sorted(df["world_size"].dropna().unique()))
    plot.legend(fig, [ax])
    # The fixed knobs make a long second line: wrapped to the figure's width.
    fig.suptitle(plot.title(run, "data-parallel scaling", df, skip=("world_size",)), wrap=True)
    return fig


def processes(run: Run) -> str:
    """What a rank ran on: a GPU each on CUDA, else a process (gloo on a CPU)."""
    return "GPUs" if str(run.env.get("device") or "").startswith("cuda") else "processes"


def series_names(run: Run, df: pd.DataFrame) -> pd.Series:
    """A line per set of knobs the run varied: the label names the world size
    (ddp-1, ddp-2 ...), so it names a line only where one label spans several
    world sizes; one line named after the suite when nothing else varies."""
    keys = [p for p in plot.varying(df, run.params) if p not in (run.label, "world_size")]
    if df.groupby(run.label)["world_size"].nunique().max() > 1:
        keys.insert(0, run.label)
    if not keys:
        return pd.Series(run.suite, index=df.index)
    return pd.Series([" ".join(str(r[k]) if k == run.label else plot.describe([k], r[k]) for k in keys)
                      for _, r in df.iterrows()], index=df.index, dtype=object)
