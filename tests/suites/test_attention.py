import pytest
import torch

from bench.errors import BadInput
from bench.runner import Context, measure_one
from suites import attention as suite
from impls.attention import naive

CTX = Context(torch.device("cpu"), warmup_ms=1, rep_ms=5)


@pytest.mark.parametrize("text, seqs", [
    ("512", (512,)), ("8k", (8192,)), ("8K", (8192,)), ("1k,2k,4k", (1024, 2048, 4096)), (" 300 , 1k", (300, 1024)),
])
def test_parse_seqs(text, seqs):
    assert suite.parse_seqs(text) == seqs


@pytest.mark.parametrize("text", ["8q", "", "1k,,2k", "-5", "0", "1.5k", "k"])
def test_parse_seqs_rejects(text):
    with pytest.raises(BadInput, match="--seq"):
        suite.parse_seqs(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=6, kv_heads=4), "not divisible"),
    (dict(heads=0), "--heads must be positive"),
    (dict(head_dim=-1), "--head-dim"),
    (dict(batch=0), "--batch"),
    (dict(dtype="fp64"), "--dtype"),
    (dict(modes=("backward",)), "--mode"),
    (dict(impls=("flash3",)), "known: naive, tiled"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(BadInput, match=message):
        suite.AttentionOptions(seqs=(64,), **kwargs)


def test_default_batch_keeps_16k_tokens_and_order():
    configs = suite.AttentionOptions(seqs=(512, 8192), impls=("naive", "tiled")).configs()
    assert {(c.seq, c.batch) for c in configs} == {(512, 32), (8192, 2)}
    # shapes outermost, impls innermost: the reference is computed once per shape
    assert [c.impl for c in configs[:4]] == ["naive", "tiled", "naive", "tiled"]
    assert configs[0].causal == configs[1].causal and configs[0].causal != configs[2].causal


def _cfg(**kw):
    base = dict(impl="tiled-torch", seq=70, batch=2, heads=4, kv_heads=2, head_dim=16, dtype="fp32", causal=True, mode="fwd+bwd")
    return suite.AttentionConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", suite.MODES)
def test_row_for_each_mode(mode):
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(70,))), _cfg(mode=mode), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["tflops"] > 0 and m.stats.n >= 5
    assert m.values["kernel"].startswith("torch block=")


@pytest.mark.usefixtures("one_timed_rep")
def test_triton_tiled_runs_through_the_interpreter_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel runs natively (tests/impls/test_flash_triton.py)")
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(40,))), _cfg(impl="tiled", seq=40, batch=1), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["kernel"].startswith("triton fwd")


@pytest.mark.usefixtures("one_timed_rep")
def test_tiled_triton_runs_only_where_tiled_would_run_gluon(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the choice is real (tests/impls/test_flash_gluon.py)")
    sweep = suite.sweep(suite.AttentionOptions(seqs=(40,)))
    m = measure_one(sweep, _cfg(impl="tiled-triton", seq=40, batch=1), CTX)  # no Gluon here: the same as tiled
    assert m.status == "unsupported" and "Triton kernels here already" in m.reason
    # Where tiled would take Gluon's kernels, tiled-triton runs and keeps Triton's.
    monkeypatch.setattr(suite.flash, "uses_gluon", lambda q, k, v, gluon=None, masks=None: gluon is not False)
    m = measure_one(sweep, _cfg(impl="tiled-triton", seq=40, batch=1, mode="fwd"), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["kernel"].startswith("triton fwd")


def test_wrong_impl_is_a_mismatch_and_not_timed(monkeypatch):
    broken = suite.Impl(lambda q, k, v, causal: naive.attention(q, k, v, causal) * 1.01)
    monkeypatch.setitem(suite.IMPLS, "broken", broken)
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(70,))), _cfg(impl="broken", mode="fwd"), CTX)
    assert m.status == "mismatch" and m.stats is None
    assert m.values["rel_err"] == pytest.approx(0.01, rel=1e-3)


def test_out_of_memory_becomes_a_row(monkeypatch):
    def oom(q, k, v, causal):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(suite.IMPLS, "hungry", suite.Impl(oom))
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(70,))), _cfg(impl="hungry"), CTX)
    assert m.status == "oom"


