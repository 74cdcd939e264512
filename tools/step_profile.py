"""Developer tool: the time of one GPT training step with the vocabulary padded and
not, and the kernels that take it, in one command:

    PYTHONPATH=. python -m tools.step_profile --model gpt2-small --batch 16 --seq-len 1024 \\
        --precision bf16 --vocab-multiple 1 --vocab-multiple 64 [--compile] [--trace-dir DIR]

For each --vocab-multiple (1: the tokenizer's vocabulary as it is, e.g. GPT-2's 50257;
64: padded to 50304, the default of impls/gpt.py) it builds the preset from one seed,
trains --steps steps of impls/train.py's train_step (AdamW, fused on CUDA) on random
token batches (a step's cost does not depend on the text), times every step with
bench.timing.StepTimer and drops the first --warmup (allocator growth, cuBLAS
heuristics, compilation). Then three more steps run under torch.profiler
(bench/profile.py): their trace goes to --trace-dir and the kernels with the most
self device time (on CPU: operators) are printed. Last, one line per multiple:
median step time, tokens/s and MFU against this device's calibrated peak (see
`genbench env --calibrate`; on CUDA it is measured once if missing). MFU counts the
real vocabulary's FLOPs for both (GPT.flops_per_token), so the two MFUs differ
exactly as the step times do.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import calibrate, metrics
from bench.env import resolve_device
from bench.profile import OpTime, profile_fn
from bench.stats import Stats
from bench.timing import StepTimer
from impls.gpt import GPT, PRESETS, GPTConfig
from impls.precision import PRECISIONS
from impls.train import train_step

# AdamW as the precision suite trains (suites/precision.py).
LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
BATCHES = 4  # distinct random batches cycled through, so no step reuses the previous step's inputs


@dataclass(frozen=True)
class StepProfile:
    """One vocabulary multiple: its shape, its timed steps and its top kernels."""

    vocab_multiple: int
    vocab_size: int
    padded_vocab_size: int
    stats: Stats  # step times (ms) after the warm-up
    tokens_per_s: float
    mfu: float | None  # percent of the calibrated peak; None when the device is not calibrated
    top: list[OpTime]
    trace: Path


def profile_step(model: str, batch: int, seq_len: int, precision: str, vocab_multiple: int, *,
                 device: torch.device, steps: int = 20, warmup: int = 5, compile: bool = False,
                 vocab_size: int | None = None, trace_dir: Path, peaks: dict | None = None,
                 seed: int = 0) -> StepProfile:
    """Time `steps` training steps of the preset `model` and profile three more."""
    assert steps > warmup >= 0, f"--steps {steps} must exceed --warmup {warmup}"
    p = PRECISIONS[precision]
    reason = p.why_not(device)
    assert reason is None, f"{precision} cannot run here: {reason}"
    overrides = dict(vocab_multiple=vocab_multiple) | ({"vocab_size": vocab_size} if vocab_size else {})
    config = GPTConfig.from_name(model, **overrides)
    assert seq_len <= config.block_size, f"--seq-len {seq_len} exceeds {model}'s context of {config.block_size}"
    torch.manual_seed(seed)
    gpt = p.prepare(GPT(config).to(device))
    optimizer = gpt.configure_optimizer(WEIGHT_DECAY, LR, BETAS, device.type)
    scaler = p.scaler(device)
    forward = torch.compile(gpt) if compile else gpt
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(config.vocab_size, (BATCHES, batch, seq_len + 1), generator=g).to(device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]  # (B, T) inputs and next-token targets
    i = 0

    def step():
        nonlocal i
        x, y = batches[i % BATCHES]
        i += 1
        return train_step(forward, optimizer, scaler, p, x, y, device)

    timer = StepTimer(device)
    for _ in range(steps):
        with timer.step():
            step()
    stats = timer.stats(warmup=warmup)
    trace = Path(trace_dir) / f"{model}-{precision}{'-compile' if compile else ''}-vocab{vocab_multiple}.pt.trace.json"
    top = profile_fn(step, device, trace)
    tokens_per_s = metrics.per_second(batch * seq_len, stats.median)
    peak = (peaks or {}).get(calibrate.matmul_key(p.compute_dtype, tf32=p.tf32))
    mfu = metrics.mfu(tokens_per_s, gpt.flops_per_token(seq_len), peak)
    return StepProfile(vocab_multiple, config.vocab_size, config.padded_vocab_size, stats, tokens_per_s, mfu,
                       top, trace)


def render(results: list[StepProfile], console: Console, by: str) -> None:
    """Each multiple's top kernels, then the step times side by side."""
    for r in results:
        table = Table(title=f"vocabulary {r.vocab_size} -> {r.padded_vocab_size} rows (multiple {r.vocab_multiple})")
        table.add_column(f"top by self {by} time", overflow="fold", max_width=90)
        table.add_column("ms / step", justify="right")
        table.add_column("share", justify="right")
        table.add_column("calls / step", justify="right")
        for op in r.top:
            table.add_row(op.name, f"{op.ms_per_step:.4g}", f"{100 * op.share:.1f}%", f"{op.calls_per_step:g}")
        console.print(table)
    summary = Table(title="training step")
    for header in ("multiple", "lm_head rows", "median ms", "IQR ms", "steps", "tok/s", "MFU%", "speedup vs first"):
        summary.add_column(header, justify="right")
    first = results[0].stats.median
    for r in results:
        summary.add_row(str(r.vocab_multiple), str(r.padded_vocab_size), f"{r.stats.median:.4g}",
                        f"{r.stats.iqr:.2g}", str(r.stats.n), f"{r.tokens_per_s:,.0f}",
                        "" if r.mfu is None else f"{r.mfu:.1f}", f"{metrics.speedup(first, r.stats.median):.3f}x")
    console.print(summary)
    console.print(f"traces: {', '.join(str(r.trace) for r in results)}", highlight=False)


def main(argv: list[str] | None = None, console: Console | None = None) -> list[StepProfile]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--vocab-multiple", type=int, action="append",
                        help="repeatable; default: 1 and 64 (unpadded, then padded)")
    parser.add_argument("--vocab-size", type=int, help="default: the preset's (gpt2-small 50257, else 8192)")
    parser.add_argument("--compile", action="store_true", help="train under torch.compile")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trace-dir", type=Path, default=Path(tempfile.gettempdir()) / "step_profile")
    args = parser.parse_args(argv)
    console = console or Console()
    device = resolve_device(args.device)
    try:
        peaks = calibrate.load(device)
    except calibrate.Unusable:
        peaks = None
    if peaks is None and device.type == "cuda":
        peaks = calibrate.calibrate(device)
    results = []
    for multiple in args.vocab_multiple or [1, 64]:
        console.print(f"[dim]{args.model} {args.precision}{' compiled' if args.compile else ''}, "
                      f"{args.batch} x {args.seq_len} tokens, vocab multiple {multiple}: {args.steps} steps[/]")
        results.append(profile_step(args.model, args.batch, args.seq_len, args.precision, multiple, device=device,
                                    steps=args.steps, warmup=args.warmup, compile=args.compile,
                                    vocab_size=args.vocab_size, trace_dir=args.trace_dir, peaks=peaks))
        if args.compile:
            torch.compiler.reset()  # each multiple compiles its own model
    render(results, console, "CUDA" if device.type == "cuda" else "CPU")
    return results


if __name__ == "__main__":
    main()
