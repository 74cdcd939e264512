"""The gan suite: options and bad input, tiny real training rows on CPU with
what each objective promises, the unsupported rows (CUDA graphs on CPU, the
digits without scikit-learn, the penalties under torch.compile), the
vector-quantizer rows with the mismatch gate, the command line and the charts."""

import csv
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench import plot
from bench.cli import app
from bench.compare import load_run
from bench.errors import BadInput
from bench.runner import Context, measure_one
from impls import gan, vq
from suites import gan as suite
from suites.charts import gan as charts
from suites.cli import gan as command
from tests.conftest import requires_cuda

runner = CliRunner()
CPU = torch.device("cpu")
QUICK = ["--warmup-ms", "1", "--rep-ms", "5"]


def _ctx(device=CPU):
    return Context(device=device, warmup_ms=1.0, rep_ms=5.0)


def _read(out):
    [path] = out.glob("*.csv")
    with open(path) as f:
        return path, list(csv.DictReader(f))


def _fake_digits(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(100, 1, 8, 8, generator=g) * 2 - 1
    monkeypatch.setattr(gan, "digits", lambda device=None: images.to(device))


def _no_sklearn(monkeypatch):
    def missing(device=None):
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(gan, "digits", missing)


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(objectives=("lsgan",)), "unknown --objective 'lsgan'; known: nsgan, wgan, wgan-gp, r1, hinge"),
    (dict(data=("mnist",)), "unknown --data 'mnist'"),
    (dict(modes=("jit",)), "unknown --mode 'jit'"),
    (dict(objectives=()), "at least one --objective"),
    (dict(steps=0), "--steps must be positive"),
    (dict(batch=-1), "--batch must be positive"),
    (dict(modes=("cudagraph",), steps=3), "above its 3 eager warm-up steps"),
])
def test_bad_gan_options(kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        suite.GanOptions(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=(0,)), "--n must be positive"),
    (dict(k=()), "at least one --k"),
    (dict(dtypes=("fp16",)), "unknown --dtype 'fp16'; known: fp32, bf16"),
    (dict(searches=("faiss",)), "unknown --search 'faiss'"),
    (dict(ops=("decode",)), "unknown --op 'decode'"),
    (dict(autoencoder_steps=-1), "--autoencoder-steps"),
])
def test_bad_vq_options(kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        suite.VqOptions(**kwargs)


def test_rows_and_warmup():
    opts = suite.GanOptions(objectives=("wgan", "r1"), data=("8gaussians",), modes=("eager", "cudagraph"), steps=50)
    assert [(c.objective, c.mode) for c in opts.configs()] == [("wgan", "eager"), ("r1", "eager"),
                                                               ("wgan", "cudagraph"), ("r1", "cudagraph")]
    assert opts.warmup == 5 and suite.GanOptions(steps=20).warmup == 2
    assert suite.GanOptions(modes=("cudagraph",), steps=20).warmup == 3  # at least the graphs' eager steps
    configs = suite.VqOptions(n=(64,), k=(16, 32), dim=(8,), dtypes=("fp32",), autoencoder_steps=5).configs()
    assert [(c.op, c.impl, c.K) for c in configs[:10]] == [
        ("search", "cdist", 16), ("search", "matmul", 16), ("search", "fused", 16), ("search", "fused-tf32x3", 16),
        ("quantizer", "cdist", 16), ("quantizer", "matmul", 16), ("quantizer", "fused", 16),
        ("quantizer", "fused-tf32x3", 16), ("ema-update", "index_add", 16), ("search", "cdist", 32)]
    assert [(c.op, c.impl, c.steps) for c in configs[-2:]] == [("autoencoder", "ema", 5), ("autoencoder", "grad", 5)]


def test_cli_names_and_chart_constants_match_the_suite():
    assert command.OBJECTIVES == suite.OBJECTIVES
    assert command.DATA == suite.DATA and command.MODES == suite.MODES == charts.MODE_ORDER
    assert command.SEARCHES == suite.SEARCHES and command.VQ_OPS == suite.VQ_OPS
    assert command.DTYPES == tuple(suite.DTYPES)
    for name, mixture in gan.MIXTURES.items():
        np.testing.assert_allclose(charts.MIXTURE_MODES[name], mixture.means().numpy(), atol=1e-6)


# -- GAN rows --------------------------------------------------------------------------------------


def _gan_row(objective, data="8gaussians", mode="eager", steps=4, batch=32):
    cfg = suite.GanConfig(objective, data, mode, steps, batch, warmup_steps=1)
    return measure_one(suite.gan_sweep(suite.GanOptions(steps=steps, batch=batch), CPU), cfg, _ctx())


def test_wgan_gp_row_reports_its_penalty_and_gradient_norms():
    m = _gan_row("wgan-gp")
    assert m.status == "ok", m.reason
    v = m.values
    assert v["n_critic"] == 5 and v["modes"] == 8 and 0 <= v["modes_covered"] <= 8
    assert 0 <= v["high_quality"] <= 1 and math.isfinite(v["grad_norm_gap"]) and v["grad_norm_gap"] >= 0
    assert v["penalty_ms"] is not None and v["penalty_share"] < 1
    assert m.stats.n == 3  # 4 steps, 1 warm-up
    assert len(charts.parse_points(v["samples"])) == suite.CHART_SAMPLES


def test_cuda_graphs_on_cpu_and_digits_without_sklearn_are_unsupported(monkeypatch):
    m = _gan_row("hinge", mode="cudagraph")
    assert (m.status, m.reason) == ("unsupported", "CUDA graphs need a CUDA device")
    _no_sklearn(monkeypatch)
    m = _gan_row("hinge", data="digits")
    assert (m.status, m.reason) == ("unsupported", "scikit-learn not installed (install it, or genbench's gan "
                                                   "extra): no digits")


def test_digits_rows_train_the_conv_pair(monkeypatch):
    _fake_digits(monkeypatch)
    m = _gan_row("r1", data="digits", steps=3, batch=16)
    assert m.status == "ok", m.reason
    assert "modes" not in m.values and m.values["penalty_share"] is not None


@pytest.mark.slow
def test_compile_rows():
    # torch.compile trains the penalty-free objectives; a penalty differentiates a gradient,
    # which aot_autograd refuses: that row says so instead of failing.
    m = _gan_row("hinge", mode="compile", steps=3)
    assert m.status == "ok", m.reason
    m = _gan_row("wgan-gp", mode="compile", steps=3)
    assert m.status == "unsupported" and m.reason.startswith("torch.compile cannot differentiate the gp penalty")


# -- vector-quantizer rows -------------------------------------------------------------------------


def _vq_row(impl, op="search", N=96, K=40, D=12, dtype="fp32", steps=None, shared=None):
    cfg = suite.VqConfig(impl, op, N, K, D, dtype, steps)
    sweep = suite.vq_sweep(suite.VqOptions(), CPU)
    if shared is not None:  # rows that share their inputs, as within one sweep
        sweep = dataclasses.replace(sweep, run=lambda c, ctx: suite._vq_row(c, ctx, shared))
    return measure_one(sweep, cfg, _ctx())


@pytest.mark.parametrize("impl", ["cdist", "matmul"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_search_rows_agree_with_float64(impl, dtype):
    m = _vq_row(impl, dtype=dtype)
    assert m.status == "ok", m.reason
    v = m.values
    assert v["mismatches"] == 0 and v["same"] + v["near_ties"] == 96
    assert v["tie_rtol"] == vq.TIE_RTOL[torch.float32 if dtype == "fp32" else torch.bfloat16]
    assert m.stats is not None and v["tflops"] > 0


def test_a_wrong_search_is_a_mismatch_and_not_timed(monkeypatch):
    def farthest(x, e):  # the farthest code: wrong on every row
        d = torch.cdist(x.float(), e.float())
        return d.argmax(1), d.amax(1).square()

    monkeypatch.setattr(suite, "_search", lambda name: farthest)
    m = _vq_row("matmul")
    assert m.status == "mismatch" and m.stats is None
    assert m.values["mismatches"] == 96 and "96 of 96 indices differ" in m.reason


def test_fused_search_is_timed_on_a_gpu_only():
    m = _vq_row("fused")
    assert m.status == "unsupported" and ("CUDA GPU" in m.reason)


@pytest.mark.parametrize("op, impl", [("quantizer", "matmul"), ("quantizer", "cdist"), ("ema-update", "index_add")])
def test_quantizer_rows(op, impl):
    m = _vq_row(impl, op=op, dtype="bf16" if op == "quantizer" else "fp32")
    assert m.status == "ok", m.reason
    assert m.stats.n >= 5


def test_autoencoder_rows(monkeypatch):
    _fake_digits(monkeypatch)
    shared = suite._VqShared()
    for impl in ("ema", "grad"):
        m = _vq_row(impl, op="autoencoder", N=256, K=64, D=16, steps=5, shared=shared)
        assert m.status == "ok", m.reason
        assert 1 <= m.values["perplexity"] <= 64 and 0 <= m.values["dead_codes"] < 64
        assert m.stats is None
    _no_sklearn(monkeypatch)
    m = _vq_row("ema", op="autoencoder", N=256, K=64, D=16, steps=5)
    assert m.status == "unsupported" and "scikit-learn not installed" in m.reason


# -- command line and charts -----------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--objective", "lsgan"], "unknown --objective 'lsgan'"),
    (["--k", "64"], "--k belong to the vector quantizers: add --vq"),
    (["--vq", "--steps", "5"], "--steps belong to the GAN rows, not --vq"),
    (["--vq", "--dim", "0"], "--dim must be positive"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["gan", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.csv"))


def test_cli_gan_run_and_its_chart(tmp_path, monkeypatch):
    _no_sklearn(monkeypatch)
    result = runner.invoke(app, ["gan", "--device", "cpu", "--out", str(tmp_path), "--objective", "wgan",
                                 "--data", "25gaussians", "--data", "digits", "--steps", "3", "--batch", "32", *QUICK])
    assert result.exit_code == 0, result.output
    path, rows = _read(tmp_path)
    assert [(r["objective"], r["data"], r["status"]) for r in rows] == [("wgan", "25gaussians", "ok"),
                                                                         ("wgan", "digits", "unsupported")]
    wgan = rows[0]
    # WGAN keeps its critic's weights in [-c, c]; it has no penalty to time
    assert float(wgan["max_abs_weight"]) <= 0.01 and wgan["weights_in_range"] == "True"
    assert wgan["modes"] == "25" and wgan["penalty_ms"] == "" and wgan["grad_norm_gap"] == ""
    fig = plot.figure(load_run(path))
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("wgan on 25gaussians\n") and "/25 modes" in t for t in titles)


def test_cli_vq_run_and_its_chart(tmp_path):
    result = runner.invoke(app, ["gan", "--vq", "--device", "cpu", "--out", str(tmp_path), "--n", "64", "--k", "16",
                                 "--k", "48", "--dim", "8", "--dtype", "fp32", "--op", "search",
                                 "--autoencoder-steps", "0", *QUICK])
    assert result.exit_code == 0, result.output
    path, rows = _read(tmp_path)
    assert [(r["impl"], r["K"], r["status"]) for r in rows] == [
        ("cdist", "16", "ok"), ("matmul", "16", "ok"), ("fused", "16", "unsupported"),
        ("fused-tf32x3", "16", "unsupported"),
        ("cdist", "48", "ok"), ("matmul", "48", "ok"), ("fused", "48", "unsupported"),
        ("fused-tf32x3", "48", "unsupported")]
    fig = plot.figure(load_run(path))
    lines = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"cdist fp32", "matmul fp32"} <= lines


# -- on the GPU ------------------------------------------------------------------------------------


@requires_cuda
def test_gpu_rows():
    cuda = torch.device("cuda")
    opts = suite.GanOptions(objectives=("wgan-gp",), data=("8gaussians",), modes=("cudagraph",), steps=20)
    for mode in ("eager", "cudagraph"):
        cfg = suite.GanConfig("wgan-gp", "8gaussians", mode, 20, 64, warmup_steps=opts.warmup)
        m = measure_one(suite.gan_sweep(opts, cuda), cfg, _ctx(cuda))
        assert m.status == "ok", m.reason
        assert m.values["peak_mem_MiB"] > 0 and math.isfinite(m.values["grad_norm_gap"])
    sweep = suite.vq_sweep(suite.VqOptions(), cuda)
    for impl, dtype in (("fused", "fp32"), ("fused", "bf16"), ("fused-tf32x3", "fp32")):
        for op in ("search", "quantizer"):
            m = measure_one(sweep, suite.VqConfig(impl, op, 4096, 1000, 72, dtype), _ctx(cuda))
            assert m.status == "ok", m.reason