def test_unavailable_backend_is_unsupported_with_reason():
    if torch.cuda.is_available():
        pytest.skip("every backend may run on a GPU")
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(70,))), _cfg(impl="sdpa-cudnn"), CTX)
    assert m.status == "unsupported" and "CUDA" in m.reason


def test_cost_is_half_fixed_half_work_with_naive_weighted():
    # Work: sdpa at 256 is W, naive at 256 4W (NAIVE_WEIGHT), sdpa at 512 4W (S^2), naive at 512 16W;
    # the mean is 25W/4, and each cost is 1 + work/mean.
    opts = suite.AttentionOptions(seqs=(256, 512), heads=1, head_dim=16, batch=1, causal=(False,),
                                  impls=("naive", "sdpa"))
    sweep = suite.sweep(opts)
    assert [(c.impl, c.seq) for c in sweep.configs] == [("naive", 256), ("sdpa", 256), ("naive", 512), ("sdpa", 512)]
    assert sweep.costs() == pytest.approx([1 + 16 / 25, 1 + 4 / 25, 1 + 64 / 25, 1 + 16 / 25])


def test_tiled_named_on_cpu_runs_through_the_interpreter(tmp_path):
    # A new process without TRITON_INTERPRET: `--impl tiled` on a CPU turns the interpreter on itself.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "bench", "attention", "--device", "cpu", "--impl", "tiled", "--seq", "32",
            "--batch", "1", "--heads", "1", "--head-dim", "16", "--causal", "--out", str(tmp_path)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (csv,) = tmp_path.glob("attention-*.csv")
    import pandas as pd
    row = pd.read_csv(csv).iloc[0]
    import importlib.util
    if importlib.util.find_spec("triton") is not None:
        assert row["status"] == "ok", row["reason"]
    else:
        assert row["status"] == "unsupported"


# Serving shapes: q_len != kv_len, presets, bytes moved and the roofline bound.

def test_unequal_lengths_sweep_every_pair_keyed_by_q_len_and_kv_len():
    opts = suite.AttentionOptions(q_lens=(1, 64), kv_lens=(4096, 32768), impls=("naive",), causal=(True,))
    configs = opts.configs()
    assert [(c.q_len, c.kv_len, c.seq) for c in configs] == [(1, 4096, None), (1, 32768, None), (64, 4096, None),
                                                            (64, 32768, None)]
    assert {c.batch for c in configs} == {4, 1}  # 16k tokens of keys
    sweep = suite.sweep(opts)
    assert sweep.params[:3] == ("impl", "q_len", "kv_len") and "seq" not in sweep.params
    assert "q_len" not in sweep.metrics
    # square runs keep seq as the join key, and write q_len and kv_len beside it
    square = suite.sweep(suite.AttentionOptions(seqs=(64,)))
    assert square.params[:3] == ("impl", "seq", "batch") and {"q_len", "kv_len"} <= set(square.metrics)
    assert _cfg(seq=70).q_len == _cfg(seq=70).kv_len == 70


@pytest.mark.parametrize("kwargs, message", [
    (dict(seqs=(64,), q_lens=(1,), kv_lens=(64,)), "cannot be combined"),
    (dict(q_lens=(1,)), "--kv-len is missing"),
    (dict(kv_lens=(64,)), "--q-len is missing"),
    (dict(q_lens=(8, 64), kv_lens=(32, 128)), "kv_len >= q_len"),  # causal (the default has both)
    (dict(), "give --seq"),
])
def test_bad_shapes(kwargs, message):
    with pytest.raises(BadInput, match=message):
        suite.AttentionOptions(**kwargs)


def test_more_queries_than_keys_without_causal_is_fine():
    opts = suite.AttentionOptions(q_lens=(64,), kv_lens=(32,), causal=(False,))
    assert [(c.q_len, c.kv_len) for c in opts.configs()][0] == (64, 32)


def _unequal(**kw):
    return _cfg(**{"seq": None, "q_len": 3, "kv_len": 70, **kw})


