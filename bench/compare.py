"""Two runs of one suite, row against row: what got worse, what got better.

    genbench compare results/base.csv results/new.csv
    genbench compare BASE.csv NEW.csv --metric tflops --threshold 5% --format md

Rows are joined on their configuration: the suite and every sweep parameter
(the JSON sidecar's `params`; for a CSV without one, the columns between
`suite` and `status`, where the runner writes them). Each joined pair gets a
mark:

    worse / better   the metric moved past the threshold in that direction
                     (a 10% threshold: new/base >= 1.10 for a time, <= 1/1.10
                     for a rate, whose slowdown factor is base/new), and the
                     change is significant (below)
    unchanged        within the threshold, or not significant
    new / gone       a configuration only in the new / only in the base run
    newly failing    ok in the base run, not ok (error, oom, mismatch,
                     unsupported) in the new one
    newly ok         the other way round
    still failing    not ok in either

Significance. With the raw timing samples of both rows (the .samples.npz
beside each CSV), a two-sided Mann-Whitney U test at p < 0.01: it assumes no
distribution, and timings are skewed with outliers. Its smallest p-value is
that of two fully separated samples, 2 / C(n1 + n2, n1): 0.1 at 3 against 3,
0.029 at 4 against 4, 0.0079 at 5 against 5. Where that is not below 0.01 the
test can never reject, and a 99% percentile bootstrap interval of the ratio of
the medians (seeded, so a comparison always gives the same interval) decides
instead: significant when it excludes 1. The row's note names the rule, and
one warning says how many rows had too few samples for a real test. Without
samples, the two rows' interquartile ranges must not overlap. All of these are
on the time samples, so they apply to the time columns and to rates computed
from the median time (TFLOP/s, tokens/s, GB/s, % of peak, MFU); any other
metric (memory, error, speedup against another row) is judged on the ratio
alone.

Regressions, which make `genbench compare` exit 1: `worse`, `newly failing`,
and `gone` (a configuration the new run lost) unless `allow_missing`.
Input errors (BadInput, exit 2): runs of different suites or parameters, runs
that share no configuration, and runs on different hardware (GPU model and
count, the CPU for CPU runs; from the JSON sidecars) unless
`allow_different_hardware`, which turns that into a warning. Different software
(torch, triton, the ptxas Triton assembles with, CUDA, ..., and environment
variables such as TRITON_*, from the JSON's `settings`) is a warning printed
first, since comparing two versions is often the point.

GPU clocks. When both CSVs carry the SM clock of each row (`sm_clock_MHz`, the
median during the timed window), a warning says when the runs' median clocks
differ by more than 5% (a slower clock looks like a regression), and each row
whose clocks differ that much says so in its note. Another warning when only
one run had its clocks locked (`clocks_locked` in the JSON env). The telemetry
columns sit after `status`, so they are never taken for parameters, and they
are never the default metric.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.errors import BadInput

ALPHA = 0.01  # Mann-Whitney U significance level; the bootstrap interval's level is 1 - ALPHA
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
# SM clocks further apart than this make two timings of one kernel differ by
# about as much, which the threshold would read as a regression.
CLOCK_TOLERANCE = 0.05
DEFAULT_THRESHOLD = 0.10
# Relative slack on the threshold comparison, so that a ratio of exactly
# 1 + threshold computed in floating point (1.1 * x / x = 1.1000000000000003 or
# 1.0999999999999999) counts as reaching it: the threshold is `>=`.
_ROUNDING = 1e-9

REGRESSIONS = ("worse", "newly failing", "gone")  # gone: unless allow_missing
MARKS = ("worse", "newly failing", "better", "newly ok", "unchanged", "still failing", "new", "gone", "n/a")

_STAT = re.compile(r"^(median|iqr|mean|std|min|max)_([A-Za-z]+)$")
# Rates: higher is better. Checked before _LOWER, since tokens_per_s ends in _s.
_HIGHER = re.compile(r"tflops|_per_s$|GBps$|efficiency|^mfu|pct_of_peak|speedup|^accept", re.IGNORECASE)
_LOWER = re.compile(r"_(ms|s|us|ns|MiB|GiB|MB|GB|bytes)$|err$|loss$|perplexity$", re.IGNORECASE)
# Metrics computed from the median time, so that the time samples bear on them.
_FROM_TIME = re.compile(r"^(median|mean|min|max)_[A-Za-z]+$|tflops|_per_s$|GBps$|^mfu|pct_of_peak", re.IGNORECASE)


def higher_is_better(column: str) -> bool | None:
    """The direction of a metric, from its name; None when the name doesn't say."""
    if _HIGHER.search(column):
        return True
    if _LOWER.search(column):
        return False
    return None


