"""Tests for impls/fp8.py: scaling, the fp8 linear layer against float64, and
swapping layers in a GPT. torch's CPU build runs `_scaled_mm` too (emulated),
which lets the numerics and operand layouts be checked here; the fp8 precision
row itself is unsupported on CPU, and the GPU test runs on the GPU machine."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.correctness import rel_err
from impls import fp8
from impls.gpt import GPT, GPTConfig
from impls.precision import PRECISIONS
from impls.train import train_step


def _scaled_mm_runs_on(device: str) -> bool:
    if fp8.E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return False
    if device == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        return False
    a = torch.ones(16, 16, device=device).to(fp8.E4M3)
    one = torch.ones((), device=device)
    try:
        torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(not _scaled_mm_runs_on("cpu"), reason="this torch has no CPU torch._scaled_mm")
needs_gpu_fp8 = pytest.mark.skipif(not _scaled_mm_runs_on("cuda"), reason="needs a GPU with fp8 (sm_89+)")
# e4m3 keeps 3 mantissa bits, e5m2 keeps 2: one rounding costs up to 2^-4 and 2^-3 of
# a value, about a third of that on average over a tensor (the Frobenius error).
TOL_E4M3, TOL_E5M2 = 0.04, 0.08


@pytest.mark.skipif(fp8.E4M3 is None, reason="no float8 dtypes in this torch")
@pytest.mark.parametrize("dtype, tol", [(fp8.E4M3, TOL_E4M3), (fp8.E5M2, TOL_E5M2)])
def test_quantize_uses_the_whole_range(dtype, tol):
    x = torch.randn(64, 64) * 1e-3  # far below fp8's range: the scale brings it up
    x8, inv = fp8.quantize(x, dtype)
    assert x8.dtype == dtype
    assert x8.float().abs().max() == torch.finfo(dtype).max  # amax lands on the largest finite value
    assert rel_err(x8.float() * inv, x) < tol
    zeros8, zinv = fp8.quantize(torch.zeros(4, 4), dtype)
    assert torch.isfinite(zinv) and (zeros8.float() == 0).all()


def test_scaled_matmul_checks_operand_layouts():
    if fp8.E4M3 is None:
        pytest.skip("no float8 dtypes in this torch")
    a8, s = fp8.quantize(torch.randn(32, 16), fp8.E4M3)
    b8, _ = fp8.quantize(torch.randn(16, 48), fp8.E4M3)
    with pytest.raises(ValueError, match="column-major"):
        fp8.scaled_matmul(a8, b8, s, s, torch.bfloat16)  # b8 is row-major
    with pytest.raises(ValueError, match="row-major"):
        fp8.scaled_matmul(a8.t(), a8, s, s, torch.bfloat16)


def _layer_against_float64(device: str):
    torch.manual_seed(0)
    ref = nn.Linear(64, 96, device=device)
    (layer,) = [m for m in _swapped(ref) if isinstance(m, fp8.Float8Linear)]
    x = torch.randn(2, 16, 64, device=device, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 96)
    dy = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = ref.weight.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, ref.bias.detach().double())
    y64.backward(dy.double())
    assert rel_err(y, y64) < 2 * TOL_E4M3  # x and w each rounded to e4m3, the output to bf16
    assert rel_err(x.grad, x64.grad) < TOL_E4M3 + TOL_E5M2  # dy rounded to e5m2, w to e4m3
    assert rel_err(layer.weight.grad, w64.grad) < TOL_E4M3 + TOL_E5M2
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def _swapped(linear: nn.Linear):
    holder = nn.Sequential(linear)
    assert fp8.convert_linears(holder) == 1
    return list(holder.modules())


@needs_cpu_fp8
def test_fp8_linear_against_float64_cpu():
    _layer_against_float64("cpu")


@needs_gpu_fp8
def test_fp8_linear_against_float64_gpu():
    _layer_against_float64("cuda")


def test_convert_linears_keeps_parameters_and_the_head():
    model = GPT(GPTConfig.from_name("tiny", vocab_size=256))
    before = {name: p for name, p in model.named_parameters()}
    assert fp8.convert_linears(model) == 4 * model.config.n_layer  # qkv, attention out, MLP in, MLP out
    assert type(model.lm_head) is nn.Linear  # tied to the embedding, kept in bf16
    assert all(type(m) is fp8.Float8Linear for b in model.transformer.h
               for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same tensors
    assert model.lm_head.weight is model.transformer.wte.weight


@needs_cpu_fp8
def test_fp8_precision_trains_tiny_on_cpu():
    """The fp8 precision's mechanics (bf16 autocast around fp8 layers, the
    optimizer on the fp32 masters) learn on CPU too, though the row is marked
    unsupported there: CPU fp8 is an emulation, not what the suite measures."""
    torch.manual_seed(0)
    p = PRECISIONS["fp8"]
    model = p.prepare(GPT(GPTConfig.from_name("tiny", vocab_size=64)))
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 64, (2, 32))
    losses = [float(train_step(model, opt, p.scaler(torch.device("cpu")), p, x, x, torch.device("cpu")))
              for _ in range(6)]
    assert losses[-1] < losses[0] - 0.5, losses  # memorising one batch
    assert p.why_not(torch.device("cpu")) is not None