@pytest.mark.parametrize("impl", ["naive", "sdpa", "sdpa-math", "sdpa-flash", "flex"])
@pytest.mark.parametrize("q_len, kv_len", [(1, 70), (3, 70), (17, 70)])
def test_unequal_rows_match_float64(impl, q_len, kv_len):
    if impl == "sdpa-flash" and torch.cuda.is_available():
        pytest.skip("on a GPU the flash backend declines an explicit mask")
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(q_len,), kv_lens=(kv_len,)))
    m = measure_one(sweep, _unequal(impl=impl, q_len=q_len, kv_len=kv_len, mode="fwd"), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["tflops"] > 0


def test_unequal_rows_with_backward_match_float64():
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(3,), kv_lens=(70,)))
    for impl in ("naive", "sdpa"):
        m = measure_one(sweep, _unequal(impl=impl), CTX)
        assert m.status == "ok", m.reason
        assert m.values["rel_err"] < 1e-5


def test_rows_that_take_equal_lengths_only_are_unsupported_with_reason():
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(3,), kv_lens=(70,)))
    m = measure_one(sweep, _unequal(impl="tiled-torch"), CTX)
    assert m.status == "unsupported" and "q_len == kv_len" in m.reason



@pytest.mark.usefixtures("one_timed_rep")
def test_tiled_runs_unequal_lengths_and_decodes_in_fwd_mode():
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(3,), kv_lens=(70,)))
    m = measure_one(sweep, _unequal(impl="tiled", batch=1), CTX)  # fwd+bwd: the prefill kernels
    assert m.status == "ok" and m.values["rel_err"] < 1e-5, m.reason
    assert m.values["kernel"].startswith("triton fwd") and "dkdv" in m.values["kernel"]
    m = measure_one(sweep, _unequal(impl="tiled", batch=1, mode="fwd"), CTX)  # no gradient: split-KV decode
    assert m.status == "ok" and m.values["rel_err"] < 1e-5, m.reason
    assert m.values["kernel"].startswith("triton decode")


def test_flex_row_on_cpu():
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(3,), kv_lens=(70,)))
    m = measure_one(sweep, _unequal(impl="flex", mode="fwd"), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["kernel"].startswith("flex")
    if not torch.cuda.is_available():
        m = measure_one(sweep, _unequal(impl="flex", mode="fwd+bwd"), CTX)
        assert m.status == "unsupported" and "no backward on CPU" in m.reason


def _peaks(fp32_tflops, copy_GBps):
    return {"fp32_tflops": fp32_tflops, "tf32_tflops": None, "fp16_tflops": 1.0, "bf16_tflops": 1.0,
            "copy_GBps": copy_GBps}


def test_bytes_moved_and_share_of_the_bound_ceiling():
    # q_len 1 against 70 keys, batch 2, 4 heads over 2, D 16, fp32: Q and O 2*4*1*16 = 128 elements
    # each, K and V 2*2*70*16 = 4480 each: (2*128 + 2*4480) * 4 = 36864 bytes. FLOPs 4*2*4*70*16 = 35840:
    # under 1 FLOP per byte.
    cfg = _unequal(impl="naive", q_len=1, mode="fwd")
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(1,), kv_lens=(70,)))
    # ridge 1e6 TFLOP/s over 1e6 GB/s = 1000 FLOP/byte: memory-bound, share of the copy bandwidth
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=5, peaks=_peaks(1e6, 1e6))
    m = measure_one(sweep, cfg, ctx)
    assert m.status == "ok", m.reason
    assert m.values["bytes_moved"] == 36864
    assert m.values["GBps"] == pytest.approx(36864 / (m.stats.median * 1e-3) / 1e9)
    assert m.values["bound"] == "memory"
    assert m.values["pct_of_peak"] == pytest.approx(100 * m.values["GBps"] / 1e6)
    # ridge 1e6 TFLOP/s over 1e12 GB/s = 0.001 FLOP/byte: compute-bound, share of the matmul peak
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=5, peaks=_peaks(1e6, 1e12))
    m = measure_one(sweep, cfg, ctx)
    assert m.values["bound"] == "compute"
    assert m.values["pct_of_peak"] == pytest.approx(100 * m.values["tflops"] / 1e6)
    # no calibrated peaks: neither bound nor share
    m = measure_one(sweep, cfg, CTX)
    assert m.values["bound"] is None and m.values["pct_of_peak"] is None


def test_preset_names_and_cpu_versions_are_small():
    assert suite.preset("decode", "cuda").kv_len == "1k,4k,16k,32k,128k"
    small = suite.preset("decode", "cpu")
    assert small.q_len == "1" and max(suite.parse_seqs(small.kv_len)) <= 1024
    assert suite.preset("prefill", "mps") == suite.PRESETS["prefill"]["cpu"]
    with pytest.raises(BadInput, match="--preset must be one of decode, prefill"):
        suite.preset("serve", "cpu")