# Environment keys whose difference makes two runs hard to compare.
HARDWARE = ("device_name", "gpu_name", "gpu_count")
CPU_HARDWARE = ("cpu", "cpu_count")  # only when the runs measured the CPU
SOFTWARE = ("torch", "triton", "ptxas", "cuda", "cudnn", "nccl", "driver", "python")
SETTINGS = "settings"  # the JSON's environment variables that change what the libraries do (bench/env.py)
CLOCK = "sm_clock_MHz"  # per-row GPU telemetry, after `status` in the CSV


@dataclass
class Run:
    """One run as read back: its CSV rows (as text), JSON sidecar, raw samples."""

    path: Path
    rows: pd.DataFrame
    meta: dict
    samples: dict[int, np.ndarray]
    notes: list[str] = field(default_factory=list)  # what could not be read, said once

    @property
    def suite(self) -> str:
        return str(self.rows["suite"].iloc[0])

    @property
    def env(self) -> dict:
        return self.meta.get("env") or {}

    @property
    def params(self) -> list[str]:
        """The sweep's parameters, label first."""
        if "params" in self.meta:
            return list(self.meta["params"])
        cols = list(self.rows.columns)  # the runner writes: suite, params..., status, reason, stats..., metrics...
        return cols[cols.index("suite") + 1: cols.index("status")]

    @property
    def label(self) -> str:
        if self.meta.get("label"):
            return self.meta["label"]
        return "impl" if "impl" in self.params else (self.params[0] if self.params else "suite")

    @property
    def time_unit(self) -> str | None:
        units = [m.group(2) for m in map(_STAT.match, self.rows.columns) if m and m.group(1) == "median"]
        return units[0] if units else None

    @property
    def primary(self) -> str | None:
        if self.meta.get("primary") in self.rows.columns:
            return self.meta["primary"]
        return f"median_{self.time_unit}" if self.time_unit else None

    def number(self, column: str) -> pd.Series:
        if column not in self.rows.columns:
            return pd.Series(np.nan, index=self.rows.index)
        return pd.to_numeric(self.rows[column], errors="coerce")

    def direction(self, metric: str) -> bool | None:
        """True when higher is better; the JSON says so for the primary metric."""
        if metric == self.meta.get("primary") and "higher_is_better" in self.meta:
            return bool(self.meta["higher_is_better"])
        return higher_is_better(metric)


def _read_samples(csv_path: Path, meta: dict, notes: list[str]) -> dict[int, np.ndarray]:
    # The JSON names the samples file; a run whose three files were renamed
    # together (baselines/attention.csv, .json, .samples.npz) is found by stem.
    candidates = [csv_path.parent / meta["samples"]] if meta.get("samples") else []
    candidates.append(csv_path.with_suffix(".samples.npz"))
    for path in candidates:
        if path.is_file():
            with np.load(path) as data:
                return {int(k[3:]): data[k] for k in data.files if k.startswith("row")}
    if meta.get("samples"):
        notes.append(f"{csv_path.name}: its samples file {meta['samples']} is missing; comparing IQRs instead")
    return {}


