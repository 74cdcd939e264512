"""fp8 matrix products for training, through `torch._scaled_mm`.

    from impls import fp8
    reason = fp8.why_not(device)          # None on a GPU with fp8 tensor cores
    n = fp8.convert_linears(model)        # the blocks' nn.Linear layers now multiply in fp8

Recipe: per-tensor dynamic scaling, as in NVIDIA's Transformer Engine and
torchao's Float8Linear "tensorwise" recipe (Micikevicius et al. 2022, "FP8
Formats for Deep Learning"). Each operand is scaled so that its largest
magnitude lands on the format's largest finite value, cast to fp8, and the
product is taken with the inverse scales, accumulated in fp32 and returned in
bf16. Activations and weights use e4m3 (more mantissa); gradients use e5m2
(more range), the paper's split. Weights keep their fp32 master copy; only the
product sees fp8.

Only the transformer blocks' projections are converted. The language-model
head stays in bf16: it is tied to the token embedding, and keeping the first
and last layers in higher precision is the usual practice (same paper, sec. 4).

`torch._scaled_mm` on a GPU wants its first operand row-major and its second
column-major, both dimensions multiples of 16; the code below lays operands
out that way (and asserts it, so the CPU tests check the layouts too).
"""

from __future__ import annotations

import torch
import torch.nn as nn

E4M3 = getattr(torch, "float8_e4m3fn", None)
E5M2 = getattr(torch, "float8_e5m2", None)
# Smallest amax a scale is taken from: an all-zero tensor must not give an infinite scale.
_AMAX_FLOOR = 1e-12
_ALIGN = 16  # cuBLASLt fp8 kernels need every dimension to be a multiple of 16


def why_not(device: torch.device) -> str | None:
    """None if fp8 matmuls run natively on `device`, else the reason."""
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8 types or torch._scaled_mm"
    if device.type != "cuda":
        return "fp8 matmuls need GPU tensor cores with fp8 (compute capability 8.9+: Ada, Hopper); this is a CPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"fp8 matmuls need compute capability 8.9+ (Ada, Hopper), this GPU is {cap[0]}.{cap[1]}"
    return None


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in fp8, inverse scale): x ≈ x_fp8.float() * inverse_scale.

    The scale maps amax(|x|) onto the format's largest finite value, so the
    tensor uses the whole range; the clamp guards the rounding at the top.
    """
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=_AMAX_FLOOR)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column by column (what _scaled_mm wants second)."""
    return t.t().contiguous().t()


def scaled_matmul(a8, b8, a_inv_scale, b_inv_scale, out_dtype, fast_accum=False) -> torch.Tensor:
    """(a8 · a_inv_scale) @ (b8 · b_inv_scale) in out_dtype, accumulated in fp32.

    a8 (M, K) row-major, b8 (K, N) column-major, K and N multiples of 16 on a GPU.
    """
    if not a8.is_contiguous():
        raise ValueError("the first fp8 operand must be row-major")
    if not b8.t().is_contiguous():
        raise ValueError("the second fp8 operand must be column-major")
    return torch._scaled_mm(a8, b8, a_inv_scale, b_inv_scale, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w.T with every product in fp8; x (M, K), w (N, K), y (M, N)."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, sx = quantize(x.contiguous(), E4M3)
        w8, sw = quantize(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, w.dtype, out_dtype
        # w8 is (N, K) row-major, so w8.t() is (K, N) column-major: no copy needed.
        # Fast (lower-precision) accumulation only in the forward, as torchao does;
        # gradients accumulate at full fp32 precision.
        return scaled_matmul(x8, w8.t(), sx, sw, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_y):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = quantize(grad_y.contiguous(), E5M2)  # (M, N)
        # dx = dy @ w: (M, N) @ (N, K)
        grad_x = scaled_matmul(g8, _col_major(w8), sg, sw, ctx.out_dtype)
        # dw = dy.T @ x: (N, M) @ (M, K)
        grad_w = scaled_matmul(g8.t().contiguous(), _col_major(x8), sg, sx, ctx.out_dtype)
        return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype), None


class Float8Linear(nn.Linear):
    """nn.Linear whose forward and backward products run in fp8 (see module docstring)."""

    out_dtype = torch.bfloat16

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (B*T, C_in)
        if rows.device.type == "cuda" and rows.shape[0] % _ALIGN:
            raise ValueError(f"fp8 matmuls need batch x sequence divisible by {_ALIGN}, got {rows.shape[0]} rows")
        y = _Fp8Matmul.apply(rows, self.weight, self.out_dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def convert_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every nn.Linear of `model` (except those named in `skip`, and any
    whose sizes are not multiples of 16) for a Float8Linear holding the same
    parameters. Returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            if child.in_features % _ALIGN or child.out_features % _ALIGN:
                continue
            new = Float8Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            new.weight = child.weight  # the same Parameter: optimizer, ties and state_dict unchanged
            new.bias = child.bias
            setattr(parent, name, new)
            swapped += 1
    return swapped

