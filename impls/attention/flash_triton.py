"""FlashAttention-2 kernels in Triton: the forward, delta, dK/dV and dQ behind genbench's `tiled` attention.

    from impls.attention import flash_triton as ft
    o, lse, config = ft.forward(q, k, v, causal, scale)        # lse (B, H, S): base-2 log-sum-exp, fp32
    delta = ft.delta(o, do)
    dk, dv, config = ft.backward_dkdv(q, k, v, do, lse, delta, causal, scale)
    dq, config = ft.backward_dq(q, k, v, do, lse, delta, causal, scale)
    ft.describe(config)                                        # "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"

These are the kernels and their launches; impls/attention/flash.py's
attention() checks the inputs, chooses between these kernels and
flash_gluon.py's, and makes them one differentiable function. Each launch
returns the block configuration its autotuner chose.

The algorithm is FlashAttention-2 (Dao, 2023, arXiv:2307.08691):
- forward: one program keeps a (BLOCK_M, D) block of Q resident and streams
  K/V blocks past it, keeping a running max and sum (online softmax, in fp32,
  base 2 with softmax scale * log2(e) folded into one multiply). Causal blocks
  wholly above the diagonal are never visited; only the blocks on the diagonal
  pay for a mask. The log-sum-exp of every row is saved for the backward.
- backward (Algorithm 2 of the paper, split in two kernels instead of summing
  dQ with atomics, which was slower: docs/attention-kernels.md): a
  preprocess computes delta = rowsum(dO * O); a dK/dV kernel holds a K/V
  block and streams Q/dO blocks past it; a dQ kernel holds a Q/dO block and
  streams K/V. Both recompute P = exp2(QK^T * scale * log2(e) - lse) instead
  of storing it.

Layouts: q is (B, H, S, D); k and v are (B, Hkv, S, D) with Hkv dividing H
(grouped-query attention, query head h reads kv head h // (H // Hkv)). Any
strides with a unit last stride are accepted, so both contiguous tensors and
`x.transpose(1, 2)` views of (B, S, H, D) tensors run without a copy. Sequence
tails are masked inside the kernels; nothing is padded.

Where there is no GPU, the kernels run through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported) on CPU tensors, with one
small block configuration because the interpreter is slow.

With use_tma the kernels load tiles through tensor descriptors (Hopper's TMA
copy engine) instead of pointer arithmetic. Descriptors built inside a kernel
need a scratch allocator, which Triton keeps per thread (a ContextVar), so
every such launch installs one: the autograd backward runs on a different
thread than the forward.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure makes the kernel unavailable; flash.supported() says why
    TRITON_ERROR = f"triton not importable: {type(exc).__name__}: {exc}"

    def _no_decorator(*args, **kwargs):
        # Stand-ins so that the kernel definitions below still parse without triton.
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = SimpleNamespace(jit=_no_decorator, autotune=_no_decorator, Config=lambda *a, **k: None)
    tl = SimpleNamespace(constexpr=lambda value=None: value)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HEAD_DIMS = (16, 32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))

# Triton 3.9's interpreter multiplies bf16 dot operands as their raw 16-bit
# storage (np.matmul on uint16), so under the interpreter every dot upcasts its
# operands to fp32 first: exact for fp16/bf16 products, as on the tensor cores.
_UPCAST_DOTS = tl.constexpr(INTERPRET)


# --------------------------------------------------------------------------
# Block configurations for triton.autotune, keyed on the sequence-length
# bucket, head dim, causal flag, load path and (added by the autotuner) dtype.
# The choice per key is kept for the life of the process and, where this
# Triton can (`cache_results`), in Triton's cache folder on disk, so that the
# next run on the same GPU and Triton does not tune again.
# --------------------------------------------------------------------------

SMEM_LIMIT = 227 * 1024  # shared memory one block may use on the H100/H200


def _cfg(num_warps, num_stages, maxnreg=None, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


if INTERPRET:
    # The interpreter executes every program in Python: small blocks keep it
    # quick and still make the tests cross block boundaries and the diagonal.
    FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]
    DKDV_CONFIGS = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]
    DQ_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]
else:
    # Hopper leads: 128-row Q blocks on 8 warps (two warpgroups, one 64-row
    # wgmma each), 64 or 128 key columns, 2-4 stages. The last config of each
    # list is the fallback for fp32 and head dim 256.
    FWD_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        # Two programs per SM (96 KB of shared memory, <= 128 registers a
        # thread): one's softmax runs under the other's wgmma. It pays
        # non-causal and costs causal (docs/attention-kernels.md).
        _cfg(8, 2, maxnreg=128, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 2, BLOCK_M=128, BLOCK_N=128),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),
    ]
    # dK/dV: BLOCK_N rows of K/V resident (the accumulators), BLOCK_M query rows streamed.
    # 32-row Q blocks on 8 warps keep the (BLOCK_N, BLOCK_M) fp32 P and dP
    # small next to the 128 registers of dK + dV: 64x128 spills at D=128 yet
    # is the long sequences' pick; 32x128 w8 the shorter causal ones'.
    DKDV_CONFIGS = [
        _cfg(8, 3, BLOCK_M=64, BLOCK_N=128),
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=128),
        _cfg(8, 3, BLOCK_M=32, BLOCK_N=128),
        _cfg(8, 4, BLOCK_M=32, BLOCK_N=128),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),
    ]
    # dQ: BLOCK_M query rows resident, BLOCK_N key rows streamed.
    DQ_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=32),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),
    ]


def _pad_dim(head_dim: int) -> int:
    """The power of two that tiles use along the head dim (tl.arange needs one)."""
    return 1 << (head_dim - 1).bit_length()


def _seq_bucket(seq_len: int) -> int:
    """Autotune key for the sequence length: the next power of two, at least 16."""
    return max(16, 1 << (seq_len - 1).bit_length())


def _prune(resident, streamed, acc_rows):
    """An early_config_prune that drops configs which cannot fit or are not worth compiling.

    resident(kw) and streamed(kw) give the tile rows held in shared memory once
    and per pipeline stage; acc_rows(kw) the rows of fp32 accumulators held in
    registers. Dropped: configs whose tiles need more shared memory than the
    chip has even with one buffer fewer than num_stages (the autotuner would
    skip them at launch, but only after compiling them), and configs whose
    accumulators alone take over 128 of a thread's 255 registers, or over half
    of a `maxnreg` cap (they spill).
    Small-tile fallbacks are kept only where nothing else fits.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem_bytes = args["Q"].element_size()
        d_pad = _pad_dim(args["HEAD_DIM"])

        def fits(c):
            kw = c.kwargs
            cap = getattr(c, "maxnreg", None)
            if acc_rows(kw) * d_pad > (cap // 2 if cap else 128) * 32 * c.num_warps:
                return False
            if cap and elem_bytes > 2:
                return False  # register-capped configs are sized for 16-bit tiles
            rows = resident(kw) + (c.num_stages - 1) * streamed(kw)
            return rows * d_pad * elem_bytes <= SMEM_LIMIT

        kept = [c for c in configs if fits(c)]
        if elem_bytes <= 2 and d_pad <= 128:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 64] or kept
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


