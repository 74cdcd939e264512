"""The sweep loop every suite runs through.

A suite hands the runner a `Sweep`: its configurations (frozen dataclasses),
which of their fields become CSV columns, the extra columns its rows carry, and
`run(config, ctx) -> Measurement`. The runner owns everything else: the
progress bar, isolating each configuration (out of memory, unsupported, an
unexpected error each become a row with a status, and the sweep goes on), the
result files, and handing each group of rows (one table) on as soon as its
last row is in. Two things end the sweep instead, the finished rows staying on
disk: Ctrl-C (`Interrupted`) and a `Fatal` error (re-raised saying which sweep
stopped and where its rows are); the groups begun by then are handed on as
partial first.

Progress: the bar and its ETA count work, not rows: a sweep may give each
configuration a relative `cost` (e.g. its FLOPs), and the time left is the
time so far times the cost left over the cost done. A long row reports its
own steps through `ctx.step(done, total)`, shown as "step 37/300" with a small
bar of its own, and moving the main bar by that share of the row's cost.

In turns (`ctx.interleave` rounds, `--interleave`): a suite that gives its run
split at the timing (`Sweep.timed`, returning a `Timed`: the step and what
turns its samples into the row) has each table's configurations prepared,
then timed together by `timing.measure_interleaved`, then finished, so that
rows compared in one table saw the same stretch of clocks.

Statuses: ok, mismatch (failed the correctness gate: listed, never timed as a
win), oom, unsupported (with the reason), error (with the exception).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Column as TableColumn, Table
from rich.text import Text

from bench import memory, timing
from bench.calibrate import Peaks, Share
from bench.errors import Fatal, Unsupported
from bench.profile import Profile, Profiler
from bench.results import ResultWriter
from bench.stats import Stats, stat_columns
from bench.telemetry import COLUMNS as TELEMETRY_COLUMNS, Sampler, Telemetry

STATUSES = ("ok", "mismatch", "oom", "unsupported", "error")


@dataclass
class Measurement:
    """What a suite's run function returns for one configuration."""

    values: dict[str, Any] = field(default_factory=dict)
    stats: Stats | None = None
    status: str = "ok"
    reason: str = ""
    telemetry: Telemetry | None = None  # the timed window's; the runner fills it in from the Context

    def __post_init__(self):
        assert self.status in STATUSES, f"unknown status {self.status!r}"


@dataclass
class Timed:
    """A configuration ready to time: `step` is what is timed, `finish(stats)` turns its samples into the
    row. A suite that splits its run this way (Sweep.timed) can have a table's rows timed in turns."""

    step: Callable[[], object]
    finish: Callable[[Stats], Measurement]


def timed_run(prepare: Callable[[Any, "Context"], "Timed | Measurement"]) -> Callable[[Any, "Context"], Measurement]:
    """The Sweep.run of a suite written as `prepare`: prepare, time the step alone, finish."""

    def run(config: Any, ctx: Context) -> Measurement:
        timed = prepare(config, ctx)
        return timed if isinstance(timed, Measurement) else timed.finish(ctx.time(timed.step))

    return run


