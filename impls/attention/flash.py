"""FlashAttention for genbench's `tiled` attention: one differentiable function,
and the choice of the kernels behind it.

    from impls.attention import flash
    if flash.supported(q, k, v, causal=True) is None:
        ran = flash.Kernels()
        out = flash.attention(q, k, v, causal=True, kernels=ran)   # (B, H, S, D), differentiable
        out.sum().backward()
        str(ran)  # "triton fwd BLOCK_M=...; triton bwd dkdv BLOCK_M=...; triton bwd dq BLOCK_M=..."

    # Serving shapes: fewer queries than keys (causal aligned bottom-right),
    # masks (naive.Masks), packed variable-length batches, a paged KV cache.
    out = flash.attention(q, k, v, causal=True, masks=naive.Masks(window=4096, softcap=30.0, alibi=True))
    out = flash.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                          max_seqlen_q=longest, max_seqlen_k=longest)  # q, k, v (total, H, D)
    out = flash.attention(q, k_cache, v_cache, causal=True, block_table=table, cache_seqlens=lengths)
    out = flash.attention(q, k, v, causal=True, tree_bits=bits)  # a speculative tree over the last q_len slots

    # RoPE inside the kernels: q and k given unrotated, each tile rotated as it is loaded.
    out = flash.attention(q, k, v, causal=True, rope=posenc.Rope("neox", offset=30_000))

The kernels live in flash_triton.py (Triton language: forward, delta, dK/dV
and dQ, on any CUDA GPU and, without one, in Triton's interpreter) and
flash_gluon.py (Gluon, warp-specialized for Hopper: forward, dK/dV and dQ).
This module decides, per call, which of them run (`plan`):
- Gluon's forward where it can run (flash_gluon.supported; on a Triton
  release it was not measured on, once gluon_check.py has passed it on this
  device, else the forward's `kernel` entry says why not) and, by default,
  only at the head dims where it is the faster one
  (flash_gluon.PREFERRED_HEAD_DIMS); `gluon=False` keeps every kernel
  Triton's, `gluon=True` takes Gluon's wherever they run;
- after a Gluon forward, Gluon's backward too: at head dim 128 one kernel
  forms dK, dV and dQ (flash_gluon.backward, five products a block where the
  two kernels below run seven). At head dim 64, and with `fused_bwd=False`,
  Gluon's dK/dV and dQ kernels run instead, the dQ kernel on a second stream
  beside the dK/dV kernel (the two share only inputs, so each fills the SMs
  the other's last wave leaves idle); `gluon_dq=False` keeps Triton's dQ
  after Gluon's dK/dV, `concurrent_dq=False` runs Gluon's after it. delta is
  always Triton's;
- descriptor (TMA) loads in the Triton kernels only when asked for
  (`use_tma=True`) and where they can run;
- Triton's kernels whenever the input needs what the Gluon kernels lack:
  q_len != kv_len, a mask (window, soft-capping, ALiBi), varlen, RoPE;
- flash_triton's split-KV decode kernel (Flash-Decoding) for a few queries
  (q_len <= ft.DECODE_MAX_Q) against a longer cache when no gradient is
  needed, and always for a paged cache. It has no backward: an input that
  needs one runs the prefill kernels (a paged cache cannot, and is refused);
  so does RoPE (`rope=`), which only the prefill kernels apply.
  A tree mask (tree_bits, flash_triton.Features) runs in the decode kernel, and only there.

Varlen inputs are packed as flash-attn's are: q (total_q, H, D), k and v
(total_k, Hkv, D), sequence b's rows cu_seqlens[b] .. cu_seqlens[b + 1]
(int32, on the tensors' device), max_seqlen_q/k the longest; the output is
(total_q, H, D). Each sequence attends only to its own keys, causal aligned
bottom-right on its own lengths (a query that sees no key gives 0).
A paged cache is flash-attn's too: k_cache and v_cache (pages, page_size,
Hkv, D), block_table (B, pages per sequence) int32 naming sequence b's
pages in order, cache_seqlens (B,) int32 its lengths (None: every page
full); q stays (B, H, q_len, D). The measurements behind these defaults are
in docs/attention-kernels.md.

Which kernel ran, with its block configuration, is written to a `Kernels`
record that the caller passes: the forward's at the call, the backward's when
autograd runs it. flash_gluon is imported only on the first CUDA call, never
on CPU or under the interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from impls import posenc
from impls.attention import flash_triton as ft
from impls.attention import gluon_check, naive
from impls.attention.naive import NO_MASKS, Masks

# Whether the Triton kernels use descriptor (TMA) loads unless told: off, as
# they were slower in the forward and no faster in the backward
# (docs/attention-kernels.md).
PREFER_TMA = False


@dataclass
class Kernels:
    """The kernels one attention() call ran, each named with its family and
    block configuration: "triton fwd BLOCK_M=...", "gluon bwd dq ...". Empty
    until the kernel has run; the forward resets the backward's entries."""

    fwd: str = ""
    dkdv: str = ""
    dq: str = ""

    def __str__(self) -> str:
        ran = [d for d in (self.fwd, self.dkdv, self.dq) if d]
        return "; ".join(ran) if ran else "flash: nothing run yet"


