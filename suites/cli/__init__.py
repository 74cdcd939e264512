"""The suites' commands, one module per suite: its Typer command, its options,
and the `SUITE` entry (bench/registry.py) that pyproject.toml declares under
`genbench.suites`. Like bench/commands/, these modules import nothing heavy
at the top (torch, the sweeps, scipy, matplotlib): `genbench --help` imports
them all, and each command imports what it runs inside its body."""