def load_run(path: Path | str) -> Run:
    """Read a genbench result CSV and what lies beside it; BadInput if it isn't one."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise BadInput(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not a CSV file ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in ("suite", "status") if c not in rows.columns]
    if missing:
        raise BadInput(f"{path} is not a genbench result CSV (it has no {' or '.join(missing)} column)")
    if rows.empty:
        raise BadInput(f"{path} has a header but no rows")
    suites = sorted(set(rows["suite"]))
    if len(suites) > 1:
        raise BadInput(f"{path} mixes suites ({', '.join(suites)}); compare one suite's run at a time")

    notes: list[str] = []
    meta: dict = {}
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{json_path} is not valid JSON ({exc})") from None
    else:
        notes.append(f"{path.name} has no JSON sidecar ({json_path.name}): hardware and software not checked, "
                     "no raw samples")
    if meta and not meta.get("complete", True):
        notes.append(f"{path.name} is from an interrupted run ({meta.get('rows', '?')} rows)")
    run = Run(path, rows, meta, _read_samples(path, meta, notes) if meta else {}, notes)
    absent = [p for p in run.params if p not in rows.columns]
    if absent:
        raise BadInput(f"{json_path.name} names parameters {', '.join(absent)} that {path.name} has no column for")
    return run


def parse_threshold(text: str) -> float:
    """'10%' or '10' -> 0.10."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*", text)
    if not match:
        raise BadInput(f"--threshold: cannot read {text!r}; give a percentage such as 10% or 5")
    value = float(match.group(1)) / 100
    if not 0 < value < 10:
        raise BadInput(f"--threshold must be above 0% and below 1000%, got {text!r}")
    return value


@dataclass(frozen=True)
class Change:
    """One configuration's fate between the two runs."""

    config: dict[str, str]
    mark: str
    base: float | None = None
    new: float | None = None
    ratio: float | None = None  # new / base of the metric
    p_value: float | None = None
    note: str = ""


@dataclass
class Comparison:
    suite: str
    metric: str
    higher_is_better: bool
    threshold: float
    params: list[str]
    label: str
    changes: list[Change]
    warnings: list[str]
    allow_missing: bool = False

    @property
    def failing_marks(self) -> tuple[str, ...]:
        """The marks that count as regressions in this comparison."""
        return tuple(m for m in REGRESSIONS if not (m == "gone" and self.allow_missing))

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.mark in self.failing_marks]

    def counts(self) -> dict[str, int]:
        found = [c.mark for c in self.changes]
        return {m: found.count(m) for m in MARKS if m in found}

    def shown_params(self) -> list[str]:
        """The label, and the parameters that vary between rows."""
        varying = [p for p in self.params if len({c.config[p] for c in self.changes}) > 1]
        return [self.label, *[p for p in varying if p != self.label]]

    def fixed_params(self) -> dict[str, str]:
        shown = self.shown_params()
        return {p: self.changes[0].config[p] for p in self.params if p not in shown} if self.changes else {}

    def name(self, change: Change) -> str:
        return " ".join(f"{p}={change.config[p]}" for p in self.shown_params())


def _env_diffs(base: Run, new: Run, kind: str) -> str:
    """'key base -> new; ...' for the hardware or software keys that differ; '' when none or unknown.
    Software includes the settings (environment variables) either run had and the other had not or
    had otherwise.

    A key is compared only when both JSONs have it, so that a JSON written
    before the key existed is no difference.
    """
    if not base.env or not new.env:
        return ""
    names = SOFTWARE
    if kind == "hardware":
        names = HARDWARE + (CPU_HARDWARE if "cpu" in (base.env.get("device") or "") else ())
    names = tuple(k for k in names if k in base.env and k in new.env)
    diffs = [f"{k} {base.env[k]} -> {new.env[k]}" for k in names if base.env[k] != new.env[k]]
    if kind == "software" and isinstance(base.env.get(SETTINGS), dict) and isinstance(new.env.get(SETTINGS), dict):
        b, n = base.env[SETTINGS], new.env[SETTINGS]
        diffs += [f"{k} {b.get(k, 'unset')} -> {n.get(k, 'unset')}" for k in sorted(b.keys() | n.keys())
                  if b.get(k) != n.get(k)]
    return "; ".join(diffs)


def _median_clock(run: Run) -> float | None:
    """The median over the run's ok rows of their SM clock; None without the column or its values."""
    clocks = run.number(CLOCK)[run.rows["status"] == "ok"].dropna()
    return float(clocks.median()) if len(clocks) else None


