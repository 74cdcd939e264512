"""`genbench medusa`: Medusa heads vs vanilla, draft-model and prompt-lookup
decoding; `genbench medusa train`: train (or load) the models and show how
well each head guesses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.commands import (
    Command, DeviceOpt, Group, OutOpt, ProfileOpt, RunOptions, SeedOpt, cli_errors, console, run_suite,
)
from bench.errors import BadInput
from bench.registry import Suite

if TYPE_CHECKING:
    import torch

    from suites import medusa as suite

# Names and defaults of suites/medusa.py and impls/medusa.py, written out so that
# --help need not import torch; tests/bench/test_cli.py keeps them equal.
PRESETS = ("tiny", "small", "medium")  # impls.medusa_models.PRESETS
METHODS = ("vanilla", "medusa", "draft", "lookup")  # suites.medusa.METHODS
DEFAULT_TREE_SIZE = 64  # impls.medusa.DEFAULT_TREE_SIZE
TREE_ATTENTION = ("auto", "sdpa", "tiled")  # suites.medusa.TREE_ATTENTION

medusa_app = typer.Typer(
    help="Medusa heads vs vanilla greedy decoding, with draft-model and prompt-lookup speculative decoding beside them.",
    cls=Group,
    no_args_is_help=False,
    add_completion=False,
)

ModelOpt = Annotated[str, typer.Option(
    help=f"A preset ({', '.join(PRESETS)}; trained here on first use and cached) or a local Hugging Face "
         "causal-LM folder (vanilla and lookup only; needs transformers).")]
HeadsOpt = Annotated[int, typer.Option(help="Medusa heads K; head k guesses the token k+1 places after the next one.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="Decoding dtype: fp32, bf16 or fp16. Default: bf16 on a GPU, fp32 on CPU.")]
DataOpt = Annotated[Optional[str], typer.Option(help="Corpus preset of impls/data.py (stdlib, stdlib-small, bytes). Default: the model preset's.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(help="A base-model checkpoint (.pt from `genbench medusa train`) to use instead of training.")]
BaseStepsOpt = Annotated[Optional[int], typer.Option(help="Training steps of the base model (default: the preset's).")]
HeadsStepsOpt = Annotated[Optional[int], typer.Option(help="Training steps of the heads (default: the preset's).")]
DraftStepsOpt = Annotated[Optional[int], typer.Option(help="Training steps of the draft model (default: the preset's).")]


def _progress() -> tuple[Progress, suite.Progress]:
    """A rich progress bar per training phase, driven by the suite's callback."""
    bars = Progress(TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=console)
    tasks: dict[str, int] = {}

    def update(phase: str, step: int, total: int, info: str = "") -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total, info="")
        bars.update(tasks[phase], completed=step, total=total, info=info)

    return bars, update


def _prepare(opts: suite.MedusaOptions, dev: torch.device, train_only: bool) -> suite.Prepared:
    from suites import medusa as suite

    bars, update = _progress()
    with bars:
        return suite.prepare(opts, dev, update, train_only=train_only)


