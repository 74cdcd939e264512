"""One optimizer step of language-model training, the same for every suite
that trains (precision, DDP, Medusa's base model):

    p = PRECISIONS["fp16"]
    model = p.prepare(GPT(config).to(device))
    opt = model.configure_optimizer(weight_decay=0.1, lr=6e-4, betas=(0.9, 0.95), device_type=device.type)
    scaler = p.scaler(device)
    loss = train_step(model, opt, scaler, p, x, y, device)

The loss is returned as a detached tensor so that the caller decides when to
read it: reading it forces a device synchronization.
"""

from __future__ import annotations

import torch

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