@dataclass(frozen=True)
class Plan:
    """Which kernels one attention() call runs, decided from its inputs before any launch."""

    causal: bool
    scale: float
    tma: bool = False  # descriptor loads in the Triton kernels
    features: ft.Features = ft.PLAIN  # masks and varlen, for the Triton kernels
    decode: bool = False  # flash_triton's split-KV decode kernel (forward only)
    num_splits: int | None = None  # with decode: None chooses
    gluon: bool = False  # flash_gluon's forward, and its dK/dV where that can run
    gluon_dq: bool = True  # with gluon: flash_gluon's dQ kernel too
    concurrent_dq: bool = True  # with gluon and gluon_dq: dQ on a second stream beside dK/dV
    fused_bwd: bool = True  # with gluon and gluon_dq: dK, dV and dQ in one kernel where it takes the head dim
    note: str = ""  # added to the forward's `kernel` entry: why Gluon is off, or that it was self-checked


# flash_gluon, imported on the first call that could use it: None until then,
# False if the import failed (_GLUON_ERROR says why).
_GLUON = None
_GLUON_ERROR: str | None = None


def _gluon_module(q: torch.Tensor):
    """flash_gluon where its forward could run q (a CUDA tensor, no interpreter), else None.

    Imported lazily so that CPU and TRITON_INTERPRET=1 runs never load Gluon
    (triton.experimental.gluon), which no interpreter runs.
    """
    global _GLUON, _GLUON_ERROR
    if ft.TRITON_ERROR is not None or ft.INTERPRET or not q.is_cuda:
        return None
    if _GLUON is None:
        try:
            from impls.attention import flash_gluon
            _GLUON = flash_gluon
        except Exception as exc:  # noqa: BLE001 - without Gluon the Triton kernels run
            _GLUON, _GLUON_ERROR = False, f"flash_gluon not importable: {type(exc).__name__}: {exc}"
    return _GLUON or None


