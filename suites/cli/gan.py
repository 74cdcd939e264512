"""`genbench gan`: the gan suite's command (suites/gan.py): GAN objectives
trained and timed, or with --vq the vector quantizers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import DeviceOpt, OutOpt, RunOptions, SeedOpt, WarmupOpt, RepOpt, cli_errors, run_suite
from bench.registry import Suite

# Names and defaults of suites/gan.py, written out so that --help need not
# import torch; tests/suites/test_gan.py keeps them equal to the originals.
OBJECTIVES = ("nsgan", "wgan", "wgan-gp", "r1", "hinge")  # suites.gan.OBJECTIVES
DATA = ("8gaussians", "25gaussians", "digits")  # suites.gan.DATA
MODES = ("eager", "compile", "cudagraph")  # suites.gan.MODES
SEARCHES = ("cdist", "matmul", "fused", "fused-tf32x3")  # suites.gan.SEARCHES
VQ_OPS = ("search", "quantizer", "ema-update")  # suites.gan.VQ_OPS
DTYPES = ("fp32", "bf16")  # suites.gan.DTYPES

# On a GPU: long enough runs for the mixtures, every mode, and VQGAN's shapes
# (N = 16 x 64 x 64 latents, K = 1k ... 64k codes of 256 dims); on a CPU what
# finishes in a few minutes.
GPU = dict(steps=2000, modes=MODES, n=(65536,), k=(1024, 4096, 16384, 65536), dim=(256,), ae_steps=1000)
CPU = dict(steps=300, modes=("eager",), n=(2048,), k=(256, 1024), dim=(64,), ae_steps=200)


@cli_errors
def gan_command(
    objective: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable: {', '.join(OBJECTIVES)}. Default: all.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable: {', '.join(DATA)} (digits: scikit-learn's 8x8 images, installed with genbench's gan extra). Default: all.")] = None,
    mode: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable: {', '.join(MODES)}. Default: all on a GPU, eager on CPU.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per row (a step: n_critic critic steps and one generator step). Default: 2000 on a GPU, 300 on CPU.")] = None,
    batch: Annotated[int, typer.Option(help="Samples per critic and generator step.")] = 256,
    vq: Annotated[bool, typer.Option("--vq", help="Vector quantizers instead: nearest-code search, quantizer step, EMA update, codebook usage.")] = False,
    n: Annotated[Optional[list[int]], typer.Option("--n", help="--vq: latents N (repeatable). Default: 65536 on a GPU, 2048 on CPU.")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="--vq: codebook sizes K (repeatable). Default: 1024 4096 16384 65536 on a GPU, 256 1024 on CPU.")] = None,
    dim: Annotated[Optional[list[int]], typer.Option("--dim", help="--vq: code dims D (repeatable). Default: 256 on a GPU, 64 on CPU.")] = None,
    dtype: Annotated[Optional[list[str]], typer.Option(help=f"--vq: input dtypes (repeatable): {', '.join(DTYPES)}. Default: both.")] = None,
    search: Annotated[Optional[list[str]], typer.Option(help=f"--vq: nearest-code searches (repeatable): {', '.join(SEARCHES)}. Default: all.")] = None,
    op: Annotated[Optional[list[str]], typer.Option(help=f"--vq: what is timed (repeatable): {', '.join(VQ_OPS)} (the quantizer's forward+backward with each search; the EMA codebook update). Default: all.")] = None,
    autoencoder_steps: Annotated[Optional[int], typer.Option(help="--vq: training steps of the small VQ autoencoder on the digits (0: none). Default: 1000 on a GPU, 200 on CPU.")] = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
    warmup_ms: WarmupOpt = 25.0,
    rep_ms: RepOpt = 100.0,
):
    """GAN objectives (non-saturating, WGAN, WGAN-GP, R1, hinge): step time, the penalty's share, memory, mode
    coverage on the Gaussian mixtures. With --vq: nearest-code search (cdist, matmul, fused Triton) and quantizers."""
    from bench.errors import BadInput
    from bench.env import resolve_device
    from suites import gan as suite

    dev = resolve_device(device)
    defaults = GPU if dev.type == "cuda" else CPU
    given_vq = [name for name, v in (("--n", n), ("--k", k), ("--dim", dim), ("--dtype", dtype), ("--search", search), ("--op", op),
                                     ("--autoencoder-steps", autoencoder_steps)) if v is not None]
    given_gan = [name for name, v in (("--objective", objective), ("--data", data), ("--mode", mode),
                                      ("--steps", steps)) if v is not None]
    if vq and given_gan:
        raise BadInput(f"{', '.join(given_gan)} belong to the GAN rows, not --vq")
    if not vq and given_vq:
        raise BadInput(f"{', '.join(given_vq)} belong to the vector quantizers: add --vq")
    run_opts = RunOptions(dev, out, seed, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if vq:
        opts = suite.VqOptions(
            n=tuple(n or defaults["n"]), k=tuple(k or defaults["k"]), dim=tuple(dim or defaults["dim"]),
            dtypes=tuple(dtype or DTYPES), searches=tuple(search or SEARCHES), ops=tuple(op or VQ_OPS),
            autoencoder_steps=defaults["ae_steps"] if autoencoder_steps is None else autoencoder_steps)
        run_suite(suite.vq_sweep(opts, dev), run_opts)
        return
    opts = suite.GanOptions(
        objectives=tuple(objective or OBJECTIVES), data=tuple(data or DATA), modes=tuple(mode or defaults["modes"]),
        steps=defaults["steps"] if steps is None else steps, batch=batch)
    run_suite(suite.gan_sweep(opts, dev), run_opts)


SUITE = Suite("gan", gan_command, charts={"gan": "suites.charts.gan:chart", "gan-vq": "suites.charts.gan:vq_chart"})
