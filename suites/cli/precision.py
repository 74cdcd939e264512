"""`genbench precision`: the precision suite's command (suites/precision.py).

`--model` takes the GPT presets, the model factories installed packages
register under the entry-point group `genbench.precision`, and your own as
`module:function`; `--list` shows them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.commands import (
    DeviceOpt, OutOpt, ProfileOpt, RunOptions, cli_errors, console, list_option, plugin_help, run_suite,
)
from bench.errors import BadInput
from bench.registry import Suite
from suites.cli.training import DATA_PRESETS, MODELS, PRECISIONS, data_config

# Defaults of suites/precision.py, written out so that --help need not import
# torch; tests/bench/test_cli.py keeps them equal to the originals.
DEFAULT_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8")  # suites.precision.DEFAULT_PRECISIONS
LR = 6e-4  # suites.precision.LR
GROUP = "genbench.precision"  # suites.precision.GROUP
_OWN = ("--model module:function, a factory(vocab_size, seq_len) -> torch.nn.Module built on the CPU, whose "
        "forward(idx, targets) takes (B, T) token ids and returns (logits, loss); a flops_per_token(seq_len) method "
        "gives its rows MFU")

# (model, steps, batch, seq_len) when not given: GPT-2's shape and batch on a GPU;
# on a CPU a model that trains in seconds, so the whole run takes about a minute.
GPU_DEFAULTS = ("gpt2-small", 300, 16, 1024)
CPU_DEFAULTS = ("tiny", 30, 4, 64)


@cli_errors
def precision_command(
    model: Annotated[Optional[str], typer.Option(help=plugin_help(GROUP, f"GPT preset: {', '.join(MODELS)}. Default: gpt2-small on a GPU, tiny on CPU."))] = None,
    list_: Annotated[bool, typer.Option("--list", is_eager=True, callback=list_option(GROUP, MODELS, _OWN),
                                        help="List the models --model takes, and exit.")] = False,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per precision. Default: 300 on a GPU, 30 on CPU.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Sequences per step. Default: 16 on a GPU, 4 on CPU.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence, at most the model's context. Default: 1024 on a GPU, 64 on CPU.")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable: {', '.join(PRECISIONS)}; add +compile to compile one (bf16+compile). Default: {', '.join(DEFAULT_PRECISIONS)}.")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Train every precision under torch.compile; compilation falls in the warm-up steps.")] = False,
    parity: Annotated[bool, typer.Option("--parity/--no-parity", help="Train fp32 first, and again from weights nudged by one ulp on the same batches (the band), and judge every precision's loss curve against them.")] = True,
    band_steps: Annotated[Optional[int], typer.Option(help="Steps of the band run (fp32 from nudged weights). Default: --steps.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="First steps left out of the timing. Default: a tenth of --steps.")] = None,
    eval_batches: Annotated[int, typer.Option(help="Held-out batches scored for the validation loss after training (0: none).")] = 10,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = LR,
    matmul: Annotated[bool, typer.Option("--matmul", help="Also show this device's matmul rate per dtype (the calibrated ceiling MFU is measured against).")] = False,
    data: Annotated[Optional[list[str]], typer.Option(help=f"A preset ({', '.join(DATA_PRESETS)}) or your own text files and folders (repeatable). Default: stdlib, the Python standard library's sources.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="bpe (trained here on the data, cached) or byte. Default: the data preset's.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="BPE vocabulary. Default: the model preset's (50257 for gpt2-small, else 8192), or the data preset's (stdlib-small: 2048).")] = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and of the batches' order (the band's nudge uses seed + 1).")] = 0,
    profile: ProfileOpt = False,
):
    """Train one GPT (or your model: --list) under fp32, tf32, fp16, bf16 (and bf16-pure, fp8) from the
    same weights on the same batches: step time, tokens/s, MFU, memory, and the loss against fp32's."""
    from bench.env import cache_dir, resolve_device
    from impls import data as textdata
    from impls.gpt import PRESETS as GPT_PRESETS
    from suites import precision as suite

    dev = resolve_device(device)
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    model = model or defaults[0]
    context = GPT_PRESETS[model].block_size if model in GPT_PRESETS else defaults[3]  # yours is built for seq_len
    opts = suite.PrecisionOptions(
        model=model,
        steps=defaults[1] if steps is None else steps,
        batch=defaults[2] if batch is None else batch,
        seq_len=min(defaults[3], context) if seq_len is None else seq_len,
        precisions=tuple(precision) if precision else suite.DEFAULT_PRECISIONS,
        compile=compile_,
        parity=parity,
        band_steps=band_steps,
        warmup_steps=warmup_steps,
        eval_batches=eval_batches,
        lr=lr,
        matmul=matmul,
    )
    corpus = data_config(data, tokenizer, vocab_size, model)
    run_opts = RunOptions(dev, out, seed, profile=profile)
    with console.status("reading and tokenizing the training text (cached after the first run)"):
        try:
            text = textdata.load_data(corpus, cache_dir())
        except ValueError as exc:
            raise BadInput(f"--data: {exc}") from None
    shortest = min(len(text.train), len(text.val))
    if shortest <= opts.seq_len:
        raise BadInput(f"--data: {shortest} tokens in the smaller of the train and held-out splits, too few for "
                       f"--seq-len {opts.seq_len}; give more text or a shorter --seq-len")
    for note in opts.notes():
        console.print(f"[dim]{note}[/]", highlight=False)
    run_suite(suite.sweep(opts, text, dev), run_opts)


SUITE = Suite("precision", precision_command, charts={"precision": "suites.charts.precision:chart"})
