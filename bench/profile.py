"""`--profile`: each configuration's measured callable run once more under
torch.profiler, after it was timed, so the timings never carry the
profiler's overhead.

    genbench attention --seq 1k --impl tiled --profile

The schedule skips one call (wait), records but discards one (warm-up: the
profiler's own start-up cost lands there) and keeps three (active). The
active calls are written as one Chrome trace per row, in a folder per row
beside the run's CSV:

    results/attention-20261128-203000-traces/row3-impl=tiled-seq=1024-.../rank0.pt.trace.json

Open a trace at https://ui.perfetto.dev (or chrome://tracing). The layout is
the one both trace analysers read, neither of which genbench needs:
- TensorBoard's torch-tb-profiler plugin (`pip install 'genbench[tb]'`,
  deprecated upstream): `tensorboard --logdir <traces folder>` shows each
  row's folder as a run, and its `<worker>.pt.trace.json` as the worker.
- Holistic Trace Analysis (`pip install 'genbench[hta]'`), maintained:
  `TraceAnalysis(trace_dir=<a row's folder>)`. It reads every file in a
  folder as one rank of one job, hence a folder per row.

Each profile also keeps the ten operators (on a GPU: kernels) with the most
self time on the device, or on the CPU when the run is on the CPU.

A suite asks for a profile through `Context.profile(fn)`, a no-op unless
--profile was given; the runner tells the `Profiler` which folder and which
CSV row the trace belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, schedule, supported_activities

WAIT, WARMUP, ACTIVE = 1, 1, 3
TOP = 10
PERFETTO = "https://ui.perfetto.dev"


@dataclass(frozen=True)
class OpTime:
    """One line of the top-10: an operator or kernel over the active steps."""

    name: str
    ms_per_step: float  # self time on the device (or CPU), averaged over the active steps
    calls_per_step: float
    share: float  # of the self time of every event in the same steps


@dataclass
class Profile:
    row: int
    description: str
    trace: Path | None
    by: str  # "CUDA" or "CPU": whose time ranks the top-10
    top: list[OpTime] = field(default_factory=list)
    error: str | None = None


# The trace's file name: TensorBoard's plugin reads what comes before
# `.pt.trace.json` as the worker's name (and a trailing `.<digits>` as a span).
WORKER = "rank0"


def _slug(text: str) -> str:
    # Folder names that Perfetto, TensorBoard, HTA and shells all accept.
    return re.sub(r"[^A-Za-z0-9=_+-]+", "-", text.replace(" ", "-")).strip("-")[:150]


def top_ops(events, device_type: str, steps: int = ACTIVE, n: int = TOP) -> list[OpTime]:
    """The `n` events of `prof.key_averages()` with the most self time.

    On CUDA the ranking is by self device time, which only kernels, memcpys
    and memsets have, so the list names the kernels that ran; on the CPU by
    self CPU time, i.e. the aten operators doing the work.
    """

    def self_us(e) -> float:
        return e.self_device_time_total if device_type == "cuda" else e.self_cpu_time_total

    # ProfilerStep#N spans a whole step: its self time is the gaps between ops.
    events = [e for e in events if not e.key.startswith("ProfilerStep") and self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:n]
    return [OpTime(e.key, self_us(e) / 1e3 / steps, e.count / steps, self_us(e) / total) for e in ranked]


def profile_fn(fn: Callable[[], object], device: torch.device, trace: Path) -> list[OpTime]:
    """Call `fn` WAIT + WARMUP + ACTIVE times under torch.profiler, write the
    Chrome trace of the active calls to `trace`, and return the top-10."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda" and ProfilerActivity.CUDA in supported_activities():
        activities.append(ProfilerActivity.CUDA)
    trace.parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(
        activities=activities,
        schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace)),
        record_shapes=True,
    ) as prof:
        for _ in range(WAIT + WARMUP + ACTIVE):
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # each step holds its own kernels
            prof.step()
    by = "cuda" if ProfilerActivity.CUDA in activities else "cpu"
    return top_ops(prof.key_averages(), by)


class Profiler:
    """The profiles of one run. The runner sets `folder` once and `row`
    (CSV row index, description) before each configuration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.folder: Path | None = None
        self.row: tuple[int, str] = (0, "")
        self.profiles: list[Profile] = []

    @property
    def by(self) -> str:
        return "CUDA" if self.device.type == "cuda" else "CPU"

    def profile(self, fn: Callable[[], object]) -> Profile:
        assert self.folder is not None, "the runner sets Profiler.folder before the first row"
        index, description = self.row
        trace = self.folder / f"row{index}-{_slug(description)}" / f"{WORKER}.pt.trace.json"
        try:
            result = Profile(index, description, trace, self.by, profile_fn(fn, self.device, trace))
        except Exception as exc:  # the row's timings stand; the failure is shown with the tables
            first = (str(exc).strip().splitlines() or [""])[0]
            result = Profile(index, description, None, self.by, error=f"{type(exc).__name__}: {first}"[:300])
        self.profiles.append(result)
        return result


def render(profiler: Profiler, console: Console) -> None:
    """A top-10 table per profiled row, then where the traces are and how to open them."""
    for p in profiler.profiles:
        if p.error:
            console.print(f"[red]profile of row {p.row} ({p.description}) failed: {p.error}[/]", highlight=False)
            continue
        console.print(f"[bold]profile of row {p.row}[/]: {p.description}", highlight=False)
        table = Table()
        table.add_column(f"top {TOP} by self {p.by} time", overflow="fold", max_width=90)
        table.add_column(f"{p.by} ms / step", justify="right", no_wrap=True)
        table.add_column("share", justify="right", no_wrap=True)
        table.add_column("calls / step", justify="right", no_wrap=True)
        for op in p.top:
            table.add_row(op.name, f"{op.ms_per_step:.4g}", f"{100 * op.share:.1f}%", f"{op.calls_per_step:g}")
        console.print(table)
    traces = [p.trace for p in profiler.profiles if p.trace is not None]
    if not traces:
        if not profiler.profiles:
            console.print("[yellow]--profile: no configuration was profiled (none ran, or this suite does not "
                          "call ctx.profile)[/]")
        return
    console.print(f"[dim]a step is one call of the measured function; times are the mean of {ACTIVE} profiled "
                  "steps, taken after the timed repetitions[/]")
    console.print(
        f"traces: {profiler.folder}/ (a folder per row, {len(traces)} in all). Open one at {PERFETTO} (Open trace "
        f"file) or chrome://tracing; with the optional, deprecated torch-tb-profiler plugin (genbench[tb]): "
        f"tensorboard --logdir {profiler.folder}; with Holistic Trace Analysis (genbench[hta]): "
        f"TraceAnalysis(trace_dir=<a row's folder>)",
        highlight=False, soft_wrap=True,
    )