def _clock_warnings(base: Run, new: Run) -> list[str]:
    out = []
    b, n = _median_clock(base), _median_clock(new)
    if b and n and abs(n / b - 1) > CLOCK_TOLERANCE:
        out.append(f"the runs ran at different SM clocks: base {b:.0f} MHz, new {n:.0f} MHz ({n / b - 1:+.0%}): "
                   "a clock difference looks like a regression")
    locked = {"base": base.env.get("clocks_locked"), "new": new.env.get("clocks_locked")}
    if list(locked.values()).count(True) == 1:
        (one,) = (name for name, value in locked.items() if value is True)
        other = "new" if one == "base" else "base"
        out.append(f"only the {one} run had its GPU clocks locked (clocks_locked: {one} true, {other} "
                   f"{json.dumps(locked[other])}): unlocked clocks follow temperature and power")
    return out


def _clock_note(b: pd.Series, n: pd.Series) -> str:
    bc, nc = _float(b.get(CLOCK)), _float(n.get(CLOCK))
    if not bc or not nc or abs(nc / bc - 1) <= CLOCK_TOLERANCE:
        return ""
    return f"SM clock {bc:.0f} -> {nc:.0f} MHz ({nc / bc - 1:+.0%})"


def _iqr_apart(b: pd.Series, n: pd.Series, unit: str) -> bool | None:
    """Whether the two rows' IQRs are disjoint; None without the columns.

    The CSV keeps each IQR's width, not its ends, so the interval is taken
    centred on the median: exact for a symmetric distribution, close for the
    mildly skewed ones timings give.
    """
    try:
        bm, bi = float(b[f"median_{unit}"]), float(b[f"iqr_{unit}"])
        nm, ni = float(n[f"median_{unit}"]), float(n[f"iqr_{unit}"])
    except (KeyError, ValueError, TypeError):
        return None
    if any(math.isnan(x) for x in (bm, bi, nm, ni)):
        return None
    return bm + bi / 2 < nm - ni / 2 or nm + ni / 2 < bm - bi / 2


def min_p_value(n1: int, n2: int) -> float:
    """The smallest two-sided p-value a Mann-Whitney U test can give on n1 and
    n2 samples: that of full separation, 2 / C(n1 + n2, n1); ties only make
    it larger. scipy's exact method gives the same."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def mwu_can_reject(n1: int, n2: int) -> bool:
    """Whether the test can reach p < ALPHA at these sample sizes at all."""
    return min_p_value(n1, n2) < ALPHA


def median_ratio_ci(base: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """The 1 - ALPHA percentile bootstrap interval of median(new) / median(base).

    Seeded, so that one pair of runs always gives one interval. The percentile
    method, since BCa needs more samples than this is for; with n <= 3 a side
    its ends are min(new)/max(base) and max(new)/min(base), so it excludes 1
    exactly when the samples are fully separated.
    """
    def median_ratio(b, n, axis):
        return np.median(n, axis=axis) / np.median(b, axis=axis)

    # random_state, not rng: scipy >= 1.10 takes it.
    from scipy.stats import bootstrap  # here, not at the top: scipy.stats takes most of a second to import

    result = bootstrap((base, new), median_ratio, vectorized=True, confidence_level=1 - ALPHA, method="percentile",
                       n_resamples=BOOTSTRAP_RESAMPLES, random_state=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _has_samples(metric: str, unit: str | None, b_samples, n_samples) -> bool:
    """Whether the rows' time samples bear on the metric and both rows have some to test."""
    return (bool(_FROM_TIME.search(metric)) and unit is not None and b_samples is not None
            and n_samples is not None and len(b_samples) > 1 and len(n_samples) > 1)


def _too_few_samples(metric: str, unit: str | None, b_samples, n_samples) -> bool:
    """Whether the rows have samples to test, but too few for Mann-Whitney to ever reject."""
    return _has_samples(metric, unit, b_samples, n_samples) and not mwu_can_reject(len(b_samples), len(n_samples))