@dataclass
class Context:
    """What a suite's run function may use: the device, the timer settings, and
    the GPU telemetry of the timed window (`time()` opens one; a suite timing
    its own loop wraps the timed steps in `with ctx.telemetry():`)."""

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    peaks: Peaks | None = None  # a dict of peak values is taken as Peaks of this device
    crosscheck: bool = False  # also time with triton.testing.do_bench
    interleave: int = 0  # rounds in which a table's rows are timed in turns (Sweep.timed); 0: each alone
    seed: int = 0
    extras: dict = field(default_factory=dict)
    profiler: Profiler | None = None  # set by --profile
    on_step: Callable[[int, int, str], None] | None = None  # set by the runner while a row runs: see step()
    sampler: Sampler | None = None  # made from the device by the first window
    last_telemetry: Telemetry | None = None  # of the last window closed; the runner resets it per row

    def __post_init__(self):
        if isinstance(self.peaks, dict):
            self.peaks = Peaks(self.device, self.peaks)

    def time(self, fn: Callable[[], object]) -> Stats:
        return timing.measure(fn, device=self.device, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms,
                              window=self.telemetry())

    @contextlib.contextmanager
    def telemetry(self):
        """Sample the GPU's clocks, power and throttle reasons while the block
        runs (the timed steps, not the warm-up); the row gets the last window's."""
        if self.sampler is None:
            self.sampler = Sampler(self.device)
        with self.sampler.window() as window:
            yield window
        self.last_telemetry = window.telemetry

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

    def step(self, done: int, total: int, what: str = "step") -> None:
        """Report progress within a long row (a training loop's step 37 of
        300): the progress line shows it. Cheap enough to call at every step;
        it never synchronizes a device. Any thread may call it."""
        if self.on_step is not None:
            self.on_step(done, total, what)

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
    # Label value the speedup column is taken against; several: in each group, the first of them it has.
    baseline: str | tuple[str, ...] | None = None
    # Parameters the baseline row does not depend on: a group without a baseline row of its own takes
    # the one of a group that differs only in these (ddp: DDP's knobs, for the row without DDP).
    baseline_ignores: Sequence[str] = ()
    primary: str = "median_ms"  # what ranks rows within a group
    higher_is_better: bool = False
    time_unit: str = "ms"
    note: str | None = None  # a column shown in the table's note cell (e.g. which kernel ran)
    # Relative work of a configuration, for the progress bar and its ETA (any
    # unit: only ratios count); None: every row counts the same.
    cost: Callable[[Any], float] | None = None
    # Work started in the background while the device is calibrated (only
    # then: it is there to fill that wait), e.g. kernels compiled in other
    # processes; called with the device and seed. `prepare` waits for it.
    start: Callable[[torch.device, int], None] | None = None
    # Work done once before the first configuration, in steps, e.g. compiling
    # the sweep's kernels side by side: each (what the progress line says
    # meanwhile, a function of the context returning a line for the terminal,
    # or None to say nothing).
    prepare: tuple[tuple[str, Callable[[Context], str | None]], ...] = ()
    # The run split at its timing (see Timed), for --interleave: each table's configurations are prepared,
    # timed in turns (timing.measure_interleaved), then finished. None: the suite times each row alone.
    timed: Callable[[Any, Context], Timed | Measurement] | None = None

    def columns(self) -> list[str]:
        return ["suite", *self.params, "status", "reason", *stat_columns(unit=self.time_unit), *TELEMETRY_COLUMNS,
                *self.metrics, "wall_s"]

    def describe(self, config: Any) -> str:
        return " ".join(f"{k}={getattr(config, k)}" for k in self.params)

    def group(self, config: Any) -> tuple:
        """Which table a configuration's row goes in: every parameter but the label."""
        return tuple((k, getattr(config, k)) for k in self.params if k != self.label)

    def costs(self) -> list[float]:
        costs = [float(self.cost(c)) if self.cost else 1.0 for c in self.configs]
        assert all(c > 0 for c in costs), f"{self.suite}: every configuration's cost must be positive"
        return costs

    def meta(self) -> dict:
        """How to read this sweep's CSV, for its JSON sidecar (compare, plot)."""
        return {"params": list(self.params), "label": self.label, "metrics": list(self.metrics),
                "primary": self.primary, "higher_is_better": self.higher_is_better, "baseline": self.baseline}


class Interrupted(Exception):
    """Ctrl-C during a sweep; the finished rows are on disk."""

    def __init__(self, csv_path: Path, rows: int):
        super().__init__(f"interrupted: {rows} finished rows kept in {csv_path}")
        self.csv_path, self.rows = csv_path, rows


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _release_memory(device: torch.device, allocated_before: int) -> None:
    # What one configuration left must not crowd the next. The young
    # generations go at once. On a GPU, reference cycles (autograd graphs,
    # closures) can hold device memory until a full collection, and the caching
    # allocator keeps freed blocks; but a full collection walks every object
    # torch and its compilers have made (a quarter of a second after an
    # inductor compile), so it runs only when the row left more allocated than
    # it found. On a CPU freed tensors return at once.
    gc.collect(1)
    if device.type == "cuda":
        if _allocated(device) > allocated_before:
            gc.collect()
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _guarded(call: Callable[[], Measurement]) -> Measurement:
    """call(), its failure turned into a status (a Fatal error still ends the run)."""
    try:
        return call()
    except Fatal:  # ends the run, not just this configuration
        raise
    except Unsupported as exc:
        return Measurement(status="unsupported", reason=str(exc))
    except torch.OutOfMemoryError as exc:
        return Measurement(status="oom", reason=_one_line(exc))
    except Exception as exc:  # one broken configuration must not end the sweep
        return Measurement(status="error", reason=_one_line(exc))


