"""Attention as written in the textbook: the (Sq x Sk) score matrix is
materialized, softmaxed, and multiplied by V. Memory grows with Sq·Sk.

Causal attention with fewer queries than keys is aligned bottom-right
(`causal_mask`): the queries are the last Sq positions of the sequence, as in
decoding against a KV cache (flash-attention's convention, and PyTorch's
`causal_lower_right`; `is_causal` in scaled_dot_product_attention aligns
top-left instead).

Masks beyond causal (`Masks`), applied in this order to the scaled scores
s = q·k^T·scale: logit soft-capping, s = X·tanh(s / X) (Gemma 2's); the ALiBi
bias, −slope_h·(i − j) (Press et al. 2022, "Train Short, Test Long"; slopes
in `alibi_slopes`); the sliding window with causal, query position i seeing
keys i − N < j <= i. Positions i, j are in the bottom-right aligned frame:
query row r sits at i = Sk − Sq + r. The ALiBi bias and the masks are one
additive (H, Sq, Sk) tensor (`bias`: −inf where masked), which the SDPA rows
pass as their float `attn_mask` too.

Variable-length batches (`Varlen`): sequences of different lengths packed
without padding into one (1, H, T, D) tensor, T the total of their lengths,
cu_seqlens (N + 1,) int32 their offsets (flash-attention's convention). Each
sequence attends only to itself (document masking), causal within it, and the
masks above apply in each sequence's own frame. naive and the reference loop
over the sequences; empty and 1-token sequences are allowed.

Paged KV caches (`pages`, `gather_pages`): the cache as (num_pages, page_size,
Hkv, D) pages and a (B, Sk / page_size) int32 block table naming each
sequence's pages in order (vLLM's and flash-attention's layout); naive gathers
the pages back into (B, Hkv, Sk, D) and attends.

Also the float64 reference that every other implementation is checked
against (`reference`), computed in slices of heads to bound its memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Masks:
    """What shapes the scores beside causal: a sliding window of N keys
    (causal only), tanh soft-capping at X, ALiBi. False when none is set."""

    window: int | None = None
    softcap: float | None = None
    alibi: bool = False

    def __bool__(self) -> bool:
        return self.window is not None or self.softcap is not None or self.alibi


NO_MASKS = Masks()


@dataclass(frozen=True)
class Varlen:
    """A packed batch of sequences of these lengths (0 allowed), each attending only to itself."""

    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each non-empty sequence in the packed tensor."""
        ends = [sum(self.lengths[: i + 1]) for i in range(len(self.lengths))]
        return [(e - n, e) for n, e in zip(self.lengths, ends) if n > 0]

    def cu_seqlens(self, device) -> torch.Tensor:
        """(N + 1,) int32 offsets, 0 first and T last; made once per device."""
        return _cu_seqlens(self.lengths, torch.device(device))


