"""The sweep loop: statuses, isolation, files, interruption, fatal errors."""

import csv
import json
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

from bench import report
from bench.errors import Fatal, Unsupported
from bench.results import load_samples
from bench.runner import Context, Interrupted, Measurement, Sweep, run_sweep
from bench.stats import Stats


@dataclass(frozen=True)
class Toy:
    impl: str
    size: int


def _run(cfg: Toy, ctx: Context) -> Measurement:
    if cfg.impl == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
    if cfg.impl == "nope":
        raise Unsupported("head dim 80 not supported")
    if cfg.impl == "broken":
        raise ValueError("something else\nwith a second line")
    if cfg.impl == "wrong":
        return Measurement({"rel_err": 0.5}, status="mismatch", reason="rel_err too large")
    if cfg.impl == "ctrl-c":
        raise KeyboardInterrupt
    if cfg.impl == "fatal":
        raise Fatal("rank 1 exited with code 3")
    ms = {"fast": 1.0, "slow": 2.0}[cfg.impl]
    return Measurement({"rel_err": 0.0}, stats=Stats.of([ms, ms * 1.01, ms * 0.99, ms, ms]))


def _sweep(impls, sizes=(1,)):
    return Sweep(
        suite="toy", configs=[Toy(i, s) for s in sizes for i in impls], run=_run,
        params=("impl", "size"), metrics=("rel_err",), baseline="slow",
    )


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_failure_becomes_a_row_and_the_sweep_goes_on(tmp_path):
    sweep = _sweep(["slow", "oom", "nope", "broken", "wrong", "fast"])
    writer = run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {"x": 1}, Console(file=open("/dev/null", "w")))
    rows = _read(writer.csv_path)
    assert [r["status"] for r in rows] == ["ok", "oom", "unsupported", "error", "mismatch", "ok"]
    assert rows[1]["reason"].startswith("OutOfMemoryError")
    assert rows[2]["reason"] == "head dim 80 not supported"
    assert rows[3]["reason"] == "ValueError: something else"
    assert rows[4]["median_ms"] == ""  # a mismatch is never timed
    assert float(rows[5]["median_ms"]) == 1.0
    meta = json.loads(writer.json_path.read_text())
    assert meta["complete"] is True and meta["rows"] == 6 and meta["env"] == {"x": 1}
    samples = load_samples(writer.json_path)
    assert sorted(samples) == [0, 5] and len(samples[5]) == 5


def test_interrupted_run_keeps_finished_rows(tmp_path):
    sweep = _sweep(["slow", "fast", "ctrl-c", "fast"])
    with pytest.raises(Interrupted) as info:
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    assert info.value.rows == 2
    text = info.value.csv_path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3  # header + 2 whole rows
    meta = json.loads(info.value.csv_path.with_suffix(".json").read_text())
    assert meta["complete"] is False and meta["rows"] == 2


def test_a_fatal_error_ends_the_run_keeping_finished_rows(tmp_path):
    sweep = _sweep(["slow", "fatal", "fast"])
    with pytest.raises(Fatal, match="rank 1 exited with code 3") as info:
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    (csv_path,) = tmp_path.glob("toy-*.csv")
    assert (info.value.suite, info.value.csv_path, info.value.rows) == ("toy", csv_path, 1)
    rows = _read(csv_path)
    assert [(r["impl"], r["status"]) for r in rows] == [("slow", "ok")]  # no row for the fatal config, none after
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    assert meta["complete"] is False and meta["rows"] == 1


def test_full_float_precision_in_csv(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("fast", 1)], params=("impl", "size"), metrics=("rel_err",),
                  run=lambda c, ctx: Measurement({"rel_err": 1 / 3}, stats=Stats.of([0.1 + 0.2])))
    writer = run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    row = _read(writer.csv_path)[0]
    assert float(row["rel_err"]) == 1 / 3 and float(row["median_ms"]) == 0.1 + 0.2


def test_undeclared_column_is_a_bug(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("fast", 1)], params=("impl", "size"), metrics=(),
                  run=lambda c, ctx: Measurement({"surprise": 1}))
    with pytest.raises(AssertionError, match="surprise"):
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))


def test_best_row_and_speedup_skip_failures():
    sweep = _sweep([])
    rows = [
        {"impl": "slow", "status": "ok", "median_ms": 2.0},
        {"impl": "wrong", "status": "mismatch", "median_ms": 0.1},
        {"impl": "fast", "status": "ok", "median_ms": 1.0},
    ]
    assert report.best_row(sweep, rows)["impl"] == "fast"
    assert report.speedup(sweep, rows[2], rows[0]) == 2.0
    assert report.speedup(sweep, rows[1], rows[0]) is None
    assert report.speedup(sweep, {"impl": "calibration", "status": "ok"}, rows[0]) is None
    console = Console(record=True, width=200)
    report.render(sweep, [dict(r, suite="toy", size=1, reason="") for r in rows], console)
    text = console.export_text()
    assert "2.00x" in text and "mismatch" in text
