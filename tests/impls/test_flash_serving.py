"""Tests for the serving shapes of impls/attention/flash.py's attention() on
the Triton kernels: q_len != kv_len (causal aligned bottom-right), masks
(sliding window, soft-capping, ALiBi), varlen batches, and the split-KV
decode kernel with a dense or paged cache, and its tree mask. Forward and dq, dk, dv against the
float64 reference (impls/attention/naive.py).

Without a GPU the kernels run through Triton's interpreter on CPU tensors, at
small shapes; run this file alone with

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/impls/test_flash_serving.py
"""

import math
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported; the suite's conftest does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls.attention import flash  # noqa: E402
from impls.attention import flash_triton as ft  # noqa: E402
from impls.attention import naive  # noqa: E402
from impls.attention.naive import Masks  # noqa: E402
from tests.impls.test_flash_triton import DEVICE, TOL, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu  # every test runs the kernels on the GPU when there is one
needs_kernel = pytest.mark.skipif(ft.TRITON_ERROR is not None, reason=str(ft.TRITON_ERROR))


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=gen)


def check(H, Hkv, Sq, Sk, causal, dtype, masks=Masks(), B=1, D=16, backward=True, seed=0, kv=None):
    """attention() against the float64 reference on random (B, H, Sq, D) inputs; returns what ran."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = randn(B, H, Sq, D, dtype=dtype, gen=gen)
    k, v = kv if kv is not None else (randn(B, Hkv, Sk, D, dtype=dtype, gen=gen) for _ in range(2))
    q, k, v = (t.clone().requires_grad_(backward) for t in (q, k, v))
    assert flash.supported(q, k, v, causal, masks) is None
    ran = flash.Kernels()
    out = flash.attention(q, k, v, causal, masks=masks, kernels=ran)
    dout = randn(*out.shape, dtype=dtype, gen=gen)
    ref, grads = naive.reference(q.detach(), k.detach(), v.detach(), causal, dout if backward else None, masks=masks)
    errors = {"out": rel_err(out, ref)}
    if backward:
        out.backward(dout)
        errors.update({n: rel_err(t.grad, g) for n, t, g in zip(("dq", "dk", "dv"), (q, k, v), grads)})
    assert all(e < TOL[dtype] for e in errors.values()), f"relative errors {errors} over {TOL[dtype]} ({ran})"
    return ran


# ------------------------------------------------------------ q_len != kv_len, masks


@needs_kernel
@pytest.mark.parametrize("H, Hkv, Sq, Sk, causal, dtype", [
    (2, 1, 20, 50, True, torch.float16),  # queries the last 20 of 50 positions, offset not a block multiple
    (2, 2, 50, 20, False, torch.bfloat16),  # more queries than keys, without causal
    (4, 2, 3, 37, True, torch.float32),  # a few queries with gradients: the prefill kernels, not decode
])
def test_unequal_lengths_match_float64(H, Hkv, Sq, Sk, causal, dtype):
    ran = check(H, Hkv, Sq, Sk, causal, dtype)
    assert str(ran).startswith("triton fwd") and "dkdv" in str(ran)


@needs_kernel
@pytest.mark.parametrize("masks, Sq, Sk, causal", [
    (Masks(window=9), 37, 70, True),  # window shorter than a key block
    (Masks(window=40), 70, 70, True),
    (Masks(softcap=0.5), 37, 70, True),  # a cap small enough that tanh saturates
    (Masks(alibi=True), 37, 70, True),
    (Masks(alibi=True, softcap=2.0), 30, 45, False),  # ALiBi's bias is positive right of the query here
    (Masks(window=20, softcap=2.0, alibi=True), 50, 50, True),
])
def test_masks_match_float64(masks, Sq, Sk, causal):
    check(4, 2, Sq, Sk, causal, torch.float32, masks)


@needs_kernel
def test_window_never_reads_blocks_behind_it():
    # 16 queries at positions 272..287 with a window of 8 see keys 265..287: the
    # key blocks wholly before them (keys 0..255 at any block size up to 128)
    # must not be read, in the forward or the backward. NaN there would spread
    # through any product that touched them.
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    k, v = randn(1, 1, 288, 16, gen=gen), randn(1, 1, 288, 16, gen=gen)
    k[:, :, :256], v[:, :, :256] = float("nan"), float("nan")
    q = randn(1, 2, 16, 16, gen=gen).requires_grad_()
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = flash.attention(q, kg, vg, True, masks=Masks(window=8))
    out.backward(torch.ones_like(out))
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref, (dq, dk, dv) = naive.reference(q.detach(), k0, v0, True, torch.ones_like(out), masks=Masks(window=8))
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(q.grad, dq) < TOL[torch.float32]
    assert torch.equal(kg.grad[:, :, :256], torch.zeros_like(kg.grad[:, :, :256]))
    assert rel_err(kg.grad, dk) < TOL[torch.float32] and rel_err(vg.grad, dv) < TOL[torch.float32]


@needs_kernel
def test_bf16_masks_with_gqa():
    check(4, 1, 33, 33, True, torch.bfloat16, Masks(window=12, softcap=5.0, alibi=True), B=2)


# ------------------------------------------------------------ varlen


def _pack(lengths, heads, gen, dtype=torch.float32, D=16):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return randn(total, heads, D, dtype=dtype, gen=gen).requires_grad_(), cu


@needs_kernel
@pytest.mark.parametrize("causal, masks", [(True, Masks()), (False, Masks()), (True, Masks(window=6, alibi=True))])
def test_varlen_each_sequence_attends_to_itself(causal, masks):
    # Empty and 1-token sequences; kv lengths >= query lengths (causal aligned bottom-right per sequence).
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    q_lens, k_lens = [0, 1, 37, 5, 20], [3, 1, 40, 5, 26]
    q, cu_q = _pack(q_lens, 4, gen)
    k, cu_k = _pack(k_lens, 2, gen)
    v, _ = _pack(k_lens, 2, gen)
    out = flash.attention(q, k, v, causal, masks=masks, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    assert out.shape == q.shape and out.is_contiguous()
    dout = randn(*out.shape, gen=gen)
    out.backward(dout)
    for i in range(len(q_lens)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        one = lambda t, s: t.detach()[s].transpose(0, 1).unsqueeze(0)  # noqa: E731 - (len, H, D) -> (1, H, len, D)
        if q_lens[i] == 0:
            assert not k.grad[ks].any(), "keys no query sees get no gradient"
            continue
        ref, grads = naive.reference(one(q, qs), one(k, ks), one(v, ks), causal, one(dout, qs), masks=masks)
        for name, got, s, r in (("out", out, qs, ref), ("dq", q.grad, qs, grads[0]), ("dk", k.grad, ks, grads[1]),
                                ("dv", v.grad, ks, grads[2])):
            assert rel_err(one(got, s), r) < TOL[torch.float32], f"{name} of sequence {i}"


# ------------------------------------------------------------ decode


@needs_kernel
@pytest.mark.parametrize("Sq, splits, masks", [
    (1, None, Masks()),  # the splits chosen from the (interpreter's) SM count
    (1, 1, Masks()),  # one split writes the output directly
    (5, 3, Masks()),
    (5, 4, Masks(window=20, softcap=1.0, alibi=True)),
])
def test_decode_matches_float64(Sq, splits, masks):
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    # 12 blocks less a tail: 3 or 4 splits of whole SPLIT_ALIGN blocks, the last one partial.
    Sk = max(100, 12 * ft.SPLIT_ALIGN - 5)
    q, k, v = randn(2, 4, Sq, 16, gen=gen), randn(2, 2, Sk, 16, gen=gen), randn(2, 2, Sk, 16, gen=gen)
    ran = flash.Kernels()
    out = flash.attention(q, k, v, True, masks=masks, num_splits=splits, kernels=ran)
    assert ran.fwd.startswith("triton decode") and (splits is None or f"splits={splits} " in ran.fwd)
    ref, _ = naive.reference(q, k, v, True, masks=masks)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_kernel
def test_decode_bf16_gqa_group_of_eight():
    # Eight query heads on one kv head: one program's rows are every (query, head) pair of the group.
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    q, k, v = (randn(1, h, s, 32, dtype=torch.bfloat16, gen=gen) for h, s in ((8, 3), (1, 77), (1, 77)))
    out = flash.attention(q, k, v, True, num_splits=2)
    assert rel_err(out, naive.reference(q, k, v, True)[0]) < TOL[torch.bfloat16]


@needs_kernel
def test_decode_query_rows_over_several_programs():
    # 8 heads x 3 queries = 24 packed rows in programs of 16: a group's rows span two programs.
    gen = torch.Generator(device=DEVICE).manual_seed(14)
    q, k, v = (randn(2, h, s, 16, gen=gen) for h, s in ((8, 3), (1, 50), (1, 50)))
    out, text = ft.decode(q, k, v, True, 0.25, num_splits=2, block_rows=16)
    assert "rows=16" in text
    assert rel_err(out, naive.reference(q, k, v, True)[0]) < TOL[torch.float32]


def _paged(k, v, page_size, gen):
    """k, v (B, Hkv, S, D) as a paged cache (pages, page_size, Hkv, D) in shuffled pages, and its block table."""
    B, Hkv, S, D = k.shape
    per_seq = math.ceil(S / page_size)
    pages = torch.randperm(B * per_seq + 3, generator=torch.Generator().manual_seed(0))[: B * per_seq]
    table = pages.reshape(B, per_seq).to(torch.int32).to(DEVICE)
    caches = []
    for t in (k, v):
        cache = torch.full((B * per_seq + 3, page_size, Hkv, D), float("nan"), dtype=t.dtype, device=DEVICE)
        padded = torch.nn.functional.pad(t, (0, 0, 0, per_seq * page_size - S))  # (B, Hkv, pages*page, D)
        cache[table.long()] = padded.reshape(B, Hkv, per_seq, page_size, D).permute(0, 2, 3, 1, 4)
        caches.append(cache)
    return caches[0], caches[1], table


@needs_kernel
@pytest.mark.parametrize("page_size", [16, 8])
def test_paged_decode_with_per_sequence_lengths(page_size):
    # Sequence 0 holds 100 keys, sequence 1 only 61: the rest of its last page
    # (and the unused pages, NaN) must not be read.
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    q, k, v = randn(2, 4, 2, 16, gen=gen), randn(2, 2, 100, 16, gen=gen), randn(2, 2, 100, 16, gen=gen)
    k[1, :, 61:], v[1, :, 61:] = float("nan"), float("nan")
    k_cache, v_cache, table = _paged(k, v, page_size, gen)
    lengths = torch.tensor([100, 61], dtype=torch.int32, device=DEVICE)
    ran = flash.Kernels()
    out = flash.attention(q, k_cache, v_cache, True, block_table=table, cache_seqlens=lengths, num_splits=3,
                          kernels=ran)
    assert f"paged page_size={page_size}" in ran.fwd
    for b, n in enumerate((100, 61)):
        ref, _ = naive.reference(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], True)
        assert rel_err(out[b : b + 1], ref) < TOL[torch.float32], f"sequence {b}"


@needs_kernel
def test_decode_refuses_backward():
    q, k, v = (torch.randn(1, 2, s, 16, device=DEVICE, requires_grad=True) for s in (1, 40, 40))
    with pytest.raises(ValueError, match="forward only"):
        flash.attention(q, k, v, True, decode=True)
    ran = flash.Kernels()
    flash.attention(q, k, v, True, kernels=ran).sum().backward()  # with gradients: the prefill kernels
    assert ran.fwd.startswith("triton fwd") and ran.dq
    table = torch.zeros(1, 3, dtype=torch.int32, device=DEVICE)
    assert "forward only" in flash.supported(q, k.detach().reshape(10, 8, 1, 16), v.detach().reshape(10, 8, 1, 16),
                                             True, block_table=table)


def _tree_reference(q, k, v, bits, lengths, causal, window=None):
    """Float64 attention of q (B, H, SQ, D) on each sequence's first lengths[b] keys of k, v (B, Hkv, Sk, D),
    query i seeing every key before lengths[b] - SQ and key lengths[b] - SQ + j iff bit j of bits[b, i]."""
    B, H, SQ, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        j = torch.arange(n) - (n - SQ)  # (n,) key slots relative to the first query's
        seen = (bits[b].cpu()[:, None] >> j.clamp(0, 63)[None, :]) & 1 == 1  # (SQ, n), torch's own shifts
        visible = (j[None, :] < 0) | seen
        if causal:
            visible &= j[None, :] <= torch.arange(SQ)[:, None]
        if window is not None:
            visible &= torch.arange(SQ)[:, None] - j[None, :] < window
        kb, vb = (naive.expand_kv(t[b : b + 1, :, :n].double().cpu(), H) for t in (k, v))
        scores = (q[b : b + 1].double().cpu() @ kb.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out[b : b + 1] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vb
    return out


@needs_kernel
@pytest.mark.parametrize("Hkv, SQ, per_sequence, paged, causal, window, splits", [
    (2, 7, False, False, False, None, 3),  # one mask for the batch, GQA groups of 2
    (1, 64, True, False, False, None, 2),  # 64 queries: bit 63 is the sign bit; rows over two programs
    (2, 13, True, True, False, None, 3),  # a paged cache, each sequence its own length and tree
    (4, 9, False, False, True, 4, 2),  # with causal and a window shorter than the tree
])
def test_tree_mask_decode_matches_float64(Hkv, SQ, per_sequence, paged, causal, window, splits):
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    B, H, Sk = 2, 4, 100
    q, k, v = randn(B, H, SQ, 16, gen=gen), randn(B, Hkv, Sk, 16, gen=gen), randn(B, Hkv, Sk, 16, gen=gen)
    lengths = torch.tensor([100, 61], dtype=torch.int32, device=DEVICE)
    # Random 64-bit patterns, the bits past each row's last query slot included: the kernel must ignore those.
    bits = torch.randint(-2**63, 2**63 - 1, (B if per_sequence else 1, SQ), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bits[0, 0] = 0  # a row that sees only the prefix
    extra = dict(cache_seqlens=lengths, tree_bits=bits if per_sequence else bits[0])
    if paged:
        k_cache, v_cache, extra["block_table"] = _paged(k, v, 8, gen)
    ran = flash.Kernels()
    out = flash.attention(q, *((k_cache, v_cache) if paged else (k, v)), causal,
                          masks=Masks(window=window), num_splits=splits, kernels=ran, **extra)
    assert ran.fwd.startswith("triton decode")
    ref = _tree_reference(q, k, v, bits.expand(B, SQ), lengths, causal, window)
    assert rel_err(out.cpu(), ref) < TOL[torch.float32]


@needs_kernel
def test_tree_mask_bf16_all_bits_is_causal_over_the_tree():
    # Bits 0..i set for query i (-1 for the last of 64 queries): the tree is a chain, so plain causal decoding.
    gen = torch.Generator(device=DEVICE).manual_seed(22)
    q, k, v = (randn(1, h, s, 32, dtype=torch.bfloat16, gen=gen) for h, s in ((4, 64), (2, 90), (2, 90)))
    bits = torch.tensor([(1 << (i + 1)) - 1 - (1 << 64 if i == 63 else 0) for i in range(64)], device=DEVICE)
    out = flash.attention(q, k, v, False, tree_bits=bits, num_splits=2)
    assert rel_err(out, naive.reference(q, k, v, True)[0]) < TOL[torch.bfloat16]


@needs_kernel
def test_tree_mask_refuses_what_it_cannot_hold():
    q, kv = torch.zeros(1, 2, 65, 16, device=DEVICE), torch.zeros(1, 2, 80, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most 64 queries; got q_len 65"):
        flash.attention(q, kv, kv, False, tree_bits=torch.zeros(65, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="at most 64 queries"):
        ft.decode(q, kv, kv, False, 0.25, ft.Features(tree_bits=torch.zeros(65, dtype=torch.int64, device=DEVICE)))
    q = q[:, :, :4]
    assert "int64" in flash.supported(q, kv, kv, tree_bits=torch.zeros(4, dtype=torch.int32, device=DEVICE))
    assert "(4,) or (1, 4)" in flash.supported(q, kv, kv, tree_bits=torch.zeros(5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="only in the decode kernel"):
        flash.attention(q, kv, kv, False, tree_bits=torch.zeros(4, dtype=torch.int64, device=DEVICE), decode=False)


def test_decode_splits_fill_the_waves():
    # 64 programs on 132 slots: 2 splits fill 128/132 = 97% of one wave; 264 slots: 4 (256/264).
    assert ft.decode_splits(64, 32768, 132) == 2
    assert ft.decode_splits(64, 32768, 264) == 4
    assert ft.decode_splits(200, 32768, 132) == 1  # the programs fill 80% of the slots already
    assert ft.decode_splits(64, 2 * ft.SPLIT_ALIGN, 264) == 2  # at most one split per SPLIT_ALIGN keys


# ------------------------------------------------------------ what runs where, and why not


def test_gluon_keeps_to_square_unmasked_inputs(monkeypatch):
    fake = types.SimpleNamespace(supported=lambda q, k, v: None, PREFERRED_HEAD_DIMS=(16,))
    monkeypatch.setattr(flash, "_gluon_module", lambda q: fake)
    monkeypatch.setattr(flash.gluon_check, "verdict", lambda device: types.SimpleNamespace(ok=True, note=""))
    square, short = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 4, 16)
    assert flash.uses_gluon(square, square, square)
    assert not flash.uses_gluon(short, square, square)
    assert not flash.uses_gluon(square, square, square, masks=Masks(softcap=3.0))
    assert flash.plan(square, square, square, True).gluon
    assert not flash.plan(square, square, square, True, masks=Masks(window=4)).gluon
    varlen = ft.Features(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    assert not flash.plan(square, square, square, True, features=varlen).gluon


@needs_kernel
def test_supported_gives_reasons_for_serving_inputs():
    q, kv = torch.zeros(1, 4, 8, 16, device=DEVICE), torch.zeros(1, 2, 8, 16, device=DEVICE)
    assert "window must be positive" in flash.supported(q, kv, kv, True, Masks(window=0))
    assert "positive cap" in flash.supported(q, kv, kv, False, Masks(softcap=-1.0))
    packed, cu = torch.zeros(8, 4, 16, device=DEVICE), torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    assert "together" in flash.supported(packed, packed, packed, cu_seqlens_q=cu)
    assert "int32" in flash.supported(packed, packed, packed, cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long(),
                                      max_seqlen_q=8, max_seqlen_k=8)
    assert "packed (total, H, D)" in flash.supported(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                      max_seqlen_q=8, max_seqlen_k=8)
    assert flash.supported(packed, packed, packed, cu_seqlens_q=cu, cu_seqlens_k=cu,
                           max_seqlen_q=8, max_seqlen_k=8) is None
    pages = torch.zeros(4, 8, 2, 16, device=DEVICE)
    assert "block_table must be (B, pages" in flash.supported(
        q, pages, pages, block_table=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE))
    assert "cache_seqlens must be (1,)" in flash.supported(
        q, pages, pages, block_table=torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
        cache_seqlens=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="needs kv_len >= q_len"):
        flash.attention(q, kv[:, :, :5], kv[:, :, :5], True)