# fwd: Q resident; K and V streamed; one (BLOCK_M, D) accumulator.
_prune_fwd = _prune(lambda kw: kw["BLOCK_M"], lambda kw: 2 * kw["BLOCK_N"], lambda kw: kw["BLOCK_M"])
# dK/dV: K, V resident; Q and dO streamed; two (BLOCK_N, D) accumulators.
_prune_dkdv = _prune(lambda kw: 2 * kw["BLOCK_N"], lambda kw: 2 * kw["BLOCK_M"], lambda kw: 2 * kw["BLOCK_N"])
# dQ: Q, dO resident; K and V streamed; one (BLOCK_M, D) accumulator.
_prune_dq = _prune(lambda kw: 2 * kw["BLOCK_M"], lambda kw: 2 * kw["BLOCK_N"], lambda kw: kw["BLOCK_M"])

_AUTOTUNE_KEY = ["S_BUCKET", "HEAD_DIM", "CAUSAL", "USE_TMA"]  # the autotuner adds the tensors' dtypes
_AUTOTUNE_DISK = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_SCALARS = ["H", "GROUP", "S", "S_BUCKET"]  # one compiled kernel serves every value


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc):
    """tl.dot(a, b, acc), with the interpreter's bf16 workaround (_UPCAST_DOTS)."""
    if _UPCAST_DOTS:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        # fp32 inputs get IEEE fp32 products: TF32 (Triton's default for fp32)
        # leaves gradients near 2e-3 from float64, above the fp32 tolerance.
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _make_desc(base, S, stride_s, ROWS: tl.constexpr, D_PAD: tl.constexpr, USE_TMA: tl.constexpr):
    """A tensor descriptor over one head's (S, D) matrix when USE_TMA, else the base pointer."""
    if USE_TMA:
        # TMA zero-fills rows past S, so tails need no mask on this path.
        src = tl.make_tensor_descriptor(base, shape=[S, D_PAD], strides=[stride_s, 1], block_shape=[ROWS, D_PAD])
    else:
        src = base
    return src