def _significance(metric: str, unit: str | None, b, n, b_samples, n_samples) -> tuple[bool, float | None, str]:
    """(significant, p-value, how it was judged) for a pair past the threshold."""
    if not _FROM_TIME.search(metric) or unit is None:
        return True, None, "ratio only"
    if _too_few_samples(metric, unit, b_samples, n_samples):
        lo, hi = median_ratio_ci(np.asarray(b_samples, float), np.asarray(n_samples, float))
        significant = lo > 1 or hi < 1
        note = (f"bootstrap {1 - ALPHA:.0%} CI of new/base median time [{lo:.3g}, {hi:.3g}], "
                f"n={len(b_samples)} vs {len(n_samples)}: too few samples for Mann-Whitney at p<{ALPHA:g}")
        return significant, None, note if significant else f"not significant, {note}"
    if _has_samples(metric, unit, b_samples, n_samples):
        from scipy.stats import mannwhitneyu  # here, not at the top: scipy.stats takes most of a second to import

        p = float(mannwhitneyu(b_samples, n_samples, alternative="two-sided").pvalue)
        if math.isnan(p):  # every sample tied
            p = 1.0
        shown = "p<1e-6" if p < 1e-6 else f"p={p:.2g}"
        return p < ALPHA, p, shown if p < ALPHA else f"not significant, {shown}"
    apart = _iqr_apart(b, n, unit)
    if apart is None:
        return True, None, "ratio only"
    return apart, None, "no samples; IQRs apart" if apart else "no samples; IQRs overlap"


def judge(base: float, new: float, higher: bool, threshold: float,
          significance=lambda: (True, None, "")) -> tuple[str, float, float | None, str]:
    """(mark, ratio, p-value, note) of two values of a metric, both rows ok.

    `significance` is asked only when the ratio is past the threshold.
    """
    ratio = new / base
    slowdown = 1 / ratio if higher else ratio  # > 1: worse, whichever the direction
    limit = 1 + threshold
    if slowdown >= limit * (1 - _ROUNDING):
        direction = "worse"
    elif slowdown <= (1 / limit) * (1 + _ROUNDING):
        direction = "better"
    else:
        return "unchanged", ratio, None, ""
    significant, p, note = significance()
    return (direction if significant else "unchanged"), ratio, p, note


def _failure(row) -> str:
    return f"{row['status']}: {row['reason']}" if row.get("reason") else str(row["status"])


def compare(base: Run, new: Run, metric: str | None = None, threshold: float = DEFAULT_THRESHOLD, *,
            allow_missing: bool = False, allow_different_hardware: bool = False) -> Comparison:
    """Join the runs and mark each configuration; BadInput when they cannot be compared."""
    if base.suite != new.suite:
        raise BadInput(f"{base.path.name} is a run of the {base.suite} suite and {new.path.name} of the {new.suite} suite; "
                       "compare two runs of one suite")
    if set(base.params) != set(new.params):
        only_b, only_n = sorted(set(base.params) - set(new.params)), sorted(set(new.params) - set(base.params))
        raise BadInput(f"the runs sweep different parameters (only in {base.path.name}: {', '.join(only_b) or '-'}; "
                       f"only in {new.path.name}: {', '.join(only_n) or '-'}); rows cannot be matched")
    key = ["suite", *base.params]
    b_at, n_at = _by_config(base, key), _by_config(new, key)
    hardware = _env_diffs(base, new, "hardware")
    if not set(b_at) & set(n_at):
        raise BadInput(f"{base.path.name} and {new.path.name} share no configuration ({len(b_at)} only in the base "
                       f"run, {len(n_at)} only in the new one{_disjoint(base, new)}): nothing to compare"
                       + (f"; they also ran on different hardware ({hardware})" if hardware else ""))
    if hardware and not allow_different_hardware:
        raise BadInput(f"the runs are on different hardware ({hardware}); their timings say nothing about the "
                       "code. Pass --allow-different-hardware to compare them anyway")
    metric = metric or base.primary or new.primary
    for run in (base, new):
        if metric is None or metric not in run.rows.columns:
            numeric = [c for c in run.rows.columns if run.number(c).notna().any() and c not in run.params]
            hint = f"try one of {', '.join(numeric)}" if numeric else "it has no numeric column"
            raise BadInput(f"--metric {metric}: {run.path.name} has no such column; {hint}")
    if metric in base.params or metric in ("suite", "status", "reason"):
        raise BadInput(f"--metric {metric}: that column says which configuration a row is, not what was measured")
    higher = base.direction(metric)
    if higher is None:
        raise BadInput(f"--metric {metric}: cannot tell whether a higher or a lower {metric} is better")
    unit = base.time_unit if base.time_unit == new.time_unit else None

    changes = []
    few_samples = 0  # rows whose sample sizes leave Mann-Whitney unable to reject
    # Base order first, then what only the new run has.
    for config in [*b_at, *(c for c in n_at if c not in b_at)]:
        named = dict(zip(key, config))
        b = base.rows.loc[b_at[config]] if config in b_at else None
        n = new.rows.loc[n_at[config]] if config in n_at else None
        if b is None:
            changes.append(Change(named, "new", new=_float(n[metric]), note="" if n["status"] == "ok" else _failure(n)))
        elif n is None:
            changes.append(Change(named, "gone", base=_float(b[metric])))
        elif b["status"] != "ok" or n["status"] != "ok":
            changes.append(_status_change(named, b, n, metric))
        else:
            b_samples, n_samples = base.samples.get(b_at[config]), new.samples.get(n_at[config])
            few_samples += _too_few_samples(metric, unit, b_samples, n_samples)
            changes.append(_value_change(
                named, _float(b[metric]), _float(n[metric]), higher, threshold,
                lambda: _significance(metric, unit, b, n, b_samples, n_samples),
                noisy="True" in (str(b.get("noisy")), str(n.get("noisy"))), clock=_clock_note(b, n),
            ))

    # Software first: comparing two torch versions is often the point of the comparison.
    software = _env_diffs(base, new, "software")
    warnings = [f"the runs are on different software: {software}"] if software else []
    if hardware:
        warnings.append(f"the runs are on different hardware: {hardware} (--allow-different-hardware)")
    warnings += _clock_warnings(base, new) + base.notes + new.notes
    if few_samples:
        rows_had = "1 row had" if few_samples == 1 else f"{few_samples} rows had"
        warnings.append(f"{rows_had} too few samples for a Mann-Whitney test at p<{ALPHA:g}, judged by a bootstrap "
                        "interval instead; rerun with more samples per row (a larger --rep-ms, more prompts or "
                        "steps) for a real test")
    return Comparison(base.suite, metric, higher, threshold, list(base.params), base.label, changes, warnings,
                      allow_missing)


