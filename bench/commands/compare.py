"""`genbench compare BASE.csv NEW.csv`: regressions between two runs of a suite.

Exit status: 0 when nothing got worse; 1 when a row is worse beyond the
threshold (and significantly so), newly failing, or gone (unless
--allow-missing); 2 when the runs cannot be compared: a file cannot be used,
the runs share no configuration, or they ran on different hardware (unless
--allow-different-hardware). See bench/compare.py for how rows are matched and
judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import Command, app, cli_errors, console
from bench.errors import BadInput

FORMATS = ("table", "md")


@app.command("compare", cls=Command)
@cli_errors
def compare_command(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The reference run's CSV (its .json and .samples.npz beside it).")],
    new: Annotated[Path, typer.Argument(metavar="NEW", help="The run to judge, a CSV of the same suite.")],
    threshold: Annotated[str, typer.Option(help="Smallest change that counts, e.g. 10% or 5.")] = "10%",
    metric: Annotated[Optional[str], typer.Option(help="Column to compare, e.g. median_ms, tflops, tokens_per_s, "
                                                  "peak_mem_MiB. Default: the suite's primary metric.")] = None,
    format_: Annotated[str, typer.Option("--format", help="table (terminal) or md (Markdown for a CI job summary "
                                         "or a pull-request comment).")] = "table",
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Rows of BASE that NEW lacks (gone) are "
                                                "no regression: for a sweep narrowed on purpose.")] = False,
    allow_different_hardware: Annotated[bool, typer.Option(
        "--allow-different-hardware", help="Compare runs from different GPU models or counts (a warning instead "
        "of exit 2): for a look at two machines, not a regression gate.")] = False,
):
    """Match two runs row by row and mark each: better, worse, unchanged, new, gone, newly failing.
    Exit 1 on a row worse, newly failing or gone; 2 when the runs cannot be compared."""
    from bench import compare as cmp

    if format_ not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, not {format_!r}")
    result = cmp.compare(cmp.load_run(base), cmp.load_run(new), metric, cmp.parse_threshold(threshold),
                         allow_missing=allow_missing, allow_different_hardware=allow_different_hardware)
    if format_ == "md":
        typer.echo(cmp.markdown(result), nl=False)
    else:
        cmp.render(result, console)
    if result.regressions:
        raise typer.Exit(1)
