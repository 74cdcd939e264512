"""`genbench attention`: the attention suite's command (suites/attention.py).

`--impl` takes the built-in implementations, those installed packages register
under the entry-point group `genbench.attention`, and your own as
`module:function`; `--list` shows them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import (
    CrosscheckOpt, DeviceOpt, OutOpt, ProfileOpt, RepOpt, RunOptions, SeedOpt, WarmupOpt, cli_errors, list_option,
    plugin_help,
    run_suite,
)
from bench.registry import Suite

# suites.attention.IMPLS and GROUP, written out so that --help need not import torch (a test keeps them equal).
IMPLS = ("naive", "tiled", "tiled-triton", "tiled-torch", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
         "sdpa-math")
GROUP = "genbench.attention"
_OWN = ("--impl module:function, a function fn(q, k, v, causal) -> out with q, out of shape (B, H, S, D) and k, v "
        "(B, H_kv, S, D), and optionally fn.why_not(q, k, v, causal) -> None or the reason it cannot run them")


@cli_errors
def attention(
    seq: Annotated[Optional[str], typer.Option(help="Sequence lengths: 512, 8k, 1k,2k,4k. Default: 8k on a GPU, 256,512,1k on CPU.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size. Default: 16k tokens / seq.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Query heads. Default: 16 on a GPU, 8 on CPU.")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="Key/value heads (GQA); must divide --heads. Default: --heads.")] = None,
    head_dim: Annotated[Optional[int], typer.Option(help="Head dimension. Default: 128 on a GPU, 64 on CPU.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16. Default: bf16 on a GPU, fp32 on CPU.")] = None,
    causal: Annotated[Optional[bool], typer.Option("--causal/--no-causal", help="Causal mask or not. Default: both.")] = None,
    mode: Annotated[Optional[list[str]], typer.Option(help="fwd, bwd or fwd+bwd; repeatable. Default: fwd and fwd+bwd on a GPU, fwd on CPU.")] = None,
    impl: Annotated[Optional[list[str]], typer.Option(help=plugin_help(GROUP, f"Repeatable; default all built-in: {', '.join(IMPLS)}."))] = None,
    list_: Annotated[bool, typer.Option("--list", is_eager=True, callback=list_option(GROUP, IMPLS, _OWN),
                                        help="List the implementations --impl takes, and exit.")] = False,
    retune: Annotated[bool, typer.Option("--retune", help="Time every block configuration of tiled's kernels on this "
                                         "GPU, ignoring the choices shipped for it and those cached on disk.")] = False,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
    warmup_ms: WarmupOpt = 25.0,
    rep_ms: RepOpt = 100.0,
    crosscheck: CrosscheckOpt = False,
    profile: ProfileOpt = False,
):
    """Naive vs tiled (FlashAttention written here) vs SDPA and each of its backends.

    The defaults suit the machine: on a GPU, seq 8k, 16 heads of 128, bf16, forward and
    forward+backward; on a CPU, a small sweep (256, 512, 1k; 8 heads of 64; fp32; forward).
    """
    from bench.env import parse_dtype, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu" and {"tiled", "tiled-triton"} & set(impl or ()):
        # Asked for by name on a CPU: the Triton kernel runs through Triton's interpreter (slow, but the
        # real kernel). The flag is read when triton is first imported, which the suite does next.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from suites import attention as suite

    gpu = dev.type == "cuda"
    dtype = dtype or ("bf16" if gpu else "fp32")
    parse_dtype(dtype, dev)
    opts = suite.AttentionOptions(
        seqs=suite.parse_seqs(seq or ("8k" if gpu else "256,512,1k")),
        batch=batch,
        heads=(16 if gpu else 8) if heads is None else heads,
        kv_heads=kv_heads,
        head_dim=(128 if gpu else 64) if head_dim is None else head_dim,
        dtype=dtype,
        causal=(False, True) if causal is None else (causal,),
        modes=tuple(mode) if mode else (("fwd", "fwd+bwd") if gpu else ("fwd",)),
        impls=tuple(impl) if impl else tuple(suite.IMPLS),
        retune=retune,
    )
    run_suite(suite.sweep(opts), RunOptions(dev, out, seed, warmup_ms, rep_ms, crosscheck, profile))


SUITE = Suite("attention", attention, charts={"attention": "suites.charts.attention:chart"})
