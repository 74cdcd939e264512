"""The attention kernels users install, as genbench rows: flash-attention 2
(`flash_attn`), flash-attention 3 (`flash_attn_interface`), FlashInfer and
xformers. None is required: an absent one is an unsupported row saying
`not installed` (`why_not`), never an import error.

    from impls.attention import third_party
    row = third_party.ROWS["flash-attn"]
    if row.why_not(q, k, v, causal=True) is None:
        out = row.attention(q, k, v, causal=True)

Every adapter takes genbench's contract (impls/attention/__init__.py): q
(B, H, Sq, D), k and v (B, Hkv, Sk, D), causal aligned bottom-right, masks
(naive.Masks), a packed batch `varlen` (q, k, v (1, H, T, D)) or pages with a
`block_table` (k, v (num_pages, page_size, Hkv, D)), and calls the library in
its own layout, saying in `describe` (the kernel column) which function ran:

- flash-attention 2: `flash_attn_func` (B, S, H, D), `flash_attn_varlen_func`
  (T, H, D) with int32 cu_seqlens, `flash_attn_with_kvcache` for pages
  (block_table int32; page sizes multiples of 256). The (B, S, H, D) tensors
  are transposed views of ours (the library needs only the last dimension
  contiguous): no copy. Causal is bottom-right there too; the window is
  window_size=(N − 1, 0); soft-capping `softcap`; ALiBi `alibi_slopes`
  (float32, one per head), whose bias −slope·|i − j| is genbench's with causal
  only. fp16 and bf16 only.
- flash-attention 3: the same three functions of `flash_attn_interface`
  (pages as `page_table`); no ALiBi.
- FlashInfer, forward only: one sequence through `single_decode_with_kv_cache`
  (q_len 1) or `single_prefill_with_kv_cache`; a batch through
  `BatchDecodeWithPagedKVCacheWrapper` (q_len 1) or
  `BatchPrefillWithPagedKVCacheWrapper`, with a contiguous cache read as one
  page per sequence in the HND layout (our (B, Hkv, Sk, D) is exactly that:
  no copy) and genbench's pages in the NHD layout; a packed batch through
  `BatchPrefillWithRaggedKVCacheWrapper`. The wrappers are planned once per
  shape, outside the timed call (as a server plans once per batch for all
  layers). Queries of more than one position, and a packed batch's q, k and v,
  are copied to FlashInfer's (tokens, heads, D), inside the timed call. The
  window is window_left = N − 1, soft-capping logits_soft_cap, ALiBi
  pos_encoding_mode "ALIBI" (FlashInfer's slopes are the paper's, as ours).
- xformers: `memory_efficient_attention` on (B, S, H, D) views, grouped-query
  heads as its 5-D (B, S, Hkv, G, D) form with K and V broadcast over G;
  causal as LowerTriangularFromBottomRightMask, the window as
  LowerTriangularFromBottomRightLocalAttentionMask, a packed batch as
  BlockDiagonalCausalMask.from_seqlens (empty sequences left out). No ALiBi,
  soft-capping or pages.

What a library cannot run here is the row's `why_not`; what it raises on a
shape it declines (a head dim, a dtype) becomes an error row with its message.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from impls.attention.naive import NO_MASKS, Masks, Varlen, alibi_slopes

FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's examples' size for the wrappers' scratch space


@dataclass(frozen=True)
class Row:
    attention: Callable[..., torch.Tensor]
    why_not: Callable[..., str | None]
    describe: Callable[..., str]


def _module(name: str):
    """The imported module, or the reason it is not there (a string)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.split(".")[0] != exc.name.split(".")[0]:
            return f"{name} not importable: {exc}"  # installed, but a dependency of it is missing
        return f"{name.split('.')[0]} not installed"
    except (ImportError, OSError) as exc:  # a build that does not match this torch or driver
        return f"{name} not importable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _requires_grad(*tensors) -> bool:
    return any(t.requires_grad for t in tensors)


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> a (B, S, H, D) view: no copy, the last dimension still contiguous."""
    return t.transpose(1, 2)


def _packed(t: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) -> a (T, H, D) view."""
    return t[0].transpose(0, 1)


@functools.lru_cache(maxsize=8)
def _slopes(heads: int, device: torch.device) -> torch.Tensor:
    return alibi_slopes(heads).to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _full_lengths(batch: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), kv_len, dtype=torch.int32, device=device)


# flash-attention 2 and 3

def _flash_args(q, causal: bool, masks: Masks, fa3: bool) -> dict:
    args = {"causal": causal}
    if masks.window is not None:
        args["window_size"] = (masks.window - 1, 0)  # keys i - (N - 1) .. i
    if masks.softcap is not None:
        args["softcap"] = masks.softcap
    if masks.alibi and not fa3:
        args["alibi_slopes"] = _slopes(q.shape[1], q.device)
    return args


