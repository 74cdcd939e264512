"""Serving shapes in the attention suite: packed variable-length batches
(--varlen), paged KV caches (--page-size), and flash-attention's error rule
for every row that runs on a CPU."""

import pytest
import torch

from bench.errors import BadInput
from bench.runner import Context, measure_one
from impls.attention import naive
from impls.attention.naive import NO_MASKS, Masks, Varlen
from suites import attention as suite

CTX = Context(torch.device("cpu"), warmup_ms=1, rep_ms=5)


# flash-attention's own tests (tests/test_flash_attn.py, hopper/test_flash_attn.py): the output within
# twice PyTorch's low-precision error (3x with soft-capping), the gradients within 3x.
FACTOR = {"out": 2, "dq": 3, "dk": 3, "dv": 3}


def within_flash_attention_rule(got, lowp, ref, atol, softcap=False):
    """flash-attention's test rule: for each tensor, the largest error of `got`
    against the float64 `ref` is at most FACTOR times that of PyTorch's own
    attention computed in the same low precision (`lowp`), plus `atol`.
    Returns the failures as text, empty when all pass."""
    failures = []
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        pt = (lo.double() - r).abs().max().item()
        factor = 3 if softcap and name == "out" else FACTOR[name]
        err, bound = (g.double() - r).abs().max().item(), factor * pt + atol
        if not err <= bound:
            failures.append(f"{name}: max error {err:.3g} > {factor} x {pt:.3g} + {atol:g}")
    return "; ".join(failures)


def test_the_rule_fails_what_is_twice_as_far_off():
    ref = torch.zeros(3, dtype=torch.float64)
    lowp = torch.tensor([0.0, 0.1, 0.0])
    assert within_flash_attention_rule([torch.tensor([0.2, 0.0, 0.0])], [lowp], [ref], atol=0.0) == ""
    assert "out: max error 0.3" in within_flash_attention_rule([torch.tensor([0.3, 0, 0])], [lowp], [ref], atol=0.0)
    assert within_flash_attention_rule([torch.tensor([0.3, 0, 0])], [lowp], [ref], atol=0.11) == ""
    # the gradients may be three times as far off, not more
    grads = [torch.tensor([0.0, 0.1, 0.0])] * 3
    assert within_flash_attention_rule([lowp, *[torch.tensor([0.29, 0, 0])] * 3], [lowp, *grads], [ref] * 4, 0.0) == ""
    assert "dk: max error 0.31" in within_flash_attention_rule(
        [lowp, grads[0], torch.tensor([0.31, 0, 0]), grads[0]], [lowp, *grads], [ref] * 4, 0.0)


# --lengths

@pytest.mark.parametrize("text, lengths", [
    ("128,4k,900", (128, 4096, 900)), ("0,1, 7", (0, 1, 7)), ("5", (5,)),
])
def test_parse_lengths_lists(text, lengths):
    assert suite.parse_lengths(text) == lengths


def test_parse_lengths_distribution_is_seeded_and_in_range():
    a = suite.parse_lengths("uniform:128-4k:16")
    assert len(a) == 16 and all(128 <= n <= 4096 for n in a) and len(set(a)) > 1
    assert a == suite.parse_lengths("uniform:128-4k:16@0") == suite.parse_lengths(" uniform : 128 - 4K : 16 ")
    assert a != suite.parse_lengths("uniform:128-4k:16@1")
    assert suite.parse_lengths("uniform:3-3:2") == (3, 3)


@pytest.mark.parametrize("text, message", [
    ("1,x", "cannot read 'x'"), ("", "cannot read ''"), ("-3", "cannot read '-3'"), ("1.5k", "cannot read"),
    ("normal:1-5:3", "unknown distribution 'normal'"), ("uniform:9-5:3", "need LO <= HI"),
    ("uniform:1-5:0", "N >= 1"), ("uniform:1-5", "cannot read"),
])
def test_parse_lengths_rejects(text, message):
    with pytest.raises(BadInput, match=message):
        suite.parse_lengths(text)


def test_varlen_offsets_by_hand():
    v = Varlen((3, 0, 1, 4))
    assert v.total == 8 and v.max_len == 4
    assert v.spans() == [(0, 3), (3, 4), (4, 8)]  # the empty sequence has none
    cu = v.cu_seqlens("cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 4, 8]


def test_varlen_is_each_sequence_alone():
    # Packed attention equals each sequence's own attention, and a 1-token sequence returns its v.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = naive.attention(q, k, v, True, varlen=Varlen((5, 0, 1, 3)))
    for s, e in ((0, 5), (6, 9)):
        assert torch.allclose(out[:, :, s:e], naive.attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], True))
    assert torch.allclose(out[:, :, 5], v[:, :, 5])