@medusa_app.callback(invoke_without_command=True)
@cli_errors
def medusa(
    ctx: typer.Context,
    model: ModelOpt = "tiny",
    method: Annotated[Optional[list[str]], typer.Option(help=f"Repeatable; default all: {', '.join(METHODS)}.")] = None,
    heads: HeadsOpt = 4,
    tree: Annotated[str, typer.Option(help="default (a prior), greedy (built from the heads' measured accuracies), or "
                                           "paths of ranks like '0;1;0.0;0.1;0.0.0' (no deeper than --heads).")] = "default",
    tree_size: Annotated[int, typer.Option(help="Nodes of a default or greedy tree, root included.")] = DEFAULT_TREE_SIZE,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens generated per prompt (default: the preset's).")] = None,
    prompts: Annotated[Optional[int], typer.Option(help="Prompts from the held-out part of the corpus (default: the preset's).")] = None,
    prompt_len: Annotated[Optional[int], typer.Option(help="Tokens per corpus prompt (default: the preset's).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Your own prompts: a text file, prompts separated by lines holding only '---'.")] = None,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily (lossless, checked); above 0 samples, with typical acceptance.")] = 0.0,
    posterior_threshold: Annotated[float, typer.Option(help="Typical acceptance: the probability floor epsilon.")] = 0.09,
    posterior_alpha: Annotated[float, typer.Option(help="Typical acceptance: delta, scaling exp(-entropy).")] = 0.3,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft model guesses per step.")] = 4,
    lookup_tokens: Annotated[int, typer.Option(help="Tokens prompt lookup copies per step.")] = 8,
    dtype: DtypeOpt = None,
    compile: Annotated[str, typer.Option(help="auto (cuda-graph on a GPU, none on CPU), none, cuda-graph (each step captured "
                                              "once, replayed), inductor (torch.compile, then captured); the same for every method.")] = "auto",
    step_kernels: Annotated[str, typer.Option(help="The small pieces of a greedy step around the forward (mask, acceptance, "
                                                   "top-k): triton kernels, torch ops, or auto (triton on a GPU); the same for every method.")] = "auto",
    tree_attention: Annotated[str, typer.Option(help="How medusa's tree verification attends: sdpa (a dense tree mask), tiled (the "
                                                     "split-KV decode kernel with the tree as bits; CUDA and triton), or auto "
                                                     "(both timed once on the run's shape, the faster kept).")] = "auto",
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    base_steps: BaseStepsOpt = None,
    heads_steps: HeadsStepsOpt = None,
    draft_steps: DraftStepsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
    profile: ProfileOpt = False,
):
    """Decode held-out prompts with each method at batch 1; tokens/s, speedup over vanilla, tokens kept per step,
    and whether the output is exactly vanilla greedy's. Trains the preset's models on first use."""
    if ctx.invoked_subcommand is not None:
        return
    from bench.env import parse_dtype, resolve_device
    from suites import medusa as suite

    dev = resolve_device(device)
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    parse_dtype(dtype, dev)
    opts = suite.MedusaOptions(
        model=model, methods=tuple(method) if method else suite.METHODS, heads=heads, tree=tree, tree_size=tree_size,
        max_new_tokens=max_new_tokens, prompts=prompts, prompt_len=prompt_len,
        prompt_file=str(prompt_file) if prompt_file else None, temperature=temperature,
        posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha, dtype=dtype, compile=compile,
        step_kernels=step_kernels, tree_attention=tree_attention, draft_tokens=draft_tokens, lookup_tokens=lookup_tokens, data=data,
        checkpoint=str(checkpoint) if checkpoint else None, base_steps=base_steps, heads_steps=heads_steps,
        draft_steps=draft_steps, seed=seed,
    )
    run_opts = RunOptions(dev, out, seed, profile=profile)
    prep = _prepare(opts, dev, train_only=False)
    run_suite(suite.sweep(prep), run_opts)
    if prep.tree_attention is not None:
        console.print(prep.tree_attention.line(), highlight=False, soft_wrap=True)


@medusa_app.command(cls=Command)
@cli_errors
def train(
    model: ModelOpt = "tiny",
    heads: HeadsOpt = 4,
    data: DataOpt = None,
    checkpoint: CheckpointOpt = None,
    base_steps: BaseStepsOpt = None,
    heads_steps: HeadsStepsOpt = None,
    draft_steps: DraftStepsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
):
    """Train (or load from the cache) the base model, the Medusa heads and the draft model; a row per part with
    its validation loss, and per head the top-1 and top-5 accuracy on held-out self-distilled text."""
    from bench.env import resolve_device
    from suites import medusa as suite

    dev = resolve_device(device)
    opts = suite.MedusaOptions(model=model, heads=heads, data=data, checkpoint=str(checkpoint) if checkpoint else None,
                               base_steps=base_steps, heads_steps=heads_steps, draft_steps=draft_steps, seed=seed)
    if opts.hf:
        raise BadInput("`medusa train` trains genbench's own presets; a Hugging Face model needs no training here")
    run_opts = RunOptions(dev, out, seed)
    prep = _prepare(opts, dev, train_only=True)
    run_suite(suite.train_sweep(prep), run_opts)


SUITE = Suite("medusa", medusa_app, charts={"medusa": "suites.charts.medusa:chart"})