def loaded_gluon():
    """flash_gluon if a call has imported it, else None (impls/attention/tuning.py seeds its tuners then)."""
    return _GLUON or None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, masks: Masks = NO_MASKS, *,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
              rope: posenc.Rope | None = None, tree_bits: torch.Tensor | None = None) -> str | None:
    """None if `attention` can run on these inputs here, else a short reason.

    The keyword arguments are attention()'s: a varlen batch (cu_seqlens_q/k,
    max_seqlen_q/k, q, k, v packed (total, H, D)), a paged cache (block_table,
    k and v (pages, page_size, Hkv, D)), per-sequence cache lengths
    (cache_seqlens), a tree mask over the queries' own slots (tree_bits, the
    decode kernel's: see flash_triton.Features). Lengths inside cu_seqlens and cache_seqlens are not read
    here (that would wait for the GPU); see the module docstring for what
    they may hold.
    """
    if ft.TRITON_ERROR is not None:
        return ft.TRITON_ERROR
    if not ft.INTERPRET:
        if not torch.cuda.is_available():
            return "no CUDA, and Triton's interpreter is off (TRITON_INTERPRET=1 runs the kernel on CPU, slowly; `genbench attention --impl tiled` on a CPU turns it on)"
        if not q.is_cuda:
            return f"tensors on {q.device.type}: the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in ft.DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')} not supported"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v must share a dtype"
    reason = _masks_reason(masks, causal)
    if reason is None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        reason = _varlen_reason(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    elif reason is None and block_table is not None:
        reason = _paged_reason(q, k, v, causal, block_table, cache_seqlens)
    elif reason is None:
        reason = _dense_reason(q, k, v, causal, cache_seqlens)
    if reason is None and any(t.stride(-1) != 1 for t in (q, k, v)):
        reason = "the head dim must be contiguous (stride 1)"
    if reason is None and rope is not None:
        reason = _rope_reason(q, cu_seqlens_q is not None, block_table is not None or cache_seqlens is not None)
    if reason is None and tree_bits is not None:
        if rope is not None:
            reason = "RoPE runs in the prefill kernels, a tree mask only in the decode kernel"
        elif cu_seqlens_q is not None:
            reason = "a tree mask runs in the decode kernel, which takes no varlen batch"
        else:
            reason = ft.tree_bits_reason(tree_bits, q.shape[0], q.shape[2], q.device)
    return reason


def _rope_reason(q, varlen: bool, cache: bool) -> str | None:
    if varlen or cache:
        return "RoPE inside the kernels takes dense (B, H, S, D) inputs: no varlen batch, no KV cache"
    if q.shape[-1] < 32:
        # Each half of the rotated pairs is a tl.dot operand, which needs 16 columns at the least.
        return f"RoPE inside the kernels needs a head dim of 32 or more, got {q.shape[-1]}"
    return None


def _masks_reason(masks: Masks, causal: bool) -> str | None:
    if masks.window is not None and masks.window <= 0:
        return f"a sliding window must be positive (keys each query sees), got {masks.window}"
    if masks.softcap is not None and not masks.softcap > 0:
        return f"soft-capping needs a positive cap, got {masks.softcap}"
    return None


def _heads_reason(q_heads: int, D: int, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> str | None:
    if D not in ft.HEAD_DIMS:
        return f"head dim {D} not supported ({', '.join(map(str, ft.HEAD_DIMS))})"
    if k.shape != v.shape or k.shape[-1] != D:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape, with q's head dim {D}"
    if kv_heads == 0 or q_heads % kv_heads != 0:
        return f"kv heads {kv_heads} do not divide query heads {q_heads}"
    return None


def _dense_reason(q, k, v, causal: bool, cache_seqlens) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-d (B, H, S, D)"
    B, H, Sq, D = q.shape
    if k.shape[0] != B:
        return f"k {tuple(k.shape)} and q {tuple(q.shape)} differ in batch"
    reason = _heads_reason(H, D, k, v, k.shape[1])
    if reason is None and causal and Sq > k.shape[2]:
        reason = (f"causal attention is aligned bottom-right (the queries are the last q_len positions) and needs "
                  f"kv_len >= q_len, got q_len {Sq} > kv_len {k.shape[2]}")
    if reason is None and (Sq == 0 or k.shape[2] == 0 or B * H == 0):
        reason = "empty input"
    if reason is None and cache_seqlens is not None:
        reason = _seqlens_reason(cache_seqlens, B, q.device)
    return reason


def _int32_on(t, device, what: str) -> str | None:
    if t.dtype != torch.int32 or t.device != device:
        return f"{what} must be int32 on {device}, got {str(t.dtype).removeprefix('torch.')} on {t.device}"
    return None


def _seqlens_reason(cache_seqlens, B: int, device) -> str | None:
    if cache_seqlens.shape != (B,):
        return f"cache_seqlens must be ({B},), one length per sequence, got {tuple(cache_seqlens.shape)}"
    return _int32_on(cache_seqlens, device, "cache_seqlens")


def _varlen_reason(q, k, v, cu_q, cu_k, max_q, max_k, block_table) -> str | None:
    if cu_q is None or cu_k is None or max_q is None or max_k is None:
        return "varlen needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k together"
    if block_table is not None:
        return "a varlen batch takes no block_table (the paged cache is the decode kernel's)"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "varlen q, k, v are packed (total, H, D)"
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 2:
        return f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} must both be (sequences + 1,)"
    reason = _int32_on(cu_q, q.device, "cu_seqlens_q") or _int32_on(cu_k, q.device, "cu_seqlens_k")
    if reason is None and (max_q < 0 or max_k < 0):
        reason = f"max_seqlen_q and max_seqlen_k must be >= 0, got {max_q}, {max_k}"
    return reason or _heads_reason(q.shape[1], q.shape[2], k, v, k.shape[1])


def _paged_reason(q, k, v, causal: bool, block_table, cache_seqlens) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "with a block_table, q is (B, H, q_len, D) and k, v are pages (pages, page_size, Hkv, D)"
    B, H, Sq, D = q.shape
    if block_table.dim() != 2 or block_table.shape[0] != B:
        return f"block_table must be (B, pages per sequence) with B = {B}, got {tuple(block_table.shape)}"
    reason = _int32_on(block_table, q.device, "block_table") or _heads_reason(H, D, k, v, k.shape[2])
    if reason is None and cache_seqlens is not None:
        reason = _seqlens_reason(cache_seqlens, B, q.device)
    if reason is None and causal and Sq > block_table.shape[1] * k.shape[1]:
        reason = f"causal q_len {Sq} is longer than the {block_table.shape[1] * k.shape[1]} keys the block table holds"
    if reason is None and (Sq == 0 or B * H == 0):
        reason = "empty input"
    if reason is None and _needs_grad(q, k, v):
        reason = _DECODE_FORWARD_ONLY
    return reason


_DECODE_FORWARD_ONLY = ("the paged cache runs in the split-KV decode kernel, which is forward only (decoding "
                        "needs no gradient); call it under torch.no_grad() or on tensors that do not require grad")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gluon_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if flash_gluon's forward can run these inputs here, else why not (the Triton forward runs then)."""
    fg = _gluon_module(q)
    if fg is None:
        if _GLUON_ERROR is not None:
            return _GLUON_ERROR
        return "the Gluon forward needs a CUDA tensor on a Hopper GPU, outside Triton's interpreter"
    return fg.supported(q, k, v)


def uses_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gluon: bool | None = None,
               masks: Masks = NO_MASKS) -> bool:
    """Whether attention(q, k, v, ..., gluon=gluon) runs flash_gluon's forward instead of the Triton one.

    gluon=None: where it can run and the head dim is one of
    flash_gluon.PREFERRED_HEAD_DIMS; True: wherever it can run; False: never.
    The Gluon kernels take dense self-attention without masks: q_len !=
    kv_len, any mask, and varlen (3-d) inputs keep Triton's.
    """
    return _gluon_choice(q, k, v, gluon, masks)[0]


