"""The pieces every genbench command shares: the Typer app, the common
options, turning user mistakes, fatal errors and Ctrl-C into exit codes, and
running a suite's sweep through the harness.

The harness's own commands (compare, env, plot) live in modules here and
register themselves on `app`; each suite's command is the suite's own
(suites/cli/), added to `app` by bench/cli.py from the registry
(bench/registry.py). So that `genbench --help`, a command's `--help`,
`compare`, `plot` and a mistyped option answer at once, command modules import
nothing heavy at the top (torch, the sweeps, scipy, matplotlib): each command
imports what it runs inside its body, and its help text is literal.
tests/bench/test_cli.py checks both: the imports, and that the help lists the
suites' names.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperArgument, TyperCommand, TyperGroup

import bench
from bench.errors import BadInput, Fatal

if TYPE_CHECKING:
    import torch

    from bench.runner import Sweep


class _PlainHelp:
    """Help as Typer and Click have long written it: a flag shows no `<bool>`
    value it does not take, and the usage line names arguments in capitals
    (`compare [OPTIONS] BASE NEW`)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # the type column of the rich help shows an option's metavar
        return params

    def collect_usage_pieces(self, ctx):
        capitals = {}
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
                capitals[param.get_usage_pieces(ctx)[0]] = name if param.required else f"[{name}]"
        return [capitals.get(piece, piece) for piece in super().collect_usage_pieces(ctx)]


class Command(_PlainHelp, TyperCommand):
    """Every genbench command: `@app.command(cls=Command)`."""


class Group(_PlainHelp, TyperGroup):
    """genbench and its command groups: `typer.Typer(cls=Group)`."""


app = typer.Typer(
    name="genbench",
    help="Benchmark and profile the building blocks of generative models on your own hardware.",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 140  # logs and pipes: don't squeeze tables into rich's default of 80


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("genbench")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return bench.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"genbench {version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version_: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                           help="Print genbench's version and exit.")] = False,
):
    pass


DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present), cuda, cuda:N or cpu.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the CSV, JSON and samples files.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for inputs and weights; the same seed gives the same data.")]
WarmupOpt = Annotated[float, typer.Option("--warmup-ms", help="Warm-up budget per configuration (discarded).")]
RepOpt = Annotated[float, typer.Option("--rep-ms", help="Timed budget per configuration; at least 5 repetitions.")]
CrosscheckOpt = Annotated[
    bool, typer.Option("--crosscheck", help="Also time with triton.testing.do_bench (CUDA) into do_bench_median_ms.")
]
# Rounds of --interleave on a GPU when it is not given. On a power-capped H100
# the ratio of two rows' medians spread by 0.003 over three runs in 10 rounds,
# against 0.071 with each row alone (docs/measurements.md, session 19). On a
# CPU rows run alone unless asked.
GPU_INTERLEAVE = 10
InterleaveOpt = Annotated[
    Optional[int], typer.Option("--interleave", metavar="ROUNDS", show_default=False,
                                help="Time each table's rows in turns, ROUNDS rounds of each row's share of --rep-ms, "
                                "so all see the same GPU clocks and their ratios hold steadier; they are prepared "
                                "together, so a table's inputs are in memory at once. 0: each row alone. "
                                f"[default: {GPU_INTERLEAVE} on a GPU, 0 on a CPU]")
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
    interleave: int | None = None  # None: GPU_INTERLEAVE on a GPU, 0 elsewhere

    def __post_init__(self):
        if self.warmup_ms < 0 or self.rep_ms <= 0:
            raise BadInput("--warmup-ms must be >= 0 and --rep-ms > 0")
        if self.interleave is None:
            object.__setattr__(self, "interleave", GPU_INTERLEAVE if self.device.type == "cuda" else 0)
        if self.interleave < 0:
            raise BadInput("--interleave takes a number of rounds, 0 (off) or more")
        # Created and written to now, before anything is measured or trained: a
        # folder that cannot take the results fails the command, not a long run's end.
        from bench.results import writable_folder

        try:
            writable_folder(self.out)
        except BadInput as exc:
            raise BadInput(f"--out: {exc}") from None


def plugin_help(group: str, lead: str) -> str:
    """An option's help naming the implementations installed packages register under `group` too."""
    from bench import registry

    installed = registry.names(group)
    also = f" Installed: {', '.join(installed)}." if installed else ""
    return f"{lead}{also} Or your own, module:function (see --list)."


def list_option(group: str, builtin: tuple[str, ...], own: str):
    """The callback of a suite's eager --list: the built-in names, the installed ones
    (entry-point group `group`) with the package each comes from, and `own`, how to
    give one's own. Nothing is imported."""
    from bench import registry

    def show(value: bool) -> None:
        if not value:
            return
        console.print(f"[bold]built in[/]   {', '.join(builtin)}", highlight=False, soft_wrap=True)
        for ep in registry.entry_points(group):
            console.print(f"[bold]installed[/]  {ep.name}  ({registry.source(ep)})", highlight=False, soft_wrap=True)
        console.print(f"[bold]your own[/]   {own}; installed packages add theirs under the entry-point group "
                      f"{group} (README: Benchmark your own implementation)", highlight=False, soft_wrap=True)
        raise typer.Exit()

    return show


def cli_errors(fn):
    """A user's mistake becomes one red line and exit 2; an error that ended the
    run (`Fatal`) one red line saying where the finished rows are, and exit 1; a
    file the system would not read or write (OSError) one red line naming it,
    and exit 1; Ctrl-C exits 130."""

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
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as exc:  # the machine, not the arguments: a disk full or read-only, a file gone
            said = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
            err_console.print(f"[bold red]error:[/] {said}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            if not _interrupted(exc):
                raise
            err_console.print(f"[yellow]{exc}[/]", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _interrupted(exc: Exception) -> bool:
    """Whether `exc` is the runner's Ctrl-C (`bench.runner.Interrupted`). Looked
    up rather than imported: bench.runner imports torch, and a command that
    never ran a sweep cannot have raised it."""
    runner = sys.modules.get("bench.runner")
    return runner is not None and isinstance(exc, runner.Interrupted)


def cached_peaks(device: torch.device) -> dict | None:
    """This device's cached peaks; None, with a warning, for a file that cannot be used."""
    from bench import calibrate

    try:
        return calibrate.load(device)
    except calibrate.Unusable as exc:
        err_console.print(f"[yellow]warning:[/] {exc}: not used", highlight=False, soft_wrap=True)
        return None


def measure_peaks(device: torch.device) -> dict:
    """Calibrate now, a progress line naming what is being measured."""
    from bench import calibrate

    progress = Progress(TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, transient=True)
    with progress:
        task = progress.add_task("", total=len(calibrate.RATES))

        def on_step(name: str) -> None:
            progress.update(task, completed=list(calibrate.RATES.values()).index(name), description=name)

        return calibrate.calibrate(device, on_step=on_step)


def run_suite(sweep: Sweep, opts: RunOptions, extras: dict | None = None) -> list[dict]:
    """Measure a sweep, print its tables as they complete and say where the files are."""
    import torch

    import bench.env
    from bench import calibrate, profile, report
    from bench.runner import Context, run_sweep

    bench.env.cache_dir()  # an unwritable cache folder: one red line now, not a traceback mid-run
    torch.manual_seed(opts.seed)
    peaks = cached_peaks(opts.device)
    if peaks is None:
        console.print(f"[dim]measuring this device's peaks once ({bench.env.device_name(opts.device)}); "
                      "see `genbench env --calibrate`[/]")
        if sweep.start is not None:  # work that waits beside the calibration rather than after it
            sweep.start(opts.device, opts.seed)
        peaks = measure_peaks(opts.device)
    ctx = Context(
        device=opts.device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, peaks=calibrate.Peaks(opts.device, peaks),
        crosscheck=opts.crosscheck, interleave=opts.interleave, seed=opts.seed, extras=extras or {},
        profiler=profile.Profiler(opts.device) if opts.profile else None,
    )
    info = bench.env.collect(opts.device, opts.seed)
    # The peaks' own dict: one re-measured during the run is in the JSON the run's end writes (plot draws it).
    info["peaks"] = ctx.peaks.values
    if opts.interleave and sweep.timed is not None:
        info["interleave_rounds"] = opts.interleave  # the rows of each table were timed in turns
    # Each table as soon as its group is done (above the live bar); Ctrl-C prints the groups begun, as partial.
    writer = run_sweep(sweep, ctx, opts.out, info, console,
                       on_group=lambda rows, partial, pool: report.render(sweep, rows, console, partial, pool))
    for note in ctx.peaks.notes:
        console.print(f"[yellow]peaks:[/] {note}", highlight=False)
    for line in report.clock_warnings(sweep, writer.rows):  # rows that ran throttled or below the maximum clock
        console.print(f"[yellow]clocks:[/] {line}", highlight=False, soft_wrap=True)
    for line in ctx.sampler.notes() if ctx.sampler else ():  # GPU telemetry: off, or readings NVML refused
        console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
    if ctx.profiler is not None:
        profile.render(ctx.profiler, console)
    console.print(f"wrote {writer.csv_path} ({len(writer.rows)} rows), {writer.json_path.name}"
                  + (f", {writer.samples_path.name}" if writer.samples_path.exists() else ""))
    return writer.rows