def _invoke(tmp_path, *args):
    from typer.testing import CliRunner

    from bench.cli import app

    return CliRunner().invoke(app, ["attention", "--device", "cpu", "--out", str(tmp_path), "--warmup-ms", "1",
                                    "--rep-ms", "5", *args])


def test_preset_decode_on_cpu_fills_what_is_not_given(tmp_path):
    import pandas as pd

    # decode's CPU version, made tinier by options given, which override the preset's
    result = _invoke(tmp_path, "--preset", "decode", "--kv-len", "64", "--batch", "1", "--heads", "2",
                     "--head-dim", "16", "--impl", "naive", "--impl", "sdpa", "--impl", "tiled-torch", "--impl", "flex")
    assert result.exit_code == 0, result.output
    (csv,) = tmp_path.glob("attention-*.csv")
    rows = pd.read_csv(csv)
    assert "seq" not in rows.columns
    # q_len 1, kv_heads 2, causal, forward and fp32 come from the preset; the rest from the options given
    assert set(zip(rows.q_len, rows.kv_len, rows.batch, rows.heads, rows.kv_heads, rows.head_dim)) == {(1, 64, 1, 2, 2, 16)}
    assert rows.causal.tolist() == [True] * 4 and set(rows["mode"]) == {"fwd"} and set(rows.dtype) == {"fp32"}
    by = rows.set_index("impl")
    assert (by.loc[["naive", "sdpa", "flex"], "status"] == "ok").all(), by.reason
    assert by.loc["tiled-torch", "status"] == "unsupported" and "q_len == kv_len" in by.loc["tiled-torch", "reason"]
    # (Q and O 1*2*1*16 each, K and V 1*2*64*16 each) * 4 bytes
    assert (by.loc[["naive", "sdpa", "flex"], "bytes_moved"] == (2 * 32 + 2 * 2048) * 4).all()


def test_square_run_writes_q_len_and_kv_len_beside_seq(tmp_path):
    import pandas as pd

    result = _invoke(tmp_path, "--seq", "32", "--batch", "1", "--heads", "1", "--head-dim", "16", "--causal",
                     "--impl", "naive")
    assert result.exit_code == 0, result.output
    (csv,) = tmp_path.glob("attention-*.csv")
    row = pd.read_csv(csv).iloc[0]
    assert (row["seq"], row["q_len"], row["kv_len"]) == (32, 32, 32)
    assert row["bytes_moved"] == 4 * 32 * 16 * 4


@pytest.mark.parametrize("args, message", [
    (["--seq", "64", "--q-len", "1", "--kv-len", "64"], "cannot be combined"),
    (["--preset", "decode", "--seq", "64", "--kv-len", "128"], "cannot be combined"),
    (["--q-len", "64", "--kv-len", "32", "--causal"], "kv_len >= q_len"),
    (["--q-len", "1"], "--kv-len is missing"),
    (["--q-len", "1", "--kv-len", "4q"], "--kv-len: cannot read '4q'"),
    (["--preset", "serve"], "--preset must be one of"),
])
def test_bad_serving_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))


# Masks: --window, --softcap, --alibi.

def _masked(**kw):
    return _cfg(**{"seq": None, "q_len": 5, "kv_len": 40, "mode": "fwd", **kw})


@pytest.mark.parametrize("impl", ["naive", "sdpa", "sdpa-math", "flex"])
@pytest.mark.parametrize("masks", [dict(window=7), dict(alibi=True), dict(window=4, alibi=True),
                                   dict(softcap=2.0), dict(softcap=2.0, alibi=True, window=9)], ids=str)
def test_masked_rows_match_float64(impl, masks):
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(5,), kv_lens=(40,), causal=(True,), **masks))
    m = measure_one(sweep, _masked(impl=impl, **masks), CTX)
    if impl.startswith("sdpa") and "softcap" in masks:
        assert m.status == "unsupported" and m.reason == "SDPA has no logit soft-capping"
        return
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5


