"""PyTorch's scaled_dot_product_attention, either letting PyTorch choose the
backend (`backend=None`) or forcing one through torch.nn.attention.sdpa_kernel.

`chosen_backend` asks PyTorch which fused backend it would pick for these
inputs (torch._fused_sdp_choice, the dispatcher's own choice function; private,
so feature-detected).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention(q, k, v, causal: bool, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def why_not(q, k, v, causal: bool, backend: str) -> str | None:
    """None if the forced backend runs on these inputs, else PyTorch's reason
    (the error and the warnings in which the dispatcher says why each fused
    kernel declined)."""
    if q.device.type != "cuda" and backend in ("efficient", "cudnn"):
        return f"the {backend} backend needs a CUDA device"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                attention(q, k, v, causal, backend=backend)
        except RuntimeError as exc:
            reasons = [str(w.message).split("\n")[0] for w in caught if "kernel" in str(w.message).lower()]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no kernel"
            return "; ".join([first, *reasons[:2]])[:300]
    return None


def chosen_backend(q, k, v, causal: bool) -> str:
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    try:
        index = choose(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=None,
                       enable_gqa=q.shape[1] != k.shape[1])
        return SDPBackend(index).name.lower().replace("_attention", "")
    except (RuntimeError, TypeError, ValueError):
        return "unknown"