def gluon_check_due(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: Masks = NO_MASKS) -> bool:
    """Whether attention(q, k, v, ..., masks=masks) would first run the Gluon kernels' self-check here
    (gluon_check.verdict), which a suite may run ahead of its rows instead, under a progress line of its own."""
    return _gluon_wanted(q, k, v, None, masks) and gluon_check.known(q.device) is None


def _gluon_wanted(q, k, v, gluon: bool | None, masks: Masks = NO_MASKS) -> bool:
    # Whether the Gluon kernels would run these inputs, the self-check's verdict aside.
    if gluon is False or masks or q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]:
        return False
    fg = _gluon_module(q)
    if fg is None or fg.supported(q, k, v) is not None:
        return False
    return bool(gluon or q.shape[-1] in fg.PREFERRED_HEAD_DIMS)


def _gluon_choice(q, k, v, gluon: bool | None, masks: Masks = NO_MASKS) -> tuple[bool, str]:
    # (uses_gluon, a note for the forward's `kernel` entry). On a Triton the Gluon
    # kernels were not measured on, they run only once gluon_check has passed them here.
    if not _gluon_wanted(q, k, v, gluon, masks):
        return False, ""
    checked = gluon_check.verdict(q.device)
    return checked.ok, f" ({checked.note})" if checked.note else ""


