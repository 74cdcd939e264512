"""Calibrated peaks: best of several rounds, the cache key, a corrupt cache, and
shares of a peak that are never above 100% (fake timers, fake re-measures)."""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from bench import calibrate, metrics
from bench.cli import app
from bench.commands import RunOptions, run_suite
from bench.runner import Context, Measurement, Sweep
from bench.stats import Stats

CPU = torch.device("cpu")
runner = CliRunner()
PEAKS = {"fp32_tflops": 1.0, "tf32_tflops": None, "fp16_tflops": 0.2, "bf16_tflops": 100.0, "copy_GBps": 16.0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_best(monkeypatch):
    """calibrate._best answering from a table, recording what it was asked."""
    table, asked = dict(PEAKS), []

    def best(key, device):
        asked.append(key)
        return table[key]

    monkeypatch.setattr(calibrate, "_best", best)
    return table, asked


def test_each_peak_is_the_best_of_several_rounds(cache, monkeypatch):
    # n = 1000: a product is 2e9 FLOP; the copy moves 2 x 4e6 bytes.
    monkeypatch.setitem(calibrate._MATMUL_N_DEFAULT, "cpu", 1000)
    monkeypatch.setitem(calibrate._MATMUL_N, "cpu", {})
    monkeypatch.setitem(calibrate._COPY_BYTES, "cpu", 4_000_000)
    medians = iter([4.0, 2.0, 8.0,  # fp32: best round 2 ms -> 2e9 / 2e-3 s = 1.0 TFLOP/s
                    10.0, 20.0, 40.0,  # fp16: 10 ms -> 0.2
                    5.0, 5.0, 4.0,  # bf16: 4 ms -> 0.5
                    1.0, 0.5, 2.0])  # copy: 0.5 ms -> 8e6 B / 5e-4 s = 16 GB/s
    warmups = []

    def measure(fn, device, warmup_ms, rep_ms):
        warmups.append(warmup_ms)
        return Stats.of([next(medians)])

    monkeypatch.setattr(calibrate.timing, "measure", measure)
    steps = []
    peaks = calibrate.calibrate(CPU, on_step=steps.append)
    assert steps == ["fp32 matmul", "tf32 matmul", "fp16 matmul", "bf16 matmul", "copy bandwidth"]
    assert peaks["fp32_tflops"] == pytest.approx(1.0) and peaks["tf32_tflops"] is None
    assert peaks["fp16_tflops"] == pytest.approx(0.2) and peaks["bf16_tflops"] == pytest.approx(0.5)
    assert peaks["copy_GBps"] == pytest.approx(16.0)
    # Three rounds of each; only the first of a workload warms up.
    assert warmups == [10.0, 0.0, 0.0] * 4
    assert calibrate.load(CPU) == peaks and peaks["rounds"] == 3 and peaks["torch"] == torch.__version__


def test_calibrating_leaves_the_global_seed_alone(cache, monkeypatch):
    monkeypatch.setattr(calibrate.timing, "measure", lambda fn, device, warmup_ms, rep_ms: Stats.of([1.0]))
    monkeypatch.setitem(calibrate._MATMUL_N_DEFAULT, "cpu", 8)
    monkeypatch.setitem(calibrate._MATMUL_N, "cpu", {})
    monkeypatch.setitem(calibrate._COPY_BYTES, "cpu", 64)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    calibrate.calibrate(CPU)
    assert torch.equal(torch.rand(3), expected)


def test_the_cache_key_names_device_driver_torch_and_cuda(cache, monkeypatch):
    monkeypatch.setattr(calibrate, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(calibrate, "nvidia_driver", lambda: "570.124.06")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    path = calibrate.cache_path(torch.device("cuda"))
    assert path == cache / "peaks" / "cuda-nvidia-h200-driver-570.124.06-torch-2.13.0-cu128-cuda-12.8.json"
    assert calibrate.identity(torch.device("cuda")) == {"device_name": "NVIDIA H200", "driver": "570.124.06",
                                                        "torch": "2.13.0+cu128", "cuda": "12.8"}


def test_other_versions_measure_again(cache, fake_best, monkeypatch):
    calibrate.calibrate(CPU)
    assert calibrate.load(CPU)["bf16_tflops"] == 100.0
    # Another torch: another file, so nothing is cached for it yet.
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        assert calibrate.load(CPU) is None
    # A file whose recorded versions differ from its name's (copied, edited) is refused.
    path = calibrate.cache_path(CPU)
    path.write_text(json.dumps({**json.loads(path.read_text()), "torch": "2.0.0"}))
    with pytest.raises(calibrate.Unusable, match=r"measured with torch '2\.0\.0' \(now '"):
        calibrate.load(CPU)


@pytest.mark.parametrize("content", ["", "{\"fp32_tflops\": 1.0", "[]", "{\"fp32_tflops\": \"fast\"}"])
def test_a_corrupt_peaks_file_is_unusable_not_fatal(cache, fake_best, content):
    path = calibrate.cache_path(CPU)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(calibrate.Unusable, match="the cached peaks .* (cannot be read|hold no)"):
        calibrate.load(CPU)
    # `env` warns and shows no peaks; it measures on --calibrate only.
    result = runner.invoke(app, ["env", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: the cached peaks" in result.output and "not measured yet" in result.output
    assert "Traceback" not in result.output


def test_a_suite_measures_a_corrupt_peaks_file_again(cache, fake_best, tmp_path):
    path = calibrate.cache_path(CPU)
    path.parent.mkdir(parents=True)
    path.write_text("")  # an interrupted write of an older genbench
    result = runner.invoke(app, ["attention", "--impl", "naive", "--seq", "32", "--heads", "1", "--head-dim", "8",
                                 "--batch", "1", "--warmup-ms", "1", "--rep-ms", "2", "--device", "cpu",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "warning: the cached peaks" in result.output and "measuring this device's peaks once" in result.output
    assert calibrate.load(CPU)["bf16_tflops"] == 100.0  # written again, whole
    assert fake_best[1] == list(calibrate.RATES)


# -- shares of a peak ------------------------------------------------------------------------------


def _pct(rate):
    return functools.partial(metrics.pct_of_peak, rate)


def test_a_share_above_100_re_measures_that_peak_once():
    asked = []

    def measure(key):
        asked.append(key)
        return 150.0

    peaks = calibrate.Peaks(CPU, {"bf16_tflops": 100.0, "fp32_tflops": 10.0}, measure=measure)
    assert peaks.share("bf16_tflops", _pct(50.0)) == calibrate.Share(50.0, 100.0, "")
    first = peaks.share("bf16_tflops", _pct(120.0))  # 120% of 100: re-measured, 150 -> 80%
    assert (first.pct, first.peak) == (80.0, 150.0) and "measured again, 150 TFLOP/s" in first.note
    assert peaks.share("bf16_tflops", _pct(135.0)) == calibrate.Share(90.0, 150.0, "")
    later = peaks.share("bf16_tflops", _pct(300.0))  # 200% of 150: not measured a second time
    assert later.pct is None and later.peak == 150.0
    assert "above the re-measured bf16 matmul peak 150 TFLOP/s: the peak measurement is unreliable" in later.note
    assert asked == ["bf16_tflops"] and peaks.values["bf16_tflops"] == 150.0
    assert peaks.share("fp32_tflops", _pct(20.0)).pct == pytest.approx(100 * 20 / 150)  # its own re-measure
    assert asked == ["bf16_tflops", "fp32_tflops"]
    assert len(peaks.notes) == 3  # two re-measures, one unreliable peak


def test_a_lower_re_measure_keeps_the_peak_and_gives_no_share():
    peaks = calibrate.Peaks(CPU, {"bf16_tflops": 100.0}, measure=lambda key: 90.0)
    share = peaks.share("bf16_tflops", _pct(110.0))
    assert share.pct is None and share.peak == 100.0 and peaks.values["bf16_tflops"] == 100.0
    assert "measured again, no higher (90)" in share.note and "unreliable" in share.note


def test_no_peak_no_share():
    assert calibrate.Peaks(CPU, {"tf32_tflops": None}).share("tf32_tflops", _pct(5.0)) == calibrate.Share()
    assert Context(CPU).share_of_peak("bf16_tflops", _pct(5.0)) == calibrate.Share()


@dataclass(frozen=True)
class Rate:
    impl: str
    tflops: float


def _share_row(cfg: Rate, ctx: Context) -> Measurement:
    share = ctx.share_of_peak("bf16_tflops", _pct(cfg.tflops))
    return Measurement({"tflops": cfg.tflops, "pct_of_peak": share.pct}, reason=share.note)


def test_a_run_re_measures_once_and_never_writes_a_share_above_100(cache, fake_best, tmp_path, capsys):
    table, asked = fake_best
    calibrate.calibrate(CPU)  # bf16 cached at 100 TFLOP/s
    table["bf16_tflops"] = 150.0  # what measuring again finds
    asked.clear()
    configs = [Rate("a", 50.0), Rate("b", 120.0), Rate("c", 135.0), Rate("d", 200.0)]
    sweep = Sweep(suite="fake", configs=configs, run=_share_row, params=("impl",), metrics=("tflops", "pct_of_peak"))
    run_suite(sweep, RunOptions(device=CPU, out=tmp_path / "out"))
    assert asked == ["bf16_tflops"]  # one re-measure in the whole run
    ((csv_path,),) = [list((tmp_path / "out").glob("fake-*.csv"))]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["pct_of_peak"] for r in rows] == ["50.0", "80.0", "90.0", ""]
    assert rows[0]["reason"] == "" and "measured again, 150" in rows[1]["reason"] and rows[2]["reason"] == ""
    assert "unreliable on this machine" in rows[3]["reason"]
    # The run's JSON and the cache hold the re-measured peak; the notes are printed under the tables.
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    assert meta["env"]["peaks"]["bf16_tflops"] == 150.0
    assert calibrate.load(CPU)["bf16_tflops"] == 150.0
    out = capsys.readouterr().out
    assert "peaks: a rate above the cached bf16 matmul peak" in out and "unreliable" in out


def test_a_sweep_starts_its_background_work_only_beside_a_calibration(cache, fake_best, tmp_path):
    # Sweep.start fills the calibration's wait (the attention suite compiles kernels then); with the peaks
    # cached there is no wait to fill, and it is not called. Its prepare runs before the first row either way.
    events = []
    sweep = Sweep(suite="fake", configs=[Rate("a", 50.0)], run=lambda cfg, ctx: events.append("row") or Measurement({}),
                  params=("impl",), metrics=(), start=lambda device, seed: events.append(("start", device, seed)),
                  prepare=(("getting ready", lambda ctx: events.append("prepare") or "ready"),
                           ("still getting ready", lambda ctx: events.append("prepare 2"))))
    run_suite(sweep, RunOptions(device=CPU, out=tmp_path / "out", seed=5))
    assert events == [("start", CPU, 5), "prepare", "prepare 2", "row"]
    events.clear()
    run_suite(sweep, RunOptions(device=CPU, out=tmp_path / "out2"))  # the peaks are cached now
    assert events == ["prepare", "prepare 2", "row"]
