"""The pieces every genbench command shares: the Typer app, the common
options, turning user mistakes, fatal errors and Ctrl-C into exit codes, and
running a suite's sweep through the harness.

Each suite's command lives in its own module here and registers itself on
`app`; bench/cli.py imports them all.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import bench.env
from bench import calibrate, profile, report
from bench.errors import BadInput, Fatal
from bench.runner import Context, Interrupted, Sweep, run_sweep

app = typer.Typer(
    name="genbench",
    help="Benchmark and profile the building blocks of generative models on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 140  # logs and pipes: don't squeeze tables into rich's default of 80

DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present), cuda, cuda:N or cpu.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the CSV, JSON and samples files.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for inputs and weights; the same seed gives the same data.")]
WarmupOpt = Annotated[float, typer.Option("--warmup-ms", help="Warm-up budget per configuration (discarded).")]
RepOpt = Annotated[float, typer.Option("--rep-ms", help="Timed budget per configuration; at least 5 repetitions.")]
CrosscheckOpt = Annotated[
    bool, typer.Option("--crosscheck", help="Also time with triton.testing.do_bench (CUDA) into do_bench_median_ms.")
]
ProfileOpt = Annotated[
    bool, typer.Option("--profile", help="After timing, run each configuration under torch.profiler: Chrome/Perfetto "
                       "traces in OUT/<run>-traces/ and a top-10 table of kernels by device time (CPU time on CPU).")
]


@dataclass(frozen=True)
class RunOptions:
    """Options every suite takes."""

    device: torch.device
    out: Path = Path("results")
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    crosscheck: bool = False
    profile: bool = False

    def __post_init__(self):
        if self.warmup_ms < 0 or self.rep_ms <= 0:
            raise BadInput("--warmup-ms must be >= 0 and --rep-ms > 0")


def cli_errors(fn):
    """A user's mistake becomes one red line and exit 2; an error that ended the
    run (`Fatal`) one red line saying where the finished rows are, and exit 1;
    Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line, even in logs
            raise typer.Exit(2) from None
        except Fatal as exc:
            kept = f". {exc.rows} finished row(s) kept in {exc.csv_path}" if exc.csv_path is not None else ""
            err_console.print(f"[bold red]error:[/] {exc.suite or 'the'} run stopped: {exc}{kept}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Interrupted as exc:
            err_console.print(f"[yellow]{exc}[/]", highlight=False)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def cached_peaks(device: torch.device) -> dict | None:
    """This device's cached peaks; None, with a warning, for a file that cannot be used."""
    try:
        return calibrate.load(device)
    except calibrate.Unusable as exc:
        err_console.print(f"[yellow]warning:[/] {exc}: not used", highlight=False, soft_wrap=True)
        return None


def measure_peaks(device: torch.device) -> dict:
    """Calibrate now, a progress line naming what is being measured."""
    progress = Progress(TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, transient=True)
    with progress:
        task = progress.add_task("", total=len(calibrate.RATES))

        def on_step(name: str) -> None:
            progress.update(task, completed=list(calibrate.RATES.values()).index(name), description=name)

        return calibrate.calibrate(device, on_step=on_step)


def run_suite(sweep: Sweep, opts: RunOptions, extras: dict | None = None) -> list[dict]:
    """Measure a sweep, print its tables as they complete and say where the files are."""
    bench.env.cache_dir()  # an unwritable cache folder: one red line now, not a traceback mid-run
    torch.manual_seed(opts.seed)
    peaks = cached_peaks(opts.device)
    if peaks is None:
        console.print(f"[dim]measuring this device's peaks once ({bench.env.device_name(opts.device)}); "
                      "see `genbench env --calibrate`[/]")
        peaks = measure_peaks(opts.device)
    ctx = Context(
        device=opts.device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, peaks=calibrate.Peaks(opts.device, peaks),
        crosscheck=opts.crosscheck, seed=opts.seed, extras=extras or {},
        profiler=profile.Profiler(opts.device) if opts.profile else None,
    )
    info = bench.env.collect(opts.device, opts.seed)
    # The peaks' own dict: one re-measured during the run is in the JSON the run's end writes (plot draws it).
    info["peaks"] = ctx.peaks.values
    # Each table as soon as its group is done (above the live bar); Ctrl-C prints the groups begun, as partial.
    writer = run_sweep(sweep, ctx, opts.out, info, console,
                       on_group=lambda rows, partial: report.render(sweep, rows, console, partial=partial))
    for note in ctx.peaks.notes:
        console.print(f"[yellow]peaks:[/] {note}", highlight=False)
    if ctx.profiler is not None:
        profile.render(ctx.profiler, console)
    console.print(f"wrote {writer.csv_path} ({len(writer.rows)} rows), {writer.json_path.name}"
                  + (f", {writer.samples_path.name}" if writer.samples_path.exists() else ""))
    return writer.rows