def test_pages_follow_the_block_table():
    # 2 sequences of 6 positions in pages of 2: 6 pages, stored shuffled; gathering restores the cache.
    k = torch.arange(2 * 1 * 6 * 1, dtype=torch.float32).reshape(2, 1, 6, 1)
    store, table = naive.pages(k, 2, torch.Generator().manual_seed(0))
    assert store.shape == (6, 2, 1, 1) and table.shape == (2, 3) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(6)) and table.flatten().tolist() != list(range(6))
    assert store[table[1, 2], :, 0, 0].tolist() == [10.0, 11.0]  # sequence 1's positions 4, 5
    assert torch.equal(naive.gather_pages(store, table), k)


# The rule, for every row that runs on a CPU, over the serving shapes.

CASES = {  # name: (q_len, kv_len or lengths, heads, kv_heads, causal, masks, page_size)
    "odd-square": (37, 37, 4, 2, True, NO_MASKS, None),
    "q<kv": (5, 70, 4, 2, True, NO_MASKS, None),
    "q>kv-noncausal": (20, 9, 4, 4, False, NO_MASKS, None),
    "varlen": (None, (0, 1, 37, 20, 0, 9), 4, 2, True, NO_MASKS, None),
    "varlen-noncausal": (None, (3, 1, 0, 17), 4, 2, False, NO_MASKS, None),
    "mqa": (7, 40, 4, 1, True, NO_MASKS, None),
    "window": (9, 50, 4, 2, True, Masks(window=8), None),
    "softcap": (9, 50, 4, 2, True, Masks(softcap=2.0), None),
    "alibi": (9, 50, 6, 3, True, Masks(alibi=True), None),
    "varlen-masks": (None, (1, 30, 0, 12), 4, 2, True, Masks(window=5, softcap=3.0, alibi=True), None),
    "paged": (3, 64, 4, 2, True, NO_MASKS, 16),
    "paged-window": (1, 64, 4, 1, True, Masks(window=20), 8),
}
# Every row that runs on a CPU but naive, which is the low-precision baseline itself (its masks are
# checked against pairwise attention in test_attention.py); tiled runs Triton's interpreter, slowly.
CPU_ROWS = ("sdpa", "sdpa-math", "sdpa-flash", "flex", "tiled-torch", pytest.param("tiled", marks=pytest.mark.slow))
ATOL = {torch.bfloat16: 1e-3, torch.float16: 2e-4}


def _case(name, dtype):
    q_len, kv, heads, kv_heads, causal, masks, page_size = CASES[name]
    varlen = Varlen(kv) if isinstance(kv, tuple) else None
    q_len, kv_len, batch = (varlen.total, varlen.total, 1) if varlen else (q_len, kv, 2)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, q_len, 16, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, 16, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    return q, k, v, dout, causal, masks, varlen, page_size


def _run(fn, q, k, v, dout, causal, backward, **kw):
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v, causal, **kw)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)] if backward else [out]


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("impl", CPU_ROWS)
@pytest.mark.parametrize("name", CASES)
def test_rows_within_twice_pytorchs_low_precision_error(name, impl, dtype):
    if impl == "tiled" and dtype == torch.float16:
        pytest.skip("tiled runs through Triton's interpreter here, slowly: bf16, its coarser dtype, covers it")
    q, k, v, dout, causal, masks, varlen, page_size = _case(name, dtype)
    row = suite.find_impl(impl)
    wants = {"masks": masks} if masks else {}
    if varlen is not None:
        wants["varlen"] = varlen
    kw = dict(wants)
    k_in, v_in = k, v
    if page_size is not None:
        k_in, kw["block_table"] = naive.pages(k, page_size, torch.Generator().manual_seed(0))
        v_in, _ = naive.pages(v, page_size, torch.Generator().manual_seed(0))
    lacks = ((varlen and row.varlen) or (page_size and row.paged) or (masks and row.no_masks)
             or (masks.softcap is not None and row.no_softcap))
    backward = page_size is None and not (impl == "flex")  # flex has no backward on CPU; paged is forward-only
    why = lacks or row.why_not(*(t.requires_grad_(backward) for t in (q.clone(), k_in.clone(), v_in.clone())),
                               causal, **kw)
    if why:
        # The rows that cannot run a case, and only those, say so.
        expected = {"tiled-torch": "tiled-torch" if (masks or varlen or page_size) else "q_len == kv_len",
                    "tiled": "tiled kernels" if (masks or varlen or page_size) else "differ",
                    "sdpa": "soft-capping", "sdpa-math": "soft-capping", "sdpa-flash": "soft-capping"}
        assert expected.get(impl, "runs everything") in why, why
        return
    ref_out, ref_grads = naive.reference(q, k, v, causal, dout if backward else None, masks=masks, varlen=varlen)
    ref = [ref_out, *(ref_grads or ())]
    lowp = _run(naive.attention, q, k, v, dout, causal, backward, **wants)  # PyTorch's own attention, in dtype
    got = _run(row.fn, q, k_in, v_in, dout, causal, backward, **kw)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert not within_flash_attention_rule(got, lowp, ref, ATOL[dtype], softcap=masks.softcap is not None)


