"""The precision suite's chart: step time per precision (median and IQR),
the loss curves, and under them each curve minus fp32's, smoothed: does the
loss still match?

Loss curves are read from the suite's `loss_curve` column, else from a "loss"
series beside the CSV (bench/plot.py). The curves themselves coincide, so they
are named at the ends of their differences instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench import plot
from bench.compare import Run

SMOOTH_STEPS = 10  # the differences' rolling mean: step-to-step loss noise hides a drift of a few hundredths
# suites.precision's, written out so that a chart needs no torch (tests/suites/test_charts.py keeps them equal).
BAND = "-band"  # suffix of the label of the reference's band run (the reference again from weights nudged one ulp)
OFF_SCALE = 3  # a band difference this many times the largest other one is named, not drawn


def parse_curve(text: str) -> np.ndarray:
    """A `loss_curve` cell, losses joined by ';', as suites.precision.format_curve writes it."""
    return np.array([float(v) for v in text.split(";")]) if text else np.array([])


def chart(run: Run) -> Figure:
    """Step time per precision (median and IQR); the loss curves, and under
    them each curve minus the reference's (fp32), which is what says whether
    a precision still trains like fp32: the curves themselves coincide."""
    df = plot.ok_rows(run)
    curves = _loss_curves(run, df)
    if curves:  # rows without a curve (the --matmul rate rows) have no step time either
        df = df.loc[list(curves)]
    names = dict(zip(df.index, plot.row_names(run, df)))
    time = run.primary or "median_ms"
    by_label = plot.label_colors(df[run.label])
    colors = {i: by_label[v] for i, v in df[run.label].items()}  # by CSV row
    ref = _reference(df[run.label]) if curves else None
    fig = Figure(figsize=(13, 1.5 + max(5, 0.35 * len(df))), layout="constrained")
    grid = fig.add_gridspec(2 if ref is not None else 1, 2, height_ratios=(3, 2) if ref is not None else None)
    ax_time = fig.add_subplot(grid[:, 0])
    ax_loss = fig.add_subplot(grid[0, 1])
    if time in df.columns and df[time].notna().any():
        # Whiskers: the IQR's width centred on the median (the CSV keeps the width, not the quartiles).
        iqr = df.get(time.replace("median_", "iqr_")) / 2 if time.startswith("median_") else None
        plot.bars(ax_time, list(names.values()), df[time], list(colors.values()),
                  f"step time, {time}{plot.direction(run, time)}; whiskers: IQR", errors=iqr)
    else:
        plot.no_data(ax_time, "no step times")
    if not curves:
        plot.no_data(ax_loss, "no loss curves recorded with this run")
    else:
        for i, loss in curves.items():
            ax_loss.plot(np.arange(len(loss)), loss, color=colors[i], label=names[i], linewidth=1)
        ax_loss.set_xlim(0, max(len(c) for c in curves.values()) - 1)  # step 0 to the last step
        ax_loss.set_ylabel("training loss")
        ax_loss.grid(True, alpha=0.3)
        if ref is None:  # nothing to compare with: name the curves here
            ax_loss.set_xlabel("step")
            plot.name_ends(ax_loss, [(names[i], len(c) - 1, c[-1], colors[i]) for i, c in curves.items()])
        else:
            ax_loss.tick_params(labelbottom=False)
            band = [i for i in curves if str(df.loc[i, run.label]).endswith(BAND)]
            _difference_panel(fig.add_subplot(grid[1, 1], sharex=ax_loss), curves, ref, band, names, colors)
    plot.legend(fig, [ax_loss])
    fig.suptitle(plot.title(run, "step time and loss per precision", df))
    return fig


def _reference(labels: pd.Series):
    """The row every other is compared with: the run the band row repeats
    (`fp32` for `fp32-band`), else fp32; None if there is none."""
    bands = [label for label in labels.astype(str) if label.endswith(BAND)]
    ref = labels.index[labels.astype(str) == (bands[0].removesuffix(BAND) if bands else "fp32")]
    return ref[0] if len(ref) else None


def _loss_differences(curves: dict[int, np.ndarray], ref: int) -> dict[int, np.ndarray]:
    """Each loss curve minus the reference's, over the steps both have, as a
    centred rolling mean over SMOOTH_STEPS steps."""
    out = {}
    for i, loss in curves.items():
        n = min(len(loss), len(curves[ref]))
        diff = pd.Series(loss[:n] - curves[ref][:n])
        out[i] = diff.rolling(SMOOTH_STEPS, center=True, min_periods=1).mean().to_numpy()
    return out


def _difference_panel(ax: Axes, curves: dict, ref: int, band: list[int], names: dict, colors: dict) -> None:
    """loss - reference loss per step, each curve named at its end. The band
    run (the reference from nudged weights) is drawn like the others unless
    it is off their scale (a long run's band can be), where its curve would
    flatten theirs to a line; its size is given instead."""
    diffs = _loss_differences(curves, ref)
    scale = max((np.nanmax(np.abs(d)) for i, d in diffs.items() if i not in band), default=0.0)
    for i in band:
        if not np.nanmax(np.abs(diffs[i])) > OFF_SCALE * scale:
            continue
        band_diff = diffs.pop(i)
        ax.set_title(f"{names[i]} ({names[ref]} from nudged weights) is off this scale: its difference reaches "
                     f"{np.nanmax(np.abs(band_diff)):.2f}", loc="left", fontsize=8, color=colors[i])
    for i, diff in diffs.items():
        ax.plot(np.arange(len(diff)), diff, color=colors[i], label=names[i], linewidth=1.5 if i == ref else 1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss − {names[ref]} loss\n({SMOOTH_STEPS}-step mean)")
    ax.grid(True, alpha=0.3)
    plot.name_ends(ax, [(names[i], len(d) - 1, d[-1], colors[i]) for i, d in diffs.items()])


def _loss_curves(run: Run, df: pd.DataFrame) -> dict[int, np.ndarray]:
    """Training loss per step by CSV row: the precision suite's `loss_curve`
    column (losses joined by ';'), else a "loss" series beside the CSV."""
    if "loss_curve" in df.columns:
        return {i: parse_curve(text) for i, text in df["loss_curve"].items() if isinstance(text, str) and text}
    series = plot.load_series(run)
    return {i: series[i]["loss"] for i in df.index if "loss" in series.get(i, {})}
