"""PyTorch's FlexAttention (torch.nn.attention.flex_attention): attention whose
mask is a BlockMask, compiled by torch.compile into one fused Triton kernel.

    from impls.attention import flex
    if flex.why_not(q, k, v, causal=True) is None:
        out = flex.attention(q, k, v, causal=True)   # (B, H, Sq, D), differentiable

Causal attention is aligned bottom-right (impls/attention/naive.py
`causal_mask`): query i, at position Sk - Sq + i, sees keys up to it. The
BlockMask is built once per (Sq, Sk, window, device) and cached (`block_mask`),
so a timed call only runs the kernel.

Masks (impls/attention/naive.py `Masks`): causal and the sliding window are
the BlockMask's mask_mod (blocks wholly outside the window are skipped);
soft-capping and ALiBi a score_mod, applied in naive's order (cap, then bias).

Variable-length batches (naive.Varlen), packed (1, H, T, D): the document
mask. The BlockMask's mask_mod looks up each position's sequence in a (T,)
tensor of sequence ids and keeps pairs of the same sequence (causal and the
window within it), so blocks that straddle no sequence of the query's are
skipped; a square sequence's relative positions are the packed ones' shifted
alike, so ALiBi's score_mod needs no change. Paged KV caches: flex reads
contiguous K and V, so the pages are gathered first (naive.gather_pages), a
copy inside the timed call.

On CUDA the call goes through torch.compile (without it flex_attention runs an
unfused fallback that materializes the score matrix). On a CPU it runs that
eager fallback: compiling there works, but takes tens of seconds per shape,
and the CPU rows check correctness rather than speed; `kernel` says which ran.
"""

from __future__ import annotations

import functools
import warnings

import torch

from impls.attention.naive import NO_MASKS, Masks, Varlen, alibi_slopes, gather_pages

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    FLEX_ERROR = None
except ImportError as exc:  # torch before 2.5
    FLEX_ERROR = f"torch.nn.attention.flex_attention not importable: {exc}"


def compiled(device: torch.device) -> bool:
    """Whether calls on `device` go through torch.compile (CUDA) or the eager fallback (elsewhere)."""
    return device.type == "cuda"


@functools.cache
def _compiled_flex():
    # One compilation per shape and mask. Past dynamo's recompile limit (8) it
    # would run the eager fallback instead, silently: a sweep's shapes fit
    # under a higher limit, and a call beyond it fails (an error row) rather
    # than time the fallback as if compiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def block_mask(q_len: int, kv_len: int, device: torch.device, window: int | None = None):
    """The bottom-right causal BlockMask of a (q_len, kv_len) shape, for every
    batch element and head; with a window, query position i sees keys i - window < j <= i."""
    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx < window)

    return create_block_mask(causal if window is None else sliding, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len,
                             device=device)


@functools.lru_cache(maxsize=4)
def document_mask(varlen: Varlen, causal: bool, device: torch.device, window: int | None = None):
    """The BlockMask of a packed batch: query and key in the same sequence,
    causal within it (and the window); packed positions, as each sequence is square."""
    doc = torch.repeat_interleave(torch.arange(len(varlen.lengths), device=device),
                                  torch.tensor(varlen.lengths, device=device))  # (T,) sequence of each position

    def same(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def same_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def same_sliding(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    mod = same if not causal else same_causal if window is None else same_sliding
    return create_block_mask(mod, B=None, H=None, Q_LEN=varlen.total, KV_LEN=varlen.total, device=device)


@functools.lru_cache(maxsize=8)
def score_mod(q_len: int, kv_len: int, softcap: float | None, alibi_heads: int | None, device: torch.device):
    """Soft-capping, X·tanh(s / X), then ALiBi's bias −slope_h·(i − j); None
    without either. Cached, so a compiled call sees the same function each time."""
    if softcap is None and alibi_heads is None:
        return None
    offset = kv_len - q_len
    slopes = None if alibi_heads is None else alibi_slopes(alibi_heads).to(device=device, dtype=torch.float32)

    def mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx + offset - kv_idx)
        return score

    return mod


def why_not(q, k, v, causal: bool, masks: Masks = NO_MASKS, varlen: Varlen | None = None,
            block_table: torch.Tensor | None = None) -> str | None:
    """None if `attention` runs these inputs here, else why not (inputs that
    require grad ask for the backward too)."""
    if FLEX_ERROR is not None:
        return FLEX_ERROR
    if block_table is not None:
        k = gather_pages(k, block_table)
    if causal and q.shape[-2] > k.shape[-2]:
        return f"causal with {q.shape[-2]} queries over {k.shape[-2]} keys: the first queries would see no key"
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return "empty input"
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
    return None


# Queries shorter than a block (< 128) lower to inductor's flex-decoding kernel,
# which stacks the query rows of the heads that share a kv head (q_len x group)
# into one block, by default that product rounded up to a power of two. Past
# the BlockMask's 128-row blocks no config is left to choose from
# (NoValidChoicesError: tree verification at q_len 64 over 4 query heads per kv
# head on the H100). Capping flex-decoding's block at 128 rows ran, but slowly:
# 52.8 ms at q_len 64 over a 32k cache (batch 8, 32 query heads over 8, D 128,
# bf16) on the H100, against 1.66 ms for flex's main kernel on the same inputs
# (docs/measurements.md). So those shapes take the main kernel.
MASK_BLOCK = 128


def kernel_options(q_len: int, group: int) -> dict | None:
    """The kernel_options a compiled call passes: flex's main kernel where flex-decoding's
    stacked rows (q_len x group) would exceed the mask's block."""
    if q_len < MASK_BLOCK and q_len * group > MASK_BLOCK:
        return {"FORCE_USE_FLEX_ATTENTION": True}
    return None


def describe(q) -> str:
    return "flex compiled" if compiled(q.device) else "flex eager (unfused: materializes the scores)"


def attention(q, k, v, causal: bool, scale: float | None = None, masks: Masks = NO_MASKS,
              varlen: Varlen | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale (+ bottom-right causal mask, masks)) v; q (B, H, Sq, D), k and v (B, Hkv, Sk, D),
    or pages with `block_table`; with `varlen`, packed (1, H or Hkv, T, D)."""
    reason = why_not(q, k, v, causal, masks, varlen, block_table)
    if reason is not None:
        raise ValueError(f"flex attention cannot run this input: {reason}")
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if varlen is not None:
        mask = document_mask(varlen, causal, q.device, masks.window)
    else:
        # One query, the last position, sees every key (but for a window): no mask to apply.
        masked = causal and (q_len > 1 or (masks.window is not None and masks.window < kv_len))
        mask = block_mask(q_len, kv_len, q.device, masks.window) if masked else None
    mod = score_mod(q_len, kv_len, masks.softcap, q.shape[1] if masks.alibi else None, q.device)
    gqa = q.shape[1] != k.shape[1]
    if compiled(q.device):
        options = kernel_options(q_len, q.shape[1] // k.shape[1])
        extra = {"kernel_options": options} if options else {}
        return _compiled_flex()(q, k, v, score_mod=mod, block_mask=mask, scale=scale, enable_gqa=gqa, **extra)
    with warnings.catch_warnings():
        # The eager fallback warns that it is unfused on every call; describe() says so once, in the row.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=mod, block_mask=mask, scale=scale, enable_gqa=gqa)
