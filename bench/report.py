"""Terminal tables of a sweep: one rich table per group of rows that share
every parameter but the label (impl, method ...), the best row in bold green,
failures in red or yellow, and a speedup column against the baseline (or
the first of several baselines that the group has; where the baseline does
not depend on some parameters, Sweep.baseline_ignores, another table's). The
runner hands each group on as soon as it is done (bench/runner.py), so tables
appear during the sweep; a group cut short by Ctrl-C is titled "partial".
Groups are ordered by their parameters, numbers by value (seq 256 before
1024); rows within a group keep their order, the order they were measured in.
After the run, a yellow line for each row whose GPU ran throttled or below
its maximum SM clock (`clock_warnings`; the rule: bench/telemetry.py `clock_warning`).
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Sequence

from rich.console import Console
from rich.table import Table

from bench.runner import Sweep
from bench.telemetry import clock_warning

_STATUS_STYLE = {"ok": "", "mismatch": "bold red", "oom": "yellow", "unsupported": "dim yellow", "error": "red"}


def _fmt(value, fmt: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def best_row(sweep: Sweep, rows: Sequence[dict]) -> dict | None:
    """The winner of a group: only rows that passed the correctness gate count."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(sweep.primary) not in (None, "")]
    if not ok:
        return None
    pick = max if sweep.higher_is_better else min
    return pick(ok, key=lambda r: float(r[sweep.primary]))


def speedup(sweep: Sweep, row: dict, base: dict | None) -> float | None:
    if base is None or row["status"] != "ok" or base["status"] != "ok":
        return None
    if row.get(sweep.primary) in (None, "") or base.get(sweep.primary) in (None, ""):
        return None  # an ok row need not be timed (e.g. a calibration row)
    a, b = float(row[sweep.primary]), float(base[sweep.primary])
    if a <= 0 or b <= 0:
        return None
    return a / b if sweep.higher_is_better else b / a


def baselines(sweep: Sweep) -> tuple[str, ...]:
    """The label values the speedup column may be taken against, in order of preference."""
    return (sweep.baseline,) if isinstance(sweep.baseline, str) else tuple(sweep.baseline or ())


def baseline_row(sweep: Sweep, group: Sequence[dict], pool: Sequence[dict] = ()) -> dict | None:
    """The group's row for the first of the sweep's baselines that it has; without one, where the
    sweep says which parameters the baseline ignores, the first such row in `pool` (every row of the
    run) that matches the group in the rest."""
    own = next((r for name in baselines(sweep) for r in group if r[sweep.label] == name), None)
    if own is not None or not sweep.baseline_ignores or not group:
        return own
    same = [k for k in sweep.params if k != sweep.label and k not in sweep.baseline_ignores]
    return next((r for name in baselines(sweep) for r in pool
                 if r[sweep.label] == name and all(r[k] == group[0][k] for k in same)), None)


def group_key(sweep: Sweep, row: dict) -> tuple:
    return tuple((k, row[k]) for k in sweep.params if k != sweep.label)


def clock_warnings(sweep: Sweep, rows: Sequence[dict]) -> list[str]:
    """One line per row whose clocks say its timing may not be the GPU's best,
    numbered as in the CSV and the samples file (row0 first)."""
    lines = []
    for index, row in enumerate(rows):
        why = clock_warning(row)
        if why:
            params = " ".join(f"{k}={row.get(k)}" for k in sweep.params)
            lines.append(f"row {index} ({params}): {why}")
    return lines


def _order(key: tuple) -> tuple:
    """A group key to sort by: numbers by value, anything else as text after them."""
    def one(value):
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            return (0, value, "")
        return (1, 0, str(value))
    return tuple(one(v) for _, v in key)


def render(sweep: Sweep, rows: Sequence[dict], console: Console, partial: bool = False,
           pool: Sequence[dict] = ()) -> None:
    """One table per group of `rows`; `partial`: the sweep ended before the group did; `pool`: every
    row of the run, where a group may find its baseline (Sweep.baseline_ignores)."""
    ordered = sorted(rows, key=lambda r: _order(group_key(sweep, r)))  # stable: rows keep their order
    for key, group in groupby(ordered, key=lambda r: group_key(sweep, r)):
        group = list(group)
        title = "  ".join(f"{k}={v}" for k, v in key) + ("  (partial)" if partial else "")
        base = baseline_row(sweep, group, pool or rows)
        best = best_row(sweep, group)
        names = baselines(sweep)
        shown = base[sweep.label] if base is not None else " / ".join(names)
        if base is not None and not any(r is base for r in group):
            shown += ", its row in another table"
        caption = f"speedup: {sweep.primary} against {shown}" if names else None
        table = Table(title=f"{sweep.suite}  {title}", title_justify="left", caption=caption, caption_justify="left")
        # Numbers never wrap; on a narrow terminal the note column folds instead.
        table.add_column(sweep.label, no_wrap=True)
        table.add_column("status", no_wrap=True)
        for col in sweep.display:
            table.add_column(col.header, justify="right", no_wrap=True)
        if sweep.baseline:
            table.add_column("speedup", justify="right", no_wrap=True)
        table.add_column("note", overflow="fold")
        for row in group:
            cells = [str(row[sweep.label]), row["status"]]
            cells += [_fmt(row.get(col.name), col.fmt) for col in sweep.display]
            if sweep.baseline:
                cells.append(_fmt(speedup(sweep, row, base), "{:.2f}x"))
            note = row.get("reason", "") or ("noisy: IQR >= 10% of median" if row.get("noisy") is True else "")
            if sweep.note and row.get(sweep.note) and row["status"] == "ok":
                note = "; ".join(filter(None, [str(row[sweep.note]), note]))
            cells.append(note)
            style = "bold green" if row is best else _STATUS_STYLE.get(row["status"], "")
            table.add_row(*cells, style=style)
        console.print(table)
