"""Charts of one run: `figure(run)` draws the chart its suite registered
(bench/registry.py: each suite names its charts by the `suite` of the runs it
writes), else a bar chart of the run's primary metric.

    genbench plot results/attention-20261128-203000.csv -o attention.png

This module holds what every chart is drawn with, and the bar chart: reading a
run's rows that passed (`ok_rows`) and its per-step series (`load_series`),
lines against a log axis named at their right ends (`lines`, `name_ends`),
horizontal bars (`bars`), a colour per label kept in every panel
(`label_colors`), titles naming what the run held fixed (`title`). The suites'
own charts, in suites/charts/, are drawn with these. A chart is a function from
a `Run` to a matplotlib Figure; `@plots("suite")` registers one directly.

Every line is named at its right end as well as in the legend, in a colour
kept for its label in every panel, so a chart reads without matching colours
against the legend.

Figures are built with matplotlib's object-oriented API (`Figure`, no pyplot):
no global state, and saving to PNG renders with Agg whatever the backend.

Per-step series (a loss curve, tokens kept per step) that don't fit in a
CSV row can sit in an .npz beside it that the JSON names under "series", with
arrays keyed "row<i>.<name>" (row i of the CSV, 0-based): "row3.loss",
"row3.accept_length". A suite may write short ones into the CSV instead,
joined by ';', and read them in its chart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench import registry
from bench.compare import Run
from bench.errors import BadInput
from bench.results import writable_folder

def _registered(suite: str, target: str) -> Callable[[Run], Figure]:
    """The chart the registry names for `suite` runs, imported when one is drawn."""

    def chart(run: Run) -> Figure:
        return registry.load_target(target, f"the chart of {suite} runs")(run)

    return chart


# The suite of a run -> its chart: those the suites registered (bench/registry.py), and any added with @plots.
PLOTS: dict[str, Callable[[Run], Figure]] = {suite: _registered(suite, target)
                                             for suite, target in registry.charts().items()}


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


def varying(df: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c in df.columns and df[c].nunique() > 1]


def label_colors(labels: Iterable) -> dict:
    """One colour per label, the same in every panel (matplotlib's tab10 cycle)."""
    return {label: f"C{i % 10}" for i, label in enumerate(sorted(set(labels), key=str))}


def _value(v) -> str:
    """A parameter as written in a title: 300.0 -> '300' (pandas reads a column
    with an empty cell as floats), 0.7 -> '0.7', 'bf16' -> 'bf16'."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def describe(columns: list[str], values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return "  ".join(f"{c}={_value(v)}" for c, v in zip(columns, values))


def _fixed(run: Run, df: pd.DataFrame, skip: Iterable[str] = ()) -> str:
    fixed = [p for p in run.params if p in df.columns and df[p].nunique() == 1 and p not in skip]
    return describe(fixed, tuple(df[p].iloc[0] for p in fixed))


def title(run: Run, what: str, df: pd.DataFrame, skip: Iterable[str] = ()) -> str:
    device = run.env.get("device_name")
    head = f"{run.suite}: {what}" + (f" on {device}" if device else "")
    fixed = _fixed(run, df, skip)
    return f"{head}\n{fixed}" if fixed else head


def no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def lines(ax: Axes, df: pd.DataFrame, x: str, y: str, series: str, colors: dict, log: bool = True,
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
    name_ends(ax, ends)
    return True


def name_ends(ax: Axes, ends: list[tuple[str, float, float, str]], fontsize: float = 8) -> None:
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


def legend(fig: Figure, axes) -> None:
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if handles:
        fig.legend([handles[k] for k in labels], labels, loc="outside right center")


def bars(ax: Axes, names: list[str], values, colors: list[str], xlabel: str, errors=None) -> None:
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


def row_names(run: Run, df: pd.DataFrame) -> list[str]:
    shown = [run.label, *(p for p in varying(df, run.params) if p != run.label)]
    return [" ".join(str(r[c]) if c == run.label else f"{c}={_value(r[c])}" for c in shown if c in df.columns)
            for _, r in df.iterrows()]


def direction(run: Run, metric: str) -> str:
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
    colors = label_colors(df[run.label])
    fig = Figure(figsize=(9, 1.5 + 0.3 * len(df)), layout="constrained")
    ax = fig.subplots()
    bars(ax, row_names(run, df), df[metric], [colors[v] for v in df[run.label]], metric + direction(run, metric))
    fig.suptitle(title(run, metric, df))
    return fig