def _disjoint(base: Run, new: Run) -> str:
    """'; model tiny vs medium' for each parameter whose values the two runs don't share."""
    out = []
    for p in base.params:
        bv, nv = sorted(set(base.rows[p])), sorted(set(new.rows[p]))
        if not set(bv) & set(nv):
            out.append(f"{p} {','.join(bv)} vs {','.join(nv)}")
    return "".join(f"; {x}" for x in out)


def _status_change(config: dict, b: pd.Series, n: pd.Series, metric: str) -> Change:
    if b["status"] == "ok":
        return Change(config, "newly failing", base=_float(b[metric]), note=_failure(n))
    if n["status"] == "ok":
        return Change(config, "newly ok", new=_float(n[metric]), note=f"was {_failure(b)}")
    was = f" (was {b['status']})" if b["status"] != n["status"] else ""
    # A configuration this machine cannot run, in both runs, is no failure.
    mark = "unchanged" if b["status"] == n["status"] == "unsupported" else "still failing"
    return Change(config, mark, note=_failure(n) + was)


def _value_change(config: dict, bv: float | None, nv: float | None, higher: bool, threshold: float,
                  significance, noisy: bool, clock: str = "") -> Change:
    if bv is None or nv is None or bv <= 0 or nv <= 0:
        return Change(config, "n/a", bv, nv, note="; ".join(filter(None, ["no positive value in both runs", clock])))
    mark, ratio, p, note = judge(bv, nv, higher, threshold, significance)
    note = "; ".join(filter(None, [note, "noisy: IQR >= 10% of median" if noisy else "", clock]))
    return Change(config, mark, bv, nv, ratio, p, note)


def _by_config(run: Run, key: list[str]) -> dict[tuple, int]:
    """CSV row index (as in the samples file) by configuration; BadInput on a repeat."""
    at: dict[tuple, int] = {}
    for i, config in enumerate(run.rows[key].itertuples(index=False, name=None)):
        if config in at:
            named = " ".join(f"{k}={v}" for k, v in zip(key, config))
            raise BadInput(f"{run.path.name} measures one configuration twice ({named}); "
                           "compare runs that measured each configuration once")
        at[config] = i
    return at


