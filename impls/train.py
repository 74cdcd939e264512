"""One optimizer step of language-model training, the same for every suite
that trains (precision, DDP, Medusa's base model):

    p = PRECISIONS["fp16"]
    model = p.prepare(GPT(config).to(device))
    opt = model.configure_optimizer(weight_decay=0.1, lr=6e-4, betas=(0.9, 0.95), device_type=device.type)
    scaler = p.scaler(device)
    loss = train_step(model, opt, scaler, p, x, y, device)

The loss is returned as a detached tensor so that the caller decides when to
read it: reading it forces a device synchronization.

Also here: `cosine_lr`, the learning-rate schedule (linear warm-up, cosine
decay), and `evaluate`, the mean loss over held-out batches:

    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, steps, max_lr=6e-4, warmup=steps // 20)
    val_loss = evaluate(model, data, p, device, batches=10, batch_size=16, seq_len=1024, seed=0)
"""

from __future__ import annotations

import math

import torch

from impls.data import TextData
from impls.precision import Precision


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    grad_clip: float | None = 1.0,
) -> torch.Tensor:
    # The matmul mode covers the backward too (its products run at launch-time
    # settings); autocast covers only the forward, as autocast should.
    with precision.matmul_mode():
        with precision.context(device):
            _, loss = model(x, y)
        # With fp16 the loss is scaled up before the backward so small gradients
        # survive fp16's range, and unscaled before clipping; otherwise a no-op.
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skipped when the gradients hold inf/NaN (fp16 overflow)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def cosine_lr(step: int, steps: int, max_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate at `step` (0-based) of `steps`: linear warm-up over the
    first `warmup` steps, then cosine decay to min_ratio * max_lr at the last
    step. The GPT-3 schedule (Brown et al. 2020, appendix B), as nanoGPT uses it."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    decay_steps = max(1, steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TextData,
    precision: Precision,
    device: torch.device,
    batches: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
) -> float:
    """Mean loss over `batches` held-out batches, the same ones for every call
    with the same seed (so every precision is scored on the same text)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    try:
        for _ in range(batches):
            x, y = data.get_batch("val", batch_size, seq_len, generator=generator, device=device)
            with precision.context(device):
                _, loss = model(x, y)
            total += loss.float()
    finally:
        model.train(was_training)
    return float(total) / batches  # the one synchronization
