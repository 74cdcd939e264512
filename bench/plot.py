"""Charts of one run, each suite with its own: `figure(run)` picks the chart
registered for the run's suite, else a bar chart of its primary metric.

    genbench plot results/attention-20261128-203000.csv -o attention.png

    attention  TFLOP/s and peak memory against sequence length, one line per
               implementation, log axes, one row of panels per (mode, mask, ...)
    precision  step time per precision, the loss curves (`loss_curve`), and each
               curve minus fp32's, smoothed: does the loss still match?
    ddp        scaling efficiency against world size, busbw against message size
    medusa     tokens/s per method, and the histogram of accepted tokens per step

A new suite adds its chart with `@plots("suite")` on a function from a `Run`
to a matplotlib Figure. Every line is named at its right end as well as in the
legend, in a colour kept for its label in every panel, so a chart reads
without matching colours against the legend (the precision loss curves,
which coincide, are named at the ends of their differences instead).

Figures are built with matplotlib's object-oriented API (`Figure`, no pyplot):
no global state, and saving to PNG renders with Agg whatever the backend.

Per-step series (a loss curve, tokens kept per step) that don't fit in a
CSV row can sit in an .npz beside it that the JSON names under "series", with
arrays keyed "row<i>.<name>" (row i of the CSV, 0-based): "row3.loss",
"row3.accept_length". The suites write the short ones into the CSV instead,
joined by ';': precision's `loss_curve`, medusa's `accept_hist`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench.compare import Run, higher_is_better
from bench.errors import BadInput
from bench.metrics import mean_accept_length
from bench.results import writable_folder

PLOTS: dict[str, Callable[[Run], Figure]] = {}


def plots(suite: str):
    """Register the chart of a suite."""

    def register(fn: Callable[[Run], Figure]) -> Callable[[Run], Figure]:
        PLOTS[suite] = fn
        return fn

    return register


def figure(run: Run) -> Figure:
    if not (run.rows["status"] == "ok").any():
        raise BadInput(f"nothing to plot: no row of {run.path.name} has status ok")
    return PLOTS.get(run.suite, bar_chart)(run)


def save(fig: Figure, path: Path) -> None:
    path = Path(path)
    kinds = fig.canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in kinds:
        raise BadInput(f"-o {path}: cannot write {path.suffix or 'a file without a suffix'}; "
                       f"use one of {', '.join('.' + k for k in sorted(kinds))}")
    try:
        writable_folder(path.parent)
        fig.savefig(path, dpi=120)
    except BadInput as exc:
        raise BadInput(f"-o {path}: {exc}") from None
    except OSError as exc:  # a folder of that name, or a read-only file
        raise BadInput(f"-o {path}: cannot write it: {exc.strerror or exc}") from None


# --- reading -------------------------------------------------------------------


def ok_rows(run: Run) -> pd.DataFrame:
    """The rows that passed, with every all-numeric column as numbers. The CSV
    row index is kept as the frame's index (it keys samples and series)."""
    df = run.rows[run.rows["status"] == "ok"].copy()
    for col in df.columns:
        filled = df[col] != ""
        as_num = pd.to_numeric(df[col], errors="coerce")
        if as_num[filled].notna().all():  # an all-empty column becomes NaN
            df[col] = as_num
    return df


def load_series(run: Run) -> dict[int, dict[str, np.ndarray]]:
    """Per-step series by CSV row (see the module docstring), or {}."""
    name = run.meta.get("series")
    path = run.path.parent / name if name else None
    if path is None or not path.is_file():
        return {}
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            match = re.fullmatch(r"row(\d+)\.(.+)", key)
            if match:
                out.setdefault(int(match.group(1)), {})[match.group(2)] = data[key]
    return out


def _varying(df: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c in df.columns and df[c].nunique() > 1]


