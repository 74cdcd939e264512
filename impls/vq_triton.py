"""The fused nearest-code search: a Triton kernel that computes the squared
distances of a block of latents to a block of codes at a time, keeping a
running minimum and argmin, so that the N x K distance matrix is never
stored (memory N indices and N distances, whatever K is).

    idx, dist = nearest_fused(x, codebook)    # x (N, D), codebook (K, D), fp32 or bf16 -> (N,) int64, (N,) fp32

Each program takes BLOCK_N latents and walks the codebook BLOCK_K codes at a
time: x.e^T by tl.dot, accumulated in fp32 (bf16 inputs on the tensor cores,
fp32 inputs as IEEE fp32 products, not TF32, so that fp32 means fp32; or, with
precision="tf32x3", on the tensor cores as three TF32 products of the
operands' high and low parts: the low x low term it drops is about 2^-22 of
each product, where fp32 rounds at 2^-24); then
d = ||e||^2 - 2 x.e, the row's minimum over the block, and the running
minimum. Up to D = 256 the block of latents is loaded once and stays on chip
while the codebook streams past (as FlashAttention keeps its Q block);
beyond, D is walked in slices for every block of codes. ||x||^2 is added at the end: it shifts a
row's distances alike, so the argmin does not need it. ||e||^2 is computed
once, in fp32, before the kernel. Ties go to the lowest index, as torch.argmin:
within a block by tl.min's leftmost index, across blocks by replacing the
running minimum only when strictly smaller. K need not be a multiple of
BLOCK_K (codes past K are +inf), nor D a power of two (masked to zero).

tests/impls/test_vq_triton.py checks it against the float64 search through
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations


import torch

from impls.triton_import import INTERPRET, TRITON_ERROR, tl, triton

DTYPES = (torch.float32, torch.bfloat16)


def why_not(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run on `device` and `dtype`; None when it can."""
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if torch.device(device).type != "cuda" and not INTERPRET:
        return "the fused search is a Triton kernel: it needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU)"
    if dtype not in DTYPES:
        return f"the fused search takes fp32 or bf16, not {str(dtype).removeprefix('torch.')}"
    return None


# Up to this code dim the block of latents is loaded once and stays on chip: 64 KB of
# bf16 at 128 x 256. fp32 inputs take IEEE products, on the CUDA cores, whose
# operands live in registers: beyond 32 dims they spill, so fp32 walks D in slices.
# 3xTF32 runs on the tensor cores from shared memory, where a 128 x 64 slice of fp32
# takes what 128 x 128 of bf16 does.
MAX_RESIDENT_D = {2: 256, 4: 32}  # by the inputs' element size in bytes
MAX_RESIDENT_D_TF32X3 = 64
PRECISIONS = ("ieee", "tf32x3")  # for fp32 inputs; bf16 inputs always take bf16 products


