"""The exceptions the harness knows about.

`BadInput` is the one project exception for a user's mistake: the CLI turns it
into a red line and exit code 2. `Unsupported` is raised by a suite or an
implementation that cannot run a configuration on this machine; the runner
turns it into a row with status `unsupported` and the reason. `Fatal` ends the
whole run: the runner keeps the rows finished so far and lets it through, and
the CLI prints its message and where those rows are, then exits 1.
"""

from __future__ import annotations

from pathlib import Path


class BadInput(Exception):
    """A user's mistake: an option or file that cannot be used as given."""


class Unsupported(Exception):
    """This configuration cannot run here; the message says why."""


class Fatal(Exception):
    """This failure ends the whole run, not just this configuration.

    For failures after which the next configuration would fail the same way,
    or hang: a worker process died or stopped making progress (bench/launch.py).
    The runner writes no row for it; it stops the sweep, closes the result
    files with the rows finished so far, says which sweep stopped and where its
    rows are (`suite`, `csv_path`, `rows`), and re-raises it."""

    suite: str = ""  # set by the runner
    csv_path: Path | None = None
    rows: int = 0
