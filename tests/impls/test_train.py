"""Tests for impls/train.py (and the precisions it applies): the schedule by
hand, the matmul mode held through the backward, the validation loss, and the
budgeted loop that trains the Medusa suite's models."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from impls.data import DataConfig, load_data
from impls.gpt import GPT, GPTConfig
from impls import train
from impls.precision import PRECISIONS, _MatmulDtypes, cpu_has_matmul_instructions
from impls.train import LMTraining, cosine_lr, evaluate, fit, train_lm, train_step

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


def test_cosine_lr_follows_a_given_progress():
    # After the warm-up the decay follows `progress` (e.g. a time budget's), not the step count.
    assert cosine_lr(50, 100, 1.0, 10, progress=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lr(50, 100, 1.0, 10, progress=2.0) == pytest.approx(0.1)  # a spent budget stays on the floor
    assert cosine_lr(3, 100, 1.0, 10, progress=0.9) == pytest.approx(0.4)  # the warm-up is by step still


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


class _Optimizer:
    """Records the learning rate of every step fit() runs."""

    def __init__(self):
        self.param_groups = [{"lr": None}]
        self.lrs = []


def test_fit_runs_the_steps_on_the_schedule_and_reports_every_tenth():
    opt, reports = _Optimizer(), []

    def step():
        opt.lrs.append(opt.param_groups[0]["lr"])
        return torch.tensor(float(len(opt.lrs)))

    done, _, loss = fit(opt, step, 25, 1.0, 5, None, lambda n, loss: reports.append((n, float(loss))))
    assert done == 25 and float(loss) == 25.0
    assert reports == [(10, 10.0), (20, 20.0), (25, 25.0)]
    assert opt.lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warm-up over 5 steps
    # then cosine over the run's fraction step / steps: step 5 is a fifth of the way
    assert opt.lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert opt.lrs[24] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.96)))


def test_fit_stops_when_the_time_budget_is_spent(monkeypatch):
    # Each step takes one second of a four-second budget: four of the 100 steps run, and the
    # schedule follows the time, 0, 1/4, 1/2 and 3/4 of the way.
    clock = [0.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    opt, reports = _Optimizer(), []

    def step():
        opt.lrs.append(opt.param_groups[0]["lr"])
        clock[0] += 1.0
        return torch.tensor(0.0)

    done, seconds, _ = fit(opt, step, 100, 1.0, 0, 4.0, lambda n, loss: reports.append(n))
    assert (done, seconds, reports) == (4, 4.0, [])
    assert opt.lrs == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)) for f in (0, 0.25, 0.5, 0.75)])


def test_train_lm_is_repeatable_and_reports(tmp_path):
    data = load_data(DataConfig.from_name("bytes"), tmp_path)
    config = GPTConfig.from_name("tiny", vocab_size=data.vocab_size)
    t = LMTraining(steps=3, batch_size=2, seq_len=16, lr=1e-3, warmup=1)
    heard = []
    a, info = train_lm(config, data, t, CPU, seed=0, progress=lambda *args: heard.append(args), phase="draft")
    b, _ = train_lm(config, data, t, CPU, seed=0)
    assert not a.training and info["steps"] == 3 and info["precision"] == "fp32"
    assert info["params"] == a.num_params(False) and math.isfinite(info["val_loss"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [h[:3] for h in heard] == [("draft", 3, 3), ("draft", 3, 3)]  # the last step, then the val loss