def test_the_rule_catches_a_row_that_ignores_the_sequences():
    q, k, v, dout, causal, masks, varlen, _ = _case("varlen", torch.bfloat16)
    ref, _ = naive.reference(q, k, v, causal, varlen=varlen)
    lowp = naive.attention(q, k, v, causal, varlen=varlen)
    wrong = naive.attention(q, k, v, causal)  # one causal sequence of all the tokens
    assert "out: max error" in within_flash_attention_rule([wrong], [lowp], [ref], ATOL[torch.bfloat16])


# The suite: configurations, FLOPs and bytes, rows and unsupported reasons.

def _varlen_opts(**kw):
    return suite.AttentionOptions(**{"lengths": (0, 1, 37, 20), "heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "fp32",
                                     "causal": (True,), "impls": ("naive", "sdpa", "flex", "tiled", "tiled-torch"),
                                     **kw})


def test_varlen_configs_are_one_packed_batch_keyed_by_lengths():
    opts = _varlen_opts()
    configs = opts.configs()
    assert {(c.lengths, c.batch, c.q_len, c.kv_len, c.seq) for c in configs} == {("0,1,37,20", 1, 58, 58, None)}
    sweep = suite.sweep(opts)
    assert sweep.params[:3] == ("impl", "lengths", "batch") and {"tokens", "sequences"} <= set(sweep.metrics)
    # Causal FLOPs of the real tokens: pairs 0 + 1/2 + 37^2/2 + 20^2/2 (the square convention), 4 heads, D 16.
    assert suite._flops(configs[0]) == pytest.approx(4 * 4 * 16 * (0.5 + 37 * 37 / 2 + 20 * 20 / 2))


@pytest.mark.usefixtures("one_timed_rep")
def test_varlen_rows(tmp_path):
    sweep = suite.sweep(_varlen_opts(modes=("fwd+bwd",), impls=("naive", "sdpa")))
    by = {c.impl: measure_one(sweep, c, CTX) for c in sweep.configs}
    for impl in ("naive", "sdpa"):
        assert by[impl].status == "ok", by[impl].reason
        assert by[impl].values["rel_err"] < 1e-5
        assert (by[impl].values["tokens"], by[impl].values["sequences"]) == (58, 4)
    assert by["sdpa"].values["kernel"].startswith("per-sequence ")
    # Q, K, V and O of 58 tokens, with the backward dO, dQ, dK, dV too: (4 * 4 + 4 * 2) * 58 * 16 * 4 bytes
    assert by["naive"].values["bytes_moved"] == (4 * 4 + 4 * 2) * 58 * 16 * 4
    sweep = suite.sweep(_varlen_opts())
    for cfg in sweep.configs:
        m = measure_one(sweep, cfg, CTX)
        if cfg.impl == "tiled-torch":
            assert m.status == "unsupported" and m.reason.startswith("tiled-torch takes no packed")
        else:
            assert m.status == "ok" and m.values["rel_err"] < 1e-5, m.reason


@pytest.mark.usefixtures("one_timed_rep")
def test_paged_rows():
    opts = suite.AttentionOptions(q_lens=(3,), kv_lens=(64,), page_size=16, heads=4, kv_heads=2, head_dim=16,
                                  causal=(True,), modes=("fwd",), batch=2, dtype="fp32",
                                  impls=("naive", "sdpa", "sdpa-math", "flex", "tiled", "tiled-torch"))
    sweep = suite.sweep(opts)
    assert sweep.params[-1] == "page_size"
    for cfg in sweep.configs:
        m = measure_one(sweep, cfg, CTX)
        if cfg.impl == "tiled-torch":
            assert m.status == "unsupported" and m.reason == "tiled-torch takes no paged KV cache (block table)"
            continue
        assert m.status == "ok" and m.values["rel_err"] < 1e-5, (cfg.impl, m.reason)
        if cfg.impl == "tiled":  # the split-KV decode kernel reads the pages through the table itself
            assert m.values["kernel"].startswith("triton decode")
        elif cfg.impl != "naive":
            assert m.values["kernel"].startswith("gather+")