def _colors(labels: Iterable) -> dict:
    """One colour per label, the same in every panel (matplotlib's tab10 cycle)."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(set(labels), key=str))}


def _value(v) -> str:
    """A parameter as written in a title: 300.0 -> '300' (pandas reads a column
    with an empty cell as floats), 0.7 -> '0.7', 'bf16' -> 'bf16'."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _describe(columns: list[str], values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return "  ".join(f"{c}={_value(v)}" for c, v in zip(columns, values))


def _fixed(run: Run, df: pd.DataFrame, skip: Iterable[str] = ()) -> str:
    fixed = [p for p in run.params if p in df.columns and df[p].nunique() == 1 and p not in skip]
    return _describe(fixed, tuple(df[p].iloc[0] for p in fixed))


def _title(run: Run, what: str, df: pd.DataFrame, skip: Iterable[str] = ()) -> str:
    device = run.env.get("device_name")
    head = f"{run.suite}: {what}" + (f" on {device}" if device else "")
    fixed = _fixed(run, df, skip)
    return f"{head}\n{fixed}" if fixed else head


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax: Axes, df: pd.DataFrame, x: str, y: str, series: str, colors: dict, log: bool = True,
           linestyles: dict | None = None) -> bool:
    """One line per value of `series`, named at its right end. False if nothing to draw."""
    data = df[[x, y, series]].dropna()
    data = data[pd.to_numeric(data[y], errors="coerce") > 0] if log else data
    if data.empty:
        return False
    ends = []
    for name, part in data.groupby(series, sort=True):
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", color=colors[name], label=str(name),
                linestyle=(linestyles or {}).get(name, "-"))
        ends.append((str(name), part[x].iloc[-1], part[y].iloc[-1], colors[name]))
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Tick at the measured x values, written as numbers (1k, not 2^10).
        ax.set_xticks(sorted(data[x].unique()), [_count(v) for v in sorted(data[x].unique())])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    ax.margins(x=0.15)  # room for the names at the line ends
    ax.grid(True, which="both", alpha=0.3)
    _name_ends(ax, ends)
    return True


