"""The suites' charts (suites/charts/), drawn through `genbench plot`'s
dispatch (bench/plot.py `figure`), from runs written as each suite writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from bench import plot
from bench.compare import load_run
from bench.stats import stat_columns
from tests.bench.test_compare import write_run
from tests.bench.test_plot import IMPLS, attention_run


def _add_series(csv_path, arrays):
    """Per-step series beside a run, named by its JSON (see bench/plot.py)."""
    name = f"{csv_path.stem}.series.npz"
    np.savez(csv_path.with_name(name), **arrays)
    meta_path = csv_path.with_suffix(".json")
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "series": name}))


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_attention_chart(tmp_path):
    fig = plot.figure(load_run(attention_run(tmp_path)))
    axes = fig.axes
    assert len(axes) == 4  # (causal off, causal on) x (TFLOP/s, memory)
    rate, mem = axes[0], axes[1]
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_xlabel() == "sequence length (tokens)"
    assert "TFLOP/s" in rate.get_ylabel() and "higher is better" in rate.get_ylabel()
    assert "MiB" in mem.get_ylabel() and "lower is better" in mem.get_ylabel()
    assert {ax.get_title(loc="left") for ax in axes} == {"causal=False", "causal=True"}
    assert [t.get_text() for t in rate.get_xticklabels()] == ["1k", "2k", "4k", "8k"]
    # A line per impl, failed rows left out: naive stops at 4k.
    lines = {line.get_label(): line for line in rate.get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == ["naive", "sdpa", "tiled"]
    assert list(lines["naive"].get_xdata()) == [1024, 2048, 4096]
    # Each line is named at its end, in its own colour, and by the figure's legend.
    ends = [t for t in rate.texts if t.get_text().strip() in lines]
    assert sorted(t.get_text().strip() for t in ends) == ["naive", "sdpa", "tiled"]
    assert all(t.get_color() == lines[t.get_text().strip()].get_color() for t in ends)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["naive", "sdpa", "tiled"]
    # The calibrated peak, recovered from pct_of_peak.
    assert any(t.startswith("measured matmul peak 790 TFLOP/s") for t in _texts(fig))
    assert "NVIDIA H200" in fig.get_suptitle() and "dtype=bf16" in fig.get_suptitle()


def test_attention_peak_line_is_the_runs_last_peak(tmp_path):
    from tests.bench.test_compare import ENV

    # The run's JSON keeps the peaks as they stood at its end (one re-measured during the run, 800): that one is drawn.
    fig = plot.figure(load_run(attention_run(tmp_path, env={**ENV, "peaks": {"bf16_tflops": 800.0}})))
    assert any(t.startswith("measured matmul peak 800 TFLOP/s") for t in _texts(fig))
    assert not any("unreliable" in t for t in _texts(fig))
    # A peak below the plotted rates is wrong, and the line says so.
    fig = plot.figure(load_run(attention_run(tmp_path / "low", env={**ENV, "peaks": {"bf16_tflops": 300.0}})))
    assert any(t.startswith("measured matmul peak 300 TFLOP/s (rates above it") for t in _texts(fig))


def test_attention_names_that_end_together_are_spread_apart(tmp_path):
    fig = plot.figure(load_run(attention_run(tmp_path)))
    rate = fig.axes[0]
    ys = sorted(np.log10(t.get_position()[1]) for t in rate.texts if t.get_text().strip() in IMPLS and
                t.xy[0] == 8192)
    assert len(ys) == 2  # sdpa and tiled (naive stops at 4k)
    lo, hi = np.log10(rate.get_ylim())
    assert min(np.diff(ys)) >= 0.05 * (hi - lo) - 1e-9


def test_attention_on_cpu_has_no_memory_panels(tmp_path):
    fig = plot.figure(load_run(attention_run(tmp_path, memory=False)))
    assert len(fig.axes) == 2 and all("TFLOP/s" in ax.get_ylabel() for ax in fig.axes)
    assert "measured on CUDA devices only" in fig.get_suptitle()


DDP_META = {"params": ["setup", "model", "precision", "scaling", "batch", "seq", "bucket_mb", "gradient_as_bucket_view",
                       "static_graph", "compression", "find_unused_parameters"],
            "label": "setup", "baseline": "no-ddp", "primary": "tokens_per_s", "higher_is_better": True}
DDP_COLUMNS = ["suite", *DDP_META["params"], "status", "reason", *stat_columns(), "world_size", "tokens_per_s",
               "efficiency"]


def ddp_run(folder, efficiencies: dict, env=None):
    """Rows as the ddp suite writes them: no-ddp first, then ddp-N per world
    size and knob set; `efficiencies` maps (world size, compression) to a row's
    efficiency, the knob fixed at its default elsewhere."""
    from tests.bench.test_compare import ENV

    knobs = dict(model="gpt2-small", precision="bf16", scaling="weak", batch=16, seq=1024, bucket_mb=25.0,
                 gradient_as_bucket_view=False, static_graph=False, find_unused_parameters=False)
    rows = [{"setup": "no-ddp", **knobs, "compression": "none", "world_size": 1, "samples": [10.0] * 5,
             "tokens_per_s": 1000.0, "efficiency": 1.0}]
    rows += [{"setup": f"ddp-{n}", **knobs, "compression": comp, "world_size": n, "samples": [10.0] * 5,
              "tokens_per_s": 1000.0 * n * eff, "efficiency": eff} for (n, comp), eff in efficiencies.items()]
    return write_run(folder, rows, suite="ddp", env=env or ENV, meta=DDP_META, columns=DDP_COLUMNS)


def _named_lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_ddp_chart_draws_a_line_of_the_ddp_rows_against_the_baseline(tmp_path):
    fig = plot.figure(load_run(ddp_run(tmp_path, {(1, "none"): 0.98, (2, "none"): 0.95, (4, "none"): 0.9})))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "world size (GPUs)" and "efficiency" in ax.get_ylabel()
    assert list(ax.get_xticks()) == [1, 2, 4]
    # ddp-1, ddp-2, ddp-4 are one line, not a point each; no-ddp is the dashed line at 1, not a point.
    lines = _named_lines(ax)
    assert list(lines) == ["ddp"]
    assert list(lines["ddp"].get_xdata()) == [1, 2, 4] and list(lines["ddp"].get_ydata()) == [0.98, 0.95, 0.9]
    (one,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(one.get_ydata()) == [1.0, 1.0]
    assert any(t.startswith("1 = linear scaling: world size x no-ddp's") for t in _texts(fig))
    assert "NVIDIA H200" in fig.get_suptitle() and "compression=none" in fig.get_suptitle()


def test_ddp_chart_on_a_cpu_counts_processes(tmp_path):
    from tests.bench.test_compare import ENV

    env = {**ENV, "device": "cpu", "device_name": "AMD EPYC", "gpu_count": 0}
    (ax,) = plot.figure(load_run(ddp_run(tmp_path, {(1, "none"): 0.8, (2, "none"): 0.4}, env=env))).axes
    assert ax.get_xlabel() == "world size (processes)"


def test_ddp_chart_draws_a_line_per_knob_set(tmp_path):
    effs = {(n, comp): 1 - 0.05 * n * (comp == "none") for n in (1, 2, 4) for comp in ("none", "bf16")}
    fig = plot.figure(load_run(ddp_run(tmp_path, effs)))
    lines = _named_lines(fig.axes[0])
    assert sorted(lines) == ["compression=bf16", "compression=none"]
    assert list(lines["compression=none"].get_ydata()) == pytest.approx([0.95, 0.9, 0.8])
    assert list(lines["compression=bf16"].get_xdata()) == [1, 2, 4]
    assert "compression" not in fig.get_suptitle()  # it varies: the lines name it


def test_ddp_chart_title_fits_in_the_figure(tmp_path):
    """A CPU's name and the fixed knobs make a title wider than the figure: it wraps."""
    from tests.bench.test_compare import ENV

    env = {**ENV, "device": "cpu", "device_name": "Intel(R) Xeon(R) Platinum 8480C with a long marketing name"}
    fig = plot.figure(load_run(ddp_run(tmp_path, {(1, "none"): 0.8, (2, "none"): 0.4}, env=env)))
    FigureCanvasAgg(fig).draw()  # lays the figure out and wraps the title, as saving it does
    title = fig._suptitle.get_window_extent()
    assert title.width > 0 and fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1
    assert fig.bbox.y0 <= title.y0 and title.y1 <= fig.bbox.y1
    assert not title.overlaps(fig.axes[0].get_window_extent())


