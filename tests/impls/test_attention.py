"""Every attention implementation against the float64 reference."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.correctness import TOLERANCE, max_rel_err
from impls.attention import flex, naive, sdpa, tiled
from tests.conftest import requires_cuda

IMPLS = {
    "naive": naive.attention,
    "tiled": lambda q, k, v, causal: tiled.attention(q, k, v, causal, block=32),
    "sdpa": sdpa.attention,
    "sdpa-math": lambda q, k, v, causal: sdpa.attention(q, k, v, causal, backend="math"),
}
if not torch.cuda.is_available():
    IMPLS["sdpa-flash"] = lambda q, k, v, causal: sdpa.attention(q, k, v, causal, backend="flash")


def _inputs(B, H, Hkv, S, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=dtype, device=device) for _ in range(2))
    dout = torch.randn(B, H, S, D, generator=g, dtype=dtype, device=device)
    return q, k, v, dout


def _check(fn, B, H, Hkv, S, D, dtype, causal, backward, device="cpu"):
    return _check_inputs(fn, *_inputs(B, H, Hkv, S, D, dtype, device), dtype, causal, backward)


def _check_inputs(fn, q, k, v, dout, dtype, causal, backward):
    """fn's output (and gradients) against the float64 reference on these inputs; the relative error."""
    ref_out, ref_grads = naive.reference(q, k, v, causal, dout if backward else None)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal)
    got, want = [out], [ref_out]
    if backward:
        got += torch.autograd.grad(out, (q, k, v), dout)
        want += ref_grads
    err = max_rel_err(got, want)
    assert err <= TOLERANCE[dtype], f"rel_err {err:.2e} above {TOLERANCE[dtype]:.0e}"
    return err


@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S", [1, 77, 130])  # not multiples of the tiled block (32)
def test_matches_reference_fwd_bwd_fp32(name, causal, S):
    _check(IMPLS[name], 2, 4, 4, S, 32, torch.float32, causal, backward=True)


@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention(name, kv_heads):
    _check(IMPLS[name], 1, 4, kv_heads, 65, 16, torch.float32, causal=True, backward=True)


@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(name, dtype):
    _check(IMPLS[name], 1, 2, 2, 100, 32, dtype, causal=True, backward=False)


def test_tiled_backward_bf16():
    _check(IMPLS["tiled"], 1, 2, 1, 96, 32, torch.bfloat16, causal=False, backward=True)


def test_gate_catches_a_wrong_implementation():
    # The same check must fail for attention without the causal mask.
    wrong = lambda q, k, v, causal: naive.attention(q, k, v, causal=False)  # noqa: E731
    with pytest.raises(AssertionError, match="rel_err"):
        _check(wrong, 1, 2, 2, 64, 16, torch.float32, causal=True, backward=False)


# A user's check must hold under `python -O`, which strips asserts: with one, tiled-torch
# answered a 1-token query against 339 keys with a wrong output instead of an error.
_UNDER_O = """
import torch
from impls.attention import tiled
q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 339, 16)
try:
    tiled.attention(q, k, k, causal=False)
except ValueError as exc:
    print("ValueError:", exc)
"""


def test_tiled_rejects_unequal_lengths_even_under_python_O():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-O", "-c", _UNDER_O], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ValueError: tiled attention takes self-attention: 1 queries against 339 keys")
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="3 kv heads do not divide 4 query heads"):
        tiled.attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), causal=True)


def test_reference_chunks_agree_with_one_piece():
    q, k, v, dout = _inputs(2, 4, 2, 40, 8, torch.float32)
    whole = naive.reference(q, k, v, True, dout)
    chunked = naive.reference(q, k, v, True, dout, max_elems=1)  # one kv head at a time
    assert torch.equal(whole[0], chunked[0])
    for a, b in zip(whole[1], chunked[1]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_sdpa_reports_backend_and_reasons():
    q, k, v, _ = _inputs(1, 2, 2, 64, 32, torch.float32)
    assert sdpa.chosen_backend(q, k, v, False) in {b.lower() for b in ("flash", "efficient", "cudnn", "math")}
    assert sdpa.why_not(q, k, v, False, "math") is None
    if not torch.cuda.is_available():
        assert "CUDA" in sdpa.why_not(q, k, v, False, "cudnn")



def _unequal(B, H, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn(B, H, Sq, D, generator=g, dtype=dtype)
    return q, k, v, dout


@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (3, 9), (5, 17), (7, 7)])
def test_naive_causal_is_aligned_bottom_right(q_len, kv_len):
    # Built by hand, one score at a time: query i stands at position kv_len - q_len + i
    # and sees the keys at positions up to its own.
    q, k, v, _ = (t.double() for t in _unequal(1, 2, 2, q_len, kv_len, 8))
    want = torch.empty_like(q)
    for h in range(2):
        for i in range(q_len):
            seen = kv_len - q_len + i + 1
            scores = torch.tensor([float(q[0, h, i] @ k[0, h, j]) / 8**0.5 for j in range(seen)], dtype=torch.float64)
            want[0, h, i] = scores.softmax(0) @ v[0, h, :seen]
    assert torch.allclose(naive.attention(q, k, v, causal=True), want, rtol=1e-12, atol=1e-12)
    if q_len < kv_len:  # top-left alignment would differ
        top_left = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        assert not torch.equal(naive.causal_mask(q_len, kv_len), top_left)


