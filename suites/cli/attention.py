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
    CrosscheckOpt, DeviceOpt, InterleaveOpt, OutOpt, ProfileOpt, RepOpt, RunOptions, SeedOpt, WarmupOpt, cli_errors, list_option,
    plugin_help,
    run_suite,
)
from bench.registry import Suite

# suites.attention.IMPLS and GROUP, written out so that --help need not import torch (a test keeps them equal).
IMPLS = ("naive", "tiled", "tiled-triton", "tiled-torch", "flex", "sdpa", "sdpa-flash", "sdpa-efficient",
         "sdpa-cudnn", "sdpa-math", "flash-attn", "flash-attn3", "flashinfer", "xformers")
GROUP = "genbench.attention"
_PRESET_HELP = ("Serving shapes; options you give override the preset's. decode: q_len 1 against kv_len "
                "1k,4k,16k,32k,128k, batch 8, 32 query heads over 8 kv heads of 128, bf16, causal, forward. prefill: "
                "square causal seq 1k,4k,16k, same heads. On CPU a small version: decode kv_len 256,1k, batch 2, "
                "8 heads over 2 of 64, fp32; prefill seq 128,512. prefill-varlen: 16k tokens packed in ten causal "
                "sequences of 128 to 4k, same heads (CPU: lengths 100,0,1,37,128,64).")
_OWN = ("--impl module:function, a function fn(q, k, v, causal) -> out with q, out of shape (B, H, Sq, D) and k, v "
        "(B, H_kv, Sk, D) (causal aligned bottom-right when Sq < Sk), and optionally fn.why_not(q, k, v, causal) -> None or the reason it cannot run them")


@cli_errors
def attention(
    seq: Annotated[Optional[str], typer.Option(help="Sequence lengths, square (q_len = kv_len): 512, 8k, 1k,2k,4k. Default: 8k on a GPU, 256,512,1k on CPU.")] = None,
    q_len: Annotated[Optional[str], typer.Option(help="Query lengths, with --kv-len instead of --seq: 1,64. Causal aligns them bottom-right (the last q_len positions).")] = None,
    kv_len: Annotated[Optional[str], typer.Option(help="Key/value (KV cache) lengths, with --q-len: 4k,32k.")] = None,
    preset: Annotated[Optional[str], typer.Option(help=_PRESET_HELP)] = None,
    window: Annotated[Optional[int], typer.Option(help="Sliding window of N keys, with --causal: the query at position i sees keys i-N < j <= i (bottom-right frame).")] = None,
    softcap: Annotated[Optional[float], typer.Option(help="Logit soft-capping at X > 0: scores become X*tanh(scores/X). SDPA rows cannot.")] = None,
    alibi: Annotated[bool, typer.Option("--alibi", help="ALiBi: add -slope_h*(i-j) to the scores, slopes 2^(-8h/H) (Press et al. 2022).")] = False,
    varlen: Annotated[bool, typer.Option("--varlen", help="A packed batch of sequences of different lengths (no padding, cu_seqlens), each attending only to itself; give --lengths.")] = False,
    lengths: Annotated[Optional[str], typer.Option(help="The --varlen sequences: 128,4k,900 (0 and 1 allowed), or uniform:LO-HI:N[@SEED], e.g. uniform:128-4k:16@0 (N lengths uniform in LO..HI, seeded).")] = None,
    page_size: Annotated[Optional[int], typer.Option(help="Store K and V as pages of N positions with a block table (decode, forward); N must divide every kv_len.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size. Default: 16k tokens / seq (or / kv-len).")] = None,
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
    interleave: InterleaveOpt = None,
):
    """Naive vs tiled (FlashAttention written here) vs SDPA and each of its backends.

    The defaults suit the machine: on a GPU, seq 8k, 16 heads of 128, bf16, forward and
    forward+backward; on a CPU, a small sweep (256, 512, 1k; 8 heads of 64; fp32; forward).
    Serving shapes: --q-len 1,64 --kv-len 4k,32k (queries against a KV cache), or --preset decode;
    --varlen --lengths 128,4k,900 (a packed batch), --page-size 16 (a paged KV cache).
    """
    from bench.env import parse_dtype, resolve_device
    from bench.errors import BadInput

    dev = resolve_device(device)
    if dev.type == "cpu" and {"tiled", "tiled-triton"} & set(impl or ()):
        # Asked for by name on a CPU: the Triton kernel runs through Triton's interpreter (slow, but the
        # real kernel). The flag is read when triton is first imported, which the suite does next.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from suites import attention as suite

    gpu = dev.type == "cuda"
    if preset is not None:
        p = suite.preset(preset, dev.type)
        if p.lengths is not None:
            varlen, lengths = True, lengths or p.lengths
        elif seq is None and q_len is None and kv_len is None:
            seq, q_len, kv_len = p.seq, p.q_len, p.kv_len
        elif seq is None:
            q_len, kv_len = q_len or p.q_len, kv_len or p.kv_len
        batch = p.batch if batch is None else batch
        heads = p.heads if heads is None else heads
        kv_heads = p.kv_heads if kv_heads is None else kv_heads
        head_dim = p.head_dim if head_dim is None else head_dim
        dtype = dtype or p.dtype
        causal = p.causal if causal is None else causal
        mode = mode or (list(p.modes) if p.modes else None)
    if varlen != (lengths is not None):
        raise BadInput("--varlen and --lengths go together: --varlen --lengths 128,4k,900")
    square = q_len is None and kv_len is None and not varlen
    dtype = dtype or ("bf16" if gpu else "fp32")
    parse_dtype(dtype, dev)
    opts = suite.AttentionOptions(
        seqs=suite.parse_seqs(seq or ("8k" if gpu else "256,512,1k")) if seq is not None or square else (),
        lengths=suite.parse_lengths(lengths) if varlen else (),
        page_size=page_size,
        q_lens=suite.parse_seqs(q_len, "--q-len") if q_len is not None else (),
        kv_lens=suite.parse_seqs(kv_len, "--kv-len") if kv_len is not None else (),
        batch=batch,
        heads=(16 if gpu else 8) if heads is None else heads,
        kv_heads=kv_heads,
        head_dim=(128 if gpu else 64) if head_dim is None else head_dim,
        dtype=dtype,
        causal=(False, True) if causal is None else (causal,),
        modes=tuple(mode) if mode else (("fwd", "fwd+bwd") if gpu else ("fwd",)),
        impls=tuple(impl) if impl else tuple(suite.IMPLS),
        retune=retune,
        window=window,
        softcap=softcap,
        alibi=alibi,
    )
    run_suite(suite.sweep(opts), RunOptions(dev, out, seed, warmup_ms, rep_ms, crosscheck, profile, interleave))


SUITE = Suite("attention", attention, charts={"attention": "suites.charts.attention:chart"})