@functools.lru_cache(maxsize=8)
def _cu_seqlens(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def pages(k: torch.Tensor, page_size: int, generator: torch.Generator | None = None):
    """(B, Hkv, Sk, D) -> (pages (B·Sk/page_size, page_size, Hkv, D), block_table (B, Sk/page_size) int32).
    The pages are stored in a random order (`generator`, on the CPU), so a reader must follow the table."""
    B, Hkv, Sk, D = k.shape
    assert Sk % page_size == 0, f"page size {page_size} does not divide {Sk}"
    n = Sk // page_size
    order = torch.randperm(B * n, generator=generator).to(k.device)
    store = torch.empty(B * n, page_size, Hkv, D, dtype=k.dtype, device=k.device)
    store[order] = k.transpose(1, 2).reshape(B * n, page_size, Hkv, D)
    return store, order.reshape(B, n).to(torch.int32)


def gather_pages(store: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The cache a block table names, contiguous: (num_pages, P, Hkv, D), (B, n) -> (B, Hkv, n·P, D)."""
    B, n = block_table.shape
    _, P, Hkv, D = store.shape
    return store[block_table.long()].reshape(B, n * P, Hkv, D).transpose(1, 2)


def expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat each kv head for the query heads of its group: (B, Hkv, S, D) -> (B, H, S, D)."""
    group = heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """(Sq, Sk) booleans, True where a query may see a key, aligned bottom-right:
    query i sits at position kv_len - q_len + i and sees keys 0 .. that
    position. The square case is the usual lower triangle. Raises ValueError
    for q_len > kv_len, where the first queries would see no key."""
    if q_len > kv_len:
        raise ValueError(f"causal attention aligned bottom-right needs q_len <= kv_len, got {q_len} > {kv_len}")
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes, float64 (H,): for H a power of two the
    geometric sequence 2^(-8h/H), h = 1..H (H = 8: 1/2, 1/4, ..., 1/256).
    For other H, as the paper's reference code does (ofirpress/attention_with_linear_biases,
    `get_slopes`): the slopes of the largest power of two n < H, followed by
    every other one of the slopes for 2n (the 1st, 3rd, ...), H − n of them."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: heads - n]
    return torch.tensor(slopes, dtype=torch.float64)


def distance(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """(Sq, Sk) integers i − j: query row r at position i = Sk − Sq + r, key j, aligned bottom-right."""
    i = torch.arange(kv_len - q_len, kv_len, device=device)
    return i[:, None] - torch.arange(kv_len, device=device)[None, :]


def bias(q_len: int, kv_len: int, causal: bool, masks: Masks, slopes: torch.Tensor | None, dtype,
         device=None) -> torch.Tensor | None:
    """The additive score bias, (H, Sq, Sk) with ALiBi's `slopes` (H,), else (1, Sq, Sk):
    −slope·(i − j), and −inf where causal or the window masks a key. None
    with neither causal, window nor ALiBi."""
    if not (causal or masks.window is not None or masks.alibi):
        return None
    d = distance(q_len, kv_len, device)
    out = torch.zeros(1, q_len, kv_len, dtype=dtype, device=device)
    if masks.alibi:
        out = -slopes.to(device=device, dtype=dtype)[:, None, None] * d.to(dtype)
    visible = (d >= 0) if causal else torch.ones_like(d, dtype=torch.bool)
    if masks.window is not None:
        visible = visible & (d < masks.window)
    return out.masked_fill(~visible, float("-inf"))


def _attention(q, k, v, causal: bool, scale, masks: Masks, slopes) -> torch.Tensor:
    B, H, Sq, D = q.shape  # (B, H, Sq, D); k, v (B, Hkv, Sk, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = expand_kv(k, H), expand_kv(v, H)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if masks.softcap is not None:
        scores = masks.softcap * torch.tanh(scores / masks.softcap)
    if causal and not masks:
        scores = scores.masked_fill(~causal_mask(Sq, k.shape[2], q.device), float("-inf"))
    elif masks:
        if causal:
            causal_mask(Sq, k.shape[2])  # raises for q_len > kv_len, as without masks
        add = bias(Sq, k.shape[2], causal, masks, slopes, scores.dtype, q.device)
        scores = scores if add is None else scores + add
    return scores.softmax(dim=-1) @ v


def attention(q, k, v, causal: bool, scale: float | None = None, masks: Masks = NO_MASKS,
              varlen: Varlen | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, Sq, D); k, v (B, Hkv, Sk, D), or pages with `block_table`;
    with `varlen`, q, k, v packed as (1, H or Hkv, T, D)."""
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    slopes = alibi_slopes(q.shape[1]) if masks.alibi else None
    if varlen is None:
        return _attention(q, k, v, causal, scale, masks, slopes)
    out = torch.zeros_like(q)  # empty sequences have no rows; every other row is written below
    for s, e in varlen.spans():
        out[:, :, s:e] = _attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal, scale, masks, slopes)
    return out


def reference(q, k, v, causal: bool, dout: torch.Tensor | None = None, max_elems: int = 2**28,
              masks: Masks = NO_MASKS, varlen: Varlen | None = None):
    """Float64 attention output, and the gradients of <out, dout> when dout is given.

    Works one batch element and one group of kv heads at a time so the float64
    score matrix stays under `max_elems` elements where the shape allows;
    with `varlen`, one packed sequence at a time (empty ones have nothing).
    Returns (out, (dq, dk, dv) or None), on q's device, in float64.
    """
    if varlen is not None:
        out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
        grads = None if dout is None else tuple(torch.zeros(t.shape, dtype=torch.float64, device=q.device)
                                                 for t in (q, k, v))
        for s, e in varlen.spans():
            o, g = reference(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal,
                             None if dout is None else dout[:, :, s:e], max_elems, masks)
            out[:, :, s:e] = o
            for whole, part in zip(grads or (), g or ()):
                whole[:, :, s:e] = part
        return out, grads
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    grads = None
    if dout is not None:
        grads = tuple(torch.empty(t.shape, dtype=torch.float64, device=q.device) for t in (q, k, v))
    kv_per_chunk = max(1, min(Hkv, max_elems // max(1, G * Sq * Sk)))
    slopes = alibi_slopes(H) if masks.alibi else None
    for b in range(B):
        for h0 in range(0, Hkv, kv_per_chunk):
            hk = slice(h0, min(Hkv, h0 + kv_per_chunk))
            hq = slice(hk.start * G, hk.stop * G)
            qs, ks, vs = (t[b : b + 1, s].double() for t, s in ((q, hq), (k, hk), (v, hk)))
            sl = None if slopes is None else slopes[hq]
            if dout is None:
                out[b : b + 1, hq] = _attention(qs, ks, vs, causal, None, masks, sl)
                continue
            qs, ks, vs = (t.requires_grad_() for t in (qs, ks, vs))
            with torch.enable_grad():
                o = _attention(qs, ks, vs, causal, None, masks, sl)
                dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), dout[b : b + 1, hq].double())
            out[b : b + 1, hq] = o.detach()
            grads[0][b : b + 1, hq], grads[1][b : b + 1, hk], grads[2][b : b + 1, hk] = dq, dk, dv
    return out, grads
