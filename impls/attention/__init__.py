"""Attention implementations measured by `genbench attention`.

Every implementation has the signature

    attention(q, k, v, causal: bool, scale: float | None = None) -> out

with q of shape (B, H, S, D) and k, v of shape (B, Hkv, S, D), where Hkv
divides H (grouped-query attention: query head h reads kv head h // (H // Hkv)).
"""
