"""The medusa suite's chart: decoding throughput per method, and the
histogram of tokens kept per decoding step, from the suite's `accept_hist`
column (steps that kept 1, 2, ... tokens, joined by ';') or from an
"accept_length" series beside the CSV (bench/plot.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run
from bench.metrics import mean_accept_length


def chart(run: Run) -> Figure:
    """Decoding throughput per method, and how many tokens each step kept."""
    df = plot.ok_rows(run)
    label = run.label
    rate = "tokens_per_s" if "tokens_per_s" in df.columns else run.primary
    colors = plot.label_colors(df[label])
    names = dict(zip(df.index, plot.row_names(run, df)))
    fig = Figure(figsize=(13, 1.5 + max(3.5, 0.35 * len(df))), layout="constrained")
    ax_rate, ax_accept = fig.subplots(1, 2)
    plot.bars(ax_rate, list(names.values()), df[rate], [colors[v] for v in df[label]],
              rate + plot.direction(run, rate))
    histograms = {i: h for i, h in _accept_histograms(run, df).items() if h.sum() > 0}
    if histograms:
        _grouped_bars(ax_accept, histograms, names, {i: colors[df.loc[i, label]] for i in histograms})
    elif "mean_accept_length" in df.columns and df["mean_accept_length"].notna().any():
        means = df.dropna(subset=["mean_accept_length"])
        plot.bars(ax_accept, [names[i] for i in means.index], means["mean_accept_length"],
                  [colors[v] for v in means[label]], "mean tokens kept per decoding step (higher is better)")
    else:
        plot.no_data(ax_accept, "no acceptance histogram (accept_hist) or mean_accept_length in this run")
    fig.suptitle(plot.title(run, "speculative decoding", df))
    return fig


def _accept_histograms(run: Run, df: pd.DataFrame) -> dict[int, np.ndarray]:
    """Decoding steps by tokens kept, by CSV row: h[k] = steps that kept k + 1
    tokens. From the medusa suite's `accept_hist` column (read from the raw
    text: a vanilla-only run's single counts would have been read as numbers),
    else from per-step lengths in an "accept_length" series beside the CSV."""
    if "accept_hist" in run.rows.columns:
        texts = run.rows.loc[df.index, "accept_hist"]
        return {i: np.array([int(v) for v in text.split(";")]) for i, text in texts.items() if text}
    series = plot.load_series(run)
    return {i: np.bincount(series[i]["accept_length"].astype(int))[1:]
            for i in df.index if "accept_length" in series.get(i, {})}


def _grouped_bars(ax: Axes, histograms: dict[int, np.ndarray], names: dict[int, str], colors: dict[int, str]) -> None:
    """Each row's share of steps per number of tokens kept, side by side at each whole number."""
    top = max(len(h) for h in histograms.values())
    width = 0.8 / len(histograms)
    for j, (i, counts) in enumerate(histograms.items()):
        tokens = np.arange(1, len(counts) + 1)
        ax.bar(tokens + (j - (len(histograms) - 1) / 2) * width, counts / counts.sum(), width=width,
               color=colors[i], label=f"{names[i]} (mean {mean_accept_length(counts):.2f})")
    ax.set_xticks(np.arange(1, top + 1))
    ax.set_xlabel("tokens kept per decoding step")
    ax.set_ylabel("share of steps")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
