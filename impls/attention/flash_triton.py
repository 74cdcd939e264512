"""FlashAttention-2 kernels in Triton: the forward, delta, dK/dV and dQ behind genbench's `tiled` attention.

    from impls.attention import flash_triton as ft
    o, lse, config = ft.forward(q, k, v, causal, scale)        # lse (B, H, S): base-2 log-sum-exp, fp32
    delta = ft.delta(o, do)
    dk, dv, config = ft.backward_dkdv(q, k, v, do, lse, delta, causal, scale)
    dq, config = ft.backward_dq(q, k, v, do, lse, delta, causal, scale)
    ft.describe(config)                                        # "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"
    o, text = ft.decode(q, k_cache, v_cache, causal, scale)    # split-KV decode, forward only
    o, text = ft.decode(q, k, v, causal, scale, ft.Features(tree_bits=bits))  # a Medusa tree's mask

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

Layouts: q is (B, H, Sq, D); k and v are (B, Hkv, Sk, D) with Hkv dividing H
(grouped-query attention, query head h reads kv head h // (H // Hkv)). Any
strides with a unit last stride are accepted, so both contiguous tensors and
`x.transpose(1, 2)` views of (B, S, H, D) tensors run without a copy. Sequence
tails are masked inside the kernels; nothing is padded.

Serving shapes (`Features`): Sq != Sk with causal aligned bottom-right (query
row r sits at key position r + Sk - Sq, an offset every kernel takes); a
sliding window, tanh soft-capping and ALiBi computed inside the kernels
behind constexpr flags, so that the unmasked kernels are the same code; with
a window the programs visit only the key (or query) blocks that some row of
theirs sees, so the work scales with the window. Each kernel walks its blocks
in three bands: masked at the window's trailing edge, unmasked, masked at the
causal diagonal and the tail. Varlen: sequences packed along the sequence
axis of batch-1 tensors, cu_seqlens giving each one's rows; programs past a
sequence's length return at once.

RoPE (`Features.rope_cos`, ROPE constexpr): q and k arrive unrotated, and
each tile is rotated as it is loaded, its pairs' two members read by
pointer as two (rows, D/2) halves, cos and sin from a (positions, D/2)
table (built once in float64, so exact at any offset; computing them would
put two MUFU ops per element beside the softmax's exp2, on the same unit).
The halves go to tl.dot as they are (q·k = q1·k1 + q2·k2), so nothing is
interleaved back; dQ and dK, taken w.r.t. the rotated q and k, are rotated
by −θ before they are stored. With ROPE off the kernels compile as before.

`decode` is Flash-Decoding (Dao, Haziza, Massa, Sizov 2023): for a few
queries against a long cache the keys are split across programs, each
writing a partial output and its log-sum-exp, which a second kernel merges.
One program holds the queries of all the heads that share a kv head, so each
K/V byte is read once; the cache may be paged (a block table of pages). A
tree mask (Features.tree_bits: one int64 of bits per query, over the
queries' own slots) lets it verify a speculative tree such as Medusa's, whose
nodes see the whole prefix and, among themselves, their ancestors only.

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
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from impls.attention import ahead

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

# The mask flags are part of the key: a window or ALiBi changes which blocks a
# program visits and what each costs.
_AUTOTUNE_KEY = ["S_BUCKET", "HEAD_DIM", "CAUSAL", "USE_TMA", "WINDOW", "SOFTCAP", "ALIBI", "VARLEN"]
# (the autotuner adds the tensors' dtypes)
_AUTOTUNE_DISK = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_SCALARS = ["H", "GROUP", "SQ", "SK", "S_BUCKET", "window", "rope_offset"]  # one compiled kernel serves every value

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
def _pair_cols(HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GPTJ: tl.constexpr):
    """(i, c1, c2): pair i of RoPE's rotation joins columns c1[i] and c2[i], i < HEAD_DIM / 2
    (i padded to D_PAD / 2): gptj pairs (2i, 2i + 1), neox (i, i + HEAD_DIM / 2)."""
    i = tl.arange(0, D_PAD // 2)
    if GPTJ:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + HEAD_DIM // 2
    return i, c1, c2


@triton.jit
def _rope_rows(base, row0, S, stride_s, pos0, COS, SIN, sign, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, BOUNDS: tl.constexpr, GPTJ: tl.constexpr):
    """Rows row0 .. row0 + ROWS of one head's (S, HEAD_DIM) matrix rotated by RoPE, as the pairs'
    two members: (y1, y2), each (ROWS, D_PAD / 2) in the matrix's dtype, row r at position pos0 + r.

    y1 = x1 cos − x2 sin, y2 = x2 cos + x1 sin, in fp32, with sin times `sign`
    (−1: the inverse rotation). cos and sin come from the (positions, HEAD_DIM / 2)
    tables COS and SIN. Rows past S and padded pairs read as 0. A dot product
    over the head dim is the sum of the two halves' (q·k = q1·k1 + q2·k2 for any
    split of the dimensions), so the halves go to tl.dot as they are and are
    never interleaved back.
    """
    i, c1, c2 = _pair_cols(HEAD_DIM, D_PAD, GPTJ)
    rows = row0 + tl.arange(0, ROWS)
    ptrs = base + rows[:, None] * stride_s
    tab = (pos0 + rows).to(tl.int64)[:, None] * (HEAD_DIM // 2) + i[None, :]
    if BOUNDS or HEAD_DIM != D_PAD:
        inside = (rows[:, None] < S) & (i[None, :] < HEAD_DIM // 2)
        x1 = tl.load(ptrs + c1[None, :], mask=inside, other=0.0)
        x2 = tl.load(ptrs + c2[None, :], mask=inside, other=0.0)
        cos = tl.load(COS + tab, mask=inside, other=0.0).to(tl.float32)
        sin = tl.load(SIN + tab, mask=inside, other=0.0).to(tl.float32) * sign
    else:
        x1 = tl.load(ptrs + c1[None, :])
        x2 = tl.load(ptrs + c2[None, :])
        cos = tl.load(COS + tab).to(tl.float32)
        sin = tl.load(SIN + tab).to(tl.float32) * sign
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)


@triton.jit
def _resident_rows(base, row0, S, stride_s, pos0, COS, SIN, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, ROPE: tl.constexpr, GPTJ: tl.constexpr):
    """A backward program's resident block (its K rows for dK/dV, its Q rows for dQ) and the zeroed
    fp32 gradient that accumulates against it: with ROPE, rotated and as the pairs' two halves
    (x, x2, g, g2), each (ROWS, D_PAD / 2); without, (x, 0, g, 0) over the whole head dim."""
    if ROPE:
        x, x2 = _rope_rows(base, row0, S, stride_s, pos0, COS, SIN, 1.0, ROWS, HEAD_DIM, D_PAD, True, GPTJ)
        return x, x2, tl.zeros([ROWS, D_PAD // 2], tl.float32), tl.zeros([ROWS, D_PAD // 2], tl.float32)
    else:
        x = _load_rows(base, row0, S, stride_s, ROWS, HEAD_DIM, D_PAD, True, False)
        return x, 0.0, tl.zeros([ROWS, D_PAD], tl.float32), 0.0


@triton.jit
def _store_rope_rows(base, y1, y2, row0, S, stride_s, pos0, COS, SIN, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     D_PAD: tl.constexpr, GPTJ: tl.constexpr):
    """Store the pairs (y1, y2) of rows row0 .. (fp32, (ROWS, D_PAD / 2) each) rotated back
    by −θ (row r at position pos0 + r): a gradient w.r.t. rotated rows becomes one w.r.t.
    the rows before rotation, as R(θ)^T = R(−θ)."""
    i, c1, c2 = _pair_cols(HEAD_DIM, D_PAD, GPTJ)
    rows = row0 + tl.arange(0, ROWS)
    inside = (rows[:, None] < S) & (i[None, :] < HEAD_DIM // 2)
    tab = (pos0 + rows).to(tl.int64)[:, None] * (HEAD_DIM // 2) + i[None, :]
    cos = tl.load(COS + tab, mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(SIN + tab, mask=inside, other=0.0).to(tl.float32)
    ptrs = base + rows[:, None] * stride_s
    tl.store(ptrs + c1[None, :], (y1 * cos + y2 * sin).to(base.dtype.element_ty), mask=inside)
    tl.store(ptrs + c2[None, :], (y2 * cos - y1 * sin).to(base.dtype.element_ty), mask=inside)


@triton.jit
def _seq(b, SQ, SK, CU_Q, CU_K, VARLEN: tl.constexpr):
    """(q0, SQ, k0, SK) of sequence b: the row of its first query and key in the
    (packed) tensors, and its lengths. Without VARLEN every sequence starts at row 0."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        SQ = tl.load(CU_Q + b + 1) - q_start
        SK = tl.load(CU_K + b + 1) - k_start
        q0 = q_start.to(tl.int64)
        k0 = k_start.to(tl.int64)
    else:
        q0 = 0
        k0 = 0
    return q0, SQ, k0, SK