def tma_available() -> bool:
    """Whether descriptor (TMA) loads can be compiled here: Triton with tensor descriptors on Hopper or newer."""
    if ft.TRITON_ERROR is not None or ft.INTERPRET or not torch.cuda.is_available():
        return False
    return hasattr(ft.tl, "make_tensor_descriptor") and torch.cuda.get_device_capability()[0] >= 9


def _tma_allowed(*tensors: torch.Tensor) -> bool:
    # A TMA box needs a 16-byte-aligned base and 16-byte-aligned row strides;
    # kept to the 16-bit types and power-of-two head dims that were checked.
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16) or t0.shape[-1] not in (64, 128):
        return False
    return all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None, *,
         use_tma: bool = PREFER_TMA, gluon: bool | None = None, gluon_dq: bool = True,
         concurrent_dq: bool = True, fused_bwd: bool = True, masks: Masks = NO_MASKS,
         features: ft.Features = ft.PLAIN,
         decode: bool = False, num_splits: int | None = None) -> Plan:
    """The kernels attention(q, k, v, causal, scale, ...) with these options runs (see the module docstring).

    q, k, v are (B, H, S, D), varlen batches as their (1, H, total, D) views;
    features are the kernels' masks and varlen arguments (`_features`);
    decode: whether the split-KV decode kernel runs (`uses_decode`).
    """
    plain = not masks and not features.varlen and not features.rope and not decode
    # Imports flash_gluon where it may run, before its tuners are seeded.
    use_gluon, note = _gluon_choice(q, k, v, gluon) if plain else (False, "")
    return Plan(
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
        tma=bool(use_tma) and plain and tma_available() and _tma_allowed(q, k, v),
        gluon=use_gluon,
        gluon_dq=gluon_dq,
        concurrent_dq=concurrent_dq,
        fused_bwd=fused_bwd,
        note=note,
        features=features,
        decode=decode,
        num_splits=num_splits,
    )


def uses_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool | None = None, *,
                paged: bool = False, varlen: bool = False, cache_seqlens: torch.Tensor | None = None,
                tree: bool = False) -> bool:
    """Whether attention() runs the split-KV decode kernel: always for a paged
    cache, per-sequence cache lengths or a tree mask; else, with decode=None, for at most
    ft.DECODE_MAX_Q queries against more keys when no gradient is needed;
    decode=True wherever it can run (not varlen), False never."""
    if paged or cache_seqlens is not None or tree:
        return True
    if decode is False or varlen:
        return False
    if decode:
        return True
    return not _needs_grad(q, k, v) and q.shape[2] <= ft.DECODE_MAX_Q and k.shape[2] > q.shape[2]


_SLOPES: dict[tuple[int, torch.device], torch.Tensor] = {}


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(rope: posenc.Rope, positions: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p·θ_i, (P, D/2) each for P >= `positions`, in the inputs' dtype: made once (the
    angles in float64, impls/posenc.py rope_angles) and grown to the next power of two when a call needs more.

    In the inputs' dtype rather than float32: the forward reads the table
    once per key tile, so 16-bit entries halve what that costs, and
    posenc.apply_rope rounds cos and sin to x's dtype as well."""
    key = (head_dim, rope.base, rope.scaling, dtype, device)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < positions:
        P = 1 << max(0, positions - 1).bit_length()
        cos, sin = posenc.rope_angles(torch.arange(P, device=device), head_dim, rope.base, rope.scaling, dtype)
        table = _ROPE_TABLES[key] = (cos.contiguous(), sin.contiguous())
    return table


