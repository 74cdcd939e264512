"""`genbench posenc`: the positional-encoding suite's command (suites/posenc.py).

`--cost` times applying each encoding at LLM shapes (RoPE eager, compiled and
our Triton kernel; RoPE with causal attention, rotated first or inside tiled's
kernels; ALiBi through SDPA's bias, FlexAttention and tiled; the absolute
tables); `--reach` trains the shared GPT once per encoding at context L and
scores it at L, 2L, 4L, 8L. Both may be given: the cost run comes first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import (
    DeviceOpt, OutOpt, RepOpt, RunOptions, SeedOpt, WarmupOpt, cli_errors, console, run_suite,
)
from bench.errors import BadInput
from bench.registry import Suite

# Names of suites/posenc.py, written out so that --help need not import torch;
# tests/suites/test_posenc.py keeps them equal to the originals.
MODES = ("fwd", "fwd+bwd")
COST_ENCODINGS = ("rope", "rope+attention", "alibi", "sinusoidal", "learned")
REACH_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
LAYOUTS = ("neox", "gptj")
REACH_MODELS = ("tiny", "small")

# (batch, seq, heads, head_dim, dtypes) of --cost when not given: the LLM shape on a GPU, a small one on a CPU.
GPU_COST = (16, "4096", 32, 128, ("bf16", "fp32"))
CPU_COST = (2, "512", 8, 64, ("fp32",))


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"{option}: cannot read {text!r} as whole numbers separated by commas (e.g. 0,30000)") from None


@cli_errors
def posenc_command(
    cost: Annotated[bool, typer.Option("--cost", help="Time applying each encoding: RoPE (eager, compiled, our Triton kernel), RoPE with causal attention (rotated first, or inside tiled's kernels), ALiBi (SDPA bias, FlexAttention, tiled), the absolute tables.")] = False,
    reach: Annotated[bool, typer.Option("--reach", help="Train the GPT once per encoding at context L and score it at L, 2L, 4L, 8L (perplexity).")] = False,
    encoding: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable. --cost: {', '.join(COST_ENCODINGS)}; --reach: {', '.join(REACH_ENCODINGS)} (rope brings rope+pi and rope+ntk). Default: all.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="--cost: sequences per call. Default: 16 on a GPU, 2 on CPU.")] = None,
    seq: Annotated[Optional[str], typer.Option(help="--cost: sequence lengths, e.g. 4096 or 1k,4k. Default: 4096 on a GPU, 512 on CPU.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="--cost: heads of q and k. Default: 32 on a GPU, 8 on CPU.")] = None,
    head_dim: Annotated[Optional[int], typer.Option(help="--cost: head dimension, even for RoPE. Default: 128 on a GPU, 64 on CPU.")] = None,
    dtype: Annotated[Optional[list[str]], typer.Option(help="--cost: fp32, fp16 or bf16; repeatable. Default: bf16 and fp32 on a GPU, fp32 on CPU.")] = None,
    mode: Annotated[Optional[list[str]], typer.Option(help="--cost: fwd or fwd+bwd; repeatable. Default: both.")] = None,
    offset: Annotated[str, typer.Option(help="--cost: position of the first token, e.g. 0,30000 (a decode step far into a sequence); RoPE rows.")] = "0",
    layout: Annotated[Optional[list[str]], typer.Option(help="--cost: RoPE layout, neox (rotate-half) or gptj (interleaved); repeatable. Default: both.")] = None,
    impl: Annotated[Optional[list[str]], typer.Option(help="--cost: only these implementations (eager, compile, triton, triton-computed, triton-inplace, triton-inplace-computed; rope+attention: compile+sdpa-cudnn, compile+tiled, tiled-fused; sdpa, sdpa-bias, flex, tiled; cached); repeatable. Default: all.")] = None,
    model: Annotated[Optional[str], typer.Option(help=f"--reach preset: {', '.join(REACH_MODELS)}. tiny: 2 layers of 128 at L = 64, minutes on a CPU; small: 8 layers of 512 at L = 256, minutes on a GPU. Default: small on a GPU, tiny on CPU.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="--reach: training steps per encoding. Default: the preset's (tiny 300, small 2000).")] = None,
    train_len: Annotated[Optional[int], typer.Option(help="--reach: training context L. Default: the preset's (tiny 64, small 256).")] = None,
    eval_factors: Annotated[str, typer.Option(help="--reach: evaluation lengths as multiples of L.")] = "1,2,4,8",
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
    warmup_ms: WarmupOpt = 25.0,
    rep_ms: RepOpt = 100.0,
):
    """Positional encodings: what applying each costs (--cost), and how far past its training length a
    model using it still predicts (--reach)."""
    if not cost and not reach:
        raise BadInput("give --cost (time each encoding), --reach (train and score a model per encoding), or both")
    from bench.env import resolve_device

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    run_opts = RunOptions(dev, out, seed, warmup_ms, rep_ms)
    if cost:
        if not gpu and any(i.startswith("triton") or "tiled" in i for i in impl or ()):
            # Asked for by name on a CPU: the Triton kernels run through Triton's interpreter (slow, but the
            # real kernels). The flag is read when triton is first imported, which the suite does later.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from suites import attention, posenc as suite

        defaults = GPU_COST if gpu else CPU_COST
        cost_opts = suite.CostOptions(
            batch=defaults[0] if batch is None else batch,
            seqs=attention.parse_seqs(seq or defaults[1]),
            heads=defaults[2] if heads is None else heads,
            head_dim=defaults[3] if head_dim is None else head_dim,
            dtypes=tuple(dtype) if dtype else defaults[4],
            modes=tuple(mode) if mode else MODES,
            offsets=_ints(offset, "--offset"),
            encodings=tuple(encoding) if encoding else suite.COST_ENCODINGS,
            layouts=tuple(layout) if layout else LAYOUTS,
            impls=tuple(impl or ()),
        )
    if reach:
        from suites import posenc as suite

        reach_opts = suite.ReachOptions(
            model=model or ("small" if gpu else "tiny"),
            encodings=tuple(encoding) if encoding else suite.REACH_ENCODINGS,
            steps=steps,
            train_len=train_len,
            eval_factors=_ints(eval_factors, "--eval-factors"),
        )
    if cost:
        run_suite(suite.cost_sweep(cost_opts), run_opts)
    if reach:
        _reach(suite, reach_opts, run_opts)


def _reach(suite, opts, run_opts: RunOptions) -> None:
    from bench.env import cache_dir
    from impls import data as textdata

    with console.status("reading and tokenizing the training text (cached after the first run)"):
        text = textdata.load_data(suite.data_config(opts), cache_dir())
    longest = max(opts.eval_factors) * opts.preset.train_len
    if len(text.val) <= longest:
        raise BadInput(f"the held-out text has {len(text.val)} tokens, too few for windows of {longest}; "
                       "give a shorter --train-len or smaller --eval-factors")
    p = opts.preset
    console.print(f"[dim]reach: {p.gpt} GPT trained {p.steps} steps of {p.batch} x {p.train_len} tokens per "
                  f"encoding, one context of {opts.context} positions (learned: rows past {p.train_len} never "
                  "trained); scored on the same held-out windows[/]", highlight=False)
    run_suite(suite.reach_sweep(opts, text), run_opts)


SUITE = Suite("posenc", posenc_command, charts={"posenc-cost": "suites.charts.posenc:cost_chart",
                                                "posenc-reach": "suites.charts.posenc:reach_chart"})
