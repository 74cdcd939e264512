"""`genbench plot RESULTS.csv -o FILE.png`: the chart that fits the run's suite
(see bench/plot.py); PNG, SVG or PDF by the file's suffix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import Command, app, cli_errors, console


@app.command("plot", cls=Command)
@cli_errors
def plot_command(
    results: Annotated[Path, typer.Argument(metavar="RESULTS", help="A run's CSV (its JSON sidecar beside it).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Image to write (.png, .svg, .pdf). "
                                                   "Default: the CSV's name with .png.")] = None,
):
    """Chart a run with the chart its suite registered; a bar chart of the primary metric for a suite without one."""
    from bench import plot
    from bench.compare import load_run

    run = load_run(results)
    path = output or results.with_suffix(".png")
    plot.save(plot.figure(run), path)
    console.print(f"wrote {path}", highlight=False)
