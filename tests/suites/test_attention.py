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


def test_triton_tiled_runs_through_the_interpreter_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel runs natively (tests/impls/test_flash_triton.py)")
    m = measure_one(suite.sweep(suite.AttentionOptions(seqs=(70,))), _cfg(impl="tiled", head_dim=32), CTX)
    assert m.status == "ok", m.reason
    assert m.values["rel_err"] < 1e-5 and m.values["kernel"].startswith("triton fwd")


def test_tiled_triton_runs_only_where_tiled_would_run_gluon(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the choice is real (tests/impls/test_flash_gluon.py)")
    sweep = suite.sweep(suite.AttentionOptions(seqs=(70,)))
    m = measure_one(sweep, _cfg(impl="tiled-triton", head_dim=32), CTX)  # no Gluon here: the same as tiled
    assert m.status == "unsupported" and "Triton kernels here already" in m.reason
    # Where tiled would take Gluon's kernels, tiled-triton runs and keeps Triton's.
    monkeypatch.setattr(suite.flash, "uses_gluon", lambda q, k, v, gluon=None: gluon is not False)
    m = measure_one(sweep, _cfg(impl="tiled-triton", head_dim=32), CTX)
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
