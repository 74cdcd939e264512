"""The exceptions the harness knows about.

`BadInput` is the one project exception for a user's mistake: the CLI turns it
into a red line and exit code 2. `Unsupported` is raised by a suite or an
implementation that cannot run a configuration on this machine; the runner
turns it into a row with status `unsupported` and the reason.
"""


class BadInput(Exception):
    """A user's mistake: an option or file that cannot be used as given."""


class Unsupported(Exception):
    """This configuration cannot run here; the message says why."""