def _first(result):
    # Some flash-attention 3 builds return (out, softmax_lse).
    return result[0] if isinstance(result, tuple) else result


def _flash_attention(q, k, v, causal: bool, scale: float | None = None, masks: Masks = NO_MASKS,
                     varlen: Varlen | None = None, block_table: torch.Tensor | None = None, fa3: bool = False):
    fa = _module("flash_attn_interface" if fa3 else "flash_attn")
    assert not isinstance(fa, str), fa
    args = {"softmax_scale": scale, **_flash_args(q, causal, masks, fa3)}
    if varlen is not None:
        cu = varlen.cu_seqlens(q.device)
        out = fa.flash_attn_varlen_func(_packed(q), _packed(k), _packed(v), cu, cu, varlen.max_len,
                                        varlen.max_len, **args)
        return _first(out).transpose(0, 1)[None]
    if block_table is not None:
        pages = {"page_table" if fa3 else "block_table": block_table}
        lengths = _full_lengths(q.shape[0], block_table.shape[1] * k.shape[1], q.device)
        out = fa.flash_attn_with_kvcache(_bshd(q), k, v, cache_seqlens=lengths, **pages, **args)
        return _first(out).transpose(1, 2)
    return _first(fa.flash_attn_func(_bshd(q), _bshd(k), _bshd(v), **args)).transpose(1, 2)


FA2_PAGE = 256  # flash_attn_with_kvcache's paged KV needs page sizes that are multiples of this


def _flash_why_not(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                   block_table: torch.Tensor | None = None, fa3: bool = False) -> str | None:
    name = "flash_attn_interface" if fa3 else "flash_attn"
    fa = _module(name)
    if isinstance(fa, str):
        return fa
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} takes fp16 and bf16 only"
    if masks.alibi and fa3:
        return "flash-attention 3 has no ALiBi"
    if masks.alibi and not causal:
        return "flash-attention's ALiBi is −slope·|i − j|; genbench's without causal is −slope·(i − j)"
    if block_table is not None and not fa3 and k.shape[1] % FA2_PAGE:
        return f"flash_attn_with_kvcache takes pages of a multiple of {FA2_PAGE} positions, not {k.shape[1]}"
    return None


def _flash_describe(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                    block_table: torch.Tensor | None = None, fa3: bool = False) -> str:
    fn = "flash_attn_varlen_func" if varlen else "flash_attn_with_kvcache" if block_table is not None else \
        "flash_attn_func"
    return f"{'flash_attn_interface' if fa3 else 'flash_attn'}.{fn}"


# FlashInfer

@functools.lru_cache(maxsize=2)
def _workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _infer_args(masks: Masks) -> dict:
    return {"pos_encoding_mode": "ALIBI" if masks.alibi else "NONE",
            "window_left": -1 if masks.window is None else masks.window - 1,
            "logits_soft_cap": masks.softcap}


@functools.lru_cache(maxsize=8)
def _planned(kind: str, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, head_dim: int,
             page_size: int, causal: bool, masks: Masks, dtype: torch.dtype, device: torch.device,
             block_table: torch.Tensor | None, lengths: tuple[int, ...] | None):
    """A FlashInfer batch wrapper planned for one shape (and block table, by identity): planning is per
    batch, outside the timed call."""
    fi = _module("flashinfer")
    common = dict(**_infer_args(masks), q_data_type=dtype, kv_data_type=dtype)
    if kind == "ragged":
        cu = Varlen(lengths).cu_seqlens(device)
        wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(_workspace(device), "NHD")
        wrapper.plan(cu, cu, heads, kv_heads, head_dim, causal=causal, **common)
        return wrapper
    per_seq = kv_len // page_size
    indices = (block_table.flatten() if block_table is not None  # each sequence's pages, in order
               else torch.arange(batch, dtype=torch.int32, device=device))
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * per_seq
    last = torch.full((batch,), page_size, dtype=torch.int32, device=device)
    layout = "NHD" if block_table is not None else "HND"
    if kind == "decode":
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(_workspace(device), layout)
        wrapper.plan(indptr, indices, last, heads, kv_heads, head_dim, page_size, **common)
    else:
        wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(_workspace(device), layout)
        qo = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
        wrapper.plan(qo, indptr, indices, last, heads, kv_heads, head_dim, page_size, causal=causal, **common)
    return wrapper