def test_causal_with_more_queries_than_keys_is_refused():
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        naive.causal_mask(5, 3)


def _check_unequal(fn, Sq, Sk, causal, backward, kv_heads=2, dtype=torch.float32):
    return _check_inputs(fn, *_unequal(2, 4, kv_heads, Sq, Sk, 16, dtype), dtype, causal, backward)


SDPA_ROWS = [n for n in IMPLS if n.startswith("sdpa")]


@pytest.mark.parametrize("name", SDPA_ROWS)
@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 77, True), (3, 77, True), (13, 130, True), (40, 9, False)])
def test_sdpa_unequal_lengths_match_reference(name, q_len, kv_len, causal):
    _check_unequal(IMPLS[name], q_len, kv_len, causal, backward=True)


def test_sdpa_decode_passes_no_mask():
    # One query sees every key, so the backends that take no mask can run decode.
    q, k, v, _ = _unequal(1, 2, 2, 1, 9, 16)
    assert sdpa._mask(q, k, causal=True) == (None, False)
    assert torch.equal(sdpa.attention(q, k, v, True), sdpa.attention(q, k, v, False))
    mask, is_causal = sdpa._mask(q[:, :, :1].expand(1, 2, 2, 16), k, causal=True)
    assert mask.shape == (2, 9) and not is_causal


def test_sdpa_bottom_right_mask_differs_from_is_causal():
    # The test above could pass with is_causal (top-left) only if the two agreed: they do not.
    q, k, v, _ = _unequal(1, 2, 2, 3, 9, 16)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(sdpa.attention(q, k, v, True), top_left, atol=1e-3)


@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 77, True), (3, 77, True), (70, 70, True), (40, 9, False)])
def test_flex_forward_matches_reference(q_len, kv_len, causal):
    _check_unequal(flex.attention, q_len, kv_len, causal, backward=False)


def test_flex_says_why_not():
    q, k, v, _ = _unequal(1, 2, 2, 5, 3, 16)
    assert "see no key" in flex.why_not(q, k, v, causal=True)
    if not torch.cuda.is_available():
        q.requires_grad_()
        assert "no backward on CPU" in flex.why_not(q, k, v, causal=False)

def test_flex_takes_its_main_kernel_where_decoding_would_pass_the_masks_block(monkeypatch):
    # q_len x group rows in one flex-decoding block: 64 x 4 = 256 > 128 is the case that had no config.
    force = {"FORCE_USE_FLEX_ATTENTION": True}
    assert flex.kernel_options(64, 4) == force and flex.kernel_options(1, 4) is None
    assert flex.kernel_options(32, 4) is None and flex.kernel_options(128, 8) is None  # 128 rows: the full kernel
    seen = []
    monkeypatch.setattr(flex, "compiled", lambda device: True)
    monkeypatch.setattr(flex, "_compiled_flex", lambda: lambda *a, **kw: seen.append(kw.get("kernel_options")))
    for q_len in (64, 1):
        q, k, v, _ = _unequal(1, 8, 2, q_len, 300, 16)
        flex.attention(q, k, v, True)
    assert seen == [force, None]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_impl_on_gpu(dtype):
    for name, fn in IMPLS.items():
        _check(fn, 2, 8, 2, 1000, 64, dtype, causal=True, backward=True, device="cuda")