COLLECTIVES_META = {"params": ["size", "collective", "world_size", "dtype"], "label": "size",
                    "primary": "busbw_GBps", "higher_is_better": True}
COLLECTIVES_COLUMNS = ["suite", *COLLECTIVES_META["params"], "status", "reason", *stat_columns(),
                       "size_bytes", "busbw_GBps", "pct_of_line_rate"]
SIZES = [2**p for p in range(10, 31)]  # 1 KiB .. 1 GiB, as `genbench ddp --collectives` sweeps on a GPU


def busbw(collective, nbytes):
    """A made-up curve: rises with the size to a plateau of 360 GB/s (all_reduce), 330 (the others)."""
    return (360 if collective == "all_reduce" else 330) * nbytes / (nbytes + 2**23)


def collectives_run(folder, line_rate=None, worlds=(4,)):
    rows = [{"size": str(b), "collective": c, "world_size": n, "dtype": "fp32", "samples": [10.0] * 5,
             "size_bytes": b, "busbw_GBps": busbw(c, b),
             "pct_of_line_rate": 100 * busbw(c, b) / line_rate if line_rate else None}
            for n in worlds for c in ("all_reduce", "all_gather", "reduce_scatter") for b in SIZES]
    rows.append({"size": str(2**31), "collective": "all_reduce", "world_size": worlds[0], "dtype": "fp32",
                 "status": "oom", "reason": "needs 2 GiB"})
    return write_run(folder, rows, suite="ddp-collectives", meta=COLLECTIVES_META, columns=COLLECTIVES_COLUMNS)


