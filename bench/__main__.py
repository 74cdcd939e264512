"""`python -m bench ...` is the same as `genbench ...`."""

from bench.cli import main

main()