@requires_cuda
@pytest.mark.gpu
def test_tiled_memory_grows_linearly_with_length():
    from bench.memory import peak_memory_mib

    def peak(S):
        q, k, v, _ = _inputs(1, 8, 8, S, 64, torch.bfloat16, device="cuda")
        return peak_memory_mib(lambda: tiled.attention(q, k, v, False), torch.device("cuda"))

    # Doubling S doubles a linear footprint and would quadruple an S×S one.
    assert peak(8192) / peak(4096) < 2.5


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len", [(1, 1000), (64, 1000), (1000, 1000)])
def test_flex_compiled_on_gpu(q_len, kv_len):
    q, k, v, dout = (t.cuda() for t in _unequal(2, 8, 2, q_len, kv_len, 64, torch.bfloat16))
    ref_out, ref_grads = naive.reference(q, k, v, True, dout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flex.attention(q, k, v, True)
    err = max_rel_err([out, *torch.autograd.grad(out, (q, k, v), dout)], [ref_out, *ref_grads])
    assert err <= TOLERANCE[torch.bfloat16], f"rel_err {err:.2e}"


# Masks: a sliding window, soft-capping and ALiBi, in the bottom-right aligned frame.

def _dense_masked(q, k, v, causal, window=None, softcap=None, slopes=None):
    """Attention written out pair by pair in float64: query row r at position i = Sk - Sq + r."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Sq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for r in range(Sq):
                i = Sk - Sq + r
                scores = torch.full((Sk,), float("-inf"), dtype=torch.float64)
                for j in range(Sk):
                    if causal and j > i or window is not None and j <= i - window:
                        continue
                    s = float(q[b, h, r].double() @ k[b, hk, j].double()) / D ** 0.5
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[h] * (i - j)
                    scores[j] = s
                out[b, h, r] = scores.softmax(0) @ v[b, hk].double()
    return out


_MASKS = [
    dict(window=3), dict(window=1), dict(softcap=0.7), dict(alibi=True), dict(window=4, softcap=1.5, alibi=True),
]


@pytest.mark.parametrize("masks", _MASKS, ids=str)
@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (3, 11), (1, 9)])
def test_naive_masks_match_pairwise_attention(masks, q_len, kv_len):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=g) for _ in range(2))  # GQA: 4 query heads over 2
    slopes = [2.0 ** (-8 * h / 4) for h in range(1, 5)] if masks.get("alibi") else None
    want = _dense_masked(q, k, v, True, masks.get("window"), masks.get("softcap"), slopes)
    m = naive.Masks(**masks)
    assert torch.allclose(naive.attention(q, k, v, True, masks=m).double(), want, atol=1e-5)
    assert torch.allclose(naive.reference(q, k, v, True, masks=m, max_elems=1)[0], want, atol=1e-12)


def test_alibi_without_causal_and_softcap_alone_match_pairwise_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (5, 9, 9))
    want = _dense_masked(q, k, v, False, slopes=[2.0 ** -4, 2.0 ** -8])
    assert torch.allclose(naive.attention(q, k, v, False, masks=naive.Masks(alibi=True)).double(), want, atol=1e-5)
    want = _dense_masked(q, k, v, False, softcap=0.3)
    assert torch.allclose(naive.attention(q, k, v, False, masks=naive.Masks(softcap=0.3)).double(), want, atol=1e-5)


def test_alibi_slopes():
    assert naive.alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    # 6 heads: the slopes of 4 (2^-2, 2^-4, 2^-6, 2^-8), then every other slope of 8 (2^-1, 2^-3)
    assert naive.alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


_MASKED_ROWS = {
    "flex": flex.attention,
    "sdpa": sdpa.attention,
    "sdpa-math": lambda q, k, v, causal, masks: sdpa.attention(q, k, v, causal, backend="math", masks=masks),
}


@pytest.mark.parametrize("name, masks", [
    (name, masks) for name in _MASKED_ROWS for masks in _MASKS
    if not (name.startswith("sdpa") and "softcap" in masks)  # SDPA has none: test_sdpa_refuses_softcap
], ids=str)
@pytest.mark.parametrize("q_len, kv_len", [(13, 13), (5, 21), (1, 21)])
def test_masked_rows_match_float64(name, masks, q_len, kv_len):
    m = naive.Masks(**masks)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, q_len, 16, generator=g)
    k, v = (torch.randn(2, 1, kv_len, 16, generator=g) for _ in range(2))  # MQA
    want, _ = naive.reference(q, k, v, True, masks=m)
    got = _MASKED_ROWS[name](q, k, v, True, masks=m)
    assert max_rel_err([got], [want]) <= TOLERANCE[torch.float32]
    # and the masks change the answer: the check can fail
    assert max_rel_err([naive.attention(q, k, v, True)], [want]) > 1e-3


def test_sdpa_backward_with_window_and_alibi():
    masks = naive.Masks(window=5, alibi=True)
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(1, 2, 17, 8, generator=g) for _ in range(4))
    ref_out, ref_grads = naive.reference(q, k, v, True, dout, masks=masks)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sdpa.attention(q, k, v, True, masks=masks)
    got = [out, *torch.autograd.grad(out, (q, k, v), dout)]
    assert max_rel_err(got, [ref_out, *ref_grads]) <= TOLERANCE[torch.float32]


def test_sdpa_refuses_softcap():
    q = torch.randn(1, 2, 4, 8)
    m = naive.Masks(softcap=5.0)
    assert sdpa.why_not(q, q, q, True, None, m) == "SDPA has no logit soft-capping"
    assert sdpa.why_not(q, q, q, True, "math", m) == "SDPA has no logit soft-capping"
    with pytest.raises(ValueError, match="soft-capping"):
        sdpa.attention(q, q, q, True, masks=m)
