"""PyTorch's scaled_dot_product_attention, either letting PyTorch choose the
backend (`backend=None`) or forcing one through torch.nn.attention.sdpa_kernel.

`chosen_backend` asks PyTorch which fused backend it would pick for these
inputs (torch._fused_sdp_choice, the dispatcher's own choice function; private,
so feature-detected).

Causal attention with q_len != kv_len: PyTorch's `is_causal` aligns the mask
top-left, genbench bottom-right (impls/attention/naive.py `causal_mask`), so
those calls pass the bottom-right mask as an explicit boolean `attn_mask`
instead, made once per shape and device (`_bottom_right`). A backend that
takes no mask (flash) then declines, and `why_not` gives PyTorch's reason.
A single query (decode) sees every key: no mask is passed.

Masks (impls/attention/naive.py `Masks`): a sliding window and ALiBi go in as
an explicit float `attn_mask`, the additive bias naive.bias builds (−inf where
masked, −slope·(i − j) for ALiBi), (1, H, Sq, Sk), cached per shape. It
materializes Sq·Sk scores per head, as naive does: fine for checking and
timing the rows, not what a served kernel would do. A backend that takes no
explicit mask declines it (`why_not` gives PyTorch's reason). SDPA has no
logit soft-capping: `why_not` says so.

Variable-length batches (naive.Varlen): SDPA has no cu_seqlens, so the rows
loop over the packed sequences, one SDPA call per non-empty sequence (square,
so `is_causal` aligns right and backends without masks run it), writing into
the packed output: no padding and no block-diagonal T x T mask, the work done
is the real tokens', and the time includes one kernel launch per sequence
(and, with a window or ALiBi over more than four distinct lengths, building
their float masks again, as `_bias` keeps four).

Paged KV caches (a `block_table`): SDPA reads contiguous K and V only, so the
rows gather the pages first (naive.gather_pages) and then attend; the gather,
a copy of the cache, is inside the timed call.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from impls.attention.naive import NO_MASKS, Masks, Varlen, alibi_slopes, bias, causal_mask, gather_pages

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.lru_cache(maxsize=4)
def _bottom_right(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return causal_mask(q_len, kv_len, device)


@functools.lru_cache(maxsize=4)
def _bias(q_len: int, kv_len: int, causal: bool, masks: Masks, heads: int, dtype, device) -> torch.Tensor:
    slopes = alibi_slopes(heads) if masks.alibi else None
    return bias(q_len, kv_len, causal, masks, slopes, dtype, device)[None]  # (1, H or 1, Sq, Sk)


def _mask(q, k, causal: bool, masks: Masks = NO_MASKS) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA: is_causal where top-left and bottom-right
    agree (q_len == kv_len); no mask at all for one query, the last position,
    which sees every key (decode: so the backends that take no mask run it);
    the float bias for a window or ALiBi."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if masks.window is not None or masks.alibi:
        return _bias(q_len, kv_len, causal, masks, q.shape[1], q.dtype, q.device), False
    if causal and q_len == 1:
        return None, False
    if causal and q_len != kv_len:
        return _bottom_right(q_len, kv_len, q.device), False
    return None, causal


def attention(q, k, v, causal: bool, scale: float | None = None, backend: str | None = None,
              masks: Masks = NO_MASKS, varlen: Varlen | None = None,
              block_table: torch.Tensor | None = None) -> torch.Tensor:
    if masks.softcap is not None:
        raise ValueError(NO_SOFTCAP)
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    if varlen is not None:
        out = torch.zeros_like(q)
        for s, e in varlen.spans():
            out[:, :, s:e] = attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal, scale, backend, masks)
        return out
    gqa = q.shape[1] != k.shape[1]
    mask, is_causal = _mask(q, k, causal, masks)
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)


NO_SOFTCAP = "SDPA has no logit soft-capping"


def why_not(q, k, v, causal: bool, backend: str | None, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
            block_table: torch.Tensor | None = None) -> str | None:
    """None if the backend (None: PyTorch's choice) runs on these inputs,
    else PyTorch's reason (the error and the warnings in which the dispatcher
    says why each fused kernel declined)."""
    if masks.softcap is not None:
        return NO_SOFTCAP
    if backend is None:
        return None
    if q.device.type != "cuda" and backend in ("efficient", "cudnn"):
        return f"the {backend} backend needs a CUDA device"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                attention(q, k, v, causal, backend=backend, masks=masks, varlen=varlen, block_table=block_table)
        except RuntimeError as exc:
            reasons = [str(w.message).split("\n")[0] for w in caught if "kernel" in str(w.message).lower()]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no kernel"
            return "; ".join([first, *reasons[:2]])[:300]
    return None


def chosen_backend(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
                   block_table: torch.Tensor | None = None) -> str:
    """PyTorch's choice for these inputs (for a packed batch, for its longest sequence),
    prefixed "gather+" when the pages are gathered first and "per-sequence " for a packed batch."""
    prefix = "gather+" if block_table is not None else ""
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    if varlen is not None:
        spans = varlen.spans()
        if not spans:
            return "per-sequence (none)"
        s, e = max(spans, key=lambda span: span[1] - span[0])
        return "per-sequence " + chosen_backend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal, masks)
    return prefix + _choice(q, k, v, causal, masks)


def _choice(q, k, v, causal: bool, masks: Masks) -> str:
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    try:
        mask, is_causal = _mask(q, k, causal, masks)
        index = choose(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=None,
                       enable_gqa=q.shape[1] != k.shape[1])
        return SDPBackend(index).name.lower().replace("_attention", "")
    except (RuntimeError, TypeError, ValueError):
        return "unknown"