def measure_one(sweep: Sweep, config: Any, ctx: Context) -> Measurement:
    """Run one configuration, turning its failure into a status. A timed row
    carries the telemetry of the last window its run closed."""
    ctx.last_telemetry = None
    allocated = _allocated(ctx.device)
    try:
        m = _guarded(lambda: sweep.run(config, ctx))
        if m.telemetry is None and m.stats is not None:
            m.telemetry = ctx.last_telemetry
        return m
    finally:
        _release_memory(ctx.device, allocated)


def measure_group(sweep: Sweep, configs: list, ctx: Context, on_row: Callable[[int], None]) -> list[Measurement]:
    """The configurations of one table, timed in turns: each prepared (its failure a status), the prepared
    ones timed together in ctx.interleave rounds, then each finished. If timing them together fails (one
    runs out of memory beside the others), each is timed alone instead. `on_row(i)` before each
    configuration's preparing and finishing, for the progress line. Every row gets the rounds' telemetry."""
    allocated = _allocated(ctx.device)
    try:
        return _in_turns(sweep, configs, ctx, on_row)
    finally:  # after _in_turns has returned: its frame held every row's inputs
        _release_memory(ctx.device, allocated)


def _in_turns(sweep: Sweep, configs: list, ctx: Context, on_row: Callable[[int], None]) -> list[Measurement]:
    prepared = []
    for i, config in enumerate(configs):
        on_row(i)
        prepared.append(_guarded(lambda: sweep.timed(config, ctx)))
    ready = [i for i, p in enumerate(prepared) if isinstance(p, Timed)]
    ctx.last_telemetry = None
    try:
        stats = dict(zip(ready, timing.measure_interleaved(
            [prepared[i].step for i in ready], device=ctx.device, rounds=ctx.interleave,
            warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms, window=ctx.telemetry())))
    except Fatal:
        raise
    except Exception:  # noqa: BLE001 - each is timed alone below, its own failure its own row
        stats = {}
    together = ctx.last_telemetry
    results = []
    for i, p in enumerate(prepared):
        on_row(i)
        if not isinstance(p, Timed):
            results.append(p)
            continue
        ctx.last_telemetry = together if i in stats else None
        m = _guarded(lambda: p.finish(stats[i] if i in stats else ctx.time(p.step)))
        if m.telemetry is None and m.stats is not None:
            m.telemetry = ctx.last_telemetry
        results.append(m)
    return results


def to_row(sweep: Sweep, config: Any, m: Measurement) -> dict:
    params = {k: getattr(config, k) for k in sweep.params}
    row = {"suite": sweep.suite, **params, "status": m.status, "reason": m.reason}
    if m.stats is not None:
        row.update(m.stats.columns())
    if m.telemetry is not None:
        row.update(m.telemetry.columns())
    unknown = set(m.values) - set(sweep.metrics)
    assert not unknown, f"{sweep.suite}: values {sorted(unknown)} are not declared in Sweep.metrics"
    row.update(m.values)
    return row


def eta_seconds(elapsed: float | None, done: float, total: float) -> float | None:
    """Time left if the work left goes at the pace of the work done; None before any is done."""
    if not elapsed or done <= 0:
        return None
    return elapsed * max(total - done, 0.0) / done


class _Eta(ProgressColumn):
    """Time left from the sweep's pace so far. Rich's own estimate averages the
    last 30 s only, which holds no finished row once rows take longer."""

    max_refresh = 0.5

    def render(self, task) -> Text:
        left = eta_seconds(task.elapsed, task.completed, task.total or 0.0)
        if left is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class _RowSteps(ProgressColumn):
    """The row in progress's own steps, when it reports them: a small bar and "step 37/300"."""

    def render(self, task):
        if task.fields.get("step") is None:
            return Text("")
        what, done, total = task.fields["step"]
        line = Table.grid(padding=(0, 1))
        line.add_row(ProgressBar(total=max(total, 1), completed=min(done, total), width=10),
                     Text(f"{what} {done}/{total}", style="progress.download"))
        return line


