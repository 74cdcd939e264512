"""Developer tool: the five-product Gluon backward (dK, dV and dQ in one kernel), timed against the shipped pair.

    python -m tools.gluon_bwd5 [--seq 8192] [--head-dim 128] [--causal both] [--check-only]

The shipped backward runs two kernels, dK/dV and dQ, seven products a block
pair between them with the forward. This candidate follows FlashAttention-3's
backward (Shah et al., 2024): one program owns 128 key rows, 64 per compute
warpgroup, and streams 64-row Q and dO blocks past them as the shipped dK/dV
kernel does (its loader is reused). Per block each warpgroup also writes its
dS^T tile to shared memory; once both halves are in, each forms dQ for 64 of
the head's columns over all 128 keys (dS @ K[:, cols]) and writes that fp32
tile to a two-slot staging buffer. A one-warp reducer partition adds each tile
into an fp32 dQ accumulator in global memory with a TMA reduce-add and frees
the slot once the copy has read it, so the compute warpgroups never wait for
the adds. dQ is scaled and cast at the end (one elementwise pass).

It prints, per case, the shipped pair's time and this kernel's
(triton.testing.do_bench medians) and the largest differences of dK, dV, dQ
against the shipped kernels' over the largest magnitude. `--compile` only
builds it for sm_90a, without a GPU. Development only: on the H100 at
B 2 x H 16 x 8k, head dim 128, non-causal, it tied the shipped pair (5.740 and
5.835 ms against 5.770 and 5.666, two alternations; with two dS^T buffers
5.523 and 6.354 against 5.518 and 5.632) and lost causal (3.714, or 3.409
with two buffers, against 3.223), dK and dV bit-identical, dQ within 5.4e-3;
docs/attention-kernels.md ("What is left") has the rest.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from impls.attention import flash_gluon
from impls.attention.flash_gluon import LOG2E, _dkdv_loader, _mma_layout, _origin


@builtin
def _tma_add(tensor_desc, coord, src, _semantic=None):
    # TMA reduce-add of a shared-memory tile into global memory. Triton 3.6's
    # Gluon has the builder call but no Python name (3.8 calls it tma.async_atomic_add).
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _reducer(dqa_desc, dq0_smem, dq1_smem, dq0_full, dq1_full, dq_empty, b, hk, H, GROUP, SP, q_lo, n_q):
    # dqW_smem: warpgroup W's two slots [2, 64, 64] fp32; dqW_full one barrier
    # a slot, dq_empty one a slot for both. Each tile is added where its 64 query rows and 64
    # columns belong; a slot is freed once both of its copies have read it,
    # which store_wait tells a block later.
    BLOCK_M: gl.constexpr = dq0_smem.shape[1]
    t = 0
    for g in range(GROUP):
        row = ((b * H + hk * GROUP + g) * SP).to(gl.int32)
        for i in range(q_lo, n_q):
            slot = t % 2
            ph = (t // 2) & 1
            mbarrier.wait(dq0_full.index(slot), ph)
            _tma_add(dqa_desc, [row + i * BLOCK_M, 0], dq0_smem.index(slot))
            mbarrier.wait(dq1_full.index(slot), ph)
            _tma_add(dqa_desc, [row + i * BLOCK_M, 64], dq1_smem.index(slot))
            tma.store_wait(2)  # the previous block's two copies have read their tiles
            mbarrier.arrive(dq_empty.index(1 - slot), count=1, pred=t > 0)
            t += 1
    tma.store_wait(0)


@gluon.jit
def _block(t, i, dk, dv, ds16_prev, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
           ds_all, ds_mine, ds_full, ds_empty, nbuf, dq_smem, dq_full, dq_empty, krows, S, qk_scale, causal,
           s_layout: gl.constexpr, MASK: gl.constexpr):
    # The shipped dK/dV block at head dim 128 (dK's product a block late, dV's
    # within its block) with dS^T also written to shared memory, then this
    # warpgroup's 64 columns of the block's dQ formed and staged.
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    ROWS: gl.constexpr = k.shape[0]
    st = t % STAGES
    prev = gl.maximum(t - 1, 0) % STAGES
    qrows = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    mbarrier.wait(ready.index(st), (t // STAGES) & 1)
    q = q_smem.index(st)
    do = do_smem.index(st)
    zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
    acc_layout: gl.constexpr = dv.type.layout
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    st_tok = warpgroup_mma(k, q.permute((1, 0)), zero, use_acc=False, is_async=True)
    dk_tok = warpgroup_mma(ds16_prev, q_smem.index(prev), dk, is_async=True)
    dpt_tok = warpgroup_mma(v, do.permute((1, 0)), zero, use_acc=False, is_async=True)
    lse = lse_smem.index(st).load(qrows.type.layout)
    s_t = warpgroup_mma_wait(num_outstanding=2, deps=(st_tok, ))
    p_t = gl.exp2(s_t * qk_scale - lse[None, :])
    if MASK:  # keys past S too: their dS^T rows would reach dQ
        keep = (qrows[None, :] < S) & (krows[:, None] < S) & ((qrows[None, :] >= krows[:, None]) | (causal == 0))
        p_t = gl.where(keep, p_t, 0.0)
    p_t = p_t.to(q.dtype)
    p16 = gl.convert_layout(p_t, op_layout)
    dv_tok = warpgroup_mma(p16, do, dv, is_async=True)
    dp_t, dk, ds16_prev = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok, dk_tok, ds16_prev))
    mbarrier.arrive(empty.index(prev), count=1, pred=t > 0)
    delta = delta_smem.index(st).load(qrows.type.layout)
    ds_t = (p_t.to(gl.float32) * (dp_t - delta[None, :])).to(q.dtype)
    ds16 = gl.convert_layout(ds_t, op_layout)
    # dS^T goes to buffer t % nbuf (ds_all and ds_mine are pairs; with one buffer both name it):
    # once both warpgroups' dQ products of that buffer's last block have read it.
    buf = t % nbuf
    ph = (t // nbuf) & 1
    mbarrier.wait(ds_empty.index(buf), ph ^ 1)
    if buf == 0:
        ds_mine[0].store(ds_t)
    else:
        ds_mine[1].store(ds_t)
    fence_async_shared()
    mbarrier.arrive(ds_full.index(buf), count=1)
    dv, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, p16))
    mbarrier.wait(ds_full.index(buf), ph)
    dq_zero = gl.zeros([BLOCK_M, 64], gl.float32, _mma_layout(64))
    if buf == 0:
        dq_tok = warpgroup_mma(ds_all[0].permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
    else:
        dq_tok = warpgroup_mma(ds_all[1].permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
    mbarrier.arrive(ds_empty.index(buf), count=1)
    slot = t % 2
    mbarrier.wait(dq_empty.index(slot), ((t // 2) & 1) ^ 1)
    dq_smem.index(slot).store(dq)
    fence_async_shared()
    mbarrier.arrive(dq_full.index(slot), count=1)
    return dk, dv, ds16


@gluon.jit
def _consumer(k, v, k_cols, ds_mine, dq_smem, dq_full, row0, ds_all, ds_full, ds_empty, nbuf, dq_empty,
              q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty,
              DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
              b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, causal):
    ROWS: gl.constexpr = k.shape[0]
    HEAD_DIM: gl.constexpr = k.shape[1]
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    s_layout: gl.constexpr = _mma_layout(BLOCK_M)
    acc_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    krows = start_n + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    ds16 = gl.zeros([ROWS, BLOCK_M], q_smem.dtype, op_layout)
    t = 0
    for g in range(GROUP):
        for i in range(q_lo, diag_hi):
            dk, dv, ds16 = _block(t, i, dk, dv, ds16, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready,
                                  empty, ds_all, ds_mine, ds_full, ds_empty, nbuf, dq_smem, dq_full, dq_empty, krows, S,
                                  qk_scale, causal, s_layout, True)
            t += 1
        for i in range(diag_hi, gl.maximum(diag_hi, full_q)):
            dk, dv, ds16 = _block(t, i, dk, dv, ds16, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready,
                                  empty, ds_all, ds_mine, ds_full, ds_empty, nbuf, dq_smem, dq_full, dq_empty, krows, S,
                                  qk_scale, causal, s_layout, False)
            t += 1
        for i in range(gl.maximum(diag_hi, full_q), n_q):
            dk, dv, ds16 = _block(t, i, dk, dv, ds16, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready,
                                  empty, ds_all, ds_mine, ds_full, ds_empty, nbuf, dq_smem, dq_full, dq_empty, krows, S,
                                  qk_scale, causal, s_layout, True)
            t += 1
    last = (t - 1) % STAGES
    dk_tok = warpgroup_mma(ds16, q_smem.index(last), dk, is_async=True)
    dk, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, ds16))
    mbarrier.arrive(empty.index(last), count=1)
    rows = start_n + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    keep = rows[:, None] < S
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows[:, None].to(gl.int64) * stride_dks + cols[None, :]
    gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows[:, None].to(gl.int64) * stride_dvs + cols[None, :]
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=keep)


@gluon.jit
def _bwd5_kernel(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, dqa_desc, DK, DV,
                 stride_qb, stride_qh, stride_qs,
                 stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs,
                 stride_db, stride_dh, stride_ds,
                 stride_dkb, stride_dkh, stride_dks,
                 stride_dvb, stride_dvh, stride_dvs,
                 H, GROUP, S, SP, LSE_S, qk_scale, sm_scale,
                 HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, DS_BUFFERS: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_N: gl.constexpr = 128
    BLOCK_M: gl.constexpr = 64
    gl.static_assert(HEAD_DIM == 128)
    gl.static_assert(num_warps == 4)
    start_n = gl.program_id(0) * BLOCK_N
    bhk = gl.program_id(1)
    Hkv = H // GROUP
    b = (bhk // Hkv).to(gl.int64)
    hk = (bhk % Hkv).to(gl.int64)
    k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
    v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)
    n_q = gl.cdiv(S, BLOCK_M)
    full_q = (S // BLOCK_M) * (start_n + BLOCK_N <= S).to(gl.int32)  # a partial key tile masks every block
    if CAUSAL:
        q_lo = start_n // BLOCK_M
        diag_hi = gl.minimum(gl.cdiv(start_n + BLOCK_N, BLOCK_M), n_q)
    else:
        q_lo = 0
        diag_hi = 0

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], k_desc.dtype)
    gl.static_assert(DS_BUFFERS == 1 or DS_BUFFERS == 2)
    ds0_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, BLOCK_M], ds_layout)
    if DS_BUFFERS == 2:  # a second dS^T buffer: one warpgroup can write block t+1's while the other reads t's
        ds1_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, BLOCK_M], ds_layout)
    else:
        ds1_smem = ds0_smem
    dq0_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, 64], dqa_desc.layout)  # two slots a warpgroup
    dq1_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, 64], dqa_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # one a buffer
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq0_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq1_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=2)
        mbarrier.init(ds_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(dq0_full.index(i), count=1)
        mbarrier.init(dq1_full.index(i), count=1)
    mbarrier.init(dq_empty.index(0), count=1)
    mbarrier.init(dq_empty.index(1), count=1)

    shared = ((ds0_smem, ds1_smem), ds_full, ds_empty, DS_BUFFERS, dq_empty,
              q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty, DK, DV,
              stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
              b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, CAUSAL * 1)
    gl.warp_specialize([
        (_consumer, (k_smem.slice(0, 64), v_smem.slice(0, 64), k_smem.slice(0, 64, dim=1),
                     (ds0_smem.slice(0, 64), ds1_smem.slice(0, 64)),
                     dq0_smem, dq0_full, 0) + shared),
        (_consumer, (k_smem.slice(64, 64), v_smem.slice(64, 64), k_smem.slice(64, 64, dim=1),
                     (ds0_smem.slice(64, 64), ds1_smem.slice(64, 64)),
                     dq1_smem, dq1_full, 64) + shared),
        (_dkdv_loader, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                        lse_smem, delta_smem, kv_bar, ready, empty, k_row, k_col, v_row, v_col, start_n, b, hk, H,
                        GROUP, S, LSE_S, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds, q_lo, n_q)),
        (_reducer, (dqa_desc, dq0_smem, dq1_smem, dq0_full, dq1_full, dq_empty, b, hk, H, GROUP, SP, q_lo, n_q)),
    ], [4, 1, 1], [CONSUMER_REGS, 24, 24])


def dqa_layout():
    return gl.NVMMASharedLayout.get_default_for([64, 64], gl.float32)


def launch(q, k, v, do, lse, delta, causal, scale, stages=2, ds_buffers=1, regs=240):
    """(dq, dk, dv) of the five-product kernel; lse base 2 and delta as the shipped kernels take them."""
    B, H, S, D = q.shape
    SP = triton.cdiv(S, 64) * 64
    dqa = torch.zeros((B, H, SP, D), device=q.device, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse_rows, delta_rows = flash_gluon._tma_rows(lse), flash_gluon._tma_rows(delta)
    flat = dqa.view(B * H * SP, D)
    dqa_desc = TensorDescriptor(flat, list(flat.shape), [D, 1], [64, 64], dqa_layout())
    grid = (triton.cdiv(S, 128), B * k.shape[1])
    _bwd5_kernel[grid](
        flash_gluon._descriptor(k, 128), flash_gluon._descriptor(v, 128), flash_gluon._descriptor(q, 64),
        flash_gluon._descriptor(do, 64), flash_gluon._row_descriptor(lse_rows, 64),
        flash_gluon._row_descriptor(delta_rows, 64), dqa_desc, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, H // k.shape[1], S, SP, lse_rows.shape[-1], scale * LOG2E, scale,
        D, bool(causal), stages, ds_buffers, regs, num_warps=4)
    dq = (dqa[:, :, :S] * scale).to(q.dtype)
    return dq, dk, dv


def _shipped(q, k, v, do, lse, delta, causal, scale, tune=True):
    # The shipped pair as `tiled` runs it (tuned), or at fixed configs for the checks, which tuning would slow.
    dk, dv, _ = flash_gluon.backward_dkdv(q, k, v, do, lse, delta, causal, scale, None if tune else (64, 3))
    dq, _ = flash_gluon.backward_dq(q, k, v, do, lse, delta, causal, scale, None if tune else (128, 2))
    return dq, dk, dv


def _inputs(B, H, Hkv, S, D, causal, seed=0):
    from impls.attention import flash_triton
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    o, lse, _ = flash_gluon.forward(q, k, v, causal, scale, (128, 128, 2, "ws"))
    delta = flash_triton.delta(o, do)
    return q, k, v, do, lse, delta, scale


def compile_check(stages: int = 2, ds_buffers=(1, 2)) -> None:
    """Compile for sm_90a without a GPU (tools/compile_gluon) and print shared memory, registers, spills."""
    from tools.compile_gluon import _desc, compile_sm90, resources
    x = torch.empty(2, 16, 8192, 128, dtype=torch.bfloat16)
    lse = torch.empty(2, 16, 8192)
    dqa = torch.empty(2 * 16 * 8192, 128)
    for nbuf, causal in [(n, c) for n in ds_buffers for c in (False, True)]:
        example = dict(k_desc=_desc(x, 128), v_desc=_desc(x, 128), q_desc=_desc(x, 64), do_desc=_desc(x, 64),
                       lse_desc=flash_gluon._row_descriptor(lse, 64), delta_desc=flash_gluon._row_descriptor(lse, 64),
                       dqa_desc=TensorDescriptor(dqa, list(dqa.shape), [128, 1], [64, 64], dqa_layout()),
                       DK=x, DV=x, H=16, GROUP=1, S=8191, SP=8192, LSE_S=8192, qk_scale=0.5, sm_scale=0.1,
                       **{f"stride_{n}{a}": 3 for n in ("q", "k", "v", "d", "dk", "dv") for a in "bhs"})
        try:
            kernel = compile_sm90(_bwd5_kernel, example, dict(HEAD_DIM=128, CAUSAL=causal, STAGES=stages,
                                                              DS_BUFFERS=nbuf, CONSUMER_REGS=240))
            print(f"bwd5 ds{nbuf} causal={causal} s{stages}: {json.dumps(resources(kernel))}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"bwd5 ds{nbuf} causal={causal} s{stages}: does not compile: {type(exc).__name__}: {exc}",
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--ds-buffers", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="the variants: one dS^T buffer, or two that the warpgroups alternate")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--compile", action="store_true", help="only compile for sm_90a (no GPU needed)")
    args = ap.parse_args(argv)
    if args.compile:
        compile_check(args.stages, args.ds_buffers)
        return 0
    from triton.testing import do_bench
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    checks = [(1, 4, 2, 333), (2, 4, 4, 1000), (1, 2, 2, 4096)]
    for causal in causals:
        for B, H, Hkv, S in checks:
            q, k, v, do, lse, delta, scale = _inputs(B, H, Hkv, S, 128, causal)
            ref = _shipped(q, k, v, do, lse, delta, causal, scale, tune=False)
            for nbuf in args.ds_buffers:
                got = launch(q, k, v, do, lse, delta, causal, scale, args.stages, nbuf)
                torch.cuda.synchronize()
                errs = [((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                        for a, r in zip(got, ref)]
                print(f"check ds{nbuf} causal={causal} B={B} H={H}/{Hkv} S={S}: rel. max diff dq {errs[0]:.2e} "
                      f"dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
        if args.check_only:
            continue
        q, k, v, do, lse, delta, scale = _inputs(args.batch, args.heads, args.heads, args.seq, 128, causal)
        for _ in range(2):  # twice, alternating, to see the drift
            t_ref = do_bench(lambda: _shipped(q, k, v, do, lse, delta, causal, scale), warmup=25, rep=200,
                             return_mode="median")
            t_new = [do_bench(lambda: launch(q, k, v, do, lse, delta, causal, scale, args.stages, nbuf),
                              warmup=25, rep=200, return_mode="median") for nbuf in args.ds_buffers]
            print(f"time causal={causal} B={args.batch} H={args.heads} S={args.seq} D=128: shipped pair "
                  f"{t_ref:.3f} ms, five-product " + ", ".join(f"ds{n} {t:.3f}" for n, t in zip(args.ds_buffers, t_new))
                  + " ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
