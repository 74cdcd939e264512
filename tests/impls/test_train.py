"""Tests for impls/train.py (and the precisions it applies): the schedule by
hand, the matmul mode held through the backward, and the validation loss."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from impls.data import DataConfig, load_data
from impls.gpt import GPT, GPTConfig
from impls.precision import PRECISIONS, _MatmulDtypes, cpu_has_matmul_instructions
from impls.train import cosine_lr, evaluate, train_step

CPU = torch.device("cpu")


def test_cosine_lr_by_hand():
    # 100 steps, 10 of warm-up, peak 1.0, floor 0.1
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)  # 1/10 of the way up
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)  # decay starts at the peak
    middle = 10 + (99 - 10) / 2
    assert cosine_lr(int(middle), 100, 1.0, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert cosine_lr(99, 100, 1.0, 10) == pytest.approx(0.1)  # the last step sits on the floor
    decay = [cosine_lr(s, 100, 1.0, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert cosine_lr(0, 1, 6e-4, 0) == pytest.approx(6e-4)  # a one-step run with no warm-up


class _RecordsBackwardMode(torch.autograd.Function):
    """Identity that notes the float32 matmul mode in force during the backward."""

    seen: list[str] = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _RecordsBackwardMode.seen.append(torch.get_float32_matmul_precision())
        return grad


class _Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x, y):
        logits = self.proj(_RecordsBackwardMode.apply(x))
        return logits, F.cross_entropy(logits, y)


def test_tf32_covers_the_backward_and_is_restored():
    # cuBLAS reads the mode when each backward product is launched, after the
    # forward's context has closed; train_step must still hold it then.
    model, p = _Probe(), PRECISIONS["tf32"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = torch.get_float32_matmul_precision()
    _RecordsBackwardMode.seen.clear()
    x = torch.randn(3, 8, requires_grad=True)
    train_step(model, opt, p.scaler(CPU), p, x, torch.tensor([0, 1, 2]), CPU)
    assert _RecordsBackwardMode.seen == ["high"]
    assert torch.get_float32_matmul_precision() == before


def test_evaluate_is_repeatable_and_leaves_training_mode(tmp_path):
    data = load_data(DataConfig.from_name("bytes"), tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=data.vocab_size))
    p = PRECISIONS["fp32"]
    a = evaluate(model, data, p, CPU, batches=3, batch_size=2, seq_len=16, seed=5)
    b = evaluate(model, data, p, CPU, batches=3, batch_size=2, seq_len=16, seed=5)
    assert a == b and model.training
    # by hand: the mean of the three held-out batches' losses
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        losses = [model(*data.get_batch("val", 2, 16, generator=g))[1] for _ in range(3)]
    assert a == pytest.approx(float(sum(losses)) / 3, rel=1e-6)
    assert evaluate(model, data, p, CPU, batches=3, batch_size=2, seq_len=16, seed=6) != a  # other text


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                         ("bf16-pure", torch.bfloat16)])
def test_cpu_training_step_multiplies_in_the_precision_it_is_named_for(name, dtype):
    # On the CPU the bf16 and fp16 losses of a short run lie within about 1e-4 of fp32's: not
    # because autocast leaves the products in fp32 (this checks every one, backward included),
    # but because near initialization the loss hardly depends on the logits' rounding.
    torch.manual_seed(0)
    p = PRECISIONS[name]
    model = p.prepare(GPT(GPTConfig.from_name("tiny", vocab_size=256)))
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert p.matmul_dtypes(model, x, CPU) == {dtype: 11}  # 2 blocks x (qkv, attention, out, 2 MLP) + lm_head
    recorder = _MatmulDtypes()
    with recorder:
        train_step(model, opt, p.scaler(CPU), p, x, x, CPU)
    assert set(recorder.dtypes) == {dtype} and sum(recorder.dtypes.values()) > 11  # the backward's products too


def test_cpu_matmul_instructions_as_torch_reports_them(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert cpu_has_matmul_instructions(torch.bfloat16) is False
    assert cpu_has_matmul_instructions(torch.float16) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_has_matmul_instructions(torch.bfloat16) is True and cpu_has_matmul_instructions(torch.float16) is False
    assert cpu_has_matmul_instructions(torch.float32) is None  # fp32 is always native
    monkeypatch.delattr(torch.cpu, "_is_amx_fp16_supported")
    assert cpu_has_matmul_instructions(torch.float16) is None  # this torch cannot tell
