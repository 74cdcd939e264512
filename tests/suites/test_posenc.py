"""The posenc suite: options and rows, bytes by hand, cost rows on CPU (the
correctness gate included, Triton through the interpreter), a reach run of a
few steps, the oom row, the charts, and the command line."""

import math
import re

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from typer.testing import CliRunner

from bench import plot
from bench.cli import app
from bench.compare import load_run
from bench.env import cache_dir
from bench.errors import BadInput
from bench.runner import Context, measure_one
from bench.stats import stat_columns
from impls import posenc
from impls.data import DataConfig, load_data
from suites import posenc as suite
from suites.cli import posenc as command
from tests.bench.test_compare import ENV, write_run

runner = CliRunner()
CPU = torch.device("cpu")
COPY_GBPS = 10.0  # a made-up calibrated copy bandwidth: pct_of_peak is GBps / 10 * 100
TINY = dict(batch=1, seqs=(9,), heads=2, head_dim=8, dtypes=("fp32",), modes=("fwd",))


def _ctx() -> Context:
    return Context(CPU, warmup_ms=0.5, rep_ms=2.0, peaks={"copy_GBps": COPY_GBPS})


def _row(impl, encoding="rope", layout="neox", mode="fwd", offset=0, dtype="fp32", **shape):
    shape = {**dict(batch=1, seq=9, heads=2, head_dim=8), **shape}
    cfg = suite.CostConfig(impl, encoding, layout, dtype=dtype, mode=mode, offset=offset, **shape)
    return cfg, measure_one(suite.cost_sweep(suite.CostOptions(**TINY)), cfg, _ctx())