@triton.jit
def _load_rows(src, row0, S, stride_s, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows row0 .. row0 + ROWS of one head's (S, HEAD_DIM) matrix as a (ROWS, D_PAD) tile.

    Rows past S and columns past HEAD_DIM read as 0 (only checked when BOUNDS,
    or when the head dim is padded).
    """
    if USE_TMA:
        tile = src.load([row0, 0])
    else:
        rows = row0 + tl.arange(0, ROWS)
        cols = tl.arange(0, D_PAD)
        ptrs = src + rows[:, None] * stride_s + cols[None, :]
        if BOUNDS or HEAD_DIM != D_PAD:
            tile = tl.load(ptrs, mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(base, tile, row0, S, stride_s, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, D_PAD)
    ptrs = base + rows[:, None] * stride_s + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows, lo, hi, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
                 WARP_SPEC: tl.constexpr = False):
    """Online softmax over key blocks lo .. hi for one resident Q block.

    acc (BLOCK_M, D_PAD) is the unnormalised output, m_i the running row max of
    the base-2 logits, l_i the running row sum of exp2(logit - m_i).
    WARP_SPEC asks Triton to split the loop into producer and consumer warps
    (its automatic warp specialization; on Hopper only with TMA loads).
    """
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        qk = _dot(q, tl.trans(k), None)  # (BLOCK_M, BLOCK_N), fp32
        if CAUSAL_MASK or BOUNDS:
            cols = start_n + tl.arange(0, BLOCK_N)
            keep = cols[None, :] < S
            if CAUSAL_MASK:
                keep = keep & (rows[:, None] >= cols[None, :])
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
        else:
            # Unmasked blocks: the scale is folded into the exponent's one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qs,
                stride_kb, stride_kh, stride_ks,
                stride_vb, stride_vh, stride_vs,
                stride_ob, stride_oh, stride_os,
                H, GROUP, S, S_BUCKET, qk_scale,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr = False):
    # grid: (cdiv(S, BLOCK_M), B * H); one program owns rows start_m .. start_m + BLOCK_M of one head.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the causal diagonal starts on a K block boundary
    n_m = tl.cdiv(S, BLOCK_M)
    if CAUSAL:
        # Heaviest (last) row blocks first, so the short ones fill the tail of the grid.
        start_m = (n_m - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # grouped-query attention: this head's K/V head

    q_base = Q + b * stride_qb + h * stride_qh
    k_src = _make_desc(K + b * stride_kb + hk * stride_kh, S, stride_ks, BLOCK_N, D_PAD, USE_TMA)
    v_src = _make_desc(V + b * stride_vb + hk * stride_vh, S, stride_vs, BLOCK_N, D_PAD, USE_TMA)
    q_src = _make_desc(q_base, S, stride_qs, BLOCK_M, D_PAD, USE_TMA)

    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_src, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, D_PAD, True, USE_TMA)  # (BLOCK_M, D_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    if CAUSAL:
        # Key blocks left of the diagonal: every key visible, all rows < S.
        acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows,
                                     0, start_m, qk_scale,
                                     BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA)
        # The diagonal band: causal mask and the sequence tail. Every row sees
        # key start_m in the band's first block, so no row's max stays -inf.
        acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows,
                                     start_m, tl.minimum(start_m + BLOCK_M, S), qk_scale,
                                     BLOCK_N, HEAD_DIM, D_PAD, True, True, USE_TMA)
    else:
        full = (S // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows,
                                     0, full, qk_scale,
                                     BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA, WARP_SPEC)
        acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows,
                                     full, S, qk_scale,
                                     BLOCK_N, HEAD_DIM, D_PAD, False, True, USE_TMA)

    acc = acc / l_i[:, None]
    # Base-2 log-sum-exp of the scaled logits: the backward's P is exp2(logit - lse).
    tl.store(LSE + bh.to(tl.int64) * S + rows, m_i + tl.log2(l_i), mask=rows < S)
    _store_rows(O + b * stride_ob + h * stride_oh, acc, start_m, S, stride_os, BLOCK_M, HEAD_DIM, D_PAD)


@triton.jit(do_not_specialize=["H", "S"])
def _bwd_delta_kernel(O, DO, DELTA,
                      stride_ob, stride_oh, stride_os,
                      stride_db, stride_dh, stride_ds,
                      H, S,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the row term of dS = P * (dP - delta).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    o = _load_rows(O + b * stride_ob + h * stride_oh, start_m, S, stride_os, BLOCK_M, HEAD_DIM, D_PAD, True, False)
    do = _load_rows(DO + b * stride_db + h * stride_dh, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, D_PAD, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, S, cols, lo, hi, qk_scale,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dK, dV of one resident K/V block (rows `cols`) over query blocks lo .. hi.

    Works on transposed tiles (keys down, queries across) so that both
    accumulations are plain (BLOCK_N, BLOCK_M) x (BLOCK_M, D) products. Query
    rows past S read as q = dO = 0 with lse = delta = 0, which makes their
    dS and dO rows zero: they add nothing.
    """
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_src, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_M, D_PAD)
        if BOUNDS:
            lse = tl.load(lse_ptr + rows, mask=rows < S, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
        qkT = _dot(k, tl.trans(q), None)  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            pT = tl.where(rows[None, :] >= cols[:, None], pT, 0.0)
        do = _load_rows(do_src, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_M, D_PAD)
        dv = _dot(pT.to(do.dtype), do, dv)  # dV += P^T dO
        if BOUNDS:
            delta = tl.load(delta_ptr + rows, mask=rows < S, other=0.0)
        else:
            delta = tl.load(delta_ptr + rows)
        dpT = _dot(v, tl.trans(do), None)  # (BLOCK_N, BLOCK_M): (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk)  # dK += dS^T Q (the softmax scale is applied once at the end)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dkdv},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     stride_qb, stride_qh, stride_qs,
                     stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs,
                     stride_db, stride_dh, stride_ds,
                     stride_dkb, stride_dkh, stride_dks,
                     stride_dvb, stride_dvh, stride_dvs,
                     H, GROUP, S, S_BUCKET, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(S, BLOCK_N), B * Hkv); one program owns key rows start_n .. start_n + BLOCK_N of one kv
    # head and sums over the GROUP query heads that share it (no atomics needed).
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the causal diagonal ends on a Q block boundary
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)

    k = _load_rows(K + b * stride_kb + hk * stride_kh, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, D_PAD, True, False)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, D_PAD, True, False)
    cols = start_n + tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    for g in range(GROUP):
        h = hk * GROUP + g
        q_src = _make_desc(Q + b * stride_qb + h * stride_qh, S, stride_qs, BLOCK_M, D_PAD, USE_TMA)
        do_src = _make_desc(DO + b * stride_db + h * stride_dh, S, stride_ds, BLOCK_M, D_PAD, USE_TMA)
        lse_ptr = LSE + (b * H + h) * S
        delta_ptr = DELTA + (b * H + h) * S
        if CAUSAL:
            # Query rows start_n .. start_n + BLOCK_N cross the diagonal: masked.
            # Rows above start_n see none of these keys and are skipped.
            diag_end = start_n + BLOCK_N
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, S, cols,
                                  start_n, tl.minimum(diag_end, S), qk_scale,
                                  BLOCK_M, HEAD_DIM, D_PAD, True, True, USE_TMA)
            full = tl.maximum(diag_end, (S // BLOCK_M) * BLOCK_M)
        else:
            diag_end = 0
            full = (S // BLOCK_M) * BLOCK_M
        # Whole query blocks below the diagonal: no mask.
        dk, dv = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, S, cols,
                              diag_end, full, qk_scale,
                              BLOCK_M, HEAD_DIM, D_PAD, False, False, USE_TMA)
        # The last, partial query block.
        dk, dv = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, S, cols,
                              full, S, qk_scale,
                              BLOCK_M, HEAD_DIM, D_PAD, False, True, USE_TMA)

    _store_rows(DK + b * stride_dkb + hk * stride_dkh, dk * sm_scale, start_n, S, stride_dks, BLOCK_N, HEAD_DIM, D_PAD)
    _store_rows(DV + b * stride_dvb + hk * stride_dvh, dv, start_n, S, stride_dvs, BLOCK_N, HEAD_DIM, D_PAD)


@triton.jit
def _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows, lo, hi, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dQ of one resident Q block over key blocks lo .. hi."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        qk = _dot(q, tl.trans(k), None)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL_MASK or BOUNDS:
            # Keys past S read as 0, but exp2(0 - lse) need not be small: zero them.
            cols = start_n + tl.arange(0, BLOCK_N)
            keep = cols[None, :] < S
            if CAUSAL_MASK:
                keep = keep & (rows[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), None)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq)  # dQ += dS K
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dq},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_qs,
                   stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs,
                   stride_db, stride_dh, stride_ds,
                   stride_dqb, stride_dqh, stride_dqs,
                   H, GROUP, S, S_BUCKET, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(S, BLOCK_M), B * H); one program owns query rows start_m .. start_m + BLOCK_M of one head.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    n_m = tl.cdiv(S, BLOCK_M)
    if CAUSAL:
        start_m = (n_m - 1 - tl.program_id(0)) * BLOCK_M  # heaviest first, as in the forward
    else:
        start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP

    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, D_PAD, True, False)
    do = _load_rows(DO + b * stride_db + h * stride_dh, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, D_PAD, True, False)
    lse = tl.load(LSE + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
    k_src = _make_desc(K + b * stride_kb + hk * stride_kh, S, stride_ks, BLOCK_N, D_PAD, USE_TMA)
    v_src = _make_desc(V + b * stride_vb + hk * stride_vh, S, stride_vs, BLOCK_N, D_PAD, USE_TMA)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    if CAUSAL:
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows,
                         0, start_m, qk_scale,
                         BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows,
                         start_m, tl.minimum(start_m + BLOCK_M, S), qk_scale,
                         BLOCK_N, HEAD_DIM, D_PAD, True, True, USE_TMA)
    else:
        full = (S // BLOCK_N) * BLOCK_N
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows,
                         0, full, qk_scale,
                         BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows,
                         full, S, qk_scale,
                         BLOCK_N, HEAD_DIM, D_PAD, False, True, USE_TMA)

    _store_rows(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, start_m, S, stride_dqs, BLOCK_M, HEAD_DIM, D_PAD)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