def progress_bar(console: Console) -> Progress:
    """The sweep's progress line: suite, bar (work done), rows done, elapsed, ETA, the
    row's own steps, then the configuration, which is what gets cut short on a
    narrow terminal."""
    return Progress(
        TextColumn("[bold]{task.fields[suite]}"),
        BarColumn(),
        TextColumn("{task.fields[rows]}", style="progress.download"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        _Eta(),
        _RowSteps(),
        TextColumn("{task.description}", table_column=TableColumn(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console,
        transient=True,
        expand=True,
    )


def _step_reporter(progress: Progress, task, start: float, cost: float) -> Callable[[int, int, str], None]:
    """What ctx.step calls during one row: its steps, and the bar moved by their share of its cost."""

    def on_step(done: int, total: int, what: str) -> None:
        share = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        progress.update(task, completed=start + cost * share, step=(what, done, total))

    return on_step


_clock = time.perf_counter  # the rows' wall_s (a name of its own, for tests)

GroupDone = Callable[[list, bool, list], None]  # (the rows of one table, partial, every row so far), e.g. to print it


def run_sweep(sweep: Sweep, ctx: Context, out_dir: Path, env: dict, console: Console,
              on_group: GroupDone | None = None) -> ResultWriter:
    """Measure every configuration, writing each row as it finishes, and
    handing each group of rows to `on_group` once its last configuration is
    done (or, marked partial, when the sweep ends early)."""
    writer = ResultWriter(out_dir, sweep.suite, sweep.columns(), env, meta=sweep.meta())
    if ctx.profiler is not None:
        ctx.profiler.folder = writer.csv_path.with_name(f"{writer.csv_path.stem}-traces")
    complete = False
    costs = sweep.costs()
    keys = [sweep.group(c) for c in sweep.configs]
    last = {key: i for i, key in enumerate(keys)}  # a group is done after its last configuration
    handed: set = set()
    row_keys: list = []  # the group of each row written, in order

    def hand_on(key: tuple, partial: bool) -> None:
        handed.add(key)
        if on_group is not None:
            on_group([row for row, k in zip(writer.rows, row_keys) if k == key], partial, writer.rows)

    progress = progress_bar(console)
    n = len(sweep.configs)
    started = _clock()
    try:
        with progress:
            task = progress.add_task("", total=sum(costs) or 1.0, suite=sweep.suite, rows=f"0/{n}", step=None)
            for what, prepare in sweep.prepare:
                progress.update(task, description=what)
                said = prepare(ctx)
                if said:
                    console.print(said, style="dim")
            done = 0.0
            if ctx.interleave and sweep.timed is not None:
                batches = [[i for i, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)]
            else:
                batches = [[i] for i in range(n)]
            for batch in batches:
                def describe(j: int, batch=batch) -> None:
                    i = batch[j]
                    progress.update(task, description=sweep.describe(sweep.configs[i]), step=None)
                    if ctx.profiler is not None:  # traces named after the CSV row they belong to
                        ctx.profiler.row = (len(writer.rows) + j, sweep.describe(sweep.configs[i]))

                began = _clock()
                if len(batch) > 1:
                    measured = measure_group(sweep, [sweep.configs[i] for i in batch], ctx, describe)
                else:
                    describe(0)
                    ctx.on_step = _step_reporter(progress, task, done, costs[batch[0]])
                    measured = [measure_one(sweep, sweep.configs[batch[0]], ctx)]
                    ctx.on_step = None
                # The whole configuration's wait (compilation, autotuning, the correctness check, warm-up, timing):
                # where a first run's time goes, which the timed samples alone do not say. Timed in turns, a
                # table's rows share its wait equally.
                wall = round((_clock() - began) / len(batch), 3)
                for i, m in zip(batch, measured):
                    writer.write({**to_row(sweep, sweep.configs[i], m), "wall_s": wall},
                                 m.stats.samples if m.stats else None)
                    row_keys.append(keys[i])
                    done += costs[i]
                    progress.update(task, completed=done, rows=f"{len(writer.rows)}/{n}", step=None)
                    if last[keys[i]] == i:
                        hand_on(keys[i], partial=False)  # printed above the live bar
        complete = True
    except KeyboardInterrupt:
        _hand_on_begun(row_keys, handed, hand_on)
        raise Interrupted(writer.csv_path, len(writer.rows)) from None
    except Fatal as exc:
        exc.suite, exc.csv_path, exc.rows = sweep.suite, writer.csv_path, len(writer.rows)
        _hand_on_begun(row_keys, handed, hand_on)
        raise
    finally:
        ctx.on_step = None
        writer.close(complete, wall_s=round(_clock() - started, 3))
    return writer


def _hand_on_begun(keys: list, handed: set, hand_on: Callable[[tuple, bool], None]) -> None:
    """The groups that have rows but were not handed on yet, as partial, in the order they began."""
    for key in dict.fromkeys(keys):
        if key not in handed:
            hand_on(key, True)


def config_fields(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config)]
