"""A fused RoPE kernel in Triton: q and k rotated in one launch.

    q, k = rope(q, k, offset=30_000)                     # (B, S, H, D), (B, S, Hkv, D); out of place
    q, k = rope(q, k, table=RopeTable(32_768, 128, q.device), layout="gptj")
    rope(q, k, positions=pos, inplace=True)              # overwrite q and k

Token s of every sequence sits at position offset + s, or positions[s]. q and
k are (B, S, H, D) with the head dimension contiguous and any strides
elsewhere (a (B, H, S, D) tensor passes as its .transpose(1, 2) view). Both
layouts of impls/posenc.py: `neox` (pairs i, i + D/2) and `gptj` (pairs 2i,
2i + 1). The cos and sin of each angle are read from a cached table
(`RopeTable`, formed in float64, so exact at any position), or computed in
the kernel from the D/2 frequencies (`table=None`): no table to read, but the
angle p·θ_i is formed in float32, so off by up to about p·2^-24 radians (2e-3
at position 30,000), as in every float32 implementation.

Applying RoPE is memory-bound (a few FLOPs per element): one program per
token reads whole rows of its heads, each row as 16-byte vectors (the two
contiguous halves in the neox layout, the whole row split into its even and
odd lanes in the gptj layout), and writes them once, in place or to new
tensors. The backward is the rotation by −θ (a rotation's transpose), the
same kernel with the sine negated; `rope` is differentiable out of place and
in place (autograd's mark_dirty).

On a CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported), slowly: tests/impls/test_posenc_triton.py checks
it there against float64.
"""

from __future__ import annotations

import torch

from impls import posenc
from impls.triton_import import INTERPRET, TRITON_ERROR, tl, triton

ROW_ELEMENTS = 4096  # elements of one head block a program holds: BLOCK_H heads of D


def why_not(device: torch.device) -> str | None:
    """None if the kernel runs on `device`, else why not."""
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if torch.device(device).type != "cuda" and not INTERPRET:
        return ("Triton kernels need a CUDA GPU; on a CPU they run only through Triton's interpreter "
                "(TRITON_INTERPRET=1 before start, slowly)")
    return None


class RopeTable:
    """cos and sin of p·θ_i for positions 0 .. max_pos − 1, float32 (max_pos, D/2)
    each, formed in float64 (impls/posenc.py rope_angles)."""

    def __init__(self, max_pos: int, head_dim: int, device, base: float = posenc.ROPE_BASE,
                 scaling: posenc.RopeScaling | None = None):
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        cos, sin = posenc.rope_angles(torch.arange(max_pos, device=device), head_dim, base, scaling)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()

    @property
    def max_pos(self) -> int:
        return self.cos.shape[0]


if triton is not None:

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, NH, sxh, soh, c, s, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, GPTJ: tl.constexpr):
        # The NH heads of one token, BLOCK_H at a time; c, s (1, BLOCK_HALF) float32.
        i = tl.arange(0, BLOCK_HALF)[None, :]
        for h0 in range(0, NH, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
            if GPTJ:
                # The whole row, contiguous; its even and odd lanes are the pairs' members.
                d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
                inside = (h < NH) & (d < 2 * HALF)
                x = tl.load(x_ptr + h * sxh + d, mask=inside, other=0.0).to(tl.float32)
                x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
                y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)  # (BLOCK_H, BLOCK_HALF, 2)
                y = tl.reshape(y, (BLOCK_H, 2 * BLOCK_HALF))
                tl.store(o_ptr + h * soh + d, y.to(o_ptr.dtype.element_ty), mask=inside)
            else:
                # The two halves, each contiguous: pair (i, i + D/2).
                inside = (h < NH) & (i < HALF)
                x1 = tl.load(x_ptr + h * sxh + i, mask=inside, other=0.0).to(tl.float32)
                x2 = tl.load(x_ptr + h * sxh + HALF + i, mask=inside, other=0.0).to(tl.float32)
                tl.store(o_ptr + h * soh + i, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=inside)
                tl.store(o_ptr + h * soh + HALF + i, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, freq_ptr, pos_ptr, offset, S, H, HKV,
                     sqb, sqs, sqh, skb, sks, skh, sqob, sqos, sqoh, skob, skos, skoh, sign,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, GPTJ: tl.constexpr,
                     TABLE: tl.constexpr, HAS_POS: tl.constexpr):
        # One program per token (b, s): its cos and sin once, then every head of q and of k.
        t = tl.program_id(0)
        b = t // S
        si = t % S
        if HAS_POS:
            pos = tl.load(pos_ptr + si)
        else:
            pos = offset + si
        i = tl.arange(0, BLOCK_HALF)[None, :]
        if TABLE:
            c = tl.load(cos_ptr + pos.to(tl.int64) * HALF + i, mask=i < HALF, other=1.0)
            s = tl.load(sin_ptr + pos.to(tl.int64) * HALF + i, mask=i < HALF, other=0.0)
        else:
            angle = pos.to(tl.float32) * tl.load(freq_ptr + i, mask=i < HALF, other=0.0)
            c = tl.cos(angle)
            s = tl.sin(angle)
        s = s * sign  # -1: the inverse rotation, the backward
        b64 = b.to(tl.int64)
        s64 = si.to(tl.int64)
        _rotate_heads(q_ptr + b64 * sqb + s64 * sqs, qo_ptr + b64 * sqob + s64 * sqos, H, sqh, sqoh, c, s,
                      BLOCK_H, HALF, BLOCK_HALF, GPTJ)
        _rotate_heads(k_ptr + b64 * skb + s64 * sks, ko_ptr + b64 * skob + s64 * skos, HKV, skh, skoh, c, s,
                      BLOCK_H, HALF, BLOCK_HALF, GPTJ)


