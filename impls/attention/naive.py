"""Attention as written in the textbook: the (Sq x Sk) score matrix is
materialized, softmaxed, and multiplied by V. Memory grows with Sq·Sk.

Causal attention with fewer queries than keys is aligned bottom-right
(`causal_mask`): the queries are the last Sq positions of the sequence, as in
decoding against a KV cache (flash-attention's convention, and PyTorch's
`causal_lower_right`; `is_causal` in scaled_dot_product_attention aligns
top-left instead).

Also the float64 reference that every other implementation is checked
against (`reference`), computed in slices of heads to bound its memory.
"""

from __future__ import annotations

import math

import torch


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


def attention(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    B, H, Sq, D = q.shape  # (B, H, Sq, D); k, v (B, Hkv, Sk, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = expand_kv(k, H), expand_kv(v, H)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        scores = scores.masked_fill(~causal_mask(Sq, k.shape[2], q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def reference(q, k, v, causal: bool, dout: torch.Tensor | None = None, max_elems: int = 2**28):
    """Float64 attention output, and the gradients of <out, dout> when dout is given.

    Works one batch element and one group of kv heads at a time so the float64
    score matrix stays under `max_elems` elements where the shape allows.
    Returns (out, (dq, dk, dv) or None), on q's device, in float64.
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    grads = None
    if dout is not None:
        grads = tuple(torch.empty(t.shape, dtype=torch.float64, device=q.device) for t in (q, k, v))
    kv_per_chunk = max(1, min(Hkv, max_elems // max(1, G * Sq * Sk)))
    for b in range(B):
        for h0 in range(0, Hkv, kv_per_chunk):
            hk = slice(h0, min(Hkv, h0 + kv_per_chunk))
            hq = slice(hk.start * G, hk.stop * G)
            qs, ks, vs = (t[b : b + 1, s].double() for t, s in ((q, hq), (k, hk), (v, hk)))
            if dout is None:
                out[b : b + 1, hq] = attention(qs, ks, vs, causal)
                continue
            qs, ks, vs = (t.requires_grad_() for t in (qs, ks, vs))
            with torch.enable_grad():
                o = attention(qs, ks, vs, causal)
                dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), dout[b : b + 1, hq].double())
            out[b : b + 1, hq] = o.detach()
            grads[0][b : b + 1, hq], grads[1][b : b + 1, hk], grads[2][b : b + 1, hk] = dq, dk, dv
    return out, grads
