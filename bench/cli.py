"""genbench's command line: a command per suite, as the registry finds them
(bench/registry.py), then the harness's own commands (bench/commands/:
compare, env, plot). `genbench --help` lists them all."""

import warnings

import typer

from bench import registry
from bench.commands import Command, app, err_console

HARNESS = ("compare", "env", "plot")  # bench/commands' own, which no suite may take


def add_suites() -> None:
    found, problems = registry.suites()
    problems = list(problems)
    for suite in found:
        if suite.name in HARNESS:
            problems.append(f"suite {suite.name}: the name of genbench's own command; left out")
        elif isinstance(suite.command, typer.Typer):
            app.add_typer(suite.command, name=suite.name)
        else:
            app.command(suite.name, cls=Command)(suite.command)
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {problem}", highlight=False, soft_wrap=True)


add_suites()

# The harness's commands register themselves on import, after the suites: --help lists those first.
from bench.commands import compare, env, plot  # noqa: E402, F401


def main() -> None:
    # torch warns once when the autograd engine's thread makes its first cuBLAS call before a CUDA
    # context is current there, and then makes the device's primary context current itself: on a
    # GPU this lands in the middle of a run's tables, with nothing for the user to do about it.
    warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")
    app()