def test_collectives_chart_draws_busbw_against_size_a_line_per_collective(tmp_path):
    fig = plot.figure(load_run(collectives_run(tmp_path)))
    (ax,) = fig.axes
    lines = _named_lines(ax)
    assert sorted(lines) == ["all_gather", "all_reduce", "reduce_scatter"]
    assert list(lines["all_reduce"].get_xdata()) == SIZES  # the oom row is left out
    assert lines["all_gather"].get_ydata()[-1] == pytest.approx(330 * 2**30 / (2**30 + 2**23))
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels == ["1K", "4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M", "256M", "1G"]
    assert "message size" in ax.get_xlabel() and "bytes" in ax.get_xlabel()
    assert "bus bandwidth, GB/s" in ax.get_ylabel() and "higher is better" in ax.get_ylabel()
    assert ax.get_ylim()[0] == 0
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]  # no line rate given
    assert sorted(t.get_text() for t in ax.texts) == ["all_gather", "all_reduce", "reduce_scatter"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["all_gather", "all_reduce", "reduce_scatter"]
    assert "bus bandwidth against message size" in fig.get_suptitle() and "world_size=4" in fig.get_suptitle()


def test_collectives_chart_draws_the_line_rate_it_was_given(tmp_path):
    (ax,) = plot.figure(load_run(collectives_run(tmp_path, line_rate=450.0))).axes
    (rate,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(rate.get_ydata()) == pytest.approx([450.0, 450.0])
    assert "line rate 450 GB/s (--line-rate-gbps)" in [t.get_text() for t in ax.texts]
    assert ax.get_ylim()[1] >= 450


def test_collectives_chart_has_a_panel_per_world_size(tmp_path):
    fig = plot.figure(load_run(collectives_run(tmp_path, worlds=(2, 8))))
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["world_size=2", "world_size=8"]
    assert all(sorted(_named_lines(ax)) == ["all_gather", "all_reduce", "reduce_scatter"] for ax in fig.axes)
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()


def test_collectives_size_labels():
    from suites.charts.collectives import size_label

    assert [size_label(n) for n in (512, 1024, 1536, 2**20, 3 * 2**30)] == ["512", "1K", "1.5K", "1M", "3G"]


def test_precision_chart_with_loss_curves(tmp_path):
    """The precision suite keeps each row's losses in a `loss_curve` column,
    joined by ';'; its --matmul rows have none and are left out."""
    meta = {"params": ["precision", "model"], "label": "precision", "primary": "median_ms",
            "higher_is_better": False}
    columns = ["suite", "precision", "model", "status", "reason", *stat_columns(), "loss_curve"]

    def curve(k):
        return ";".join(repr(float(v)) for v in 4 * np.exp(-np.arange(50) / k))

    rows = [{"precision": p, "model": "tiny", "samples": [ms] * 5, "loss_curve": curve(20 + i)}
            for i, (p, ms) in enumerate((("fp32", 30.0), ("bf16", 12.0), ("fp8", 9.0)))]
    rows.append({"precision": "bf16", "model": "matmul", "samples": [0.5] * 5, "loss_curve": ""})
    fig = plot.figure(load_run(write_run(tmp_path, rows, suite="precision", meta=meta, columns=columns)))
    time, loss, diff = fig.axes
    assert [t.get_text() for t in time.get_yticklabels()] == ["fp32", "bf16", "fp8"]
    assert [round(p.get_width()) for p in time.patches] == [30, 12, 9]
    assert "step time" in time.get_xlabel()
    assert [line.get_label() for line in loss.get_lines()] == ["fp32", "bf16", "fp8"]
    assert len(loss.get_lines()[0].get_xdata()) == 50
    assert loss.get_ylabel() == "training loss" and diff.get_xlabel() == "step"
    assert loss.get_xlim() == (0, 49)  # step 0 to the last step, no margin
    assert [line.get_label() for line in diff.get_lines()] == ["fp32", "bf16", "fp8"]
    assert "model=tiny" in fig.get_suptitle()


def test_precision_chart_with_a_loss_series(tmp_path):
    meta = {"params": ["precision"], "label": "precision", "primary": "median_ms", "higher_is_better": False}
    columns = ["suite", "precision", "status", "reason", *stat_columns()]
    rows = [{"precision": p, "samples": [ms] * 5} for p, ms in (("fp32", 30.0), ("bf16", 12.0))]
    csv_path = write_run(tmp_path, rows, suite="precision", meta=meta, columns=columns)
    _add_series(csv_path, {f"row{i}.loss": 4 * np.exp(-np.arange(50) / (20 + i)) for i in range(2)})
    _, loss, diff = plot.figure(load_run(csv_path)).axes
    assert len(loss.get_lines()) == 2 and len(diff.get_lines()) == 2


PRECISION_META = {"params": ["precision"], "label": "precision", "primary": "median_ms", "higher_is_better": False}
PRECISION_COLUMNS = ["suite", "precision", "status", "reason", *stat_columns(), "trained_steps", "loss_curve"]


def precision_run(folder, offsets: dict, steps=60, band_steps=20, band_scale=0.5):
    """fp32's loss curve, a 20-step fp32-band run (by default well off fp32),
    and one row per precision: fp32's curve plus an offset per step."""
    fp32 = 4 + 6 * np.exp(-np.arange(steps) / 15)
    band = band_scale * (1 + 0.1 * np.cos(np.arange(band_steps)))
    curves = {"fp32": fp32, "fp32-band": fp32[:band_steps] + band,
              **{p: fp32 + off for p, off in offsets.items()}}
    rows = [{"precision": p, "samples": [10.0] * 5, "trained_steps": len(c),
             "loss_curve": ";".join(repr(float(v)) for v in c)} for p, c in curves.items()]
    return write_run(folder, rows, suite="precision", meta=PRECISION_META, columns=PRECISION_COLUMNS)


def _axes_y(ax, text):
    """A name's height as a fraction of its panel's."""
    return (ax.transData + ax.transAxes.inverted()).transform((0, text.get_position()[1]))[1]


def test_precision_difference_panel_is_loss_minus_fp32_smoothed(tmp_path):
    alternating = 0.05 + 0.02 * (-1) ** np.arange(60)  # step-to-step noise around a drift of 0.05
    fig = plot.figure(load_run(precision_run(tmp_path, {"bf16": 0.1, "fp8": alternating})))
    _, loss, diff = fig.axes
    lines = {line.get_label(): line.get_ydata() for line in diff.get_lines()}
    assert sorted(lines) == ["bf16", "fp32", "fp8"]  # the band is left out ...
    assert "fp32-band" in diff.get_title(loc="left") and "off this scale" in diff.get_title(loc="left")
    assert np.allclose(lines["fp32"], 0) and np.allclose(lines["bf16"], 0.1)
    # ... and the 10-step mean takes the noise out: away from the ends, 0.05 exactly.
    assert np.allclose(lines["fp8"][5:-5], 0.05) and not np.allclose(alternating[5:-5], 0.05)
    assert "fp32 loss" in diff.get_ylabel() and "10-step mean" in diff.get_ylabel()


def test_precision_band_within_scale_is_drawn(tmp_path):
    # a band difference of 0.05 beside bf16's 0.1: drawn, not set apart
    fig = plot.figure(load_run(precision_run(tmp_path, {"bf16": 0.1}, band_scale=0.05)))
    _, loss, diff = fig.axes
    assert sorted(line.get_label() for line in diff.get_lines()) == ["bf16", "fp32", "fp32-band"]
    assert not diff.get_title(loc="left")


def test_precision_loss_axis_runs_from_step_0_to_the_last(tmp_path):
    _, loss, diff = plot.figure(load_run(precision_run(tmp_path, {"bf16": 0.1}))).axes
    assert loss.get_xlim() == (0, 59) and diff.get_xlim() == (0, 59)
    band = next(line for line in loss.get_lines() if line.get_label() == "fp32-band")
    assert len(band.get_xdata()) == 20  # drawn over the steps it trained, not stretched


def test_precision_curves_are_named_at_their_ends_and_apart(tmp_path):
    """Ends 0.001 apart (bf16, fp16) would print one name over the other."""
    fig = plot.figure(load_run(precision_run(tmp_path, {"bf16": 0.1, "fp16": 0.101, "tf32": 0.0005})))
    _, loss, diff = fig.axes
    assert not loss.texts  # the loss curves coincide: the legend names them
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fp32", "fp32-band", "bf16", "fp16", "tf32"]
    colors = {line.get_label(): line.get_color() for line in diff.get_lines()}
    names = {t.get_text(): t for t in diff.texts}
    assert sorted(names) == sorted(colors) == ["bf16", "fp16", "fp32", "tf32"]
    for name, text in names.items():
        line = next(line for line in diff.get_lines() if line.get_label() == name)
        assert text.xy == (59, line.get_ydata()[-1])  # anchored at its own curve's last point
        assert text.get_color() == colors[name]
    heights = sorted(_axes_y(diff, t) for t in names.values())
    assert min(np.diff(heights)) >= 0.05 - 1e-9
    assert all(0 <= h <= 1 for h in heights)
    # A name moved off its curve's end is tied to it by a leader line.
    assert any(t.arrow_patch is not None for t in names.values())


def test_precision_without_fp32_has_no_difference_panel(tmp_path):
    rows = [{"precision": p, "samples": [10.0] * 5, "loss_curve": ";".join(str(4.0 - s / 10) for s in range(n))}
            for p, n in (("bf16", 30), ("fp8", 20))]
    fig = plot.figure(load_run(write_run(tmp_path, rows, suite="precision", meta=PRECISION_META,
                                         columns=PRECISION_COLUMNS)))
    _, loss = fig.axes
    assert loss.get_xlim() == (0, 29) and loss.get_xlabel() == "step"
    ends = {t.get_text(): t.xy for t in loss.texts}
    assert ends == {"bf16": (29, pytest.approx(1.1)), "fp8": (19, pytest.approx(2.1))}


MEDUSA_META = {"params": ["method", "heads"], "label": "method", "primary": "tokens_per_s", "higher_is_better": True}
MEDUSA_COLUMNS = ["suite", "method", "heads", "status", "reason", *stat_columns(), "tokens_per_s",
                  "mean_accept_length", "accept_hist"]


def medusa_run(folder, hists):
    """Rows as the medusa suite writes them: accept_hist[k] = steps that kept
    k + 1 tokens, joined by ';' (a single count for vanilla decoding)."""
    rows = []
    for method, (rate, hist) in hists.items():
        counts = [int(v) for v in hist.split(";")] if hist else []
        mean = sum((k + 1) * h for k, h in enumerate(counts)) / sum(counts) if counts else None
        rows.append({"method": method, "heads": 4, "samples": [1.0] * 5, "tokens_per_s": rate,
                     "mean_accept_length": mean, "accept_hist": hist})
    rows.append({"method": "typical", "heads": 4, "status": "error", "reason": "x", "accept_hist": ""})
    return write_run(folder, rows, suite="medusa", meta=MEDUSA_META, columns=MEDUSA_COLUMNS)


def test_medusa_acceptance_histogram(tmp_path):
    csv_path = medusa_run(tmp_path, {"vanilla": (100.0, "400"), "medusa": (230.0, "100;200;60;40"),
                                     "lookup": (180.0, "150;50")})
    fig = plot.figure(load_run(csv_path))
    rate, accept = fig.axes
    assert [round(p.get_width()) for p in rate.patches] == [100, 230, 180]
    assert "higher is better" in rate.get_xlabel()
    assert not accept.texts  # not the no-data note
    assert accept.get_xlabel() == "tokens kept per decoding step" and accept.get_ylabel() == "share of steps"
    assert list(accept.get_xticks()) == [1, 2, 3, 4]
    # Grouped bars, each row's normalised to 1, in the colour of its bar on the left.
    bars = {c.get_label(): c for c in accept.containers}
    assert [round(p.get_height(), 3) for p in bars["medusa (mean 2.10)"]] == [0.25, 0.5, 0.15, 0.1]
    assert [round(p.get_height(), 3) for p in bars["vanilla (mean 1.00)"]] == [1.0]
    assert [round(p.get_height(), 3) for p in bars["lookup (mean 1.25)"]] == [0.75, 0.25]
    assert len({round(p.get_x(), 6) for c in accept.containers for p in c}) == 7  # side by side, none on another
    assert [bars[name][0].get_facecolor() for name in bars] == [p.get_facecolor() for p in rate.patches]
    assert [t.get_text() for t in accept.get_legend().get_texts()] == list(bars)


def test_medusa_chart_without_histograms_falls_back_to_the_mean(tmp_path):
    meta = {"params": ["method"], "label": "method", "primary": "tokens_per_s", "higher_is_better": True}
    columns = ["suite", "method", "status", "reason", *stat_columns(), "tokens_per_s", "mean_accept_length"]
    rows = [{"method": m, "samples": [1.0] * 5, "tokens_per_s": t, "mean_accept_length": a}
            for m, t, a in (("vanilla", 100.0, 1.0), ("medusa", 230.0, 2.6))]
    _, accept = plot.figure(load_run(write_run(tmp_path, rows, suite="medusa", meta=meta, columns=columns))).axes
    assert [round(p.get_width(), 1) for p in accept.patches] == [1.0, 2.6]
    assert "mean tokens kept" in accept.get_xlabel()


def test_medusa_chart_with_neither_says_so(tmp_path):
    meta = {"params": ["method"], "label": "method", "primary": "tokens_per_s", "higher_is_better": True}
    columns = ["suite", "method", "status", "reason", *stat_columns(), "tokens_per_s"]
    rows = [{"method": "vanilla", "samples": [1.0] * 5, "tokens_per_s": 100.0}]
    _, accept = plot.figure(load_run(write_run(tmp_path, rows, suite="medusa", meta=meta, columns=columns))).axes
    assert not accept.patches and "no acceptance histogram" in accept.texts[0].get_text()


def test_medusa_acceptance_histogram_from_series(tmp_path):
    meta = {"params": ["method"], "label": "method", "primary": "tokens_per_s", "higher_is_better": True}
    columns = ["suite", "method", "status", "reason", *stat_columns(), "tokens_per_s"]
    rows = [{"method": m, "samples": [1.0] * 5, "tokens_per_s": t} for m, t in (("vanilla", 100.0), ("medusa", 230.0))]
    csv_path = write_run(tmp_path, rows, suite="medusa", meta=meta, columns=columns)
    _add_series(csv_path, {"row0.accept_length": np.ones(40), "row1.accept_length": np.array([1, 2, 2, 3, 4] * 8)})
    _, accept = plot.figure(load_run(csv_path)).axes
    assert list(accept.get_xticks()) == [1, 2, 3, 4]
    assert [t.get_text() for t in accept.get_legend().get_texts()] == ["vanilla (mean 1.00)", "medusa (mean 2.40)"]
    assert [round(p.get_height(), 3) for p in accept.containers[1]] == [0.2, 0.4, 0.2, 0.2]


def test_precision_subtitle_with_rate_rows(tmp_path):
    """The --matmul rate rows leave steps empty, so the column is read as floats."""
    meta = {"params": ["precision", "model", "steps"], "label": "precision", "primary": "median_ms",
            "higher_is_better": False}
    columns = ["suite", "precision", "model", "steps", "status", "reason", *stat_columns(), "loss_curve"]
    rows = [{"precision": p, "model": "tiny", "steps": 300, "samples": [ms] * 5, "loss_curve": "4.0;3.0;2.5"}
            for p, ms in (("fp32", 30.0), ("bf16", 12.0))]
    rows.append({"precision": "matmul-bf16", "model": "matmul", "steps": "", "loss_curve": ""})
    fig = plot.figure(load_run(write_run(tmp_path, rows, suite="precision", meta=meta, columns=columns)))
    assert fig.get_suptitle().splitlines()[1] == "model=tiny  steps=300"


def test_the_precision_chart_reads_the_rows_as_the_suite_writes_them():
    # The chart spells these out so that it needs no torch; they must not drift.
    from suites import precision as precision_suite
    from suites.charts import precision as precision_chart

    assert precision_chart.BAND == precision_suite.BAND
    curve = [9.01, 8.5, float("nan"), 7.25]
    text = precision_suite.format_curve(curve)
    np.testing.assert_array_equal(precision_chart.parse_curve(text), precision_suite.parse_curve(text))
    assert precision_chart.parse_curve("").size == 0
