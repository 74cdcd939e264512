"""The posenc suite's charts.

reach_chart: validation perplexity against evaluation length, one line per
encoding, the training length marked: Figure 1 of the ALiBi paper (Press et
al. 2022) for our models. cost_chart: GB/s of each memory-bound row (RoPE,
the absolute tables) against the calibrated copy bandwidth, and the time of
each attention row (RoPE with attention, ALiBi).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run

EXTENSION = "+"  # rope+pi, rope+ntk: the RoPE model scaled at evaluation, drawn dashed
ATTENTION = ("rope+attention", "alibi")  # cost rows timing causal attention: a panel of times, not GB/s


def reach_chart(run: Run) -> Figure:
    df = plot.ok_rows(run)
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    colors = plot.label_colors(df["encoding"])
    styles = {e: "--" for e in df["encoding"].unique() if EXTENSION in str(e)}
    if not plot.lines(ax, df, "eval_len", "ppl", "encoding", colors, log=True, linestyles=styles):
        plot.no_data(ax, "no perplexity measured")
    else:
        for train_len in df["train_len"].dropna().unique():
            ax.axvline(train_len, color="0.5", linestyle=":", linewidth=1)
            ax.text(train_len, 1.0, f" trained at {int(train_len)}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="0.4")
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("validation perplexity (lower is better)")
        plot.legend(fig, [ax])
    fig.suptitle(plot.title(run, "perplexity against evaluation length", df, skip=("eval_len",)))
    return fig


def cost_chart(run: Run) -> Figure:
    df = plot.ok_rows(run)
    attention = df["encoding"].isin(ATTENTION) if "encoding" in df.columns else None
    bandwidth = df[~attention] if attention is not None else df
    timed = df[attention] if attention is not None else df.iloc[:0]
    panels = [p for p in (bandwidth, timed) if len(p)]
    fig = Figure(figsize=(13, 1.5 + max(3, 0.3 * max((len(p) for p in panels), default=1))), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    colors = plot.label_colors(df[run.label])
    i = 0
    if len(bandwidth):
        ax = axes[i]
        i += 1
        plot.bars(ax, plot.row_names(run, bandwidth), bandwidth["GBps"], [colors[v] for v in bandwidth[run.label]],
                  "GB/s (higher is better)")
        peak = _copy_bandwidth(bandwidth)
        if peak is not None:
            ax.axvline(peak, color="0.3", linestyle="--", linewidth=1)
            ax.text(peak, 1.0, f" copy {peak:,.0f} GB/s", transform=ax.get_xaxis_transform(), va="bottom",
                    fontsize=8, color="0.3")
        ax.set_title("RoPE and the absolute tables: bytes moved per second", loc="left", fontsize=9)
    if len(timed):
        time = run.primary or "median_ms"
        plot.bars(axes[i], plot.row_names(run, timed), timed[time], [colors[v] for v in timed[run.label]],
                  f"{time} (lower is better)")
        axes[i].set_title("Causal attention: with RoPE (rope+attention), with ALiBi's bias", loc="left", fontsize=9)
    fig.suptitle(plot.title(run, "cost of each positional encoding", df))
    return fig


def _copy_bandwidth(df) -> float | None:
    """The calibrated copy bandwidth the rows' pct_of_peak was taken against
    (every row but a compute-bound one's): GBps / pct · 100."""
    if "pct_of_peak" not in df.columns:
        return None
    compute = df["bound"] == "compute" if "bound" in df.columns else False
    memory = df[~compute & (df["pct_of_peak"] > 0)]
    if memory.empty:
        return None
    return float(np.median(memory["GBps"] / memory["pct_of_peak"] * 100))
