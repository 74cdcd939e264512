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

And the models the Medusa suite decodes with, trained to a budget of steps or
seconds by one loop (`fit`) on that schedule:

    model, info = train_lm(config, data, LMTraining(steps=300, batch_size=8, seq_len=128, lr=6e-3), device, seed=0)
    heads, info = train_heads(model, data, 4, HeadsTraining(...), device, seed=0)   # info: steps, top-1, top-5 ...

- a GPT (base or draft model): next-token prediction on the corpus;
- Medusa heads (Cai et al. 2024, arXiv:2401.10774), by self-distillation with
  the backbone frozen: train-split prompts are continued greedily by the base
  model, and head k learns, at every position of those continuations, the
  token the base model wrote k + 1 places after its next one. The targets are
  thus exactly what greedy decoding will ask the heads to guess.
A `progress(phase, step, total, info)` callback hears how far each got.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from impls import medusa
from impls.data import TextData
from impls.gpt import GPT, GPTConfig
from impls.precision import PRECISIONS, Precision

Progress = Callable[[str, int, int, str], None]  # (phase, step, total, info)


def quiet(phase: str, step: int, total: int, info: str = "") -> None:
    """A Progress that says nothing."""


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


def cosine_lr(step: int, steps: int, max_lr: float, warmup: int, min_ratio: float = 0.1,
              progress: float | None = None) -> float:
    """Learning rate at `step` (0-based) of `steps`: linear warm-up over the
    first `warmup` steps, then cosine decay to min_ratio * max_lr at the last
    step. The GPT-3 schedule (Brown et al. 2020, appendix B), as nanoGPT uses it.

    `progress` (0 to 1) says how far the decay is where something other than
    the step count decides it, e.g. a time budget (`fit`); by default
    (step - warmup) / (steps - 1 - warmup)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, steps - 1 - warmup)
    progress = min(1.0, progress)
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


# -- training to a budget: the Medusa suite's models ---------------------------------------------


@dataclass(frozen=True)
class LMTraining:
    """Next-token training of a GPT on the corpus (base and draft models)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int = 20
    # A budget, not a measurement: training stops when it is spent and the
    # learning-rate schedule follows whichever of steps and seconds runs out
    # first. The returned info records how many steps ran.
    max_seconds: float | None = None


@dataclass(frozen=True)
class HeadsTraining:
    """Self-distillation of the Medusa heads."""

    prompts: int  # train-split prompts the base model continues greedily
    prompt_len: int
    gen_len: int
    steps: int
    batch_size: int  # positions per step
    lr: float
    gen_batch: int = 256  # prompts continued at once
    max_seconds: float | None = None


def training_precision(device: torch.device) -> Precision:
    """bf16 autocast on a GPU that has it, else fp32."""
    if device.type == "cuda" and PRECISIONS["bf16"].why_not(device) is None:
        return PRECISIONS["bf16"]
    return PRECISIONS["fp32"]


class Budget:
    """How far a run is: the larger of its share of steps and of seconds."""

    def __init__(self, steps: int, max_seconds: float | None):
        self.steps, self.max_seconds, self.start = steps, max_seconds, time.monotonic()

    def fraction(self, step: int) -> float:
        f = step / self.steps
        if self.max_seconds:
            f = max(f, (time.monotonic() - self.start) / self.max_seconds)
        return f

    def seconds(self) -> float:
        return time.monotonic() - self.start


def fit(optimizer: torch.optim.Optimizer, step: Callable[[], torch.Tensor], steps: int, lr: float, warmup: int,
        max_seconds: float | None, report: Callable[[int, torch.Tensor], None]) -> tuple[int, float, torch.Tensor | None]:
    """Call step() (one optimizer step, returning its loss) until `steps` steps
    or `max_seconds` have run, the learning rate following cosine_lr over
    whichever runs out first; report(steps done, loss) every tenth step and
    after the last. Returns (steps run, seconds, the last loss)."""
    budget = Budget(steps, max_seconds)
    done, loss = 0, None
    while done < steps and budget.fraction(done) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(done, steps, lr, warmup, progress=budget.fraction(done))
        loss = step()
        done += 1
        if done % 10 == 0 or done == steps:  # reading the loss waits for the device
            report(done, loss)
    return done, budget.seconds(), loss