@triton.jit
def _key_range(p0, p1, lo0, hi0, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks within [lo0, hi0) that query positions p0 .. p1 see, in three bands:
    [lo, full_lo) masked (the window's trailing edge), [full_lo, full_hi) seen
    by every row (no mask), [full_hi, hi) masked (the causal diagonal, the
    sequence tail). lo0 is a multiple of BLOCK_N; so are lo, full_lo and full_hi."""
    if WINDOW:
        # Query i sees keys i - window < j.
        lo = tl.maximum(lo0, (tl.maximum(p0 - window + 1, 0) // BLOCK_N) * BLOCK_N)
        full_lo = tl.cdiv(tl.maximum(p1 - window + 1, 0), BLOCK_N) * BLOCK_N
    else:
        lo = lo0
        full_lo = lo0
    if CAUSAL:
        # Query i sees keys j <= i.
        hi = tl.maximum(tl.minimum(p1 + 1, hi0), 0)
        full_hi = (tl.maximum(tl.minimum(p0 + 1, hi0), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = hi0
        full_hi = (hi0 // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(n0, n1, OFF, SQ, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query blocks that see keys n0 .. n1 (query row r sits at position r + OFF),
    in three bands: [lo, full_lo) masked (the causal diagonal), [full_lo,
    full_hi) seeing every key (no mask), [full_hi, hi) masked (the window's
    leading edge, the sequence tail)."""
    if CAUSAL:
        lo = (tl.minimum(tl.maximum(n0 - OFF, 0), SQ) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n1 - OFF, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    if WINDOW:
        hi = tl.minimum(tl.maximum(n1 + window - OFF, 0), SQ)
        full_hi = (tl.minimum(tl.maximum(n0 + window - OFF, 0), SQ) // BLOCK_M) * BLOCK_M
    else:
        hi = SQ
        full_hi = (SQ // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _logits(qk, qpos, kpos, qk_scale, cap_in, cap_out, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Base-2 logits of the raw products qk = q·k: (scores, t).

    scores = X·tanh(qk·scale / X)·log2(e) with soft-capping (cap_in =
    2·log2(e)·scale / X, cap_out = X·log2(e)), else qk·scale·log2(e); plus
    ALiBi's slope·log2(e)·(key position − query position). t = tanh(qk·scale / X),
    whose derivative 1 − t² the backward applies (t = qk without soft-capping).
    qpos and kpos broadcast to qk's shape; slope2 is a scalar or broadcasts too.
    """
    if SOFTCAP:
        # tanh(x) = 1 − 2 / (e^{2x} + 1): exact at both tails (e^{2x} -> 0 or inf).
        t = 1.0 - 2.0 / (tl.exp2(qk * cap_in) + 1.0)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        s = s + slope2 * (kpos - qpos).to(tl.float32)
    return s, t


@triton.jit
def _keep(qpos, kpos, SK, window, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """Which (query, key) pairs are visible: keys inside the sequence, at or left
    of the query when CAUSAL_MASK, within `window` of it when WINDOW_MASK."""
    keep = kpos < SK
    if CAUSAL_MASK:
        keep = keep & (kpos <= qpos)
    if WINDOW_MASK:
        keep = keep & (qpos - kpos < window)
    return keep


@triton.jit
def _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, S, rows, lo, hi, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
                 WARP_SPEC: tl.constexpr = False, qoff=0, window=0, cap_in=1.0, cap_out=1.0, slope2=0.0,
                 WINDOW_MASK: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
                 GUARD: tl.constexpr = False, q2=0.0, kpos0=0, COS=0, SIN=0, ROPE: tl.constexpr = False,
                 GPTJ: tl.constexpr = False):
    """Online softmax over key blocks lo .. hi for one resident Q block.

    acc (BLOCK_M, D_PAD) is the unnormalised output, m_i the running row max of
    the base-2 logits, l_i the running row sum of exp2(logit - m_i).
    S is the key length; query row r sits at key position r + qoff (causal
    attention aligned bottom-right). BOUNDS masks keys past S, CAUSAL_MASK and
    WINDOW_MASK the keys right of a query and those a window behind it.
    GUARD keeps a row that has seen no key yet at max -inf without NaNs (its
    p is 0), for bands where such rows exist (the window's edge, varlen).
    WARP_SPEC asks Triton to split the loop into producer and consumer warps
    (its automatic warp specialization; on Hopper only with TMA loads).
    ROPE: q and q2 are the resident block's rotated pair halves (_rope_rows),
    and each key block is rotated as it is loaded, key j at position kpos0 + j.
    """
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if ROPE:
            k, k2 = _rope_rows(k_src, start_n, S, stride_ks, kpos0, COS, SIN, 1.0, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS,
                               GPTJ)  # (BLOCK_N, D_PAD / 2) each
            qk = _dot(q2, tl.trans(k2), _dot(q, tl.trans(k), None))
        else:
            k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
            qk = _dot(q, tl.trans(k), None)  # (BLOCK_M, BLOCK_N), fp32
        if CAUSAL_MASK or BOUNDS or WINDOW_MASK or SOFTCAP or ALIBI:
            cols = start_n + tl.arange(0, BLOCK_N)
            qpos = rows[:, None] + qoff
            s, _ = _logits(qk, qpos, cols[None, :], qk_scale, cap_in, cap_out, slope2, SOFTCAP, ALIBI)
            if CAUSAL_MASK or BOUNDS or WINDOW_MASK:
                s = tl.where(_keep(qpos, cols[None, :], S, window, CAUSAL_MASK, WINDOW_MASK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if GUARD:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = tl.exp2(s - m_use[:, None])
        else:
            # Unmasked blocks: the scale is folded into the exponent's one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_use)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _fwd_kernel(Q, K, V, O, LSE, SLOPES, CU_Q, CU_K, COS, SIN,
                stride_qb, stride_qh, stride_qs,
                stride_kb, stride_kh, stride_ks,
                stride_vb, stride_vh, stride_vs,
                stride_ob, stride_oh, stride_os,
                stride_lb, stride_lh,
                H, GROUP, SQ, SK, S_BUCKET, qk_scale, window, cap_in, cap_out, rope_offset,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                ROPE: tl.constexpr, GPTJ: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr = False):
    # grid: (cdiv(SQ, BLOCK_M), B * H); one program owns query rows start_m .. start_m + BLOCK_M of one head.
    # Query row r sits at key position r + SK - SQ (bottom-right aligned). With
    # VARLEN, B counts the sequences, SQ and SK are the longest ones, and each
    # sequence's rows start at cu_seqlens[b] in tensors of batch 1. With ROPE,
    # q and k arrive unrotated and each tile is rotated as it is loaded, key j
    # at position rope_offset + j (query r at rope_offset + r + SK - SQ).
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the causal diagonal starts on a K block boundary
    tl.static_assert(not (ROPE and USE_TMA))  # the rotation reads pairs by pointer
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # grouped-query attention: this head's K/V head
    q0, SQ, k0, SK = _seq(b, SQ, SK, CU_Q, CU_K, VARLEN)
    n_m = tl.cdiv(SQ, BLOCK_M)
    if CAUSAL:
        # Heaviest (last) row blocks first, so the short ones fill the tail of the grid.
        start_m = (n_m - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    if VARLEN:
        if (start_m < 0) | (start_m >= SQ):
            return  # past this sequence's rows
    b = b.to(tl.int64)
    OFF = SK - SQ
    if ALIBI:
        slope2 = tl.load(SLOPES + h)
    else:
        slope2 = 0.0

    q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qs
    k_src = _make_desc(K + b * stride_kb + hk * stride_kh + k0 * stride_ks, SK, stride_ks, BLOCK_N, D_PAD, USE_TMA)
    v_src = _make_desc(V + b * stride_vb + hk * stride_vh + k0 * stride_vs, SK, stride_vs, BLOCK_N, D_PAD, USE_TMA)
    q_src = _make_desc(q_base, SQ, stride_qs, BLOCK_M, D_PAD, USE_TMA)

    rows = start_m + tl.arange(0, BLOCK_M)
    if ROPE:
        q, q2 = _rope_rows(q_base, start_m, SQ, stride_qs, rope_offset + OFF, COS, SIN, 1.0, BLOCK_M, HEAD_DIM, D_PAD,
                           True, GPTJ)  # (BLOCK_M, D_PAD / 2) each
    else:
        q = _load_rows(q_src, start_m, SQ, stride_qs, BLOCK_M, HEAD_DIM, D_PAD, True, USE_TMA)  # (BLOCK_M, D_PAD)
        q2 = 0.0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(start_m + OFF, start_m + BLOCK_M - 1 + OFF, 0, SK, window,
                                          CAUSAL, WINDOW, BLOCK_N)
    if WINDOW:
        # The window's trailing edge: rows may see none of its first blocks.
        acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, SK, rows,
                                     lo, full_lo, qk_scale,
                                     BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, True, USE_TMA, False,
                                     OFF, window, cap_in, cap_out, slope2, True, SOFTCAP, ALIBI, True,
                                     q2, rope_offset, COS, SIN, ROPE, GPTJ)
    # Key blocks every row sees whole.
    acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, SK, rows,
                                 full_lo, full_hi, qk_scale,
                                 BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA, WARP_SPEC,
                                 OFF, window, cap_in, cap_out, slope2, False, SOFTCAP, ALIBI, False,
                                 q2, rope_offset, COS, SIN, ROPE, GPTJ)
    # The causal diagonal band and the sequence tail. Without a window or
    # varlen, every row sees a key left of the band or the band's first key,
    # so no row's max stays -inf.
    acc, m_i, l_i = _fwd_kv_loop(acc, m_i, l_i, q, k_src, v_src, stride_ks, stride_vs, SK, rows,
                                 full_hi, hi, qk_scale,
                                 BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, True, USE_TMA, False,
                                 OFF, window, cap_in, cap_out, slope2, False, SOFTCAP, ALIBI, WINDOW or VARLEN,
                                 q2, rope_offset, COS, SIN, ROPE, GPTJ)

    if WINDOW or VARLEN:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that sees no key (varlen causal, kv shorter) is 0
    acc = acc / l_i[:, None]
    # Base-2 log-sum-exp of the scaled logits: the backward's P is exp2(logit - lse).
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + rows, m_i + tl.log2(l_i), mask=rows < SQ)
    _store_rows(O + b * stride_ob + h * stride_oh + q0 * stride_os, acc, start_m, SQ, stride_os,
                BLOCK_M, HEAD_DIM, D_PAD)


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
                 CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
                 qoff=0, SK=0, window=0, cap_in=1.0, cap_out=1.0, slope2=0.0,
                 WINDOW_MASK: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
                 k2=0.0, dk2=0.0, qpos0=0, COS=0, SIN=0, ROPE: tl.constexpr = False, GPTJ: tl.constexpr = False):
    """Accumulate dK, dV of one resident K/V block (rows `cols`) over query blocks lo .. hi.

    Works on transposed tiles (keys down, queries across) so that both
    accumulations are plain (BLOCK_N, BLOCK_M) x (BLOCK_M, D) products. S is
    the query length, query row r sits at key position r + qoff. Query rows
    past S read as q = dO = 0 with lse = delta = 0, which makes their dS and
    dO rows zero: they add nothing (with ALiBi their P is zeroed too, as
    exp2 of the bias alone could overflow).
    ROPE: k, k2 and dk, dk2 are the resident block's rotated pair halves and
    their gradients; each query block is rotated as it is loaded, query row r
    at position qpos0 + r.
    """
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        if ROPE:
            q, q2 = _rope_rows(q_src, start_m, S, stride_qs, qpos0, COS, SIN, 1.0, BLOCK_M, HEAD_DIM, D_PAD, BOUNDS,
                               GPTJ)  # (BLOCK_M, D_PAD / 2) each
        else:
            q = _load_rows(q_src, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_M, D_PAD)
        if BOUNDS:
            lse = tl.load(lse_ptr + rows, mask=rows < S, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
        if ROPE:
            qkT = _dot(k2, tl.trans(q2), _dot(k, tl.trans(q), None))
        else:
            qkT = _dot(k, tl.trans(q), None)  # (BLOCK_N, BLOCK_M)
        if SOFTCAP or ALIBI:
            qpos = rows[None, :] + qoff
            sT, tT = _logits(qkT, qpos, cols[:, None], qk_scale, cap_in, cap_out, slope2, SOFTCAP, ALIBI)
            pT = tl.exp2(sT - lse[None, :])
        else:
            pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if CAUSAL_MASK or WINDOW_MASK:
            pT = tl.where(_keep(rows[None, :] + qoff, cols[:, None], SK, window, CAUSAL_MASK, WINDOW_MASK), pT, 0.0)
        if ALIBI and BOUNDS:
            pT = tl.where(rows[None, :] < S, pT, 0.0)
        do = _load_rows(do_src, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_M, D_PAD)
        dv = _dot(pT.to(do.dtype), do, dv)  # dV += P^T dO
        if BOUNDS:
            delta = tl.load(delta_ptr + rows, mask=rows < S, other=0.0)
        else:
            delta = tl.load(delta_ptr + rows)
        dpT = _dot(v, tl.trans(do), None)  # (BLOCK_N, BLOCK_M): (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)  # d(X tanh(x / X)) / dx
        dk = _dot(dsT.to(q.dtype), q, dk)  # dK += dS^T Q (the softmax scale is applied once at the end)
        if ROPE:
            dk2 = _dot(dsT.to(q2.dtype), q2, dk2)
    return dk, dv, dk2


@triton.autotune(configs=DKDV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dkdv},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SLOPES, CU_Q, CU_K, COS, SIN,
                     stride_qb, stride_qh, stride_qs,
                     stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs,
                     stride_db, stride_dh, stride_ds,
                     stride_dkb, stride_dkh, stride_dks,
                     stride_dvb, stride_dvh, stride_dvs,
                     stride_lb, stride_lh,
                     H, GROUP, SQ, SK, S_BUCKET, qk_scale, sm_scale, window, cap_in, cap_out, rope_offset,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                     WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                     ROPE: tl.constexpr, GPTJ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(SK, BLOCK_N), B * Hkv); one program owns key rows start_n .. start_n + BLOCK_N of one kv
    # head and sums over the GROUP query heads that share it (no atomics needed). With ROPE the
    # gradients are taken w.r.t. the rotated k, and dK is rotated back before it is stored.
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the causal diagonal ends on a Q block boundary
    tl.static_assert(not (ROPE and USE_TMA))
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = bhk // Hkv
    hk = (bhk % Hkv).to(tl.int64)
    q0, SQ, k0, SK = _seq(b, SQ, SK, CU_Q, CU_K, VARLEN)
    if VARLEN:
        if start_n >= SK:
            return  # past this sequence's keys
    b = b.to(tl.int64)
    OFF = SK - SQ

    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_ks
    k, k2, dk, dk2 = _resident_rows(k_base, start_n, SK, stride_ks, rope_offset, COS, SIN, BLOCK_N, HEAD_DIM, D_PAD,
                                    ROPE, GPTJ)
    v = _load_rows(V + b * stride_vb + hk * stride_vh + k0 * stride_vs, start_n, SK, stride_vs,
                   BLOCK_N, HEAD_DIM, D_PAD, True, False)
    cols = start_n + tl.arange(0, BLOCK_N)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    lo, full_lo, full_hi, hi = _query_range(start_n, start_n + BLOCK_N - 1, OFF, SQ, window, CAUSAL, WINDOW, BLOCK_M)

    for g in range(GROUP):
        h = hk * GROUP + g
        if ALIBI:
            slope2 = tl.load(SLOPES + h)
        else:
            slope2 = 0.0
        q_src = _make_desc(Q + b * stride_qb + h * stride_qh + q0 * stride_qs, SQ, stride_qs, BLOCK_M, D_PAD, USE_TMA)
        do_src = _make_desc(DO + b * stride_db + h * stride_dh + q0 * stride_ds, SQ, stride_ds, BLOCK_M, D_PAD,
                            USE_TMA)
        lse_ptr = LSE + b * stride_lb + h * stride_lh + q0
        delta_ptr = DELTA + b * stride_lb + h * stride_lh + q0
        # Query blocks crossing the causal diagonal (and the window's far edge): masked.
        # Rows above them see none of these keys and are skipped.
        dk, dv, dk2 = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, SQ,
                                   cols, lo, full_lo, qk_scale,
                                   BLOCK_M, HEAD_DIM, D_PAD, CAUSAL, True, USE_TMA,
                                   OFF, SK, window, cap_in, cap_out, slope2, WINDOW, SOFTCAP, ALIBI,
                                   k2, dk2, rope_offset + OFF, COS, SIN, ROPE, GPTJ)
        # Whole query blocks that see every key of the block: no mask.
        dk, dv, dk2 = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, SQ,
                                   cols, full_lo, full_hi, qk_scale,
                                   BLOCK_M, HEAD_DIM, D_PAD, False, False, USE_TMA,
                                   OFF, SK, window, cap_in, cap_out, slope2, False, SOFTCAP, ALIBI,
                                   k2, dk2, rope_offset + OFF, COS, SIN, ROPE, GPTJ)
        # The window's leading edge, and the last, partial query block.
        dk, dv, dk2 = _dkdv_q_loop(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_ds, SQ,
                                   cols, full_hi, hi, qk_scale,
                                   BLOCK_M, HEAD_DIM, D_PAD, False, True, USE_TMA,
                                   OFF, SK, window, cap_in, cap_out, slope2, WINDOW, SOFTCAP, ALIBI,
                                   k2, dk2, rope_offset + OFF, COS, SIN, ROPE, GPTJ)

    dk_base = DK + b * stride_dkb + hk * stride_dkh + k0 * stride_dks
    if ROPE:
        _store_rope_rows(dk_base, dk * sm_scale, dk2 * sm_scale, start_n, SK, stride_dks, rope_offset, COS, SIN,
                         BLOCK_N, HEAD_DIM, D_PAD, GPTJ)
    else:
        _store_rows(dk_base, dk * sm_scale, start_n, SK, stride_dks, BLOCK_N, HEAD_DIM, D_PAD)
    _store_rows(DV + b * stride_dvb + hk * stride_dvh + k0 * stride_dvs, dv, start_n, SK, stride_dvs,
                BLOCK_N, HEAD_DIM, D_PAD)


@triton.jit
def _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, S, rows, lo, hi, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
                qoff=0, window=0, cap_in=1.0, cap_out=1.0, slope2=0.0,
                WINDOW_MASK: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
                q2=0.0, dq2=0.0, kpos0=0, COS=0, SIN=0, ROPE: tl.constexpr = False, GPTJ: tl.constexpr = False):
    """Accumulate dQ of one resident Q block over key blocks lo .. hi (S the key length).
    ROPE: q, q2 and dq, dq2 are the block's rotated pair halves and their
    gradients; each key block is rotated as it is loaded, key j at position kpos0 + j."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if ROPE:
            k, k2 = _rope_rows(k_src, start_n, S, stride_ks, kpos0, COS, SIN, 1.0, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS,
                               GPTJ)  # (BLOCK_N, D_PAD / 2) each
        else:
            k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, D_PAD, BOUNDS, USE_TMA)  # (BLOCK_N, D_PAD)
        if ROPE:
            qk = _dot(q2, tl.trans(k2), _dot(q, tl.trans(k), None))
        else:
            qk = _dot(q, tl.trans(k), None)  # (BLOCK_M, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        if SOFTCAP or ALIBI:
            s, t = _logits(qk, rows[:, None] + qoff, cols[None, :], qk_scale, cap_in, cap_out, slope2,
                           SOFTCAP, ALIBI)
            p = tl.exp2(s - lse[:, None])
        else:
            p = tl.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL_MASK or BOUNDS or WINDOW_MASK:
            # Keys past S read as 0, but exp2(0 - lse) need not be small: zero them.
            p = tl.where(_keep(rows[:, None] + qoff, cols[None, :], S, window, CAUSAL_MASK, WINDOW_MASK), p, 0.0)
        dp = _dot(do, tl.trans(v), None)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d(X tanh(x / X)) / dx
        dq = _dot(ds.to(k.dtype), k, dq)  # dQ += dS K
        if ROPE:
            dq2 = _dot(ds.to(k2.dtype), k2, dq2)
    return dq, dq2


@triton.autotune(configs=DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_dq},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=_SCALARS)
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SLOPES, CU_Q, CU_K, COS, SIN,
                   stride_qb, stride_qh, stride_qs,
                   stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs,
                   stride_db, stride_dh, stride_ds,
                   stride_dqb, stride_dqh, stride_dqs,
                   stride_lb, stride_lh,
                   H, GROUP, SQ, SK, S_BUCKET, qk_scale, sm_scale, window, cap_in, cap_out, rope_offset,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                   WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                   ROPE: tl.constexpr, GPTJ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(SQ, BLOCK_M), B * H); one program owns query rows start_m .. start_m + BLOCK_M of one head.
    # With ROPE, dQ is taken w.r.t. the rotated q and rotated back before it is stored.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(not (ROPE and USE_TMA))
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    q0, SQ, k0, SK = _seq(b, SQ, SK, CU_Q, CU_K, VARLEN)
    n_m = tl.cdiv(SQ, BLOCK_M)
    if CAUSAL:
        start_m = (n_m - 1 - tl.program_id(0)) * BLOCK_M  # heaviest first, as in the forward
    else:
        start_m = tl.program_id(0) * BLOCK_M
    if VARLEN:
        if (start_m < 0) | (start_m >= SQ):
            return  # past this sequence's rows
    b = b.to(tl.int64)
    OFF = SK - SQ
    if ALIBI:
        slope2 = tl.load(SLOPES + h)
    else:
        slope2 = 0.0

    rows = start_m + tl.arange(0, BLOCK_M)
    q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qs
    q, q2, dq, dq2 = _resident_rows(q_base, start_m, SQ, stride_qs, rope_offset + OFF, COS, SIN, BLOCK_M, HEAD_DIM,
                                    D_PAD, ROPE, GPTJ)
    do = _load_rows(DO + b * stride_db + h * stride_dh + q0 * stride_ds, start_m, SQ, stride_ds,
                    BLOCK_M, HEAD_DIM, D_PAD, True, False)
    lse_ptr = LSE + b * stride_lb + h * stride_lh + q0 + rows
    delta_ptr = DELTA + b * stride_lb + h * stride_lh + q0 + rows
    lse = tl.load(lse_ptr, mask=rows < SQ, other=0.0)
    delta = tl.load(delta_ptr, mask=rows < SQ, other=0.0)
    k_src = _make_desc(K + b * stride_kb + hk * stride_kh + k0 * stride_ks, SK, stride_ks, BLOCK_N, D_PAD, USE_TMA)
    v_src = _make_desc(V + b * stride_vb + hk * stride_vh + k0 * stride_vs, SK, stride_vs, BLOCK_N, D_PAD, USE_TMA)

    lo, full_lo, full_hi, hi = _key_range(start_m + OFF, start_m + BLOCK_M - 1 + OFF, 0, SK, window,
                                          CAUSAL, WINDOW, BLOCK_N)
    if WINDOW:
        dq, dq2 = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, SK, rows,
                              lo, full_lo, qk_scale,
                              BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, True, USE_TMA,
                              OFF, window, cap_in, cap_out, slope2, True, SOFTCAP, ALIBI,
                              q2, dq2, rope_offset, COS, SIN, ROPE, GPTJ)
    dq, dq2 = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, SK, rows,
                          full_lo, full_hi, qk_scale,
                          BLOCK_N, HEAD_DIM, D_PAD, False, False, USE_TMA,
                          OFF, window, cap_in, cap_out, slope2, False, SOFTCAP, ALIBI,
                          q2, dq2, rope_offset, COS, SIN, ROPE, GPTJ)
    dq, dq2 = _dq_kv_loop(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, SK, rows,
                          full_hi, hi, qk_scale,
                          BLOCK_N, HEAD_DIM, D_PAD, CAUSAL, True, USE_TMA,
                          OFF, window, cap_in, cap_out, slope2, False, SOFTCAP, ALIBI,
                          q2, dq2, rope_offset, COS, SIN, ROPE, GPTJ)

    dq_base = DQ + b * stride_dqb + h * stride_dqh + q0 * stride_dqs
    if ROPE:
        _store_rope_rows(dq_base, dq * sm_scale, dq2 * sm_scale, start_m, SQ, stride_dqs, rope_offset + OFF, COS, SIN,
                         BLOCK_M, HEAD_DIM, D_PAD, GPTJ)
    else:
        _store_rows(dq_base, dq * sm_scale, start_m, SQ, stride_dqs, BLOCK_M, HEAD_DIM, D_PAD)


# --------------------------------------------------------------------------
# Split-KV decode (Flash-Decoding)
# --------------------------------------------------------------------------

if INTERPRET:
    DECODE_CONFIGS = [_cfg(4, 1, BLOCK_N=16)]
else:
    # Memory-bound at few rows: enough K/V bytes in flight per SM to cover
    # the memory latency, from deep pipelines of 64- or 128-key tiles (one
    # program per SM) or shallower ones with two programs per SM. At 128
    # rows (q_len 64 with groups of 4) the products count too: 8 warps, two
    # wgmma warpgroups, as the forward's configs.
    DECODE_CONFIGS = [
        _cfg(4, 3, BLOCK_N=64),
        _cfg(4, 4, BLOCK_N=64),
        _cfg(4, 6, BLOCK_N=64),
        _cfg(4, 3, BLOCK_N=128),
        _cfg(4, 4, BLOCK_N=128),
        _cfg(8, 3, BLOCK_N=64),
        _cfg(8, 3, BLOCK_N=128),
        _cfg(8, 2, BLOCK_N=128),
    ]
# A split covers a whole number of the largest key tiles.
SPLIT_ALIGN = max(c.kwargs["BLOCK_N"] for c in DECODE_CONFIGS)
DECODE_MAX_Q = 64  # query rows up to which attention() takes the decode kernel
_DECODE_KEY = ["BLOCK_R", "SPLIT_BUCKET", "HEAD_DIM", "CAUSAL", "PAGED", "WINDOW", "SOFTCAP", "ALIBI", "TREE"]
TREE_MAX_Q = 64  # a tree mask holds one bit per query slot in an int64


def _prune_decode(configs, named_args, **kwargs):
    # As _prune: tiles that fit shared memory with one buffer fewer than
    # num_stages, and an accumulator of at most 128 registers a thread.
    args = {**named_args, **kwargs}
    elem_bytes, d_pad, rows = args["K"].element_size(), _pad_dim(args["HEAD_DIM"]), args["BLOCK_R"]

    def fits(c):
        smem = (rows + (c.num_stages - 1) * 2 * c.kwargs["BLOCK_N"]) * d_pad * elem_bytes
        return rows * d_pad <= 128 * 32 * c.num_warps and smem <= SMEM_LIMIT

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.num_stages)]


