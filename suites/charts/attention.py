"""The attention suite's chart: TFLOP/s and peak memory against sequence
length, one line per implementation, log axes, a row of panels per (mode,
mask, ...) the run varied, and the device's measured matmul peak as a line.

    genbench plot results/attention-20261128-203000.csv -o attention.png
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run


def chart(run: Run) -> Figure:
    """TFLOP/s and peak memory against sequence length, one line per implementation."""
    df = plot.ok_rows(run)
    label = run.label
    # Square runs against seq, unequal ones (q_len, kv_len) against kv_len, a panel per q_len;
    # packed ones (--varlen, keyed by lengths) against their total tokens.
    x = "seq" if "seq" in run.params else "tokens" if "lengths" in run.params else "kv_len"
    # batch follows the length (a fixed number of tokens per batch), so it doesn't split panels.
    panel_keys = [p for p in plot.varying(df, run.params) if p not in (label, x, "batch")]
    groups = list(df.groupby(panel_keys, sort=True)) if panel_keys else [((), df)]
    colors = plot.label_colors(df[label])
    # Peak memory is only measured on CUDA; a CPU run gets the TFLOP/s panels alone.
    memory = "peak_mem_MiB" in df.columns and df["peak_mem_MiB"].notna().any()
    panels = {"tflops": "TFLOP/s (higher is better)"}
    if memory:
        panels["peak_mem_MiB"] = "peak memory, MiB (lower is better)"
    fig = Figure(figsize=(3 + 6 * len(panels), 1.2 + 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for (key, part), row in zip(groups, axes):
        for ax, (column, what) in zip(row, panels.items()):
            if not plot.lines(ax, part, x, column, label, colors):
                plot.no_data(ax, f"no {column} values")
            elif column == "tflops":
                _peak_line(ax, run, part)
            ax.set_xlabel({"seq": "sequence length (tokens)", "tokens": "packed tokens"}.get(x, "kv length (tokens)"))
            ax.set_ylabel(what)
            ax.set_title(plot.describe(panel_keys, key), fontsize=10, loc="left")
    plot.legend(fig, axes)
    what = "TFLOP/s" + (" and peak memory" if memory else "") + " against sequence length"
    fig.suptitle(plot.title(run, what, df) + ("" if memory else "\n(peak memory: measured on CUDA devices only)"))
    return fig


def _matmul_peak(run: Run, df: pd.DataFrame) -> float | None:
    """The matmul peak a panel's rows were measured against: the run's JSON
    keeps the peaks as they stood at its end (one re-measured during the run
    included); runs from before it did are recovered from pct_of_peak =
    100 * tflops / peak, the highest being the last taken."""
    dtypes = df["dtype"].unique() if "dtype" in df.columns else ()
    peak = (run.env.get("peaks") or {}).get(f"{dtypes[0]}_tflops") if len(dtypes) == 1 else None
    if peak:
        return float(peak)
    if "pct_of_peak" not in df.columns:
        return None
    recovered = (100 * df["tflops"] / pd.to_numeric(df["pct_of_peak"], errors="coerce")).dropna()
    return float(recovered.max()) if not recovered.empty else None


def _peak_line(ax: Axes, run: Run, df: pd.DataFrame) -> None:
    peak = _matmul_peak(run, df)
    if peak is None:
        return
    # A rate above the peak proves the peak wrong (bench/calibrate.py): the line says so.
    above = " (rates above it: the measurement is unreliable)" if (df["tflops"] > peak).any() else ""
    ax.axhline(peak, color="0.3", linestyle="--", linewidth=1)
    ax.annotate(f"measured matmul peak {peak:.3g} TFLOP/s{above}", (0.01, peak), xycoords=("axes fraction", "data"),
                xytext=(0, 3), textcoords="offset points", fontsize=8, color="0.3")
