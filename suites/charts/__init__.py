"""The suites' charts, one module per suite, drawn with bench/plot.py's
primitives; each suite's `SUITE` entry names its chart, which `genbench plot`
imports for a run of that suite only."""
