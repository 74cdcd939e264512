"""Development tools: not part of genbench's CLI, run from the repository root as
`python -m tools.<name> --help`. Each has a smoke test in tests/tools/."""