if triton is not None:
    if INTERPRET:
        # The interpreter runs every program in Python: small blocks keep the
        # tests quick and still cross block edges in N and K.
        CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    else:
        # Hopper: 128-row latent blocks on 8 warps (two warpgroups of wgmma), 64 or 128
        # codes a block; at D = 256 bf16 the resident latents take 64 KB of shared memory
        # and each stage of codes 16-64 KB. Configs that do not fit are skipped by the autotuner.
        CONFIGS = [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [
                (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                (256, 64, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4),
            ]
        ]

    @triton.autotune(configs=CONFIGS, key=["K", "D", "IEEE", "TF32X3", "BLOCK_D", "RESIDENT"])
    @triton.jit
    def _nearest_kernel(x_ptr, e_ptr, e2_ptr, idx_ptr, dist_ptr, N, K, D, stride_x, stride_e,
                        IEEE: tl.constexpr, TF32X3: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # RESIDENT (BLOCK_D >= D): the whole code dim in one slice, the latents loaded once before
        # the walk over the codebook; else D is walked in BLOCK_D slices for every block of codes.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_D)
        if RESIDENT:
            xr = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                         mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            x2 = tl.sum(xr.to(tl.float32) * xr.to(tl.float32), axis=1)
            if UPCAST:
                # Triton's interpreter multiplies bf16 dot operands as their raw 16-bit storage;
                # in fp32 the products are exact, as on the tensor cores.
                xr = xr.to(tl.float32)
        else:
            xr = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # unused: the slices are loaded per block of codes
            x2 = tl.zeros((BLOCK_N,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                xs = tl.load(x_ptr + rows[:, None] * stride_x + (d0 + cols)[None, :],
                             mask=row_ok[:, None] & ((d0 + cols) < D)[None, :], other=0.0).to(tl.float32)
                x2 += tl.sum(xs * xs, axis=1)
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < K
            if RESIDENT:
                eb = tl.load(e_ptr + codes[None, :] * stride_e + cols[:, None],
                             mask=code_ok[None, :] & (cols < D)[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
                if UPCAST:
                    eb = eb.to(tl.float32)
                if IEEE:
                    acc = tl.dot(xr, eb, input_precision="ieee")
                elif TF32X3:
                    acc = tl.dot(xr, eb, input_precision="tf32x3")
                else:
                    acc = tl.dot(xr, eb)  # (BLOCK_N, BLOCK_K) x.e^T, fp32
            else:
                acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    d_ok = (d0 + cols) < D
                    xs = tl.load(x_ptr + rows[:, None] * stride_x + (d0 + cols)[None, :],
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                    es = tl.load(e_ptr + codes[None, :] * stride_e + (d0 + cols)[:, None],
                                 mask=code_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_K)
                    if UPCAST:
                        xs, es = xs.to(tl.float32), es.to(tl.float32)
                    if IEEE:
                        acc = tl.dot(xs, es, acc, input_precision="ieee")
                    elif TF32X3:
                        acc = tl.dot(xs, es, acc, input_precision="tf32x3")
                    else:
                        acc = tl.dot(xs, es, acc)
            e2 = tl.load(e2_ptr + codes, mask=code_ok, other=0.0)
            dist = tl.where(code_ok[None, :], e2[None, :] - 2.0 * acc, float("inf"))  # (BLOCK_N, BLOCK_K)
            block_best, block_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = block_best < best  # strictly: on a tie the earlier block, the lower index, stays
            best = tl.where(better, block_best, best)
            best_idx = tl.where(better, block_idx + k0, best_idx)
        tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
        tl.store(dist_ptr + rows, best + x2, mask=row_ok)


def block_d(D: int, dtype: torch.dtype = torch.bfloat16, precision: str = "ieee") -> int:
    """The code-dim slice: all of D (rounded up to a power of two, at least 16
    for tl.dot) up to MAX_RESIDENT_D, else 64 for bf16 and 3xTF32 and 32 for IEEE fp32."""
    tf32x3 = dtype == torch.float32 and precision == "tf32x3"
    limit = MAX_RESIDENT_D_TF32X3 if tf32x3 else MAX_RESIDENT_D[dtype.itemsize]
    return max(16, triton.next_power_of_2(D)) if D <= limit else min(64, limit)


def nearest_fused(x: torch.Tensor, codebook: torch.Tensor, slice_d: int | None = None, precision: str = "ieee"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code of each row of x (N, D) in codebook (K, D),
    and its squared distance in fp32. Both in the same dtype, fp32 or bf16.
    `slice_d` overrides the code-dim slice (`block_d`; a power of two >= 16):
    below D, D is walked in slices for every block of codes. `precision`
    (PRECISIONS) is how fp32 inputs are multiplied; bf16 inputs ignore it."""
    reason = why_not(x.device, x.dtype)
    if reason:
        raise RuntimeError(reason)
    assert x.dim() == 2 and codebook.dim() == 2 and x.shape[1] == codebook.shape[1], \
        f"x (N, D) and codebook (K, D) expected, got {tuple(x.shape)} and {tuple(codebook.shape)}"
    assert x.dtype == codebook.dtype, f"x is {x.dtype}, codebook {codebook.dtype}"
    assert precision in PRECISIONS, f"precision is one of {PRECISIONS}, got {precision!r}"
    fp32 = x.dtype == torch.float32
    x, codebook = x.contiguous(), codebook.contiguous()
    N, D = x.shape
    K = codebook.shape[0]
    e2 = codebook.float().square().sum(1)  # (K,) fp32
    idx = torch.empty(N, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    bd = slice_d or block_d(D, x.dtype, precision)
    assert bd >= 16 and bd & (bd - 1) == 0, f"the code-dim slice must be a power of two >= 16, got {bd}"
    _nearest_kernel[grid](x, codebook, e2, idx, dist, N, K, D, x.stride(0), codebook.stride(0),
                          IEEE=fp32 and precision == "ieee", TF32X3=fp32 and precision == "tf32x3",
                          UPCAST=INTERPRET, BLOCK_D=bd, RESIDENT=bd >= D)
    return idx, dist