def train_lm(config: GPTConfig, data: TextData, t: LMTraining, device: torch.device, seed: int,
             progress: Progress = quiet, phase: str = "base") -> tuple[GPT, dict]:
    """Train a GPT from scratch on the corpus; returns it (fp32, on device, in eval mode) and what happened."""
    torch.manual_seed(seed)
    model = GPT(config).to(device)
    precision = training_precision(device)
    opt = model.configure_optimizer(weight_decay=0.1, lr=t.lr, betas=(0.9, 0.95), device_type=device.type)
    scaler = precision.scaler(device)
    g = torch.Generator().manual_seed(seed)
    seq_len = min(t.seq_len, config.block_size)
    model.train()

    def step():
        x, y = data.get_batch("train", t.batch_size, seq_len, generator=g, device=device)
        return train_step(model, opt, scaler, precision, x, y, device)

    steps, seconds, loss = fit(opt, step, t.steps, t.lr, t.warmup, t.max_seconds,
                               lambda done, loss: progress(phase, done, t.steps, f"loss {loss.item():.3f}"))
    val_seq = min(seq_len, len(data.val) - 1)
    info = dict(steps=steps, seconds=round(seconds, 1), train_loss=None if loss is None else loss.item(),
                val_loss=evaluate(model, data, precision, device, batches=8, batch_size=8, seq_len=val_seq,
                                  seed=10_000),
                params=model.num_params(False), precision=precision.name)
    progress(phase, t.steps, t.steps, f"val loss {info['val_loss']:.3f} after {steps} steps")
    model.eval()
    return model, info


def _inference_copy(model: GPT, device: torch.device) -> GPT:
    """The frozen base model as decoding will see it: bf16 on a GPU that has it, else fp32."""
    dtype = torch.bfloat16 if training_precision(device).name == "bf16" else torch.float32
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


def train_heads(model: GPT, data: TextData, n_heads: int, h: HeadsTraining, device: torch.device, seed: int,
                progress: Progress = quiet) -> tuple[medusa.MedusaHeads, dict]:
    """Self-distilled Medusa heads for a frozen base model; returns them (fp32, eval mode) and their scores."""
    from impls.decoding import greedy_continue  # impls.decoding imports Triton, which only this needs here

    frozen = _inference_copy(model, device)
    P = h.prompt_len
    prompts = data.get_batch("train", h.prompts, P, seed=seed + 1)[0].to(device)
    seqs = []
    for chunk in prompts.split(h.gen_batch):
        seqs.append(greedy_continue(frozen, chunk, h.gen_len))
        progress("distill", sum(len(s) for s in seqs), h.prompts, "greedy continuations of train prompts")
    seq = torch.cat(seqs)  # (n, P + G)
    with torch.no_grad():
        hidden = torch.cat([frozen(chunk, return_hidden=True)[2] for chunk in seq.split(64)])  # (n, T, C)
    # Positions that have at least the first head's target: P - 1 .. T - 3.
    T = seq.shape[1]
    targets = medusa.head_targets(seq, n_heads, start=P)[:, :, P - 1:T - 2]  # (K, n, G - 1)
    hidden = hidden[:, P - 1:T - 2]
    n_eval = max(1, len(seq) // 8)  # the last eighth of the continuations is held out for the scores
    x_train = hidden[:-n_eval].reshape(-1, hidden.shape[-1])
    y_train = targets[:, :-n_eval].reshape(n_heads, -1)
    x_eval = hidden[-n_eval:].reshape(-1, hidden.shape[-1])
    y_eval = targets[:, -n_eval:].reshape(n_heads, -1)
    del frozen, hidden

    torch.manual_seed(seed)
    lm_head = model.lm_head.weight[:model.config.vocab_size]  # the real vocabulary's rows
    heads = medusa.MedusaHeads.from_lm_head(lm_head.detach().float(), n_heads).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=h.lr, weight_decay=0.0)
    precision = training_precision(device)
    g = torch.Generator().manual_seed(seed + 2)

    def step():
        idx = torch.randint(len(x_train), (h.batch_size,), generator=g).to(device)
        with precision.context(device):
            losses = medusa.head_losses(heads(x_train[idx]), y_train[:, idx])
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    steps, seconds, _ = fit(opt, step, h.steps, h.lr, 0, h.max_seconds,
                            lambda done, losses: progress("heads", done, h.steps,
                                                          "loss " + " ".join(f"{v:.2f}" for v in losses.tolist())))
    heads.eval()
    scores = score_heads(heads, x_eval, y_eval, device)
    progress("heads", h.steps, h.steps, "top-1 " + " ".join(f"{v:.2f}" for v in scores.top1))
    info = dict(steps=steps, seconds=round(seconds, 1), positions=len(x_train),
                params=sum(p.numel() for p in heads.parameters()), **asdict(scores))
    return heads, info


@torch.no_grad()
def score_heads(heads: medusa.MedusaHeads, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> medusa.HeadScores:
    """Each head's mean loss and top-1/top-5 accuracy on hidden states x (N, C) with targets y (K, N), -1 for none."""
    precision = training_precision(device)
    loss_sum = torch.zeros(heads.n_heads, dtype=torch.float64, device=device)
    hits = torch.zeros(heads.n_heads, medusa.TOPK, dtype=torch.long, device=device)
    counts = torch.zeros(heads.n_heads, dtype=torch.long, device=device)
    for xs, ys in zip(x.split(2048), y.split(2048, dim=1)):
        with precision.context(device):
            logits = heads(xs)
        n = (ys >= 0).sum(dim=1)
        loss_sum += medusa.head_losses(logits, ys).double() * n
        h, c = medusa.head_counts(logits, ys)
        hits += h
        counts += c
    return medusa.head_scores((loss_sum / counts.clamp_min(1)).tolist(), hits, counts)
