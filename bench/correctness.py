"""The correctness gate: an implementation is compared with a float64
reference on the same inputs before it is timed.

The error is relative in the Frobenius norm, ||out - ref|| / ||ref||, the
largest over all compared tensors (the output and, when the backward is
measured, every gradient). NaN or inf anywhere fails.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Largest relative error that passes, per input dtype. Rounding the inputs and
# output alone costs about one unit in the last place (fp32 6e-8, fp16 5e-4,
# bf16 4e-3), and fused kernels accumulate in fp32 in their own order; fp32
# allows TF32-class arithmetic (near 3e-4), which GPU kernels may use for fp32
# inputs. A wrong mask, scale or softmax lands orders of magnitude above these.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def max_rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    assert len(outs) == len(refs), "compare the same number of tensors"
    return max(rel_err(o, r) for o, r in zip(outs, refs))


def passes(err: float, dtype: torch.dtype) -> bool:
    return math.isfinite(err) and err <= TOLERANCE[dtype]