def _features(q: torch.Tensor, masks: Masks, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
              max_seqlen_k=None, rope: posenc.Rope | None = None, kv_len: int = 0,
              tree_bits=None) -> ft.Features:
    """The kernels' optional arguments for these masks, varlen offsets RoPE and a tree mask (ALiBi's slopes made once
    per head count, RoPE's table once per head dim and dtype)."""
    cos = sin = None
    if rope is not None:
        cos, sin = rope_table(rope, rope.offset + kv_len, q.shape[-1], q.dtype, q.device)
    slopes = None
    if masks.alibi:
        H = q.shape[-2] if cu_seqlens_q is not None else q.shape[1]
        key = (H, q.device)
        if key not in _SLOPES:
            _SLOPES[key] = (naive.alibi_slopes(H) * ft.LOG2E).to(device=q.device, dtype=torch.float32)
        slopes = _SLOPES[key]
    return ft.Features(window=masks.window, softcap=masks.softcap, slopes=slopes,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=int(max_seqlen_q or 0), max_seqlen_k=int(max_seqlen_k or 0),
                       rope_cos=cos, rope_sin=sin, rope_offset=rope.offset if rope else 0,
                       rope_gptj=rope is not None and rope.layout == "gptj",
                       tree_bits=tree_bits)


def _tma(use_tma: bool) -> str:
    return " tma" if use_tma else ""


def _forward(q, k, v, p: Plan, ran: Kernels):
    if p.gluon:
        # flash_gluon's forward writes o in q's layout and the same base-2 lse
        # as flash_triton's, so either backward runs on it.
        fg = _gluon_module(q)
        o, lse, config = fg.forward(q, k, v, p.causal, p.scale)
        ran.fwd = "gluon fwd " + fg.describe("fwd", config)
    else:
        o, lse, config = ft.forward(q, k, v, p.causal, p.scale, p.tma, p.features)
        ran.fwd = "triton fwd " + ft.describe(config) + _tma(p.tma)
    ran.fwd += p.note
    ran.dkdv = ran.dq = ""
    return o, lse


