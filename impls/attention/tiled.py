"""FlashAttention's algorithm written in PyTorch: the readable reference of the
tiled kernel, and the path that runs on CPUs.

The score matrix is never materialized. K and V are visited in blocks of
`block` keys; for each block the scores of every query against it are formed,
and an online softmax keeps, per query row, the running max `m`, the running
sum of exponentials `l` and an accumulator rescaled by exp(m_old - m_new)
whenever the max grows (Milakov & Gimelshein 2018; Dao et al. 2022). The
forward saves only the output and the log-sum-exp per row; the backward
recomputes each block's probabilities from them (a custom autograd Function),
so memory grows linearly with sequence length.

With causal masking, queries before a block's first key cannot see any of it:
each block is applied to the rows from its first key onward, which skips the
fully masked part, and only the block's diagonal square needs a mask.

Arithmetic is done in float32 whatever the input dtype, as the kernels do.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128


def _grouped(q, k, v):
    """Views for grouped-query attention: q (B, Hkv, G, S, D); k, v (B, Hkv, 1, S, D)."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    return q.reshape(B, Hkv, H // Hkv, S, D).float(), k.unsqueeze(2).float(), v.unsqueeze(2).float()


def _scores(qb, kb, scale, r0, j0, causal):
    """Scaled scores of query rows r0.. against keys j0..j0+len(kb), masked if causal."""
    s = (qb @ kb.transpose(-2, -1)) * scale  # (B, Hkv, G, rows, keys)
    if causal:
        rows = torch.arange(r0, r0 + s.shape[-2], device=s.device)[:, None]
        cols = torch.arange(j0, j0 + s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _forward(q, k, v, causal, scale, block):
    qg, kg, vg = _grouped(q, k, v)
    S = qg.shape[-2]
    acc = torch.zeros_like(qg)  # (B, Hkv, G, S, D), unnormalized output
    m = torch.full(qg.shape[:-1], float("-inf"), device=q.device)  # running row max
    l = torch.zeros(qg.shape[:-1], device=q.device)  # running row sum of exp(s - m)
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        r0 = j0 if causal else 0  # rows before j0 see nothing of this block
        s = _scores(qg[..., r0:, :], kg[..., j0:j1, :], scale, r0, j0, causal)
        m_new = torch.maximum(m[..., r0:], s.amax(dim=-1))
        alpha = torch.exp(m[..., r0:] - m_new)  # rescales what was summed under the old max
        p = torch.exp(s - m_new[..., None])
        l[..., r0:] = alpha * l[..., r0:] + p.sum(dim=-1)
        acc[..., r0:, :] = alpha[..., None] * acc[..., r0:, :] + p @ vg[..., j0:j1, :]
        m[..., r0:] = m_new
    out = acc / l[..., None]
    lse = m + torch.log(l)  # log-sum-exp per row: all the backward needs of the softmax
    return out.reshape(q.shape).to(q.dtype), lse


def _backward(q, k, v, out, lse, dout, causal, scale, block):
    qg, kg, vg = _grouped(q, k, v)
    og = out.reshape(qg.shape).float()
    dog = dout.reshape(qg.shape).float()
    S = qg.shape[-2]
    delta = (dog * og).sum(dim=-1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP), for the softmax backward
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(kg[:, :, 0])  # (B, Hkv, S, D): summed over the group's query heads
    dv = torch.zeros_like(dk)
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        r0 = j0 if causal else 0
        qb, dob = qg[..., r0:, :], dog[..., r0:, :]
        kb, vb = kg[..., j0:j1, :], vg[..., j0:j1, :]
        p = torch.exp(_scores(qb, kb, scale, r0, j0, causal) - lse[..., r0:, None])  # recomputed
        dv[:, :, j0:j1] = (p.transpose(-2, -1) @ dob).sum(dim=2)
        dp = dob @ vb.transpose(-2, -1)
        ds = p * (dp - delta[..., r0:, None])  # gradient of the scores
        dq[..., r0:, :] += (ds @ kb) * scale
        dk[:, :, j0:j1] = (ds.transpose(-2, -1) @ qb).sum(dim=2) * scale
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block):
        out, lse = _forward(q, k, v, causal, scale, block)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.causal, ctx.scale, ctx.block)
        return dq, dk, dv, None, None, None


def attention(q, k, v, causal: bool, scale: float | None = None, block: int = BLOCK) -> torch.Tensor:
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"tiled attention takes self-attention: {q.shape[-2]} queries against {k.shape[-2]} keys "
                         "(its causal mask assumes equal lengths)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{k.shape[1]} kv heads do not divide {q.shape[1]} query heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return TiledAttention.apply(q, k, v, causal, scale, block)
