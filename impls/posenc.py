"""Positional encodings, as plain functions: what the GPT (impls/gpt.py) and
the posenc suite apply.

    pe = sinusoidal(torch.arange(T), C)                 # (T, C), added to the token embeddings
    cos, sin = rope_angles(torch.arange(T) + offset, D) # (T, D/2) each, float32
    q = apply_rope(q, cos, sin, layout="neox")          # q (..., T, D) rotated pairwise
    flash.attention(q, k, v, True, rope=Rope("gptj"))   # the same rotation inside the attention kernels
    bias = alibi_bias(H, q_pos, k_pos)                  # (H, Tq, Tk), added to the attention scores

The encodings (`ENCODINGS`, the names GPTConfig.pos_encoding takes):
- `learned`: a trained table of absolute positions added to the token
  embeddings (GPT-2); the table is nn.Embedding in impls/gpt.py.
- `sinusoidal`: the fixed table of Vaswani et al. 2017, section 3.5,
  PE(p, 2i) = sin(p / 10000^(2i/C)), PE(p, 2i+1) = cos(...), added likewise.
- `rope`, `rope-gptj`: rotary embeddings (Su et al. 2021, RoFormer): q and k
  of every head are rotated, pair of dimensions i by the angle p·θ_i,
  θ_i = base^(-2i/D), so that <R_m q, R_n k> depends on m − n only. Two
  layouts of the pairs are in use: `neox` (GPT-NeoX, LLaMA, HF: dimension i
  pairs with i + D/2, "rotate half") and `gptj` (GPT-J, Mesh-TF: 2i pairs
  with 2i + 1, interleaved). They are the same rotation under a fixed
  permutation of the head dimension (`NEOX_FROM_GPTJ`), so a model trained
  in one layout runs in the other with its q/k weight rows permuted.
- `alibi`: no embedding; −slope_h·(i − j) added to the scores (Press et al.
  2022), slopes from impls/attention/naive.py `alibi_slopes`.
- `none`: nothing (NoPE): causal attention alone tells positions apart.

RoPE's inference-time extensions to lengths past the training context L,
by a factor s (`RopeScaling`):
- position interpolation (`pi`, Chen et al. 2023, arXiv:2306.15595): every
  position divided by s, so that the angles stay within those trained;
- NTK-aware scaling (`ntk`, bloc97 2023, as adopted by Code Llama and YaRN,
  Peng et al. 2023, eq. 16): base raised to base·s^(D/(D−2)), which leaves
  the fastest-turning pair as trained and interpolates the slowest by s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impls.attention.naive import alibi_slopes

ENCODINGS = ("learned", "sinusoidal", "rope", "rope-gptj", "alibi", "none")
ROPE_LAYOUTS = {"rope": "neox", "rope-gptj": "gptj"}  # encoding -> layout of its pairs
LAYOUTS = ("neox", "gptj")
SCALINGS = ("pi", "ntk")
ROPE_BASE = 10000.0  # RoFormer's and LLaMA-1's


@dataclass(frozen=True)
class RopeScaling:
    """RoPE applied past its training context by `factor` (s >= 1): `pi` or `ntk`."""

    kind: str
    factor: float

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; known: {', '.join(SCALINGS)}")
        if not self.factor >= 1.0:
            raise ValueError(f"a RoPE scaling factor is at least 1, got {self.factor}")


@dataclass(frozen=True)
class Rope:
    """RoPE as an attention kernel applies it to the unrotated q and k it is
    given (impls/attention/flash.py `rope=`): the layout of the pairs, the base
    of θ_i, a scaling, and the position of the first key: key j sits at
    offset + j, and query i of Sq against Sk keys at offset + i + Sk − Sq."""

    layout: str = "neox"
    base: float = ROPE_BASE
    scaling: RopeScaling | None = None
    offset: int = 0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown RoPE layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.offset < 0:
            raise ValueError(f"a RoPE offset is a position, 0 or more, got {self.offset}")


def check_head_dim(head_dim: int) -> None:
    """RoPE rotates pairs of dimensions: an odd head dimension has no pairing."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension (it rotates pairs), got {head_dim}")


def sinusoidal(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The sinusoidal table (T, dim) in float32 for integer `positions` (T,):
    sin at even columns, cos at odd (Vaswani et al. 2017, 3.5). Angles are
    formed in float64, so a table far from position 0 is as exact as near it."""
    if dim % 2:
        raise ValueError(f"the sinusoidal table pairs sin and cos columns: dim must be even, got {dim}")
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # (dim/2,)
    angle = positions.to(torch.float64)[:, None] * freq[None, :]  # (T, dim/2)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2).float()  # (T, dim): sin, cos interleaved


def rope_frequencies(head_dim: int, base: float = ROPE_BASE, scaling: RopeScaling | None = None,
                     device=None) -> torch.Tensor:
    """θ_i = base^(-2i/D), i = 0 .. D/2 − 1, float64 (D/2,), with `scaling`
    applied: PI divides them by s (every angle p·θ_i becomes (p/s)·θ_i); NTK
    raises the base to base·s^(D/(D−2))."""
    check_head_dim(head_dim)
    if scaling is not None and scaling.kind == "ntk":
        base = base * scaling.factor ** (head_dim / (head_dim - 2))
    freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is not None and scaling.kind == "pi":
        freq = freq / scaling.factor
    return freq


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = ROPE_BASE,
                scaling: RopeScaling | None = None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p·θ_i, each (T, D/2) in `dtype`, for integer positions (T,).
    The angles are formed in float64: at position 30,000 a float32 product
    would already be off by 2e-3 radians."""
    angle = positions.to(torch.float64)[:, None] * rope_frequencies(head_dim, base, scaling, positions.device)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "neox") -> torch.Tensor:
    """x (..., T, D) with pair i rotated by the angle whose cos and sin
    (T, D/2) are given; the arithmetic in x's dtype, as an eager model does.
    Rotating by −θ (sin negated) undoes it, and is the backward."""
    D = x.shape[-1]
    check_head_dim(D)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if layout == "neox":  # pair (i, i + D/2)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if layout == "gptj":  # pair (2i, 2i + 1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    raise ValueError(f"unknown RoPE layout {layout!r}; known: {', '.join(LAYOUTS)}")


def neox_from_gptj(head_dim: int) -> torch.Tensor:
    """The permutation P of the head dimension with neox(x[P]) = gptj(x)[P]:
    the even dimensions first, then the odd ones (pair i = (2i, 2i+1) lands on (i, i + D/2))."""
    check_head_dim(head_dim)
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def alibi_bias(heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """ALiBi's additive score bias (H, Tq, Tk): −slope_h·(i − j) for query
    position i, key position j (Press et al. 2022, eq. in section 3). Causal
    masking is the caller's: the bias is defined for every pair."""
    slopes = alibi_slopes(heads).to(q_pos.device)  # (H,) float64
    d = (q_pos[:, None] - k_pos[None, :]).to(torch.float64)  # (Tq, Tk)
    return (-slopes[:, None, None] * d).to(dtype)


def scaling_for(kind: str | None, eval_len: int, train_len: int) -> RopeScaling | None:
    """The scaling a user applies to run a RoPE model trained at train_len on
    eval_len tokens: factor eval_len / train_len (Chen et al. 2023 choose s
    = L'/L), none at or below the training length."""
    if kind is None or eval_len <= train_len:
        return None
    return RopeScaling(kind, eval_len / train_len)