def _check(q: torch.Tensor, k: torch.Tensor, layout: str, positions, table: RopeTable | None, offset: int) -> None:
    if layout not in posenc.LAYOUTS:
        raise ValueError(f"unknown RoPE layout {layout!r}; known: {', '.join(posenc.LAYOUTS)}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, S, H, D) and (B, S, Hkv, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    posenc.check_head_dim(q.shape[-1])
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("the head dimension of q and k must be contiguous (stride 1)")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError("q and k must share dtype and device")
    S = q.shape[1]
    if positions is not None and positions.shape != (S,):
        raise ValueError(f"positions must be (S,) = ({S},), got {tuple(positions.shape)}")
    if table is not None:
        if table.head_dim != q.shape[-1]:
            raise ValueError(f"the table is for head dim {table.head_dim}, q has {q.shape[-1]}")
        last = int(positions.max()) if positions is not None and S else offset + S - 1
        if last >= table.max_pos:
            raise ValueError(f"position {last} is past the table's {table.max_pos} positions")


def _launch(q, k, qo, ko, positions, offset: int, layout: str, table: RopeTable | None, freq: torch.Tensor | None,
            sign: float) -> None:
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(H, Hkv)), ROW_ELEMENTS // (2 * block_half)))
    dummy = q  # pointer arguments a specialization does not read
    grid = (B * S,)
    if B * S == 0:
        return
    _rope_kernel[grid](
        q, k, qo, ko,
        table.cos if table is not None else dummy, table.sin if table is not None else dummy,
        freq if freq is not None else dummy, positions if positions is not None else dummy,
        offset, S, H, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), sign,
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, GPTJ=layout == "gptj", TABLE=table is not None,
        HAS_POS=positions is not None, num_warps=4 if block_h * 2 * block_half <= 2048 else 8,
    )


def apply(q, k, qo, ko, *, positions=None, offset: int = 0, layout: str = "neox", table: RopeTable | None = None,
          base: float = posenc.ROPE_BASE, scaling: posenc.RopeScaling | None = None, inverse: bool = False) -> None:
    """The kernel without autograd: qo, ko = R(±θ) q, k (qo may be q: in place)."""
    _check(q, k, layout, positions, table, offset)
    freq = None
    if table is None:
        freq = posenc.rope_frequencies(q.shape[-1], base, scaling, q.device).float()
    if positions is not None:
        positions = positions.to(device=q.device, dtype=torch.int32).contiguous()
    _launch(q, k, qo, ko, positions, offset, layout, table, freq, -1.0 if inverse else 1.0)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, offset, layout, table, base, scaling, inplace):
        qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
        apply(q, k, qo, ko, positions=positions, offset=offset, layout=layout, table=table, base=base,
              scaling=scaling)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.args = dict(positions=positions, offset=offset, layout=layout, table=table, base=base, scaling=scaling)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        # An unused output's gradient comes as zeros (materialize_grads), never None.
        dqo, dko = (g if g.stride(-1) == 1 else g.contiguous() for g in (dqo, dko))
        dq, dk = torch.empty_like(dqo), torch.empty_like(dko)
        apply(dqo, dko, dq, dk, inverse=True, **ctx.args)  # R(θ)^T = R(−θ)
        return dq, dk, None, None, None, None, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor | None = None, offset: int = 0,
         layout: str = "neox", table: RopeTable | None = None, base: float = posenc.ROPE_BASE,
         scaling: posenc.RopeScaling | None = None, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, H, D) and k (B, S, Hkv, D) rotated: token s at position
    positions[s], else offset + s; cos and sin from `table`, else computed in
    the kernel (from base and scaling). In place when `inplace` (q and k are
    returned). Differentiable."""
    if why_not(q.device) is not None:
        raise RuntimeError(why_not(q.device))
    return _Rope.apply(q, k, positions, offset, layout, table, base, scaling, inplace)
