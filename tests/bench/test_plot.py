"""genbench plot: the chart a suite registered, a bar chart for any other, PNG files written. The suites'
charts themselves: tests/suites/test_charts.py."""

from __future__ import annotations

import errno
import tempfile

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from bench import plot
from bench.cli import app
from bench.compare import load_run
from bench.stats import stat_columns
from tests.bench.test_compare import write_run

runner = CliRunner()

ATTENTION_META = {"params": ["impl", "seq", "batch", "dtype", "causal", "mode"], "label": "impl",
                  "metrics": ["tflops", "pct_of_peak", "peak_mem_MiB"], "primary": "median_ms",
                  "higher_is_better": False}
ATTENTION_COLUMNS = ["suite", "impl", "seq", "batch", "dtype", "causal", "mode", "status", "reason", *stat_columns(),
                     "tflops", "pct_of_peak", "peak_mem_MiB"]
IMPLS = {"naive": 1.0, "tiled": 0.6, "sdpa": 0.3}  # ms per 1k tokens at 1k


def attention_run(folder, memory=True, seqs=(1024, 2048, 4096, 8192), env=None):
    """An H200-like attention sweep: 3 impls x 4 lengths x 2 masks, naive OOM at 8k."""
    rows = []
    for causal in (False, True):
        for seq in seqs:
            for impl, ms in IMPLS.items():
                spec = {"impl": impl, "seq": seq, "batch": 16384 // seq, "dtype": "bf16", "causal": causal,
                        "mode": "fwd"}
                if impl == "naive" and seq == 8192:
                    rows.append({**spec, "status": "oom", "reason": "OutOfMemoryError"})
                    continue
                median = ms * seq / 1024 / (2 if causal else 1)
                tflops = 400 * (1 - 1 / seq ** 0.5) / (ms / 0.3)
                mem = (seq**2 if impl == "naive" else seq) * 0.01 if memory else None
                rows.append({**spec, "samples": median * np.array([0.98, 1.0, 1.01, 1.0, 1.03]), "tflops": tflops,
                             "pct_of_peak": 100 * tflops / 790, "peak_mem_MiB": mem})
    return write_run(folder, rows, meta=ATTENTION_META, columns=ATTENTION_COLUMNS, **({"env": env} if env else {}))


def test_cli_writes_a_png(tmp_path):
    csv_path = attention_run(tmp_path)
    out = tmp_path / "charts" / "attention.png"
    result = runner.invoke(app, ["plot", str(csv_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 30_000
    pixels = imread(out)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    # Default name: the CSV's, as a PNG.
    assert runner.invoke(app, ["plot", str(csv_path)]).exit_code == 0
    assert csv_path.with_suffix(".png").is_file()


def test_other_formats_by_suffix(tmp_path):
    csv_path = attention_run(tmp_path)
    assert runner.invoke(app, ["plot", str(csv_path), "-o", str(tmp_path / "a.svg")]).exit_code == 0
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")


def test_unknown_suite_gets_a_bar_chart_of_its_primary_metric(tmp_path):
    rows = [{"impl": i, "seq": 1, "samples": [ms] * 5} for i, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0))]
    rows.append({"impl": "d", "seq": 1, "status": "error", "reason": "x"})
    fig = plot.figure(load_run(write_run(tmp_path, rows, suite="newsuite")))
    (ax,) = fig.axes
    assert [round(p.get_width(), 6) for p in ax.patches] == [1.0, 2.0, 3.0]  # failed row left out
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() == "median_ms (lower is better)"
    assert len({p.get_facecolor() for p in ax.patches}) == 3


def test_registry_is_keyed_by_suite():
    assert {"attention", "precision", "ddp", "medusa"} <= set(plot.PLOTS)


@pytest.mark.parametrize("ys, expected", [
    ([0.2, 0.5, 0.8], [0.2, 0.5, 0.8]),  # already apart: where they are
    ([0.5, 0.5, 0.5], [0.4, 0.5, 0.6]),  # a crowd spreads both ways about its mean
    ([0.45, 0.5, 0.9], [0.425, 0.525, 0.9]),
    ([0.3, 0.35, 0.38, 0.42], [0.2125, 0.3125, 0.4125, 0.5125]),  # groups merge until none overlap
    ([0.0, 0.01], [0.05, 0.15]),  # kept inside the axes
    ([0.99, 1.0], [0.85, 0.95]),
])
def test_spread_names(ys, expected):
    assert plot._spread(ys, 0.1) == pytest.approx(expected)


def test_whole_number_parameters_are_written_as_integers():
    """pandas reads a column with an empty cell as floats: steps=300, not steps=300.0."""
    assert plot.describe(["steps", "lr", "dtype", "causal"], (300.0, 0.5, "bf16", True)) == \
        "steps=300  lr=0.5  dtype=bf16  causal=True"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.csv", "no such file"),
    (lambda p: write_run(p, [{"impl": "a", "seq": 1, "status": "oom", "reason": "x"}]), "nothing to plot"),
])
def test_unusable_input_exits_2(tmp_path, make, message):
    result = runner.invoke(app, ["plot", str(make(tmp_path))])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_unknown_image_suffix_exits_2(tmp_path):
    result = runner.invoke(app, ["plot", str(attention_run(tmp_path)), "-o", str(tmp_path / "chart.xyz")])
    assert result.exit_code == 2 and "cannot write .xyz" in result.output
    assert not (tmp_path / "chart.xyz").exists()


def test_output_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    csv_path = attention_run(tmp_path)
    blocker = tmp_path / "charts"
    blocker.write_text("")  # a file where a folder should be
    result = runner.invoke(app, ["plot", str(csv_path), "-o", str(blocker / "a.png")])
    assert result.exit_code == 2 and f"-o {blocker / 'a.png'}: {blocker} is a file, not a folder" in result.output
    folder = tmp_path / "a.png"
    folder.mkdir()  # a folder with the image's name
    result = runner.invoke(app, ["plot", str(csv_path), "-o", str(folder)])
    assert result.exit_code == 2 and f"-o {folder}: cannot write it: Is a directory" in result.output

    def read_only(*args, **kwargs):  # tests run as root, whom chmod does not stop
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = runner.invoke(app, ["plot", str(csv_path), "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 2 and f"cannot write into {tmp_path}: Read-only file system" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b.png").exists()
