"""Numeric precisions for training, shared by the precision and DDP suites.

    p = PRECISIONS["bf16"]
    reason = p.why_not(device)            # None, or why it cannot run here
    model = p.prepare(model)              # bf16-pure casts the weights; others keep fp32
    with p.context(device):               # matmul mode + autocast for the forward
        logits, loss = model(x, y)
    scaler = p.scaler(device)             # GradScaler for fp16, else a disabled one
    p.matmul_dtypes(model, x, device)     # {torch.bfloat16}: what the products really ran in

fp32 runs IEEE float32 matmuls (TF32 off); tf32 lets float32 matmuls use
TF32 tensor cores (torch.set_float32_matmul_precision("high")); fp16 is autocast
with a GradScaler, because fp16's 5-bit exponent underflows small gradients;
bf16 is autocast without one (bf16 has fp32's exponent range); bf16-pure keeps
weights and optimizer state in bf16 as well (no fp32 master weights); fp8 is
bf16 autocast with the transformer blocks' projections multiplied in fp8
(impls/fp8.py), on GPUs with fp8 tensor cores.

Autocast lowers only what its device's op lists name: `matmul_dtypes` runs one
forward and returns the dtypes the matrix products (mm, addmm, bmm, baddbmm,
SDPA) came out in, so that a run can check it used the precision it is
labelled with. On the CPU, autocast lowers every product of impls/gpt.py to
bf16 or fp16 (tests/impls/test_train.py checks it); a CPU without
AVX512-BF16/AMX runs them in ATen's generic kernels, slower than fp32's.

The matmul mode is a global flag that cuBLAS reads when each product is
launched, so it must cover the backward pass as well: `matmul_mode()` alone
is what impls/train.py holds around the whole step, `context()` (matmul mode
plus autocast) around the forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from impls import fp8

# The products autocast is meant to lower: linear layers reach the dispatcher as
# mm/addmm (bmm/baddbmm when batched), attention as one of SDPA's kernels (the
# set differs between torch versions, hence the lookup by name).
MATMUL_OPS = tuple(getattr(torch.ops.aten, name) for name in (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
) if hasattr(torch.ops.aten, name))


class _MatmulDtypes(TorchDispatchMode):
    """Notes the dtype of every matrix product's (first) output. A dispatch mode
    sees the ops after autocast has cast their inputs."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMUL_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.dtypes[first.dtype] = self.dtypes.get(first.dtype, 0) + 1
        return out


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None = None  # None: no autocast
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision: highest = IEEE fp32, high = TF32
    grad_scaler: bool = False
    param_dtype: torch.dtype = torch.float32
    fp8_linear: bool = False  # the blocks' nn.Linear layers multiply in fp8

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype most matmuls run in (fp8 runs only the blocks' projections in fp8)."""
        return self.autocast_dtype or self.param_dtype

    @property
    def tf32(self) -> bool:
        return self.matmul_precision != "highest" and self.compute_dtype == torch.float32

    def why_not(self, device: torch.device) -> str | None:
        """None if this precision runs natively on `device`, else the reason."""
        if self.fp8_linear and (reason := fp8.why_not(device)):
            return reason
        if self.matmul_precision == "high" and device.type != "cuda":
            return "TF32 is a mode of NVIDIA tensor cores (compute capability 8.0+); this is a CPU"
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if self.matmul_precision == "high" and cap < (8, 0):
                return f"TF32 needs compute capability 8.0+, this GPU is {cap[0]}.{cap[1]}"
            uses_bf16 = torch.bfloat16 in (self.autocast_dtype, self.param_dtype)
            if uses_bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
                return f"no native bf16 on compute capability {cap[0]}.{cap[1]} (needs 8.0+); not emulated"
        return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.param_dtype)
        if self.fp8_linear:
            fp8.convert_linears(model)
        return model

    @contextlib.contextmanager
    def matmul_mode(self):
        """IEEE fp32 or TF32 float32 matmuls inside; the previous mode restored after."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.matmul_precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)

    @contextlib.contextmanager
    def context(self, device: torch.device):
        """Matmul mode and autocast for the forward pass; restores the matmul mode after."""
        with self.matmul_mode():
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(device_type=device.type, dtype=self.autocast_dtype):
                    yield

    @torch.no_grad()
    def matmul_dtypes(self, model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> dict[torch.dtype, int]:
        """{dtype: count} of the matrix products of one forward of `model` on `x` under
        this precision's context (the model as prepare() left it)."""
        recorder = _MatmulDtypes()
        with self.context(device), recorder:
            model(x)
        return recorder.dtypes

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.grad_scaler)


def cpu_has_matmul_instructions(dtype: torch.dtype) -> bool | None:
    """Whether this CPU multiplies `dtype` with its own instructions (bf16:
    AVX512-BF16 or AMX; fp16: AMX-FP16), as torch reports it; None when torch
    does not say or for other dtypes. Without them bf16/fp16 products run in
    ATen's generic kernels."""
    checks = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype)
    found = [getattr(torch.cpu, name, None) for name in checks or ()]
    if not found or None in found:
        return None
    return any(check() for check in found)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32"),
    "tf32": Precision("tf32", matmul_precision="high"),
    "fp16": Precision("fp16", autocast_dtype=torch.float16, grad_scaler=True),
    "bf16": Precision("bf16", autocast_dtype=torch.bfloat16),
    "bf16-pure": Precision("bf16-pure", param_dtype=torch.bfloat16),
    "fp8": Precision("fp8", autocast_dtype=torch.bfloat16, fp8_linear=True),
}
