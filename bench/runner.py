"""The sweep loop every suite runs through.

A suite hands the runner a `Sweep`: its configurations (frozen dataclasses),
which of their fields become CSV columns, the extra columns its rows carry, and
`run(config, ctx) -> Measurement`. The runner owns everything else: the
progress bar, isolating each configuration (out of memory, unsupported, an
unexpected error each become a row with a status, and the sweep goes on), the
result files, and the tables at the end. Two things end the sweep instead, the
finished rows staying on disk: Ctrl-C (`Interrupted`) and a `Fatal` error
(re-raised saying which sweep stopped and where its rows are).

Statuses: ok, mismatch (failed the correctness gate: listed, never timed as a
win), oom, unsupported (with the reason), error (with the exception).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench import memory, timing
from bench.calibrate import Peaks, Share
from bench.errors import Fatal, Unsupported
from bench.profile import Profile, Profiler
from bench.results import ResultWriter
from bench.stats import Stats, stat_columns

STATUSES = ("ok", "mismatch", "oom", "unsupported", "error")


@dataclass
class Measurement:
    """What a suite's run function returns for one configuration."""

    values: dict[str, Any] = field(default_factory=dict)
    stats: Stats | None = None
    status: str = "ok"
    reason: str = ""

    def __post_init__(self):
        assert self.status in STATUSES, f"unknown status {self.status!r}"


@dataclass
class Context:
    """What a suite's run function may use: the device and the timer settings."""

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    peaks: Peaks | None = None  # a dict of peak values is taken as Peaks of this device
    crosscheck: bool = False  # also time with triton.testing.do_bench
    seed: int = 0
    extras: dict = field(default_factory=dict)
    profiler: Profiler | None = None  # set by --profile

    def __post_init__(self):
        if isinstance(self.peaks, dict):
            self.peaks = Peaks(self.device, self.peaks)

    def time(self, fn: Callable[[], object]) -> Stats:
        return timing.measure(fn, device=self.device, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)

    def share_of_peak(self, key: str, of: Callable[[float], float | None]) -> Share:
        """`of(peak)`: a share in percent of the peak stored under `key`, never
        above 100 (see bench/calibrate.py `Peaks.share`)."""
        return self.peaks.share(key, of) if self.peaks is not None else Share()

    def peak_memory_mib(self, fn: Callable[[], object]) -> float | None:
        return memory.peak_memory_mib(fn, self.device)

    def do_bench_ms(self, fn: Callable[[], object]) -> float | None:
        if not self.crosscheck or self.device.type != "cuda":
            return None
        return timing.do_bench_median(fn, self.warmup_ms, self.rep_ms)

    def profile(self, fn: Callable[[], object]) -> Profile | None:
        """Run `fn` under torch.profiler and keep its trace, when --profile is
        on; otherwise do nothing. Suites call it after timing, on the same
        callable they timed."""
        if self.profiler is None:
            return None
        return self.profiler.profile(fn)


@dataclass(frozen=True)
class Column:
    """A column shown in the terminal table (the CSV has every column)."""

    name: str
    header: str
    fmt: str = "{:.3g}"


@dataclass(frozen=True)
class Sweep:
    suite: str
    configs: Sequence[Any]
    run: Callable[[Any, Context], Measurement]
    params: Sequence[str]  # config fields written as CSV columns, label first
    metrics: Sequence[str]  # the suite's own columns
    display: Sequence[Column] = ()
    label: str = "impl"  # the field naming what is measured (impl, method, ...)
    baseline: str | None = None  # label value the speedup column is taken against
    primary: str = "median_ms"  # what ranks rows within a group
    higher_is_better: bool = False
    time_unit: str = "ms"
    note: str | None = None  # a column shown in the table's note cell (e.g. which kernel ran)

    def columns(self) -> list[str]:
        return ["suite", *self.params, "status", "reason", *stat_columns(unit=self.time_unit), *self.metrics]

    def describe(self, config: Any) -> str:
        return " ".join(f"{k}={getattr(config, k)}" for k in self.params)

    def meta(self) -> dict:
        """How to read this sweep's CSV, for its JSON sidecar (compare, plot)."""
        return {"params": list(self.params), "label": self.label, "metrics": list(self.metrics),
                "primary": self.primary, "higher_is_better": self.higher_is_better, "baseline": self.baseline}


class Interrupted(Exception):
    """Ctrl-C during a sweep; the finished rows are on disk."""

    def __init__(self, csv_path: Path, rows: int):
        super().__init__(f"interrupted: {rows} finished rows kept in {csv_path}")
        self.csv_path, self.rows = csv_path, rows


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def measure_one(sweep: Sweep, config: Any, ctx: Context) -> Measurement:
    """Run one configuration, turning its failure into a status."""
    try:
        return sweep.run(config, ctx)
    except Fatal:  # ends the run, not just this configuration
        raise
    except Unsupported as exc:
        return Measurement(status="unsupported", reason=str(exc))
    except torch.OutOfMemoryError as exc:
        return Measurement(status="oom", reason=_one_line(exc))
    except Exception as exc:  # one broken configuration must not end the sweep
        return Measurement(status="error", reason=_one_line(exc))
    finally:
        _release_memory(ctx.device)


def to_row(sweep: Sweep, config: Any, m: Measurement) -> dict:
    params = {k: getattr(config, k) for k in sweep.params}
    row = {"suite": sweep.suite, **params, "status": m.status, "reason": m.reason}
    if m.stats is not None:
        row.update(m.stats.columns())
    unknown = set(m.values) - set(sweep.metrics)
    assert not unknown, f"{sweep.suite}: values {sorted(unknown)} are not declared in Sweep.metrics"
    row.update(m.values)
    return row


def run_sweep(sweep: Sweep, ctx: Context, out_dir: Path, env: dict, console: Console) -> ResultWriter:
    """Measure every configuration, writing each row as it finishes."""
    writer = ResultWriter(out_dir, sweep.suite, sweep.columns(), env, meta=sweep.meta())
    if ctx.profiler is not None:
        ctx.profiler.folder = writer.csv_path.with_name(f"{writer.csv_path.stem}-traces")
    complete = False
    progress = Progress(
        TextColumn("[bold]{task.fields[suite]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task("", total=len(sweep.configs), suite=sweep.suite)
            for config in sweep.configs:
                progress.update(task, description=sweep.describe(config))
                if ctx.profiler is not None:  # traces named after the CSV row they belong to
                    ctx.profiler.row = (len(writer.rows), sweep.describe(config))
                m = measure_one(sweep, config, ctx)
                writer.write(to_row(sweep, config, m), m.stats.samples if m.stats else None)
                progress.advance(task)
        complete = True
    except KeyboardInterrupt:
        raise Interrupted(writer.csv_path, len(writer.rows)) from None
    except Fatal as exc:
        exc.suite, exc.csv_path, exc.rows = sweep.suite, writer.csv_path, len(writer.rows)
        raise
    finally:
        writer.close(complete)
    return writer


def config_fields(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config)]