def test_cli_names_match_the_suite():
    assert command.MODES == suite.MODES
    assert command.COST_ENCODINGS == suite.COST_ENCODINGS
    assert command.REACH_ENCODINGS == suite.REACH_ENCODINGS
    assert command.LAYOUTS == posenc.LAYOUTS
    assert command.REACH_MODELS == tuple(suite.REACH_PRESETS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim=63), "--head-dim 63: RoPE rotates pairs"),
    (dict(encodings=("xpos",)), "unknown --encoding 'xpos' for --cost"),
    (dict(impls=("cudnn",)), "unknown --impl 'cudnn'"),
    (dict(dtypes=("fp64",)), "--dtype must be one of"),
    (dict(modes=("bwd",)), "--mode must be one of fwd, fwd+bwd"),
    (dict(offsets=(-1,)), "--offset must be 0 or more"),
    (dict(layouts=("llama",)), "unknown --layout 'llama'"),
])
def test_bad_cost_options(kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        suite.CostOptions(**kwargs)


def test_odd_head_dim_is_fine_without_rope():
    suite.CostOptions(head_dim=63, encodings=("alibi",))


@pytest.mark.parametrize("kwargs, message", [
    (dict(encodings=("rope+pi",)), "unknown --encoding 'rope+pi' for --reach"),
    (dict(model="gpt2-small"), "unknown --model 'gpt2-small' for --reach; known: tiny, small"),
    (dict(eval_factors=(1, 0)), "--eval-factors"),
    (dict(steps=0), "--steps must be positive"),
])
def test_bad_reach_options(kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        suite.ReachOptions(**kwargs)


def test_cost_rows():
    configs = suite.CostOptions().configs()
    # per dtype x mode: RoPE 2 layouts x 6 impls, rope+attention 2 layouts x 3, ALiBi 4, sinusoidal 2, learned 1
    assert len(configs) == 2 * 2 * (12 + 6 + 4 + 2 + 1)
    first = [(c.impl, c.encoding, c.layout) for c in configs[:25]]
    assert first[:6] == [(i, "rope", "neox") for i in suite.ROPE_IMPLS]
    assert first[12:18] == [("compile+sdpa-cudnn", "rope+attention", "neox"), ("compile+tiled", "rope+attention", "neox"),
                            ("tiled-fused", "rope+attention", "neox"), ("compile+sdpa-cudnn", "rope+attention", "gptj"),
                            ("compile+tiled", "rope+attention", "gptj"), ("tiled-fused", "rope+attention", "gptj")]
    assert first[18:] == [("sdpa", "alibi", ""), ("sdpa-bias", "alibi", ""), ("flex", "alibi", ""),
                          ("tiled", "alibi", ""), ("eager", "sinusoidal", ""), ("cached", "sinusoidal", ""),
                          ("eager", "learned", "")]
    # offsets multiply the RoPE rows (with attention or not) only
    two = suite.CostOptions(offsets=(0, 30_000), dtypes=("bf16",), modes=("fwd",)).configs()
    assert len(two) == 2 * 2 * (6 + 3) + 4 + 3
    only = suite.CostOptions(impls=("triton",), encodings=("rope",), layouts=("gptj",), dtypes=("bf16",),
                             modes=("fwd",)).configs()
    assert [(c.impl, c.layout) for c in only] == [("triton", "gptj")]


def test_bytes_by_hand():
    # q and k of 2 x 3 x 4 x 8 bf16 elements: 384 bytes each, read and written; the table 2 x 3 x 4 float32
    assert suite.rope_bytes(2, 3, 4, 4, 8, 2, table=True, mode="fwd") == 2 * 768 + 96
    assert suite.rope_bytes(2, 3, 4, 4, 8, 2, table=False, mode="fwd") == 1536
    assert suite.rope_bytes(2, 3, 4, 4, 8, 2, table=True, mode="fwd+bwd") == 2 * (1536 + 96)
    # x of 2 x 3 x 16 fp32 (384 bytes) read and written, the table (192) built and read; the backward passes
    # the gradient through (768) and writes the table's (192)
    assert suite.absolute_bytes(2, 3, 16, 4, "fwd") == 768 + 384
    assert suite.absolute_bytes(2, 3, 16, 4, "fwd", built=False) == 768 + 192
    assert suite.absolute_bytes(2, 3, 16, 4, "fwd+bwd") == 768 + 384 + 768 + 192


@pytest.mark.parametrize("layout", posenc.LAYOUTS)
@pytest.mark.parametrize("mode", suite.MODES)
def test_eager_rope_row(layout, mode):
    cfg, m = _row("eager", layout=layout, mode=mode, offset=30_000)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-6
    nbytes = suite.rope_bytes(1, 9, 2, 2, 8, 4, table=True, mode=mode)
    assert m.values["bytes_moved"] == nbytes
    assert m.values["GBps"] == pytest.approx(nbytes / (m.stats.median * 1e-3) / 1e9)
    assert m.values["pct_of_peak"] == pytest.approx(m.values["GBps"] / COPY_GBPS * 100)


@pytest.mark.parametrize("impl", ["triton", "triton-inplace-computed"])
@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.usefixtures("one_timed_rep")
def test_triton_rows_through_the_interpreter(impl, mode):
    from impls import posenc_triton as pt

    if pt.why_not(CPU):
        pytest.skip(pt.why_not(CPU))
    _, m = _row(impl, layout="gptj", mode=mode, offset=30_000)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-3  # computed cos/sin carry float32 angles at position 30,000
    assert ("computed" in impl) == ("computed" in m.values["kernel"])


def test_a_wrong_rotation_is_a_mismatch(monkeypatch):
    # The eager rows rotating the wrong pairs: the gate against float64 catches it before any timing.
    monkeypatch.setattr(suite, "_eager_rope", lambda q, k, cos, sin, layout: (
        posenc.apply_rope(q, cos, sin, "gptj"), posenc.apply_rope(k, cos, sin, "gptj")))
    _, m = _row("eager", layout="neox")
    assert m.status == "mismatch" and "above the fp32 tolerance" in m.reason
    assert m.stats is None


def test_unavailable_rows_say_why(monkeypatch):
    from impls import posenc_triton as pt

    monkeypatch.setattr(pt, "why_not", lambda device: "no CUDA here")
    monkeypatch.setattr(suite, "_compile_why_not", lambda device: "torch.compile does not work here: no compiler")
    assert _row("triton")[1].reason == "no CUDA here"
    m = _row("compile")[1]
    assert (m.status, m.reason) == ("unsupported", "torch.compile does not work here: no compiler")
    m = _row("flex", encoding="alibi", layout="", mode="fwd+bwd")[1]
    assert m.status == "unsupported" and "no backward on CPU" in m.reason


@pytest.mark.parametrize("impl", [i for i in suite.ALIBI_IMPLS if i != "tiled"])  # tiled: its own test below
def test_alibi_rows(impl):
    _, m = _row(impl, encoding="alibi", layout="", seq=17, heads=3)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5
    if impl == "sdpa-bias":
        assert m.values["bias_MiB"] == 3 * 17 * 17 * 4 / 2**20  # (H, S, S) float32


@pytest.mark.usefixtures("one_timed_rep")
def test_tiled_alibi_row_through_the_interpreter():
    from impls.attention import flash_triton as ft

    if ft.TRITON_ERROR is not None or not ft.INTERPRET:
        pytest.skip(ft.TRITON_ERROR or "runs the kernels through Triton's interpreter (CPU)")
    _, m = _row("tiled", encoding="alibi", layout="", mode="fwd+bwd", seq=17, heads=3, head_dim=32)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-3  # fp32 with IEEE products in the kernels
    assert m.values["kernel"].startswith("slopes in the kernel: triton fwd") and "triton bwd dq" in m.values["kernel"]


# rope+attention: shape small enough for the interpreter (B·H·S² = 2 x 33² under INTERPRET_MAX_PAIRS)
ROPE_ATTENTION = dict(encoding="rope+attention", seq=33, heads=2, head_dim=32, offset=1000)


@pytest.mark.parametrize("layout, mode", [("neox", "fwd"), ("gptj", "fwd+bwd")])  # both layouts: test_flash_triton
@pytest.mark.usefixtures("one_timed_rep")
def test_tiled_fused_rows_through_the_interpreter(layout, mode):
    from impls.attention import flash_triton as ft

    if ft.TRITON_ERROR is not None or not ft.INTERPRET:
        pytest.skip(ft.TRITON_ERROR or "runs the kernels through Triton's interpreter (CPU)")
    _, m = _row("tiled-fused", layout=layout, mode=mode, **ROPE_ATTENTION)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-3
    assert m.values["kernel"].startswith(f"RoPE {layout} in tiled's loads: triton fwd")
    # attention's FLOPs: 4·B·H·D per causal pair (S²/2 of them, bench/metrics.py), plus RoPE's few per element
    pairs = 33 * 33 / 2
    factor = 1.0 if mode == "fwd" else 3.5
    flops = 4 * 2 * pairs * 32 * factor + suite.rope_flops(1, 33, 2, 2, 32, mode)
    assert m.values["tflops"] == pytest.approx(flops / (m.stats.median * 1e-3) / 1e12)


@pytest.mark.usefixtures("one_timed_rep")
def test_compile_then_tiled_row(monkeypatch):
    # torch.compile's first compilation takes longer than this test should: the eager RoPE stands in for it,
    # and what is checked is the row around it (rotate, then the kernels without RoPE, the gate, the note).
    from impls.attention import flash_triton as ft

    if ft.TRITON_ERROR is not None or not ft.INTERPRET:
        pytest.skip(ft.TRITON_ERROR or "runs the kernels through Triton's interpreter (CPU)")
    monkeypatch.setattr(suite, "_compiled_rope", lambda: suite._eager_rope)
    monkeypatch.setattr(suite, "_compile_why_not", lambda device: None)
    _, m = _row("compile+tiled", layout="gptj", mode="fwd+bwd", **ROPE_ATTENTION)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-3
    assert m.values["kernel"].startswith("torch.compile RoPE gptj, then tiled: triton fwd")


def test_rope_attention_rows_that_cannot_run_here_say_why(monkeypatch):
    m = _row("compile+sdpa-cudnn", **ROPE_ATTENTION)[1]
    assert (m.status, m.reason) == ("unsupported", "the cudnn backend needs a CUDA device")
    m = _row("tiled-fused", **{**ROPE_ATTENTION, "seq": 200})[1]
    assert m.status == "unsupported" and "up to 16384 scored pairs" in m.reason and "80000" in m.reason
    m = _row("tiled-fused", **{**ROPE_ATTENTION, "head_dim": 16})[1]
    assert m.status == "unsupported" and "head dim of 32 or more" in m.reason


def test_a_wrong_fused_rotation_is_a_mismatch(monkeypatch):
    # tiled-fused rotating in the other layout: the gate against float64 catches it before any timing.
    from impls.attention import flash_triton as ft

    if ft.TRITON_ERROR is not None or not ft.INTERPRET:
        pytest.skip(ft.TRITON_ERROR or "runs the kernels through Triton's interpreter (CPU)")
    real = posenc.Rope
    monkeypatch.setattr(posenc, "Rope", lambda layout, offset: real("gptj" if layout == "neox" else "neox", offset=offset))
    _, m = _row("tiled-fused", layout="neox", **ROPE_ATTENTION)
    assert m.status == "mismatch" and "above the fp32 tolerance" in m.reason
    assert m.stats is None


@pytest.mark.parametrize("encoding, impl", [("sinusoidal", "eager"), ("sinusoidal", "cached"), ("learned", "eager")])
@pytest.mark.parametrize("mode", suite.MODES)
def test_absolute_rows(encoding, impl, mode):
    _, m = _row(impl, encoding=encoding, layout="", mode=mode)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-6
    assert m.values["bytes_moved"] == suite.absolute_bytes(1, 9, 16, 4, mode, built=impl != "cached")


# -- reach -----------------------------------------------------------------------------------------


@pytest.fixture
def reach(monkeypatch, tmp_path):
    """reach(encodings): a reach sweep of a few steps on bytes (no tokenizer to
    train), tiny GPT, L = 8, its models cached in a folder of this test's."""
    monkeypatch.setitem(suite.REACH_PRESETS, "tiny", suite.ReachPreset(
        gpt="tiny", train_len=8, steps=3, batch=2, lr=3e-3, data="bytes", eval_tokens=64))
    data = load_data(DataConfig.from_name("bytes"), cache_dir())
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    trained = []
    train_lm = suite.train_lm

    def counting(config, *args, **kwargs):
        trained.append(config.pos_encoding)
        return train_lm(config, *args, **kwargs)

    monkeypatch.setattr(suite, "train_lm", counting)

    def make(encodings):
        opts = suite.ReachOptions(model="tiny", encodings=encodings, eval_factors=(1, 2))
        return suite.reach_sweep(opts, data), trained

    return make


def _run(sweep):
    ctx = _ctx()
    return {(c.encoding, c.eval_len): measure_one(sweep, c, ctx) for c in sweep.configs}


def test_reach_trains_once_per_encoding_and_scales_rope_at_evaluation(reach):
    sweep, trained = reach(("learned", "rope"))
    assert [(c.encoding, c.eval_len) for c in sweep.configs] == [
        ("learned", 8), ("rope", 8), ("rope+pi", 8), ("rope+ntk", 8),
        ("learned", 16), ("rope", 16), ("rope+pi", 16), ("rope+ntk", 16)]
    rows = _run(sweep)
    assert trained == ["learned", "rope"]
    assert all(m.status == "ok" for m in rows.values()), {k: m.reason for k, m in rows.items()}
    for m in rows.values():
        assert m.values["ppl"] == pytest.approx(math.exp(m.values["val_loss"]))
        assert m.values["eval_tokens"] == 64  # every length scores the same 64 tokens: 8 windows of 8, 4 of 16
    # the training shows on the row that trained
    assert rows["rope", 8].values["trained_steps"] == 3 and rows["rope", 8].values["cached"] is False
    assert "trained_steps" not in rows["rope", 16].values
    # at L the extensions are the RoPE model itself; past L they scale by eval_len / L and change the loss
    assert rows["rope+pi", 8].values["val_loss"] == rows["rope", 8].values["val_loss"]
    assert rows["rope+pi", 16].values["scaling"] == 2.0
    assert rows["rope+pi", 16].values["val_loss"] != rows["rope", 16].values["val_loss"]
    assert rows["rope+ntk", 16].values["val_loss"] != rows["rope+pi", 16].values["val_loss"]
    assert "untrained rows" in rows["learned", 16].values["note"]
    assert rows["learned", 8].values["note"] == ""
    # a second run reads the models back: nothing trained, the same scores
    again = _run(reach(("learned", "rope"))[0])
    assert trained == ["learned", "rope"] and again["rope", 8].values["cached"] is True
    assert again["rope+ntk", 16].values["val_loss"] == rows["rope+ntk", 16].values["val_loss"]


def test_score_by_hand():
    """score() is the mean next-token loss over non-overlapping windows: a
    model that gives every token the same logits scores log(vocab) at any window."""
    class Uniform(torch.nn.Module):
        def forward(self, x, y):
            logits = torch.zeros(*x.shape, 5)
            return logits, torch.nn.functional.cross_entropy(logits.view(-1, 5), y.view(-1))

    from impls.precision import PRECISIONS

    tokens = torch.arange(17) % 5
    for window in (4, 8, 16):
        assert suite.score(Uniform(), tokens, window, PRECISIONS["fp32"], CPU) == pytest.approx(math.log(5))


def test_an_eval_length_that_does_not_fit_is_an_oom_row(reach, monkeypatch):
    sweep, _ = reach(("rope",))
    score = suite.score

    def short_memory(model, tokens, window, precision, device):
        if window > 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return score(model, tokens, window, precision, device)

    monkeypatch.setattr(suite, "score", short_memory)
    rows = _run(sweep)
    assert rows["rope", 8].status == "ok"
    assert rows["rope", 16].status == rows["rope+pi", 16].status == "oom"
    assert "can't allocate memory" in rows["rope", 16].reason


# -- charts and the command line -------------------------------------------------------------------

REACH_PARAMS = ["encoding", "eval_len", "model", "train_len", "steps"]


def test_reach_chart(tmp_path):
    rows = [dict(encoding=e, eval_len=n, model="tiny", train_len=64, steps=200, ppl=p)
            for e, ps in (("alibi", (30, 29, 29)), ("rope", (30, 60, 200)), ("rope+pi", (30, 40, 80)))
            for n, p in zip((64, 128, 256), ps)]
    rows.append(dict(encoding="learned", eval_len=256, model="tiny", train_len=64, steps=200, status="oom",
                     reason="OutOfMemoryError"))
    meta = {"params": REACH_PARAMS, "label": "encoding", "metrics": ["ppl"], "primary": "ppl",
            "higher_is_better": False}
    path = write_run(tmp_path, rows, suite="posenc-reach", meta=meta,
                     columns=["suite", *REACH_PARAMS, "status", "reason", *stat_columns(), "ppl"])
    fig = plot.figure(load_run(path))
    FigureCanvasAgg(fig).draw()
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == ["alibi", "rope", "rope+pi"]
    assert list(lines["rope"].get_ydata()) == [30, 60, 200]
    assert lines["rope+pi"].get_linestyle() == "--" and lines["rope"].get_linestyle() == "-"
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "evaluation length (tokens)"
    assert any(t.get_text() == " trained at 64" for t in ax.texts)


def test_cli_cost_run_and_its_chart(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.commands.cached_peaks", lambda device: {"copy_GBps": COPY_GBPS})
    result = runner.invoke(app, ["posenc", "--cost", "--device", "cpu", "--batch", "1", "--seq", "9", "--heads", "2",
                                 "--head-dim", "8", "--mode", "fwd", "--impl", "eager", "--impl", "sdpa",
                                 "--impl", "cached", "--warmup-ms", "0.5", "--rep-ms", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (csv_path,) = tmp_path.glob("posenc-cost-*.csv")
    run = load_run(csv_path)
    assert list(zip(run.rows["impl"], run.rows["encoding"])) == [
        ("eager", "rope"), ("eager", "rope"), ("sdpa", "alibi"), ("eager", "sinusoidal"), ("cached", "sinusoidal"),
        ("eager", "learned")]
    assert set(run.rows["status"]) == {"ok"}
    fig = plot.figure(run)
    FigureCanvasAgg(fig).draw()
    assert len(fig.axes) == 2  # bandwidth rows, ALiBi rows
    assert any(t.get_text().startswith(" copy 10 GB/s") for t in fig.axes[0].texts)


@pytest.mark.parametrize("args, message", [
    ([], "give --cost"),
    (["--cost", "--head-dim", "7"], "--head-dim 7: RoPE rotates pairs"),
    (["--reach", "--encoding", "xpos"], "unknown --encoding 'xpos' for --reach"),
    (["--cost", "--offset", "3k"], "--offset: cannot read '3k'"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["posenc", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_help_imports_no_torch_and_shows_flags_without_a_value():
    from tests.bench.test_cli import HEAVY, _loaded_after

    loaded, output = _loaded_after([["posenc", "--help"], ["posenc"]], HEAVY)
    assert loaded == {"posenc --help": [], "posenc": []}  # bad input answers before torch, as --help does
    assert "--reach" in output and "<bool>" not in output