def _backward(q, k, v, o, lse, do, p: Plan, ran: Kernels):
    if do.stride(-1) != 1 or (p.tma and not _tma_allowed(do)):
        do = do.contiguous()  # e.g. the stride-0 gradient of a .sum()
    delta = ft.delta(o, do)
    fg = _gluon_module(q) if p.gluon else None
    if fg and fg.supported_bwd(q, k, v, do) is not None:
        fg = None
    if fg and p.gluon_dq and p.fused_bwd and q.shape[-1] in fg.FUSED_HEAD_DIMS:
        dq, dk, dv, config = fg.backward(q, k, v, do, lse, delta, p.causal, p.scale)
        ran.dkdv = "gluon bwd dkdv+dq " + fg.describe("bwd", config)
        return dq, dk, dv
    if fg and p.gluon_dq and p.concurrent_dq:
        return _gluon_dkdv_beside_dq(fg, q, k, v, do, lse, delta, p, ran)
    if fg:
        dk, dv, config = fg.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale)
        ran.dkdv = "gluon bwd dkdv " + fg.describe("dkdv", config)
    else:
        dk, dv, config = ft.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale, p.tma, p.features)
        ran.dkdv = "triton bwd dkdv " + ft.describe(config) + _tma(p.tma)
    if fg and p.gluon_dq:
        dq, config = fg.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale)
        ran.dq = "gluon bwd dq " + fg.describe("dq", config)
    else:
        dq, config = ft.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale, p.tma, p.features)
        ran.dq = "triton bwd dq " + ft.describe(config) + _tma(p.tma)
    return dq, dk, dv


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _gluon_dkdv_beside_dq(fg, q, k, v, do, lse, delta, p: Plan, ran: Kernels):
    # The dQ kernel on a side stream while dK/dV runs on the caller's. The inputs
    # were made on the caller's stream, which waits for the side stream before
    # its next work, so no memory is reused under a running kernel; dq is made
    # on the side stream and handed to the caller's (record_stream).
    main = torch.cuda.current_stream(q.device)
    side = _side_streams.setdefault(q.device, torch.cuda.Stream(q.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        dq, dq_config = fg.backward_dq(q, k, v, do, lse, delta, p.causal, p.scale)
    dk, dv, dkdv_config = fg.backward_dkdv(q, k, v, do, lse, delta, p.causal, p.scale)
    main.wait_stream(side)
    dq.record_stream(main)
    ran.dkdv = "gluon bwd dkdv " + fg.describe("dkdv", dkdv_config)
    ran.dq = "gluon bwd dq " + fg.describe("dq", dq_config) + ", beside dkdv on a second stream"
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: Plan, ran: Kernels | None = None):
        ran = Kernels() if ran is None else ran
        o, lse = _forward(q, k, v, p, ran)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.ran = p, ran
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.plan, ctx.ran)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float | None = None, *, masks: Masks = NO_MASKS,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
              tree_bits: torch.Tensor | None = None, decode: bool | None = None, num_splits: int | None = None,
              use_tma: bool = PREFER_TMA, gluon: bool | None = None,
              gluon_dq: bool = True, concurrent_dq: bool = True, fused_bwd: bool = True,
              kernels: Kernels | None = None,
              rope: posenc.Rope | None = None) -> torch.Tensor:
    """softmax(q k^T * scale (+ masks)) v for q (B, H, Sq, D), k and v (B, Hkv, Sk, D).

    Returns (B, H, Sq, D) in q's dtype and layout; differentiable in q, k, v
    (except through the decode kernel). scale defaults to 1/sqrt(D). Causal
    with Sq < Sk is aligned bottom-right. masks: naive.Masks (sliding window,
    soft-capping, ALiBi with naive.alibi_slopes). Varlen (cu_seqlens_q/k,
    max_seqlen_q/k), the paged cache (block_table, cache_seqlens) and a tree
    mask (tree_bits): see the module docstring. decode: None runs the split-KV decode kernel where
    uses_decode() says, True wherever it can run, False never; num_splits
    overrides its choice of splits. use_tma: descriptor loads in the Triton
    kernels where they can run. gluon: None runs flash_gluon's kernels where
    they can run and are the faster ones, True wherever they can run, False
    never; gluon_dq, concurrent_dq and fused_bwd: see the module docstring.
    kernels, if given, is filled with what ran (the backward's entries once
    it has run).
    rope: q and k are given unrotated and RoPE (posenc.Rope) is applied to
    them inside the Triton prefill kernels, as each tile is loaded; the
    gradients are w.r.t. the unrotated q and k.
    """
    reason = supported(q, k, v, causal, masks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, block_table=block_table,
                       cache_seqlens=cache_seqlens, rope=rope, tree_bits=tree_bits)
    varlen = cu_seqlens_q is not None
    run_decode = reason is None and uses_decode(q, k, v, False if rope else decode, paged=block_table is not None,
                                                varlen=varlen, cache_seqlens=cache_seqlens,
                                                tree=tree_bits is not None)
    if reason is None and run_decode and varlen:
        reason = "the decode kernel takes no varlen batch (give each sequence's cache length as cache_seqlens)"
    if reason is None and tree_bits is not None and decode is False:
        reason = "a tree mask runs only in the decode kernel (decode=False asks for the others)"
    if reason is None and run_decode and _needs_grad(q, k, v):
        reason = ("the split-KV decode kernel is forward only (decoding needs no gradient): call it under "
                  "torch.no_grad(), or pass decode=False for the kernels with a backward")
    if reason is not None:
        raise ValueError(f"flash attention cannot run this input: {reason}")
    features = _features(q, masks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rope,
                         k.shape[-2] if rope else 0, tree_bits)
    if varlen:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (total, H, D) -> (1, H, total, D) views
    p = plan(q, k, v, causal, scale, use_tma=use_tma, gluon=gluon, gluon_dq=gluon_dq, concurrent_dq=concurrent_dq,
             fused_bwd=fused_bwd, masks=masks, features=features, decode=run_decode, num_splits=num_splits)
    if q.is_cuda and not ft.INTERPRET:
        from impls.attention import tuning
        tuning.seed(q.device)
    if p.decode:
        out, description = ft.decode(q, k, v, p.causal, p.scale, p.features, block_table, cache_seqlens,
                                     p.num_splits)
        if kernels is not None:
            kernels.fwd, kernels.dkdv, kernels.dq = "triton decode " + description, "", ""
        return out
    out = _FlashAttention.apply(q, k, v, p, kernels)
    return out.squeeze(0).transpose(0, 1) if varlen else out
