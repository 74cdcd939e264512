"""`genbench ddp`: the DDP suite's command, training (suites/ddp.py) or, with
--collectives, the collectives' bandwidth (suites/collectives.py); see docs/ddp.md."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bench.commands import DeviceOpt, OutOpt, ProfileOpt, RunOptions, SeedOpt, cli_errors, console, run_suite
from bench.errors import BadInput
from bench.registry import Suite
# --data/--tokenizer/--vocab-size, as the precision suite reads them; the names its help lists
from suites.cli.training import DATA_PRESETS, MODELS, PRECISIONS, data_config

if TYPE_CHECKING:
    import torch

# (model, precision, batch, seq, steps, warm-up steps) when not given: GPT-2 small
# at 16 x 1024 tokens per GPU; on a CPU a model that steps in milliseconds.
GPU_DEFAULTS = ("gpt2-small", "bf16", 16, 1024, 20, 5)
CPU_DEFAULTS = ("tiny", "fp32", 4, 128, 10, 2)
CPU_PROCS = 2


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise BadInput(f"{option}: expected whole numbers separated by commas, got {text!r}") from None
    return values


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BadInput(f"{option}: expected numbers separated by commas, got {text!r}") from None


def _on_off(text: str, option: str) -> tuple[bool, ...]:
    from suites.ddp import ON_OFF

    if text not in ON_OFF:
        raise BadInput(f"{option} must be off, on or both, not {text!r}")
    return ON_OFF[text]


def _processes(gpus: int | None, procs: int | None, dev: torch.device) -> int:
    """Processes per host, checked against this machine before anything launches."""
    if gpus is not None and procs is not None and gpus != procs:
        raise BadInput(f"--gpus {gpus} and --procs {procs} disagree: give one of them")
    asked = gpus if gpus is not None else procs
    if dev.type != "cuda":
        if gpus is not None:
            raise BadInput("--gpus needs CUDA GPUs and none is in use here; on a CPU give --procs N --device cpu")
        return CPU_PROCS if asked is None else _positive(asked, "--procs")
    import torch

    have = torch.cuda.device_count()
    if asked is None:
        return have
    if _positive(asked, "--gpus") > have:
        raise BadInput(f"asked for {asked} GPUs, this machine has {have}")
    return asked


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise BadInput(f"{option} must be at least 1, got {value}")
    return value


@cli_errors
def ddp_command(
    gpus: Annotated[Optional[int], typer.Option(help="GPUs per host, one process each (NCCL). Default: every visible GPU. More than this machine has is an error.")] = None,
    procs: Annotated[Optional[int], typer.Option(help="Processes per host; with --device cpu they use gloo. Default: 2 on CPU, --gpus on a GPU.")] = None,
    model: Annotated[Optional[str], typer.Option(help=f"GPT preset: {', '.join(MODELS)}. Default: gpt2-small on a GPU, tiny on CPU.")] = None,
    precision: Annotated[Optional[str], typer.Option(help=f"{', '.join(PRECISIONS)} (impls/precision.py). Default: bf16 on a GPU, fp32 on CPU.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Sequences per rank (weak scaling) or in all (--strong). Default: 16 on a GPU, 4 on CPU.")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Tokens per sequence. Default: 1024 on a GPU, 128 on CPU (at most the model's context).")] = None,
    strong: Annotated[bool, typer.Option("--strong", help="Strong scaling: --batch is the global batch, split over the ranks. Default: weak scaling.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Train every row under torch.compile (around DDP, whose buckets split the graph); compiling falls in the warm-up steps.")] = False,
    world_sizes: Annotated[Optional[str], typer.Option(help="World sizes, e.g. 1,2,4. Default: 1, 2, 4 ... up to every process on every host.")] = None,
    bucket_mb: Annotated[str, typer.Option(help="DDP bucket_cap_mb; several to sweep: 10,25,100.")] = "25",
    gradient_as_bucket_view: Annotated[str, typer.Option(help="DDP gradient_as_bucket_view: off, on or both.")] = "off",
    static_graph: Annotated[str, typer.Option(help="DDP static_graph: off, on or both.")] = "off",
    compression: Annotated[str, typer.Option(help="Gradient compression comm hook: none, bf16, fp16; several to sweep: none,bf16.")] = "none",
    find_unused_parameters: Annotated[str, typer.Option(help="DDP find_unused_parameters: off, on or both.")] = "off",
    optimize_ddp: Annotated[str, typer.Option(help="With --compile, dynamo's optimize_ddp: ddp_optimizer (split the graph at the buckets) or no_optimization (one graph); both to sweep: ddp_optimizer,no_optimization.")] = "ddp_optimizer",
    steps: Annotated[Optional[int], typer.Option(help="Timed steps per row (and as many under no_sync, in alternating pairs). Default: 20 on a GPU, 10 on CPU.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Untimed steps first (CUDA/NCCL set-up, allocator growth). Default: 5 on a GPU, 2 on CPU.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help=f"A preset ({', '.join(DATA_PRESETS)}) or your own text files and folders (repeatable). Default: stdlib.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="bpe (trained on the data, cached) or byte. Default: the data preset's.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="BPE vocabulary. Default: the model preset's (50257 for gpt2-small).")] = None,
    collectives: Annotated[bool, typer.Option("--collectives", help="Instead of training: all_reduce, all_gather and reduce_scatter at every size, with algbw and busbw.")] = False,
    collective: Annotated[Optional[list[str]], typer.Option(help="With --collectives, repeatable. Default: all_reduce, all_gather, reduce_scatter.")] = None,
    min_size: Annotated[str, typer.Option(help="With --collectives: smallest size (nccl-tests' size: the whole tensor).")] = "1K",
    max_size: Annotated[Optional[str], typer.Option(help="With --collectives: largest size, sizes doubling up to it. Default: 1G on a GPU, 16M on CPU.")] = None,
    dtype: Annotated[str, typer.Option(help="With --collectives: fp32, bf16 or fp16.")] = "fp32",
    line_rate_gbps: Annotated[Optional[float], typer.Option("--line-rate-gbps", help="With --collectives: your link's datasheet rate per direction in GB/s (450 for H200 NVLink 4), for a pct_of_line_rate column.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a collective may wait on a hung or dead peer; the run is stopped then (a watchdog: 25%, at least 5 s, later).")] = 90.0,
    nnodes: Annotated[int, typer.Option(help="Hosts taking part; run this same command on each of them.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This host's index, 0 .. --nnodes - 1; node 0 writes the results.")] = 0,
    rdzv_endpoint: Annotated[str, typer.Option(help="With --nnodes > 1: HOST:PORT of node 0, reachable from every host.")] = "",
    rdzv_id: Annotated[str, typer.Option(help="With --nnodes > 1: a name for this run, the same on every host.")] = "genbench-ddp",
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    seed: SeedOpt = 0,
    profile: ProfileOpt = False,
):
    """One device vs DistributedDataParallel on N (weak or strong scaling, DDP's knobs), or the collectives' bandwidth."""
    from bench import launch
    from bench.env import cache_dir, resolve_device
    from impls import data as textdata
    from impls.gpt import PRESETS as GPT_PRESETS
    from impls.precision import PRECISIONS as PRECISION_RECIPES
    from suites import collectives as collectives_suite, ddp as suite

    dev = resolve_device(device)
    if dev.index:
        raise BadInput(f"--device {device}: ddp runs on GPUs 0 .. --gpus - 1; choose which with CUDA_VISIBLE_DEVICES")
    gpu = dev.type == "cuda"
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    hosts = suite.Hosts(nproc=_processes(gpus, procs, dev), device_type=dev.type, nnodes=nnodes, node_rank=node_rank,
                        rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, timeout_s=timeout)
    worlds = _ints(world_sizes, "--world-sizes") if world_sizes else None
    n_steps = defaults[4] if steps is None else steps
    n_warmup = defaults[5] if warmup_steps is None else warmup_steps
    run_opts = RunOptions(dev, out, seed, profile=profile) if node_rank == 0 else None  # node 0 writes the results
    if collectives:
        opts = collectives_suite.CollectiveOptions(
            hosts=hosts, collectives=tuple(collective) if collective else collectives_suite.ddp.COLLECTIVES,
            min_bytes=collectives_suite.parse_size(min_size),
            max_bytes=collectives_suite.parse_size(max_size or ("1G" if gpu else "16M")),
            dtype=dtype, world_size=max(worlds) if worlds else None, steps=n_steps, warmup_steps=n_warmup,
            line_rate_GBps=line_rate_gbps)
        sweep = collectives_suite.collectives_sweep(opts)
    else:
        model = model or defaults[0]
        if model not in GPT_PRESETS:
            raise BadInput(f"unknown --model {model!r}; known: {', '.join(GPT_PRESETS)}")
        opts = suite.ScalingOptions(
            hosts=hosts, data=data_config(data, tokenizer, vocab_size, model),
            model=model, precision=precision or defaults[1], batch=defaults[2] if batch is None else batch,
            seq=min(defaults[3], GPT_PRESETS[model].block_size) if seq is None else seq,
            strong=strong, compile=compile, world_sizes=worlds,
            bucket_mb=_floats(bucket_mb, "--bucket-mb"),
            gradient_as_bucket_view=_on_off(gradient_as_bucket_view, "--gradient-as-bucket-view"),
            static_graph=_on_off(static_graph, "--static-graph"),
            compression=tuple(compression.split(",")),
            find_unused_parameters=_on_off(find_unused_parameters, "--find-unused-parameters"),
            optimize_ddp=tuple(optimize_ddp.split(",")),
            steps=n_steps, warmup_steps=n_warmup)
        reason = PRECISION_RECIPES[opts.precision].why_not(dev)
        if reason:
            raise BadInput(f"--precision {opts.precision} cannot run here: {reason}")
        with console.status("reading and tokenizing the training text (cached after the first run)"):
            try:
                textdata.load_data(opts.data, cache_dir())  # once, here: the workers then read the cache
            except ValueError as exc:
                raise BadInput(f"--data: {exc}") from None
        sweep = suite.sweep(opts, seed)
    if node_rank > 0:
        try:
            joined = suite.follow(sweep)
        except launch.LaunchFailed as exc:  # a Fatal, printed by cli_errors; the rows are node 0's
            stopped = launch.LaunchFailed(f"{exc}. node 0 keeps the finished rows", exc.rank)
            stopped.suite = sweep.suite
            raise stopped from None
        console.print(f"node {node_rank}: took part in {joined} launch(es); node 0 wrote the results")
        return
    run_suite(sweep, run_opts)


SUITE = Suite("ddp", ddp_command, charts={"ddp": "suites.charts.ddp:chart",
                                         "ddp-collectives": "suites.charts.collectives:chart"})