def test_masked_backward_rows_match_float64():
    masks = dict(window=6, alibi=True)
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(5,), kv_lens=(40,), causal=(True,), **masks))
    for impl in ("naive", "sdpa"):
        m = measure_one(sweep, _masked(impl=impl, mode="fwd+bwd", **masks), CTX)
        assert m.status == "ok", m.reason
        assert m.values["rel_err"] < 1e-5


def test_a_wrong_mask_is_a_mismatch(monkeypatch):
    # An implementation that ignores the window fails the gate.
    ignores = suite.Impl(lambda q, k, v, causal, masks: naive.attention(q, k, v, causal), no_masks=None)
    monkeypatch.setitem(suite.IMPLS, "ignores", ignores)
    sweep = suite.sweep(suite.AttentionOptions(q_lens=(5,), kv_lens=(40,), causal=(True,), window=4))
    assert measure_one(sweep, _masked(impl="ignores", window=4), CTX).status == "mismatch"


@pytest.mark.usefixtures("one_timed_rep")
def test_tiled_takes_masks_and_tiled_torch_does_not():
    sweep = suite.sweep(suite.AttentionOptions(seqs=(64,), causal=(True,), alibi=True))
    m = measure_one(sweep, _cfg(impl="tiled-torch", seq=64, head_dim=32, alibi=True), CTX)
    assert m.status == "unsupported" and m.reason.startswith("tiled-torch") and "takes no masks" in m.reason
    m = measure_one(sweep, _cfg(impl="tiled", seq=64, batch=1, alibi=True, mode="fwd+bwd"), CTX)
    assert m.status == "ok" and m.values["rel_err"] < 1e-5, m.reason


def test_masks_are_parameters_only_when_given():
    plain = suite.sweep(suite.AttentionOptions(seqs=(64,)))
    assert not {"window", "softcap", "alibi"} & set(plain.params + plain.metrics)
    masked = suite.sweep(suite.AttentionOptions(seqs=(64,), causal=(True,), window=16, alibi=True))
    assert masked.params[-2:] == ("window", "alibi") and "softcap" not in masked.params
    assert {(c.window, c.softcap, c.alibi) for c in masked.configs} == {(16, None, True)}


def test_window_counts_only_the_pairs_it_sees():
    # seq 64, window 16: positions 0..14 see 1..15 keys (120 pairs), 15..63 see 16 each (49*16 = 784): 904.
    cfg = _cfg(seq=64, batch=1, heads=1, head_dim=16, mode="fwd", window=16)
    assert suite._flops(cfg) == 4 * 904 * 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0, causal=(True,)), "--window must be positive"),
    (dict(window=-3, causal=(True,)), "--window must be positive"),
    (dict(window=8), "add --causal"),  # the default sweeps both causal and not
    (dict(window=8, causal=(False,)), "add --causal"),
    (dict(softcap=0.0), "--softcap must be positive"),
    (dict(softcap=-1.0), "--softcap must be positive"),
])
def test_bad_masks(kwargs, message):
    with pytest.raises(BadInput, match=message):
        suite.AttentionOptions(seqs=(64,), **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--seq", "64", "--causal", "--window", "0"], "--window must be positive"),
    (["--seq", "64", "--no-causal", "--window", "16"], "add --causal"),
    (["--seq", "64", "--softcap", "-2"], "--softcap must be positive"),
    (["--seq", "64", "--window", "x"], "Invalid value for '--window'"),  # typer's own check
])
def test_bad_masks_are_one_line_and_exit_2(tmp_path, args, message):
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))


def test_window_run_writes_ok_rows(tmp_path):
    import pandas as pd

    result = _invoke(tmp_path, "--window", "16", "--causal", "--seq", "64", "--batch", "1", "--heads", "2",
                     "--head-dim", "16", "--impl", "naive", "--impl", "sdpa", "--impl", "flex", "--impl", "tiled-torch")
    assert result.exit_code == 0, result.output
    (csv,) = tmp_path.glob("attention-*.csv")
    by = pd.read_csv(csv).set_index("impl")
    assert (by.loc[["naive", "sdpa", "flex"], "status"] == "ok").all(), by.reason
    assert (by.window == 16).all() and "softcap" not in by.columns and "alibi" not in by.columns
    assert by.loc["tiled-torch", "status"] == "unsupported"
    assert (by.loc[["naive", "sdpa", "flex"], "rel_err"] < 1e-5).all()