def _name_ends(ax: Axes, ends: list[tuple[str, float, float, str]], fontsize: float = 8) -> None:
    """Write each line's name just right of its last point, in the line's
    colour. Names of lines ending at the same x are spread apart, about their
    ends, by at least a line of text; a name moved off its line's end gets a
    thin leader to it. Call once the axis limits are final."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading transforms
    to_axes = ax.transData + ax.transAxes.inverted()  # data -> 0..1 over the axes, log axes included
    height_pt = ax.bbox.height * 72 / ax.figure.dpi
    gap = max(0.05, 1.4 * fontsize / height_pt)  # one line of text, as a fraction of the axis height
    for x in {e[1] for e in ends}:
        group = sorted((e for e in ends if e[1] == x), key=lambda e: e[2])
        ys = to_axes.transform([(x, e[2]) for e in group])[:, 1]
        for (name, _, y, color), at, to in zip(group, ys, _spread(ys, gap)):
            text_y = to_axes.inverted().transform((0, to))[1]
            leader = dict(arrowstyle="-", color=color, linewidth=0.6, relpos=(0, 0.5), shrinkA=1, shrinkB=1)
            ax.annotate(name, (x, y), xytext=(6, text_y), textcoords=("offset points", "data"), va="center",
                        fontsize=fontsize, color=color, arrowprops=leader if abs(to - at) > gap / 3 else None)


def _spread(ys, gap: float) -> list[float]:
    """Positions for the ascending targets `ys` (fractions of the axis
    height), at least `gap` apart: names that would overlap form a group
    centred on its targets' mean (so a crowd spreads both ways, not only up),
    kept within the axes, groups merging until none overlap."""

    def start(group: list[float]) -> float:
        centred = float(np.mean(group)) - gap * (len(group) - 1) / 2
        return min(max(centred, gap / 2), 1 - gap / 2 - gap * (len(group) - 1))

    groups: list[list[float]] = []
    for y in ys:
        groups.append([y])
        while len(groups) > 1 and start(groups[-1]) < start(groups[-2]) + gap * len(groups[-2]):
            groups[-1] = groups.pop(-2) + groups[-1]
    return [start(g) + gap * k for g in groups for k in range(len(g))]


def _two_and_five(v: float, _pos=None) -> str:
    """Minor log ticks labelled at 2 and 5 of each decade only, as plain numbers."""
    lead = f"{v:e}"[0]
    return f"{v:g}" if lead in "25" else ""


def _count(n: float) -> str:
    """4096 -> '4k', 1048576 -> '1M', 100 -> '100'."""
    for size, suffix in ((2**30, "G"), (2**20, "M"), (2**10, "k")):
        if n >= size and n % size == 0:
            return f"{int(n // size)}{suffix}"
    return f"{n:g}"


def _legend(fig: Figure, axes) -> None:
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if handles:
        fig.legend([handles[k] for k in labels], labels, loc="outside right center")


def _bars(ax: Axes, names: list[str], values, colors: list[str], xlabel: str, errors=None) -> None:
    ypos = np.arange(len(names))
    ax.barh(ypos, values, xerr=errors, color=colors, capsize=3 if errors is not None else 0)
    ax.set_yticks(ypos, names, fontsize=8)
    ax.invert_yaxis()  # first row on top
    ax.set_xlabel(xlabel)
    positive = np.asarray(values, dtype=float)
    positive = positive[positive > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("log")
    ax.grid(True, axis="x", alpha=0.3)


def _row_names(run: Run, df: pd.DataFrame) -> list[str]:
    shown = [run.label, *(p for p in _varying(df, run.params) if p != run.label)]
    return [" ".join(str(r[c]) if c == run.label else f"{c}={_value(r[c])}" for c in shown if c in df.columns)
            for _, r in df.iterrows()]


def _direction(run: Run, metric: str) -> str:
    higher = run.direction(metric)
    return "" if higher is None else f" ({'higher' if higher else 'lower'} is better)"


# --- charts ---------------------------------------------------------------------


def bar_chart(run: Run) -> Figure:
    """Any suite: the primary metric of each row that passed, coloured by label."""
    df = ok_rows(run)
    metric = run.primary
    if metric is None or metric not in df.columns or df[metric].isna().all():
        raise BadInput(f"nothing to plot: {run.path.name} has no primary metric (median_*) values")
    df = df.dropna(subset=[metric])
    colors = _colors(df[run.label])
    fig = Figure(figsize=(9, 1.5 + 0.3 * len(df)), layout="constrained")
    ax = fig.subplots()
    _bars(ax, _row_names(run, df), df[metric], [colors[v] for v in df[run.label]], metric + _direction(run, metric))
    fig.suptitle(_title(run, metric, df))
    return fig


@plots("attention")
def attention(run: Run) -> Figure:
    """TFLOP/s and peak memory against sequence length, one line per implementation."""
    df = ok_rows(run)
    label = run.label
    # batch follows seq (a fixed number of tokens per batch), so it doesn't split panels.
    panel_keys = [p for p in _varying(df, run.params) if p not in (label, "seq", "batch")]
    groups = list(df.groupby(panel_keys, sort=True)) if panel_keys else [((), df)]
    colors = _colors(df[label])
    # Peak memory is only measured on CUDA; a CPU run gets the TFLOP/s panels alone.
    memory = "peak_mem_MiB" in df.columns and df["peak_mem_MiB"].notna().any()
    panels = {"tflops": "TFLOP/s (higher is better)"}
    if memory:
        panels["peak_mem_MiB"] = "peak memory, MiB (lower is better)"
    fig = Figure(figsize=(3 + 6 * len(panels), 1.2 + 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for (key, part), row in zip(groups, axes):
        for ax, (column, what) in zip(row, panels.items()):
            if not _lines(ax, part, "seq", column, label, colors):
                _no_data(ax, f"no {column} values")
            elif column == "tflops":
                _peak_line(ax, run, part)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(what)
            ax.set_title(_describe(panel_keys, key), fontsize=10, loc="left")
    _legend(fig, axes)
    what = "TFLOP/s" + (" and peak memory" if memory else "") + " against sequence length"
    fig.suptitle(_title(run, what, df) + ("" if memory else "\n(peak memory: measured on CUDA devices only)"))
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


def _loss_curves(run: Run, df: pd.DataFrame) -> dict[int, np.ndarray]:
    """Training loss per step by CSV row: the precision suite's `loss_curve`
    column (losses joined by ';'), else a "loss" series beside the CSV."""
    if "loss_curve" in df.columns:
        return {i: np.array([float(v) for v in text.split(";")])
                for i, text in df["loss_curve"].items() if isinstance(text, str) and text}
    series = load_series(run)
    return {i: series[i]["loss"] for i in df.index if "loss" in series.get(i, {})}


SMOOTH_STEPS = 10  # the differences' rolling mean: step-to-step loss noise hides a drift of a few hundredths
BAND = "-band"  # the precision suite's reference run again from weights nudged one ulp (suites/precision.py)
OFF_SCALE = 3  # a band difference this many times the largest other one is named, not drawn


@plots("precision")
def precision(run: Run) -> Figure:
    """Step time per precision (median and IQR); the loss curves, and under
    them each curve minus the reference's (fp32), which is what says whether
    a precision still trains like fp32: the curves themselves coincide."""
    df = ok_rows(run)
    curves = _loss_curves(run, df)
    if curves:  # rows without a curve (the --matmul rate rows) have no step time either
        df = df.loc[list(curves)]
    names = dict(zip(df.index, _row_names(run, df)))
    time = run.primary or "median_ms"
    by_label = _colors(df[run.label])
    colors = {i: by_label[v] for i, v in df[run.label].items()}  # by CSV row
    ref = _reference(df[run.label]) if curves else None
    fig = Figure(figsize=(13, 1.5 + max(5, 0.35 * len(df))), layout="constrained")
    grid = fig.add_gridspec(2 if ref is not None else 1, 2, height_ratios=(3, 2) if ref is not None else None)
    ax_time = fig.add_subplot(grid[:, 0])
    ax_loss = fig.add_subplot(grid[0, 1])
    if time in df.columns and df[time].notna().any():
        # Whiskers: the IQR's width centred on the median (the CSV keeps the width, not the quartiles).
        iqr = df.get(time.replace("median_", "iqr_")) / 2 if time.startswith("median_") else None
        _bars(ax_time, list(names.values()), df[time], list(colors.values()),
              f"step time, {time}{_direction(run, time)}; whiskers: IQR", errors=iqr)
    else:
        _no_data(ax_time, "no step times")
    if not curves:
        _no_data(ax_loss, "no loss curves recorded with this run")
    else:
        for i, loss in curves.items():
            ax_loss.plot(np.arange(len(loss)), loss, color=colors[i], label=names[i], linewidth=1)
        ax_loss.set_xlim(0, max(len(c) for c in curves.values()) - 1)  # step 0 to the last step
        ax_loss.set_ylabel("training loss")
        ax_loss.grid(True, alpha=0.3)
        if ref is None:  # nothing to compare with: name the curves here
            ax_loss.set_xlabel("step")
            _name_ends(ax_loss, [(names[i], len(c) - 1, c[-1], colors[i]) for i, c in curves.items()])
        else:
            ax_loss.tick_params(labelbottom=False)
            band = [i for i in curves if str(df.loc[i, run.label]).endswith(BAND)]
            _difference_panel(fig.add_subplot(grid[1, 1], sharex=ax_loss), curves, ref, band, names, colors)
    _legend(fig, [ax_loss])
    fig.suptitle(_title(run, "step time and loss per precision", df))
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
    _name_ends(ax, [(names[i], len(d) - 1, d[-1], colors[i]) for i, d in diffs.items()])


_MESSAGE_SIZE = ("size_bytes", "message_bytes", "nbytes", "bytes", "size", "msg_bytes", "message_MiB", "size_MiB")


@plots("ddp")
def ddp(run: Run) -> Figure:
    """Scaling efficiency against world size; busbw against message size."""
    df = ok_rows(run)
    label = run.label
    size = next((c for c in _MESSAGE_SIZE if c in df.columns), None)
    panels = []
    if {"world_size", "efficiency"} <= set(df.columns) and df["efficiency"].notna().any():
        panels.append("efficiency")
    if size and "busbw_GBps" in df.columns and df["busbw_GBps"].notna().any():
        panels.append("busbw")
    if not panels:
        return bar_chart(run)
    fig = Figure(figsize=(6.5 * len(panels), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colors = _colors(df[label])
    for ax, panel in zip(axes, panels):
        if panel == "efficiency":
            _lines(ax, df, "world_size", "efficiency", label, colors, log=False)
            ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)  # perfect weak scaling
            ax.set_xlabel("world size (GPUs)")
            ax.set_ylabel("scaling efficiency (higher is better; 1 = linear)")
            ax.set_xticks(sorted(df["world_size"].dropna().unique()))
        else:
            _busbw(ax, df, size, label, colors)
    _legend(fig, axes[:1])
    fig.suptitle(_title(run, "data-parallel scaling", df, skip=("world_size",)))
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
        _lines(ax, data, size, "busbw_GBps", "_series", series_color, linestyles=series_style)
        ax.legend([Line2D([], [], color="0.3", linestyle=styles[n]) for n in worlds],
                  [f"world size {n:g}" for n in worlds], fontsize=8, loc="lower right")
    else:
        _lines(ax, df, size, "busbw_GBps", label, colors)
    ax.set_xlabel(f"message size ({size})")
    ax.set_ylabel("bus bandwidth, GB/s (higher is better)")


def _accept_histograms(run: Run, df: pd.DataFrame) -> dict[int, np.ndarray]:
    """Decoding steps by tokens kept, by CSV row: h[k] = steps that kept k + 1
    tokens. From the medusa suite's `accept_hist` column (read from the raw
    text: a vanilla-only run's single counts would have been read as numbers),
    else from per-step lengths in an "accept_length" series beside the CSV."""
    if "accept_hist" in run.rows.columns:
        texts = run.rows.loc[df.index, "accept_hist"]
        return {i: np.array([int(v) for v in text.split(";")]) for i, text in texts.items() if text}
    series = load_series(run)
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


@plots("medusa")
def medusa(run: Run) -> Figure:
    """Decoding throughput per method, and how many tokens each step kept."""
    df = ok_rows(run)
    label = run.label
    rate = "tokens_per_s" if "tokens_per_s" in df.columns else run.primary
    colors = _colors(df[label])
    names = dict(zip(df.index, _row_names(run, df)))
    fig = Figure(figsize=(13, 1.5 + max(3.5, 0.35 * len(df))), layout="constrained")
    ax_rate, ax_accept = fig.subplots(1, 2)
    _bars(ax_rate, list(names.values()), df[rate], [colors[v] for v in df[label]], rate + _direction(run, rate))
    histograms = {i: h for i, h in _accept_histograms(run, df).items() if h.sum() > 0}
    if histograms:
        _grouped_bars(ax_accept, histograms, names, {i: colors[df.loc[i, label]] for i in histograms})
    elif "mean_accept_length" in df.columns and df["mean_accept_length"].notna().any():
        means = df.dropna(subset=["mean_accept_length"])
        _bars(ax_accept, [names[i] for i in means.index], means["mean_accept_length"],
              [colors[v] for v in means[label]], "mean tokens kept per decoding step (higher is better)")
    else:
        _no_data(ax_accept, "no acceptance histogram (accept_hist) or mean_accept_length in this run")
    fig.suptitle(_title(run, "speculative decoding", df))
    return fig
