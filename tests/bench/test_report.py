"""Terminal tables: groups in numeric order, rows in measured order, partial groups marked."""

import io

from rich.console import Console

from bench import report
from bench.runner import Sweep

SWEEP = Sweep(suite="attention", configs=[], run=lambda cfg, ctx: None, params=("impl", "seq", "causal"),
              metrics=(), baseline="naive")


def _row(impl, seq, causal=False):
    return {"impl": impl, "seq": seq, "causal": causal, "status": "ok", "median_ms": 1.0, "reason": ""}


def _titles(rows) -> list[str]:
    console = Console(file=io.StringIO(), record=True, width=200)
    report.render(SWEEP, rows, console)
    return [line.strip() for line in console.export_text().splitlines() if line.startswith("attention")]


def test_groups_are_ordered_by_number_not_by_text():
    rows = [_row("naive", 1024), _row("naive", 256), _row("sdpa", 512), _row("naive", 512), _row("sdpa", 256)]
    assert _titles(rows) == ["attention  seq=256  causal=False", "attention  seq=512  causal=False",
                             "attention  seq=1024  causal=False"]


def test_numbers_first_then_text_and_rows_keep_their_order():
    assert report._order((("seq", 1024), ("mode", "fwd"))) < report._order((("seq", 4096), ("mode", "bwd")))
    assert report._order((("size", 2.5),)) < report._order((("size", 10),)) < report._order((("size", "1 KiB"),))
    console = Console(file=io.StringIO(), record=True, width=200)
    report.render(SWEEP, [_row("sdpa", 64), _row("naive", 64), _row("tiled", 64)], console)
    text = console.export_text()
    assert text.index("sdpa") < text.index("naive") < text.index("tiled")  # as measured, not sorted by name


def test_a_partial_group_says_so():
    console = Console(file=io.StringIO(), record=True, width=200)
    report.render(SWEEP, [_row("naive", 256, True)], console, partial=True)
    words = " ".join(console.export_text().split())  # a title wider than its table wraps
    assert words.startswith("attention seq=256 causal=True (partial) ┏")


def test_several_baselines_each_group_takes_the_first_it_has():
    sweep = Sweep(suite="attention", configs=[], run=lambda cfg, ctx: None, params=("impl", "seq", "causal"),
                  metrics=(), baseline=("naive", "sdpa"))
    rows = [dict(_row("naive", 64), median_ms=4.0), dict(_row("sdpa", 64), median_ms=2.0),
            dict(_row("tiled", 64), median_ms=1.0),
            dict(_row("sdpa", 128), median_ms=3.0), dict(_row("tiled", 128), median_ms=2.0)]
    assert report.baseline_row(sweep, rows[:3])["impl"] == "naive"
    assert report.baseline_row(sweep, rows[3:])["impl"] == "sdpa"
    assert report.baseline_row(sweep, [rows[2]]) is None
    console = Console(file=io.StringIO(), record=True, width=200)
    report.render(sweep, rows, console)
    text = " ".join(console.export_text().split())
    assert "4.00x" in text and "1.50x" in text  # tiled against naive at 64, against sdpa at 128
    assert "speedup: median_ms against naive" in text and "speedup: median_ms against sdpa" in text


def test_a_group_without_its_baseline_takes_it_from_the_group_that_differs_in_ignored_params():
    # ddp's shape: the row without DDP runs once, with the first knob set; the other knob sets' tables take it.
    sweep = Sweep(suite="ddp", configs=[], run=lambda cfg, ctx: None, params=("setup", "batch", "bucket"),
                  metrics=(), label="setup", baseline="no-ddp", baseline_ignores=("bucket",), primary="tokens_per_s",
                  higher_is_better=True)
    row = lambda setup, batch, bucket, tps: dict(suite="ddp", setup=setup, batch=batch, bucket=bucket,
                                                 status="ok", reason="", tokens_per_s=tps)
    rows = [row("no-ddp", 16, 25, 100.0), row("ddp-1", 16, 25, 97.0), row("ddp-1", 16, 100, 98.0),
            row("ddp-1", 8, 100, 50.0)]
    assert report.baseline_row(sweep, rows[2:3], rows) is rows[0]
    assert report.baseline_row(sweep, rows[3:], rows) is None  # another batch: not its baseline
    assert report.baseline_row(sweep, rows[2:3]) is None  # nothing to look in
    console = Console(file=io.StringIO(), record=True, width=200)
    report.render(sweep, rows[2:3], console, pool=rows)
    text = " ".join(console.export_text().split())
    assert "0.98x" in text and "against no-ddp, its row in another table" in text
