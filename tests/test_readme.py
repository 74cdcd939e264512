"""The README's commands as a user would type them: every `genbench ...` line in
its shell blocks parses against the CLI (each option exists and takes the value
given), and the ones that need no GPU and no file of the user's run as written."""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from bench.cli import app

# Typer 0.2x vendors its own click; older releases use click itself.
_click = getattr(typer.core, "_click", None) or click
Context, UsageError = _click.core.Context, _click.exceptions.UsageError
Exit = getattr(_click.exceptions, "Exit", typer.Exit)
README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent


def readme_commands() -> list[str]:
    """Each genbench command line of the README's bash/sh blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].split(">>", 1)[0].strip()
            if line.startswith("genbench "):
                commands.append(line)
    return commands


def parse(args: list[str]) -> None:
    """Parse a command line as the CLI would, without running the command."""
    command, name = typer.main.get_command(app), "genbench"
    ctx = None
    while hasattr(command, "get_command") and args and not args[0].startswith("-"):  # a group
        ctx = Context(command, info_name=name, parent=ctx)  # genbench's own options come before the command
        name, args = args[0], args[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"no command {name!r}"
    command.make_context(name, list(args), parent=ctx)


def test_the_readme_has_commands():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses(line):
    args = shlex.split(line)[1:]
    try:
        parse(args)
    except (Exit, typer.Exit) as exc:  # --help, --version, --list end here, as they should
        assert exc.exit_code == 0
    except UsageError as exc:
        pytest.fail(f"{line!r}: {exc.format_message()}")


def test_the_readme_compare_example_runs_on_a_fresh_clone(monkeypatch):
    (line,) = [c for c in readme_commands() if c.startswith("genbench compare results/reference/")]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, shlex.split(line)[1:])
    assert result.exit_code == 0, result.output