# The autotuned kernels by name, for the shipped choices (impls/attention/tuning.py).
AUTOTUNED = {"_fwd_kernel": _fwd_kernel, "_bwd_dkdv_kernel": _bwd_dkdv_kernel, "_bwd_dq_kernel": _bwd_dq_kernel}


def describe(config) -> str:
    """A block configuration as the `kernel` column shows it, e.g. "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"."""
    cap = getattr(config, "maxnreg", None)
    return (f"BLOCK_M={config.kwargs['BLOCK_M']} BLOCK_N={config.kwargs['BLOCK_N']} warps={config.num_warps} "
            f"stages={config.num_stages}" + (f" maxnreg={cap}" if cap else ""))


def _scratch(size: int, alignment: int, stream):
    # Global memory for descriptors that kernels build (tl.make_tensor_descriptor).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _strides(t: torch.Tensor):
    # (batch, head, seq) strides of a (B, H, S, D) tensor; the head-dim stride is 1.
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, causal: bool, scale: float, use_tma: bool = False):
    """(o, lse, config): o in q's layout, lse (B, H, S) the base-2 log-sum-exp in fp32, and the block config."""
    B, H, S, D = q.shape
    group = H // k.shape[1]
    o = torch.empty_like(q)  # keeps q's layout, e.g. a (B, S, H, D) view
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    if use_tma:
        triton.set_allocator(_scratch)
    _fwd_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, group, S, _seq_bucket(S), scale * LOG2E,
        D, _pad_dim(D), bool(causal), bool(use_tma),
    )
    return o, lse, _fwd_kernel.best_config