@triton.jit
def _load_kv(base, bt_row, rows, SK, stride_page, stride_s, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BOUNDS: tl.constexpr):
    """Key (or value) rows `rows` of one kv head as a (len(rows), D_PAD) tile; rows past SK read as 0.

    Dense: row j at base + j * stride_s. Paged: row j in page
    block_table[j // PAGE_SIZE], at its row j % PAGE_SIZE (base + page * stride_page + ...).
    """
    cols = tl.arange(0, D_PAD)
    if PAGED:
        if BOUNDS:
            page = tl.load(bt_row + rows // PAGE_SIZE, mask=rows < SK, other=0)
        else:
            page = tl.load(bt_row + rows // PAGE_SIZE)
        offs = page.to(tl.int64) * stride_page + (rows % PAGE_SIZE) * stride_s
    else:
        offs = rows * stride_s
    ptrs = base + offs[:, None] + cols[None, :]
    if BOUNDS or HEAD_DIM != D_PAD:
        tile = tl.load(ptrs, mask=(rows[:, None] < SK) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _decode_kv_loop(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kp, stride_ks, stride_vp, stride_vs, SK, qpos,
                    lo, hi, qk_scale, window, cap_in, cap_out, slope2, bits, tree0,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr,
                    WINDOW_MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, TREE_MASK: tl.constexpr):
    """Online softmax of the packed query rows (positions qpos) over key blocks lo .. hi, as _fwd_kv_loop.
    Rows that have seen no key yet (padding rows, an empty split) keep max -inf without NaNs.
    TREE_MASK: a row sees key tree0 + j only if bit j of its bits (BLOCK_R,) int64 is set; keys before tree0 all."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(k_base, bt_row, cols, SK, stride_kp, stride_ks, PAGE_SIZE, PAGED, HEAD_DIM, D_PAD, BOUNDS)
        qk = _dot(q, tl.trans(k), None)  # (BLOCK_R, BLOCK_N)
        if CAUSAL_MASK or BOUNDS or WINDOW_MASK or SOFTCAP or ALIBI or TREE_MASK:
            s, _ = _logits(qk, qpos[:, None], cols[None, :], qk_scale, cap_in, cap_out, slope2, SOFTCAP, ALIBI)
            if CAUSAL_MASK or BOUNDS or WINDOW_MASK or TREE_MASK:
                keep = _keep(qpos[:, None], cols[None, :], SK, window, CAUSAL_MASK, WINDOW_MASK)
                if TREE_MASK:
                    # The shift stays in 0..63; keys past the tree's last slot are past SK, masked above.
                    j = (cols - tree0)[None, :]  # (1, BLOCK_N)
                    bit = (bits[:, None] >> tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)) & 1
                    keep = keep & ((j < 0) | (bit != 0))
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            # Unmasked blocks: every row sees every key (padding rows' q is 0),
            # so the max is finite and the scale folds into one FMA, as in _fwd_kv_loop.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_base, bt_row, cols, SK, stride_vp, stride_vs, PAGE_SIZE, PAGED, HEAD_DIM, D_PAD, BOUNDS)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=DECODE_CONFIGS, key=_DECODE_KEY, prune_configs_by={"early_config_prune": _prune_decode},
                 **_AUTOTUNE_DISK)
@triton.jit(do_not_specialize=["H", "GROUP", "SQ", "SK", "split_len", "SPLIT_BUCKET", "window"])
def _decode_kernel(Q, K, V, O, O_PART, LSE_PART, SEQLENS, BLOCK_TABLE, SLOPES, TREE_BITS,
                   stride_qb, stride_qh, stride_qs,
                   stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs,
                   stride_ob, stride_oh, stride_os,
                   stride_bt, stride_tb,
                   H, GROUP, SQ, SK, split_len, SPLIT_BUCKET, qk_scale, window, cap_in, cap_out,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, TREE: tl.constexpr, PAGED: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, SEQLENS_GIVEN: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (splits, B * Hkv, cdiv(GROUP * SQ, BLOCK_R)). One program takes the
    # keys split * split_len .. + split_len of one kv head for BLOCK_R query
    # rows of the GROUP heads that share it, packed as row r = s * GROUP + g
    # (query s of head hk * GROUP + g): each K/V tile is read once for all of
    # them. Dense K/V are (B, Hkv, SK, D) (strides b, h, s); paged ones
    # (pages, PAGE_SIZE, Hkv, D), given as strides (page, h, row in page).
    # With SPLIT it writes its normalised partial output and base-2 lse for
    # _decode_combine_kernel, else the output itself. With TREE, query s sees
    # key OFF + j (its own block of SQ slots) only if bit j of TREE_BITS[b, s]
    # is set, and every key before OFF (stride_tb 0: one mask for the batch).
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    if SEQLENS_GIVEN:
        SK = tl.load(SEQLENS + b)
    OFF = SK - SQ  # query s sits at key position s + OFF

    r0 = tl.program_id(2) * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    valid = r < GROUP * SQ
    s = r // GROUP
    h = hk * GROUP + (r % GROUP)  # (BLOCK_R,) query heads
    qpos = s + OFF
    d = tl.arange(0, D_PAD)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + s[:, None] * stride_qs + d[None, :],
                mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_R, D_PAD)
    if ALIBI:
        slope2 = tl.load(SLOPES + h, mask=valid, other=0.0)[:, None]
    else:
        slope2 = 0.0
    if TREE:
        bits = tl.load(TREE_BITS + b * stride_tb + s, mask=valid, other=0)  # (BLOCK_R,) int64
    else:
        bits = 0

    if PAGED:
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
        bt_row = BLOCK_TABLE + b * stride_bt
    else:
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        bt_row = BLOCK_TABLE
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], tl.float32)
    n0 = split * split_len
    n1 = tl.minimum(n0 + split_len, SK)
    p0 = OFF + r0 // GROUP
    p1 = OFF + tl.minimum((r0 + BLOCK_R - 1) // GROUP, SQ - 1)
    lo, full_lo, full_hi, hi = _key_range(p0, p1, n0, n1, window, CAUSAL, WINDOW, BLOCK_N)
    if TREE:
        # Every block from the one holding slot OFF (the tree's first) on joins
        # the last band, the one that applies the tree mask (and then the
        # window's, which may now reach into it); the other two end before it.
        tree_lo = tl.maximum(lo, (OFF // BLOCK_N) * BLOCK_N)
        full_lo = tl.minimum(full_lo, tree_lo)
        full_hi = tl.maximum(tl.minimum(full_hi, tree_lo), full_lo)
    if WINDOW:
        acc, m_i, l_i = _decode_kv_loop(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks,
                                        stride_vb, stride_vs, SK, qpos, lo, full_lo, qk_scale, window,
                                        cap_in, cap_out, slope2, bits, OFF, BLOCK_N, HEAD_DIM, D_PAD, PAGE_SIZE,
                                        PAGED, CAUSAL, True, True, SOFTCAP, ALIBI, False)
    acc, m_i, l_i = _decode_kv_loop(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks,
                                    stride_vb, stride_vs, SK, qpos, full_lo, full_hi, qk_scale, window,
                                    cap_in, cap_out, slope2, bits, OFF, BLOCK_N, HEAD_DIM, D_PAD, PAGE_SIZE, PAGED,
                                    False, False, False, SOFTCAP, ALIBI, False)
    acc, m_i, l_i = _decode_kv_loop(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks,
                                    stride_vb, stride_vs, SK, qpos, full_hi, hi, qk_scale, window,
                                    cap_in, cap_out, slope2, bits, OFF, BLOCK_N, HEAD_DIM, D_PAD, PAGE_SIZE, PAGED,
                                    CAUSAL, True, WINDOW and TREE, SOFTCAP, ALIBI, TREE)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # nothing seen (an empty split): output 0, lse -inf
    acc = acc / l_i[:, None]
    d_ok = d[None, :] < HEAD_DIM
    if SPLIT:
        splits = tl.num_programs(0)
        row = (b * H + h) * SQ + s  # (BLOCK_R,) rows of the (B, H, SQ) output
        tl.store(LSE_PART + row * splits + split, m_i + tl.log2(l_i), mask=valid)
        tl.store(O_PART + (row[:, None] * splits + split) * HEAD_DIM + d[None, :], acc, mask=valid[:, None] & d_ok)
    else:
        tl.store(O + b * stride_ob + h[:, None] * stride_oh + s[:, None] * stride_os + d[None, :],
                 acc.to(O.dtype.element_ty), mask=valid[:, None] & d_ok)


@triton.jit
def _decode_combine_kernel(O_PART, LSE_PART, O, stride_ob, stride_oh, stride_os, H, SQ, SPLITS,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # grid: (B * H * SQ,). out = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m): the
    # splits' outputs weighted by their share of the softmax denominator.
    row = tl.program_id(0).to(tl.int64)
    s = row % SQ
    h = (row // SQ) % H
    b = row // (SQ * H)
    i = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(LSE_PART + row * SPLITS + i, mask=i < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # (SPLITS_PAD,)
    o = tl.load(O_PART + (row * SPLITS + i[:, None]) * HEAD_DIM + d[None, :],
                mask=(i[:, None] < SPLITS) & (d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + s * stride_os + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

# The autotuned kernels by name, for the shipped choices (impls/attention/tuning.py).
AUTOTUNED = {"_fwd_kernel": _fwd_kernel, "_bwd_dkdv_kernel": _bwd_dkdv_kernel, "_bwd_dq_kernel": _bwd_dq_kernel,
             "_decode_kernel": _decode_kernel}


@dataclass(frozen=True, eq=False)
class Features:
    """The kernels' optional inputs beyond causal: masks and variable lengths.

    window: query i sees keys i - window < j (bottom-right positions);
    softcap: scores X·tanh(scores / X); slopes: ALiBi's (H,) per-head slopes
    times log2(e), fp32, on the tensors' device (the bias is
    slope·(j − i)); cu_seqlens_q/k: (n + 1,) int32 offsets of n sequences
    packed along the sequence axis of batch-1 tensors (1, H, total, D), each
    attending only to its own keys, max_seqlen_q/k their longest lengths.
    RoPE applied to q and k as the kernels load them (not with varlen or
    descriptor loads): rope_cos and rope_sin the (positions, D/2) tables of
    cos and sin of p·θ_i, contiguous, on the tensors' device; key j at
    position rope_offset + j, query row r at rope_offset + r + Sk − Sq;
    rope_gptj the pairs' layout (2i, 2i + 1), else neox's (i, i + D/2).
    tree_bits (decode only): a tree mask over the queries' own slots, (SQ,) or
    (B, SQ) int64, SQ <= TREE_MAX_Q: query i sees key SK - SQ + j iff bit j
    of its entry is set, and every key before SK - SQ (the prefix); bit 63 is
    the int64's sign bit. With causal as well, a key must pass both.
    """

    window: int | None = None
    softcap: float | None = None
    slopes: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    rope_offset: int = 0
    rope_gptj: bool = False
    tree_bits: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def rope(self) -> bool:
        return self.rope_cos is not None


PLAIN = Features()


def describe(config) -> str:
    """A block configuration as the `kernel` column shows it, e.g. "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"."""
    cap = getattr(config, "maxnreg", None)
    blocks = " ".join(f"{name}={config.kwargs[name]}" for name in ("BLOCK_M", "BLOCK_N") if name in config.kwargs)
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}" + (f" maxnreg={cap}" if cap else "")


def _scratch(size: int, alignment: int, stream):
    # Global memory for descriptors that kernels build (tl.make_tensor_descriptor).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _strides(t: torch.Tensor):
    # (batch, head, seq) strides of a (B, H, S, D) tensor; the head-dim stride is 1.
    return t.stride(0), t.stride(1), t.stride(2)


def _batch_strides(t: torch.Tensor, f: Features):
    # (batch, head, seq) strides; with varlen the batch index counts sequences, which share one (1, H, total, D) tensor.
    return (0 if f.varlen else t.stride(0)), t.stride(1), t.stride(2)


def _launch_args(q, k, causal: bool, scale: float, use_tma: bool, f: Features, backward: bool):
    """(pointer args, grid batch, SQ, SK, trailing scalars and constexprs) shared by the three prefill kernels."""
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    n = B
    if f.varlen:
        n, SQ, SK = f.cu_seqlens_q.numel() - 1, f.max_seqlen_q, f.max_seqlen_k
    if use_tma:
        triton.set_allocator(_scratch)  # this may be autograd's worker thread
    cap = f.softcap or 1.0
    assert not (f.rope and (use_tma or f.varlen)), "RoPE in the kernels takes dense inputs and pointer loads"
    scalars = (H, H // k.shape[1], SQ, SK, _seq_bucket(max(SQ, SK)), scale * LOG2E, *((scale,) if backward else ()),
               f.window or 0, 2 * LOG2E * scale / cap, cap * LOG2E, f.rope_offset,
               D, _pad_dim(D), bool(causal), bool(use_tma),
               f.window is not None, f.softcap is not None, f.slopes is not None, f.varlen, f.rope, f.rope_gptj)
    # The lse and delta are (B, H, SQ), or (1, H, total) with varlen: (batch, head) strides.
    lse_strides = (0 if f.varlen else H * SQ, q.shape[2])
    return (f.slopes, f.cu_seqlens_q, f.cu_seqlens_k, f.rope_cos, f.rope_sin), n, SQ, SK, lse_strides, scalars


def forward(q, k, v, causal: bool, scale: float, use_tma: bool = False, features: Features = PLAIN):
    """(o, lse, config): o in q's layout, lse (B, H, SQ) the base-2 log-sum-exp in fp32, and the block config.

    q (B, H, SQ, D); k, v (B, Hkv, SK, D); causal aligned bottom-right. With
    features.varlen, q, k, v are (1, H, total, D) and lse is (1, H, total_q).
    """
    B, H = q.shape[:2]
    f = features
    o = torch.empty_like(q)  # keeps q's layout, e.g. a (B, S, H, D) view
    lse = torch.empty((B, H, q.shape[2]), device=q.device, dtype=torch.float32)
    ptrs, n, SQ, SK, lse_strides, scalars = _launch_args(q, k, causal, scale, use_tma, f, backward=False)
    ahead.launch(_fwd_kernel, lambda meta: (triton.cdiv(SQ, meta["BLOCK_M"]), n * H),
        q, k, v, o, lse, *ptrs,
        *_batch_strides(q, f), *_batch_strides(k, f), *_batch_strides(v, f), *_batch_strides(o, f), *lse_strides,
        *scalars,
    )
    return o, lse, _fwd_kernel.best_config


def delta(o, do):
    """delta = rowsum(dO * O), (B, H, S) fp32: the row term every backward kernel subtracts."""
    B, H, S, D = o.shape
    out = torch.empty((B, H, S), device=o.device, dtype=torch.float32)
    ahead.launch(_bwd_delta_kernel, (triton.cdiv(S, 64), B * H),
        o, do, out, *_strides(o), *_strides(do), H, S, D, _pad_dim(D), 64,
    )
    return out


def backward_dkdv(q, k, v, do, lse, delta, causal: bool, scale: float, use_tma: bool = False,
                  features: Features = PLAIN):
    """(dk, dv, config) from the forward's base-2 lse and delta = rowsum(dO * O)."""
    H, Hkv = q.shape[1], k.shape[1]
    f = features
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    ptrs, n, SQ, SK, lse_strides, scalars = _launch_args(q, k, causal, scale, use_tma, f, backward=True)
    ahead.launch(_bwd_dkdv_kernel, lambda meta: (triton.cdiv(SK, meta["BLOCK_N"]), n * Hkv),
        q, k, v, do, dk, dv, lse, delta, *ptrs,
        *_batch_strides(q, f), *_batch_strides(k, f), *_batch_strides(v, f), *_batch_strides(do, f),
        *_batch_strides(dk, f), *_batch_strides(dv, f), *lse_strides,
        *scalars,
    )
    return dk, dv, _bwd_dkdv_kernel.best_config


def backward_dq(q, k, v, do, lse, delta, causal: bool, scale: float, use_tma: bool = False,
                features: Features = PLAIN):
    """(dq, config) from the forward's base-2 lse and delta = rowsum(dO * O)."""
    H = q.shape[1]
    f = features
    dq = torch.empty_like(q)
    ptrs, n, SQ, SK, lse_strides, scalars = _launch_args(q, k, causal, scale, use_tma, f, backward=True)
    ahead.launch(_bwd_dq_kernel, lambda meta: (triton.cdiv(SQ, meta["BLOCK_M"]), n * H),
        q, k, v, do, dq, lse, delta, *ptrs,
        *_batch_strides(q, f), *_batch_strides(k, f), *_batch_strides(v, f), *_batch_strides(do, f),
        *_batch_strides(dq, f), *lse_strides,
        *scalars,
    )
    return dq, _bwd_dq_kernel.best_config


def decode_splits(programs: int, kv_len: int, slots: int) -> int:
    """How many parts to split the keys into, as flash-attn's num_splits_heuristic does:
    none when the `programs` (batch × kv heads × row blocks) fill 80% of the
    `slots` (SMs × programs resident per SM) already; else the fewest splits
    whose waves are at least 85% as full as the best, at most one per
    SPLIT_ALIGN keys and 128 in all."""
    if programs >= 0.8 * slots:
        return 1
    most = max(1, min(128, slots, triton.cdiv(kv_len, SPLIT_ALIGN)))

    def fill(s):  # how full the last wave is, on average over the waves
        waves = programs * s / slots
        return waves / math.ceil(waves)

    best = max(fill(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if fill(s) >= 0.85 * best)


def tree_bits_reason(bits: torch.Tensor, B: int, SQ: int, device) -> str | None:
    """None if `bits` can be decode()'s tree mask for B sequences of SQ queries, else why not."""
    if SQ > TREE_MAX_Q:
        return (f"a tree mask holds one bit per query in an int64, so at most {TREE_MAX_Q} queries; got q_len {SQ}")
    if bits.dtype != torch.int64 or bits.device != device:
        return f"tree_bits must be int64 on {device}, got {str(bits.dtype).removeprefix('torch.')} on {bits.device}"
    if bits.shape not in ((SQ,), (B, SQ)) or bits.stride(-1) != 1:
        return f"tree_bits must be ({SQ},) or ({B}, {SQ}), contiguous along the queries, got {tuple(bits.shape)}"
    return None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small count exercises the splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode(q, k, v, causal: bool, scale: float, features: Features = PLAIN, block_table=None,
           cache_seqlens=None, num_splits: int | None = None, block_rows: int | None = None):
    """(o, description): split-KV attention of a few queries against a long cache (Flash-Decoding).

    q (B, H, SQ, D), SQ small; k, v (B, Hkv, SK, D), or with block_table
    (B, pages per sequence, int32) a paged cache (pages, page_size, Hkv, D).
    cache_seqlens: None (every sequence has all SK keys; paged: pages per
    sequence × page_size), or (B,) int32 lengths. Causal is aligned bottom-right
    on each sequence's length. features.tree_bits: a tree mask over each
    sequence's last SQ keys (see Features); more than TREE_MAX_Q queries, or
    bits of another shape or dtype, raise ValueError. Forward only. num_splits: None chooses from
    the SM count and the key length (decode_splits). block_rows: the packed
    query rows (query heads of a group × queries) one program holds, a power
    of two >= 16; None takes them all, up to 128.
    """
    B, H, SQ, D = q.shape
    f = features
    tree = f.tree_bits
    if tree is not None:
        reason = tree_bits_reason(tree, B, SQ, q.device)
        if reason:
            raise ValueError(reason)
    paged = block_table is not None
    if paged:
        page_size, Hkv = k.shape[1], k.shape[2]
        SK = block_table.shape[1] * page_size
        k_strides = (k.stride(0), k.stride(2), k.stride(1))  # (page, head, row in page)
        v_strides = (v.stride(0), v.stride(2), v.stride(1))
        bt_stride = block_table.stride(0)
    else:
        page_size, Hkv, SK = 1, k.shape[1], k.shape[2]
        k_strides, v_strides, bt_stride = _strides(k), _strides(v), 0
    group = H // Hkv
    rows = group * SQ
    block_r = block_rows or max(16, min(128, triton.next_power_of_2(rows)))
    assert block_r >= 16 and block_r & (block_r - 1) == 0, f"block_rows {block_r}: a power of two >= 16 (tl.dot's least)"
    row_blocks = triton.cdiv(rows, block_r)
    if num_splits is None:
        slots = _sm_count(q.device) * (2 if block_r <= 64 else 1)
        num_splits = decode_splits(B * Hkv * row_blocks, SK, slots)
    split_len = triton.cdiv(triton.cdiv(SK, max(1, num_splits)), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = max(1, triton.cdiv(SK, split_len))
    o = torch.empty_like(q)
    o_part = lse_part = None
    if num_splits > 1:
        o_part = torch.empty((B, H, SQ, num_splits, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B, H, SQ, num_splits), device=q.device, dtype=torch.float32)
    cap = f.softcap or 1.0
    ahead.launch(_decode_kernel, (num_splits, B * Hkv, row_blocks),
        q, k, v, o, o_part, lse_part, cache_seqlens, block_table, f.slopes, tree,
        *_strides(q), *k_strides, *v_strides, *_strides(o), bt_stride,
        tree.stride(0) if tree is not None and tree.dim() == 2 else 0,
        H, group, SQ, SK, split_len, _seq_bucket(split_len), scale * LOG2E, f.window or 0,
        2 * LOG2E * scale / cap, cap * LOG2E,
        D, _pad_dim(D), bool(causal), f.window is not None, f.softcap is not None, f.slopes is not None,
        tree is not None, paged, page_size, cache_seqlens is not None, num_splits > 1, block_r,
    )
    config = _decode_kernel.best_config
    if num_splits > 1:
        ahead.launch(_decode_combine_kernel, (B * H * SQ,),
            o_part, lse_part, o, *_strides(o), H, SQ, num_splits, D, _pad_dim(D), triton.next_power_of_2(num_splits),
        )
    return o, (f"splits={num_splits} rows={block_r} BLOCK_N={config.kwargs['BLOCK_N']} warps={config.num_warps} "
               f"stages={config.num_stages}" + (f" paged page_size={page_size}" if paged else ""))
