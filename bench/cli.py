"""genbench's command line. `genbench --help` lists the commands; each lives in
bench/commands/ and registers itself on the shared Typer app."""

from bench.commands import app
from bench.commands import attention, compare, ddp, env, medusa, plot, precision  # noqa: F401  (registers the commands)


def main() -> None:
    app()
