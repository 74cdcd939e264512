"""Attention implementations measured by `genbench attention`.

Every implementation has the signature

    attention(q, k, v, causal: bool, scale: float | None = None) -> out

with q of shape (B, H, Sq, D) and k, v of shape (B, Hkv, Sk, D), where Hkv
divides H (grouped-query attention: query head h reads kv head h // (H // Hkv)).
Sq = Sk is self-attention; with Sq < Sk causal attention is aligned
bottom-right, the queries being the last Sq positions (naive.causal_mask).
An implementation that takes Sq = Sk only says so (the suite's `why_not`).
"""