def test_a_paged_row_reading_the_pages_in_storage_order_is_a_mismatch(monkeypatch):
    def ignores_table(q, k, v, causal, block_table):
        B = q.shape[0]
        flat = k.reshape(B, -1, *k.shape[2:]).transpose(1, 2), v.reshape(B, -1, *v.shape[2:]).transpose(1, 2)
        return naive.attention(q, *flat, causal)

    monkeypatch.setitem(suite.IMPLS, "unpaged", suite.Impl(ignores_table, paged=None))
    opts = suite.AttentionOptions(q_lens=(1,), kv_lens=(64,), page_size=16, causal=(True,), modes=("fwd",),
                                  impls=("unpaged",), batch=2, heads=2, head_dim=16)
    assert measure_one(suite.sweep(opts), opts.configs()[0], CTX).status == "mismatch"


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=(3,), seqs=(64,)), "not with --seq"),
    (dict(lengths=(3,), batch=2), "leave out --batch"),
    (dict(lengths=(0, 0)), "every sequence is empty"),
    (dict(lengths=(3,), page_size=4), "not a --varlen batch"),
    (dict(q_lens=(1,), kv_lens=(100,), page_size=16, modes=("fwd",)), "--page-size 16 does not divide kv_len 100"),
    (dict(q_lens=(1,), kv_lens=(64,), page_size=0, modes=("fwd",)), "--page-size must be positive"),
    (dict(q_lens=(1,), kv_lens=(64,), page_size=16, modes=("fwd+bwd",)), "add --mode fwd"),
    (dict(seqs=(64,), softcap=30.0, impls=("sdpa", "sdpa-math")), "SDPA has no logit soft-capping"),
    (dict(lengths=(3, 4), impls=("tiled-torch",)), "takes no packed variable-length batch"),
])
def test_bad_serving_options(kwargs, message):
    with pytest.raises(BadInput, match=message):
        suite.AttentionOptions(**kwargs)


def _invoke(tmp_path, *args):
    from typer.testing import CliRunner

    from bench.cli import app

    return CliRunner().invoke(app, ["attention", "--device", "cpu", "--out", str(tmp_path), "--warmup-ms", "1",
                                    "--rep-ms", "5", *args])


@pytest.mark.parametrize("args, message", [
    (["--q-len", "64", "--kv-len", "32", "--causal"], "kv_len >= q_len"),
    (["--seq", "64", "--causal", "--window", "-1"], "--window must be positive"),
    (["--varlen", "--lengths", "12,x"], "--lengths: cannot read 'x'"),
    (["--varlen", "--lengths", "uniform:5-1:3"], "need LO <= HI"),
    (["--lengths", "12,5"], "--varlen and --lengths go together"),
    (["--varlen"], "--varlen and --lengths go together"),
    (["--q-len", "1", "--kv-len", "100", "--page-size", "16"], "does not divide kv_len 100"),
    (["--seq", "64", "--softcap", "30", "--impl", "sdpa"], "SDPA has no logit soft-capping"),
    (["--varlen", "--lengths", "8,3", "--impl", "tiled-torch"], "takes no packed variable-length batch"),
])
def test_bad_serving_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))


def test_prefill_varlen_preset_on_cpu(tmp_path):
    import pandas as pd

    assert sum(suite.parse_lengths(suite.preset("prefill-varlen", "cuda").lengths)) == 16 * 1024
    assert all(128 <= n <= 4096 for n in suite.parse_lengths(suite.preset("prefill-varlen", "cuda").lengths))
    result = _invoke(tmp_path, "--preset", "prefill-varlen", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                     "--impl", "naive", "--impl", "sdpa", "--impl", "tiled-torch")
    assert result.exit_code == 0, result.output
    (csv,) = tmp_path.glob("attention-*.csv")
    by = pd.read_csv(csv).set_index("impl")
    assert set(by["lengths"]) == {"100,0,1,37,128,64"} and (by.causal == True).all()  # noqa: E712
    assert (by.loc[["naive", "sdpa"], "status"] == "ok").all(), by.reason
    assert (by.loc[["naive", "sdpa"], "tokens"] == 330).all()
    assert by.loc["tiled-torch", "status"] == "unsupported"
    # and its chart puts the rows against the packed tokens
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["plot", str(csv), "-o", str(tmp_path / "varlen.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "varlen.png").stat().st_size > 0