def delta(o, do):
    """delta = rowsum(dO * O), (B, H, S) fp32: the row term every backward kernel subtracts."""
    B, H, S, D = o.shape
    out = torch.empty((B, H, S), device=o.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(S, 64), B * H)](
        o, do, out, *_strides(o), *_strides(do), H, S, D, _pad_dim(D), 64,
    )
    return out


def _common(q, causal, scale, use_tma):
    # The scalar and constexpr arguments the dK/dV and dQ kernels share, after their strides.
    S, D = q.shape[2], q.shape[3]
    if use_tma:
        triton.set_allocator(_scratch)  # this may be autograd's worker thread
    return (S, _seq_bucket(S), scale * LOG2E, scale, D, _pad_dim(D), bool(causal), bool(use_tma))


def backward_dkdv(q, k, v, do, lse, delta, causal: bool, scale: float, use_tma: bool = False):
    """(dk, dv, config) from the forward's base-2 lse and delta = rowsum(dO * O)."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, H // Hkv, *_common(q, causal, scale, use_tma),
    )
    return dk, dv, _bwd_dkdv_kernel.best_config


def backward_dq(q, k, v, do, lse, delta, causal: bool, scale: float, use_tma: bool = False):
    """(dq, config) from the forward's base-2 lse and delta = rowsum(dO * O)."""
    B, H, S, D = q.shape
    dq = torch.empty_like(q)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, H // k.shape[1], *_common(q, causal, scale, use_tma),
    )
    return dq, _bwd_dq_kernel.best_config