def _flashinfer_attention(q, k, v, causal: bool, scale: float | None = None, masks: Masks = NO_MASKS,
                          varlen: Varlen | None = None, block_table: torch.Tensor | None = None):
    fi = _module("flashinfer")
    assert not isinstance(fi, str), fi
    assert scale is None, "the FlashInfer rows use the default scale, 1/sqrt(D)"
    B, H, Sq, D = q.shape
    Hkv = k.shape[1] if block_table is None else k.shape[2]
    if varlen is not None:
        wrapper = _planned("ragged", 1, 0, 0, H, Hkv, D, 0, causal, masks, q.dtype, q.device, None, varlen.lengths)
        qs, ks, vs = (_packed(t).contiguous() for t in (q, k, v))
        return wrapper.run(qs, ks, vs).transpose(0, 1)[None]
    if block_table is None and B == 1:
        args = dict(kv_layout="HND", **_infer_args(masks))
        if Sq == 1:
            return fi.single_decode_with_kv_cache(q[0, :, 0], k[0], v[0], **args)[None, :, None]
        out = fi.single_prefill_with_kv_cache(q[0].transpose(0, 1).contiguous(), k[0], v[0], causal=causal, **args)
        return out.transpose(0, 1)[None]
    page_size = k.shape[2] if block_table is None else k.shape[1]  # without pages, one HND page per sequence
    Sk = page_size if block_table is None else block_table.shape[1] * page_size
    kind = "decode" if Sq == 1 else "prefill"
    wrapper = _planned(kind, B, Sq, Sk, H, Hkv, D, page_size, causal, masks, q.dtype, q.device, block_table, None)
    cache = (k, v)
    if kind == "decode":
        return wrapper.run(q[:, :, 0], cache)[:, :, None]
    out = wrapper.run(q.transpose(1, 2).reshape(B * Sq, H, D), cache)
    return out.reshape(B, Sq, H, D).transpose(1, 2)


def _flashinfer_why_not(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                        block_table: torch.Tensor | None = None) -> str | None:
    fi = _module("flashinfer")
    if isinstance(fi, str):
        return fi
    if _requires_grad(q, k, v):
        return "FlashInfer has no backward (inference kernels)"
    return None


def _flashinfer_describe(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                         block_table: torch.Tensor | None = None) -> str:
    if varlen is not None:
        return "flashinfer.BatchPrefillWithRaggedKVCacheWrapper"
    decode = q.shape[2] == 1
    if block_table is None and q.shape[0] == 1:
        return f"flashinfer.single_{'decode' if decode else 'prefill'}_with_kv_cache"
    return f"flashinfer.Batch{'Decode' if decode else 'Prefill'}WithPagedKVCacheWrapper" + (
        "" if block_table is not None else " (a page per sequence)")


# xformers

def _xformers_bias(fmha_bias, q_len: int, kv_len: int, causal: bool, masks: Masks, varlen: Varlen | None):
    if varlen is not None:
        lengths = [n for n in varlen.lengths if n > 0]
        if not causal:
            return fmha_bias.BlockDiagonalMask.from_seqlens(lengths)
        mask = fmha_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
        return mask if masks.window is None else mask.make_local_attention(masks.window)
    if masks.window is not None:
        return fmha_bias.LowerTriangularFromBottomRightLocalAttentionMask(masks.window)
    if causal:
        return fmha_bias.LowerTriangularMask() if q_len == kv_len else fmha_bias.LowerTriangularFromBottomRightMask()
    return None


def _xformers_attention(q, k, v, causal: bool, scale: float | None = None, masks: Masks = NO_MASKS,
                        varlen: Varlen | None = None, block_table: torch.Tensor | None = None):
    xops, fmha_bias = _module("xformers.ops"), _module("xformers.ops.fmha.attn_bias")
    assert not isinstance(xops, str) and not isinstance(fmha_bias, str), (xops, fmha_bias)
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    qs, ks, vs = _bshd(q), _bshd(k), _bshd(v)
    if G > 1:  # xformers' grouped-query form: (B, S, Hkv, G, D), K and V broadcast over the group
        qs = qs.unflatten(2, (Hkv, G))
        ks, vs = (t.unsqueeze(3).expand(B, Sk, Hkv, G, D) for t in (ks, vs))
    bias = _xformers_bias(fmha_bias, Sq, Sk, causal, masks, varlen)
    out = xops.memory_efficient_attention(qs, ks, vs, attn_bias=bias, scale=scale)
    return out.reshape(B, Sq, H, D).transpose(1, 2)


def _xformers_why_not(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                      block_table: torch.Tensor | None = None) -> str | None:
    xops = _module("xformers.ops")
    if isinstance(xops, str):
        return xops
    if block_table is not None:
        return "memory_efficient_attention reads contiguous K and V (no block table)"
    if masks.alibi or masks.softcap is not None:
        return "memory_efficient_attention has no ALiBi or soft-capping bias here"
    return None


def _xformers_describe(q, k, v, causal: bool, **kw) -> str:
    return "xformers.ops.memory_efficient_attention"


ROWS: dict[str, Row] = {
    "flash-attn": Row(_flash_attention, _flash_why_not, _flash_describe),
    "flash-attn3": Row(*(functools.partial(f, fa3=True) for f in (_flash_attention, _flash_why_not, _flash_describe))),
    "flashinfer": Row(_flashinfer_attention, _flashinfer_why_not, _flashinfer_describe),
    "xformers": Row(_xformers_attention, _xformers_why_not, _xformers_describe),
}