def _float(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# --- output -------------------------------------------------------------------

MARK_STYLE = {"worse": "bold red", "newly failing": "red", "better": "green", "newly ok": "green",
              "new": "cyan", "gone": "dim", "still failing": "yellow", "n/a": "dim", "unchanged": ""}


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}x"


def headline(cmp: Comparison) -> str:
    way = "higher" if cmp.higher_is_better else "lower"
    fixed = "  ".join(f"{k}={v}" for k, v in cmp.fixed_params().items())
    return f"{cmp.suite}: {cmp.metric} ({way} is better), threshold {100 * cmp.threshold:g}%" + (
        f"; {fixed}" if fixed else "")


def summary(cmp: Comparison) -> str:
    counts = ", ".join(f"{n} {mark}" for mark, n in cmp.counts().items())
    allowed = " (gone rows allowed by --allow-missing)" if cmp.allow_missing and "gone" in cmp.counts() else ""
    if not cmp.regressions:
        return f"{counts}. No regression beyond {100 * cmp.threshold:g}%{allowed}."
    named = [f"{cmp.name(c)} ({c.mark}{', ' + _ratio(c.ratio) if c.ratio else ''})"
             for c in cmp.regressions if c.mark != "gone"]
    gone = [cmp.name(c) for c in cmp.regressions if c.mark == "gone"]
    if gone:  # a whole dropped implementation can be dozens of rows: name a few
        shown = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
        named.append(f"{len(gone)} gone ({shown}; --allow-missing if dropped on purpose)")
    return f"{counts}. Regressions: " + "; ".join(named)


def rows(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    """The table as text: a header and one line per configuration."""
    shown = cmp.shown_params()
    header = [*shown, f"base {cmp.metric}", f"new {cmp.metric}", "new/base", "mark", "note"]
    body = [[*(c.config[p] for p in shown), _num(c.base), _num(c.new), _ratio(c.ratio), c.mark, c.note]
            for c in cmp.changes]
    return header, body


def _numeric_column(header: str) -> bool:
    return header.startswith(("base ", "new ")) or header == "new/base"


def markdown(cmp: Comparison) -> str:
    """GitHub-flavoured Markdown, for $GITHUB_STEP_SUMMARY or a pull-request
    comment: the verdict first, then the rows that changed, then every row
    in a folded section."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    header, body = rows(cmp)
    mark_at = header.index("mark")
    bold = {m: f"**{m}**" for m in cmp.failing_marks}

    def table(lines: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(map(cell, header)) + " |",
               "|" + "|".join("---:" if _numeric_column(h) else "---" for h in header) + "|"]
        for line in lines:
            line = [bold.get(v, v) if i == mark_at else v for i, v in enumerate(line)]
            out.append("| " + " | ".join(map(cell, line)) + " |")
        return out

    verdict = ":x:" if cmp.regressions else ":white_check_mark:"
    lines = [f"### genbench compare: {cell(headline(cmp))}", ""]
    lines += [f"> **Warning:** {cell(w)}" for w in cmp.warnings]
    if cmp.warnings:
        lines.append("")
    lines += [f"{verdict} {cell(summary(cmp))}", ""]
    changed = [line for line in body if line[mark_at] != "unchanged"]
    if changed:
        lines += [*table(changed), ""]
    lines += [f"<details><summary>All {len(body)} rows</summary>", "", *table(body), "", "</details>"]
    return "\n".join(lines) + "\n"


def render(cmp: Comparison, console: Console) -> None:
    """The comparison as a rich table, warnings first, summary last."""
    for w in cmp.warnings:
        console.print(f"[yellow]warning: {escape(w)}[/]", highlight=False, soft_wrap=True)  # one line, even in logs
    header, body = rows(cmp)
    table = Table(title=escape(headline(cmp)), title_justify="left")
    for h in header:
        table.add_column(h, justify="right" if _numeric_column(h) else "left", no_wrap=h != "note",
                         overflow="fold" if h == "note" else "ellipsis")
    for change, line in zip(cmp.changes, body):
        failing = change.mark == "gone" and "gone" in cmp.failing_marks  # gone is dim only when allowed
        table.add_row(*map(escape, line), style="red" if failing else MARK_STYLE[change.mark])
    console.print(table)
    console.print(escape(summary(cmp)), style="bold red" if cmp.regressions else "green", highlight=False)
