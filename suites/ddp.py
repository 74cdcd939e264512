"""The DDP suite: how GPT training scales from one device to
DistributedDataParallel on N.

    genbench ddp --gpus 4                                   # weak scaling, 16 x 1024 tokens per GPU
    genbench ddp --gpus 4 --strong --batch 64               # strong scaling: 64 sequences split over the GPUs
    genbench ddp --gpus 4 --bucket-mb 10,25,100 --compression none,bf16
    genbench ddp --gpus 4 --compile                         # every row under torch.compile
    genbench ddp --gpus 4 --collectives                     # all_reduce, all_gather, reduce_scatter, 1 KiB .. 1 GiB
    genbench ddp --procs 2 --device cpu                     # two gloo processes on a machine without a GPU

Training rows, in order: `no-ddp`, the model trained on one device without
DDP (the baseline), then `ddp-N` for each world size N (1, 2, 4 ... up to
every GPU) and each combination of the DDP knobs. Each row is one launch of
N fresh processes through torch's elastic launcher (bench/launch.py), which
train for a few warm-up steps, then `steps` timed steps and, in a DDP row,
as many under `no_sync()`, which skips the gradient all-reduce: the two
kinds alternate, pair by pair, so that both meet the same machine.

- Weak scaling (default): every rank trains `batch` sequences; the global
  batch grows with N. Strong scaling: `batch` is the global batch, split
  evenly, and the baseline trains all of it on one device.
- Step time: each rank times its own steps (CUDA events); a step of the job
  lasts as long as its slowest rank, so the row's samples are the per-step
  maximum over ranks. `slowest_rank_median_ms` is the largest of the ranks'
  own medians, and `slowest_rank` says whose.
- Throughput: samples/s and tokens/s of the whole job; efficiency =
  tokens/s(N) / (N x tokens/s of the no-ddp baseline), measured in the same run.
- Exposed communication: what the all-reduce costs after DDP overlapped it
  with backward: the median over pairs of (step - the paired no_sync step),
  with the IQR of those differences. A sign test that cannot
  tell the differences from zero reports 0 ("within noise"); a no_sync step
  reliably slower than its synced pair is kept, negative, and flagged.
- Every rank waits at a barrier before each step, outside the timed window:
  under no_sync nothing else keeps the ranks together, and the per-step
  maximum over ranks must compare steps that ran at the same time.
- MFU per device, against the matmul peak measured by `genbench env --calibrate`.
- `--compile`: every row, the baseline too, trains under torch.compile,
  which wraps DDP: dynamo compiles the model inside it and splits the graph
  at DDP's buckets so that their all-reduces still start during the
  backward. Compiling happens in the first warm-up step (a synced step and
  its no_sync pair); `compiled_graphs` counts the graphs rank 0 compiled (1
  unless something recompiled), `compiled_pieces` the pieces AOTAutograd
  compiled them into (one per bucket where dynamo split the graph).
  `--optimize-ddp` sweeps how dynamo treats DDP (its `optimize_ddp`):
  `ddp_optimizer` splits the graph at the buckets (the default: the
  all-reduces overlap the backward), `no_optimization` compiles one graph
  (fuses more; every all-reduce waits for the whole backward).

The collectives under DDP (`--collectives`) are their own sweep,
suites/collectives.py, on the same processes (`Hosts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bench import calibrate, launch, memory, metrics
from bench.calibrate import Peaks, Share
from bench.env import cache_dir
from bench.errors import BadInput, Unsupported
from bench.profile import ACTIVE, WAIT, WARMUP, Profiler
from bench.runner import Column, Context, Measurement, Sweep
from bench.stats import Stats
from bench.timing import StepTimer
from impls import ddp
from impls.data import DataConfig, load_data
from impls.gpt import GPT, PRESETS as MODELS, GPTConfig
from impls.precision import PRECISIONS
from impls.train import train_step

BASELINE = "no-ddp"
# AdamW as GPT-3 trained its 125M model (Brown et al. 2020, table 2.1), as the precision suite does.
LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
# Hosts other than node 0 wait this long between launches, so that node 0 has
# torn down the previous launch's rendezvous store before they look for the next.
FOLLOWER_PAUSE_S = 3.0
# Exposed communication is reported as 0 unless a sign test on the paired
# differences rejects a zero median at this level.
EXPOSED_ALPHA = 0.05


# ----------------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class Hosts:
    """The processes: how many on this host, how many hosts, where they meet."""

    nproc: int
    device_type: str = "cpu"
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = "genbench-ddp"
    timeout_s: float = 90.0

    def __post_init__(self):
        # LaunchSpec checks the options (BadInput): node rank, endpoint, timeout.
        launch.LaunchSpec(self.nproc, self.device_type, self.nnodes, self.node_rank, self.rdzv_endpoint,
                          self.rdzv_id, self.timeout_s)

    @property
    def max_world(self) -> int:
        return self.nproc * self.nnodes

    def ladder(self) -> tuple[int, ...]:
        """1, 2, 4 ... below the processes of one host, that count itself, then
        every host's processes times 2, 4 ... hosts, and all of them."""
        sizes = [2**i for i in range(int(math.log2(self.nproc)) + 1) if 2**i < self.nproc] + [self.nproc]
        sizes += [self.nproc * 2**i for i in range(1, int(math.log2(self.nnodes)) + 1) if 2**i < self.nnodes]
        if self.nnodes > 1:
            sizes.append(self.max_world)
        return tuple(sizes)

    def check_world(self, world: int) -> None:
        if not 1 <= world <= self.max_world:
            raise BadInput(f"world size {world} is outside 1..{self.max_world} "
                           f"({self.nproc} process(es) x {self.nnodes} host(s))")
        if world > self.nproc and world % self.nproc:
            raise BadInput(f"world size {world} spans hosts, so it must be a multiple of the "
                           f"{self.nproc} process(es) per host")

    def nodes(self, world: int) -> int:
        return 1 if world <= self.nproc else world // self.nproc

    def spec(self, world: int, key: str) -> launch.LaunchSpec | None:
        """How this host takes part in a launch of `world` processes; None if it
        sits this one out. Worlds that fit on one host run on node 0 alone.
        `key` names the launch: every host derives the same run id from it."""
        nodes = self.nodes(world)
        if self.node_rank >= nodes:
            return None
        run_id = f"{self.rdzv_id}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        return launch.LaunchSpec(
            nproc=min(world, self.nproc), device_type=self.device_type, nnodes=nodes,
            node_rank=self.node_rank if nodes > 1 else 0, rdzv_endpoint=self.rdzv_endpoint,
            rdzv_id=run_id, timeout_s=self.timeout_s)


def cpu_threads(nproc: int) -> int:
    """Threads per rank: this host's cores shared evenly, as torchrun's
    OMP_NUM_THREADS=1 default avoids oversubscription, but without idling cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


# ----------------------------------------------------------------------------- training configurations


@dataclass(frozen=True)
class TrainConfig:
    """One training row: one world size, one set of DDP knobs (or no DDP)."""

    ddp: bool
    world_size: int
    model: str
    precision: str
    scaling: str  # weak or strong
    batch: int  # sequences per rank (weak) or in all (strong)
    seq: int
    compile: bool = False  # the model (inside DDP) under torch.compile
    bucket_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    compression: str = "none"
    find_unused_parameters: bool = False
    optimize_ddp: str = "ddp_optimizer"  # dynamo's treatment of DDP under compile (OPTIMIZE_DDP)

    @property
    def setup(self) -> str:
        return f"ddp-{self.world_size}" if self.ddp else BASELINE

    @property
    def batch_per_rank(self) -> int:
        return self.batch if self.scaling == "weak" else self.batch // self.world_size

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    @property
    def knobs(self) -> ddp.DDPKnobs:
        return ddp.DDPKnobs(self.bucket_mb, self.gradient_as_bucket_view, self.static_graph, self.compression,
                            self.find_unused_parameters)


ON_OFF = {"off": (False,), "on": (True,), "both": (False, True)}
# torch._dynamo.config.optimize_ddp's stable modes: split the graph at DDP's buckets, or compile it whole.
# ("python_reducer", the third, needs compiled autograd around the backward, which train_step does not use.)
OPTIMIZE_DDP = ("ddp_optimizer", "no_optimization")


@dataclass(frozen=True)
class ScalingOptions:
    """The training sweep, as given on the command line."""

    hosts: Hosts
    data: DataConfig
    model: str = "gpt2-small"
    precision: str = "bf16"
    batch: int = 16
    seq: int = 1024
    strong: bool = False
    compile: bool = False  # every row, the baseline included
    world_sizes: tuple[int, ...] | None = None  # default: hosts.ladder()
    bucket_mb: tuple[float, ...] = (25.0,)
    gradient_as_bucket_view: tuple[bool, ...] = (False,)
    static_graph: tuple[bool, ...] = (False,)
    compression: tuple[str, ...] = ("none",)
    find_unused_parameters: tuple[bool, ...] = (False,)
    optimize_ddp: tuple[str, ...] = ("ddp_optimizer",)
    steps: int = 20
    warmup_steps: int = 5

    def __post_init__(self):
        if self.model not in MODELS:
            raise BadInput(f"unknown --model {self.model!r}; known: {', '.join(MODELS)}")
        if self.precision not in PRECISIONS:
            raise BadInput(f"unknown --precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.batch < 1 or self.seq < 1:
            raise BadInput(f"--batch and --seq must be positive, got {self.batch} and {self.seq}")
        if self.seq > MODELS[self.model].block_size:
            raise BadInput(f"--seq {self.seq} is longer than {self.model}'s context of {MODELS[self.model].block_size}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise BadInput(f"--steps must be >= 1 and --warmup-steps >= 0, got {self.steps} and {self.warmup_steps}")
        if self.compile and self.warmup_steps < 1:
            raise BadInput("--compile needs --warmup-steps 1 or more: the first step compiles")
        unknown = [m for m in self.optimize_ddp if m not in OPTIMIZE_DDP]
        if unknown:
            raise BadInput(f"unknown --optimize-ddp {', '.join(unknown)}; known: {', '.join(OPTIMIZE_DDP)}")
        if not self.compile and self.optimize_ddp != ("ddp_optimizer",):
            raise BadInput("--optimize-ddp applies to compiled rows: add --compile")
        if any(b <= 0 for b in self.bucket_mb):
            raise BadInput(f"--bucket-mb must be positive, got {', '.join(map(str, self.bucket_mb))}")
        unknown = [c for c in self.compression if c not in ddp.COMPRESSION_HOOKS]
        if unknown:
            raise BadInput(f"unknown --compression {', '.join(unknown)}; known: {', '.join(ddp.COMPRESSION_HOOKS)}")
        for world in self.worlds:
            self.hosts.check_world(world)
            if self.strong and self.batch % world:
                raise BadInput(f"--strong splits --batch {self.batch} over {world} ranks: it must be a multiple of "
                               "every world size (try a power of two)")

    @property
    def worlds(self) -> tuple[int, ...]:
        return tuple(self.world_sizes or self.hosts.ladder())

    def configs(self) -> list[TrainConfig]:
        knob_sets = list(itertools.product(self.bucket_mb, self.gradient_as_bucket_view, self.static_graph,
                                           self.compression, self.find_unused_parameters, self.optimize_ddp))
        shape = dict(model=self.model, precision=self.precision, scaling="strong" if self.strong else "weak",
                     batch=self.batch, seq=self.seq, compile=self.compile)
        # The baseline first, so every later row has it for its efficiency. Its
        # knob columns are the first set's: knobs do not apply without DDP, and
        # this puts it in the same table as the DDP rows with those knobs.
        rows = [TrainConfig(False, 1, **shape, **_knob_fields(knob_sets[0]))]
        rows += [TrainConfig(True, world, **shape, **_knob_fields(knobs))
                 for knobs in knob_sets for world in self.worlds]
        return rows


KNOBS = ("bucket_mb", "gradient_as_bucket_view", "static_graph", "compression", "find_unused_parameters",
         "optimize_ddp")


def _knob_fields(values: tuple) -> dict:
    return dict(zip(KNOBS, values))


@dataclass(frozen=True)
class TrainJob:
    """What every rank needs besides its row's configuration."""

    data: DataConfig
    steps: int
    warmup_steps: int
    seed: int
    threads: int
    profile: tuple[str, int, str] | None = None  # (traces folder, CSV row, description) with --profile


# ----------------------------------------------------------------------------- the training rank


def train_rank(rank: launch.Rank, cfg: TrainConfig, job: TrainJob) -> dict:
    """One rank of one training row (runs in a launched process): build the
    model, train warm-up + timed steps, with DDP each paired with a no_sync step."""
    torch.set_num_threads(job.threads)
    device = rank.device
    precision = PRECISIONS[cfg.precision]
    data = load_data(job.data, cache_dir())  # the launching process built it: this reads the cache
    # Each rank its own batches, as a DistributedSampler would give them.
    generator = torch.Generator().manual_seed(job.seed * 1_000_003 + rank.rank)
    run: dict = {}
    counter = itertools.count()

    def batch():
        return data.get_batch("train", cfg.batch_per_rank, cfg.seq, generator=generator, device=device)

    def train(x, y):
        return train_step(run["model"], run["optimizer"], run["scaler"], precision, x, y, device)

    def steps(warmup: int, timed: int) -> tuple[list[float], list[float] | None]:
        """Synced steps and, with DDP, as many under no_sync, in pairs whose
        order alternates (ABBA), so that a change of the machine's load falls
        on both kinds alike. A no_sync step updates each replica from its own
        gradients, so the replicas drift apart: a step's time does not depend
        on the weights' values."""
        synced, skipped = StepTimer(device), StepTimer(device)
        kinds = (False, True) if cfg.ddp else (False,)
        for i in range(warmup + timed):
            for no_sync in kinds if i % 2 == 0 else kinds[::-1]:
                rank.beat(step=next(counter))
                x, y = batch()
                dist.barrier()  # every rank starts the step together (see the module docstring)
                with run["model"].no_sync() if no_sync else contextlib.nullcontext():
                    with (skipped if no_sync else synced).step():  # the batch is drawn outside the timed window
                        train(x, y)
        return list(synced.stats(warmup).samples), list(skipped.stats(warmup).samples) if cfg.ddp else None

    def build_and_train():
        torch.manual_seed(job.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = precision.prepare(GPT(GPTConfig.from_name(cfg.model, vocab_size=data.vocab_size)).to(device))
        run["params"] = model.num_params()
        run["optimizer"] = model.configure_optimizer(WEIGHT_DECAY, LR, BETAS, device.type)
        run["scaler"] = precision.scaler(device)
        run["model"] = ddp.wrap(model, device, cfg.knobs) if cfg.ddp else model
        if cfg.compile:  # around DDP: by default dynamo splits the graph at DDP's buckets, so their all-reduces overlap
            from torch._dynamo import config as dynamo_config

            dynamo_config.optimize_ddp = cfg.optimize_ddp  # read when it compiles; one row per process
            run["model"] = torch.compile(run["model"])
        run["step_ms"], run["no_sync_ms"] = steps(job.warmup_steps, job.steps)

    # On a GPU, the allocator's peak over building and training (None on a CPU).
    peak = memory.peak_memory_mib(build_and_train, device) if device.type == "cuda" else None
    if device.type != "cuda":
        build_and_train()
    profile = None
    if job.profile is not None:  # every rank runs the profiled steps: they all-reduce together
        if rank.rank == 0:
            profiler = Profiler(device)
            profiler.folder, profiler.row = Path(job.profile[0]), (job.profile[1], job.profile[2])
            profile = profiler.profile(lambda: train(*batch()))
        else:
            for _ in range(WAIT + WARMUP + ACTIVE):
                train(*batch())
    # Graphs dynamo compiled: 1 for the model inside DDP; more would be recompiles (e.g. no_sync changing a guard).
    # Pieces: what AOTAutograd compiled them into, one per bucket where the DDP optimizer split the graph.
    graphs = pieces = None
    if cfg.compile:
        from torch._dynamo.utils import counters

        graphs, pieces = counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]
    return {"step_ms": run["step_ms"], "no_sync_ms": run["no_sync_ms"], "peak_mem_MiB": peak, "params": run["params"],
            "compiled_graphs": graphs, "compiled_pieces": pieces, "profile": profile}


def relay_steps(ctx: Context, total: int, what: str = "step"):
    """launch's on_beat for a row: rank 0's heartbeat "step N" (written as step N
    begins, so N steps are done) becomes the row's progress, ctx.step(N, total)."""
    ctx.step(0, total, what)  # the workers are starting

    def on_beat(label: str) -> None:
        word, _, n = label.partition(" ")
        if word == "step" and n.isdigit():
            ctx.step(int(n), total, what)

    return on_beat


def train_measurement(cfg: TrainConfig, per_rank: list[dict], nodes: int, base_tokens_per_s: float | None,
                      peaks: Peaks | None) -> Measurement:
    """One row from what every rank returned; MFU against `peaks` (see bench/calibrate.py)."""
    world = len(per_rank)
    assert world == cfg.world_size, f"{world} ranks answered, {cfg.world_size} expected"
    # A step of the job ends when its slowest rank's does: per-step maximum over ranks.
    stats = Stats.of(np.max([r["step_ms"] for r in per_rank], axis=0))
    medians = [float(np.median(r["step_ms"])) for r in per_rank]
    slowest = int(np.argmax(medians))
    tokens = cfg.global_batch * cfg.seq
    tokens_per_s = metrics.per_second(tokens, stats.median)
    shape = MODELS[cfg.model]
    flops_per_token = metrics.transformer_train_flops_per_token(per_rank[0]["params"], shape.n_layer, shape.n_embd,
                                                                cfg.seq)
    memories = [r["peak_mem_MiB"] for r in per_rank if r["peak_mem_MiB"] is not None]
    precision = PRECISIONS[cfg.precision]
    key = calibrate.matmul_key(precision.compute_dtype, precision.tf32)
    mfu = functools.partial(metrics.mfu, tokens_per_s / world, flops_per_token)  # per device: a world-th of the tokens
    share = peaks.share(key, mfu) if peaks is not None else Share()
    values = dict(
        world_size=world,
        nodes=nodes,
        batch_per_rank=cfg.batch_per_rank,
        global_batch=cfg.global_batch,
        tokens_per_step=tokens,
        samples_per_s=metrics.per_second(cfg.global_batch, stats.median),
        tokens_per_s=tokens_per_s,
        efficiency=metrics.scaling_efficiency(tokens_per_s, base_tokens_per_s, world) if base_tokens_per_s else None,
        slowest_rank=slowest,
        slowest_rank_median_ms=medians[slowest],
        mfu=share.pct,
        peak_mem_MiB=max(memories) if memories else None,
        params=per_rank[0]["params"],
        compiled_graphs=per_rank[0].get("compiled_graphs"),
        compiled_pieces=per_rank[0].get("compiled_pieces"),
    )
    if per_rank[0]["no_sync_ms"] is not None:
        no_sync = Stats.of(np.max([r["no_sync_ms"] for r in per_rank], axis=0))
        values.update(no_sync_median_ms=no_sync.median, **exposed_comm(stats, no_sync))
    return Measurement(values, stats=stats, reason=share.note)


def exposed_comm(step: Stats, no_sync: Stats) -> dict:
    """The exposed-communication columns from paired samples (step i and its
    no_sync pair): the median difference, the IQR of the differences, and a
    sign test's p-value (scipy.stats.binomtest on how many differences are
    positive: the test of a zero median). Within noise the median is reported
    as 0; a no_sync step reliably slower than its pair is kept and flagged."""
    diffs = Stats.of(np.subtract(step.samples, no_sync.samples))
    median = metrics.exposed_comm_ms(step.samples, no_sync.samples)
    nonzero = [d for d in diffs.samples if d != 0]
    # Imported here, not at the top: scipy.stats takes most of a second to import, in every launched rank.
    from scipy.stats import binomtest

    p = float(binomtest(sum(d > 0 for d in nonzero), len(nonzero)).pvalue) if nonzero else 1.0
    shown = f"{median:+.3g} ms, IQR {diffs.iqr:.2g} ms over {diffs.n} pairs, sign test p={p:.2g}"
    if p >= EXPOSED_ALPHA:
        return dict(exposed_comm_ms=0.0, exposed_comm_iqr_ms=diffs.iqr, exposed_comm_p=p,
                    note=f"exposed comm within noise ({shown})")
    note = f"no_sync step slower than its synced pair ({shown}): not communication" if median < 0 else ""
    return dict(exposed_comm_ms=median, exposed_comm_iqr_ms=diffs.iqr, exposed_comm_p=p, note=note)


class ScalingRun:
    """The training sweep's run function: one launch per row, keeping the
    baseline's throughput for the efficiency of the rows after it."""

    def __init__(self, opts: ScalingOptions, seed: int):
        self.opts = opts
        self.job = TrainJob(opts.data, opts.steps, opts.warmup_steps, seed, cpu_threads(opts.hosts.nproc))
        self.base_tokens_per_s: float | None = None

    def launch(self, cfg: TrainConfig, job: TrainJob, on_beat=None) -> list[dict] | None:
        spec = self.opts.hosts.spec(cfg.world_size, repr(cfg))
        return None if spec is None else launch.launch(train_rank, (cfg, job), spec, on_beat)

    def join(self, cfg: TrainConfig) -> bool:
        """On a host other than node 0: take part in this row's launch if it spans this host."""
        if self.opts.hosts.spec(cfg.world_size, repr(cfg)) is None:
            return False
        with contextlib.suppress(launch.RankError):  # node 0 records the row's failure
            self.launch(cfg, self.job)
        return True

    def __call__(self, cfg: TrainConfig, ctx: Context) -> Measurement:
        reason = PRECISIONS[cfg.precision].why_not(ctx.device) or (cfg.ddp and ddp.why_not(cfg.knobs, ctx.device))
        if reason:
            raise Unsupported(reason)
        job = self.job
        if ctx.profiler is not None:
            index, description = ctx.profiler.row
            job = dataclasses.replace(job, profile=(str(ctx.profiler.folder), index, description))
        # train_rank beats at each warm-up and timed step, and again under no_sync.
        steps = (job.warmup_steps + job.steps) * (2 if cfg.ddp else 1)
        try:
            per_rank = self.launch(cfg, job, relay_steps(ctx, steps))
        except launch.RankError as exc:
            return Measurement(status=exc.kind, reason=str(exc))
        assert per_rank is not None, "node 0 holds rank 0, which returns every rank's results"
        m = train_measurement(cfg, per_rank, self.opts.hosts.nodes(cfg.world_size), self.base_tokens_per_s, ctx.peaks)
        if not cfg.ddp:  # the baseline: every later row's efficiency is against it
            self.base_tokens_per_s = m.values["tokens_per_s"]
            m.values["efficiency"] = metrics.scaling_efficiency(self.base_tokens_per_s, self.base_tokens_per_s, 1)
        if ctx.profiler is not None and per_rank[0]["profile"] is not None:
            ctx.profiler.profiles.append(per_rank[0]["profile"])  # shown with the others after the tables
        return m


TRAIN_DISPLAY = (
    Column("median_ms", "step ms", "{:.4g}"),
    Column("slowest_rank_median_ms", "slowest", "{:.4g}"),
    Column("no_sync_median_ms", "no_sync", "{:.4g}"),
    Column("exposed_comm_ms", "exposed", "{:.3g}"),
    Column("tokens_per_s", "tokens/s", "{:,.0f}"),
    Column("efficiency", "eff", "{:.1%}"),
    Column("mfu", "MFU%", "{:.0f}"),
    Column("peak_mem_MiB", "MiB", "{:,.0f}"),
)


def sweep(opts: ScalingOptions, seed: int = 0) -> Sweep:
    return Sweep(
        suite="ddp",
        configs=opts.configs(),
        run=ScalingRun(opts, seed),
        params=("setup", "model", "precision", "scaling", "batch", "seq", "compile", *KNOBS),
        metrics=("world_size", "nodes", "batch_per_rank", "global_batch", "tokens_per_step", "samples_per_s",
                 "tokens_per_s", "efficiency", "no_sync_median_ms", "exposed_comm_ms", "exposed_comm_iqr_ms",
                 "exposed_comm_p", "slowest_rank", "slowest_rank_median_ms", "mfu", "peak_mem_MiB", "params",
                 "compiled_graphs", "compiled_pieces", "note"),
        # No allocator counter covers a CPU (bench/memory.py): no memory column there.
        display=tuple(c for c in TRAIN_DISPLAY if opts.hosts.device_type == "cuda" or c.name != "peak_mem_MiB"),
        label="setup",
        baseline=BASELINE,
        baseline_ignores=KNOBS,  # the row without DDP is measured once, in the first knob set's table
        primary="tokens_per_s",
        higher_is_better=True,
        note="note",
    )


# ----------------------------------------------------------------------------- hosts other than node 0


def follow(sweep_: Sweep) -> int:
    """On a host other than node 0: take part in every launch of the sweep that
    spans this host, and write nothing (node 0 writes the rows). Returns how
    many launches this host joined."""
    joined = 0
    for cfg in sweep_.configs:
        if joined and sweep_.run.opts.hosts.spec(cfg.world_size, repr(cfg)) is not None:
            time.sleep(FOLLOWER_PAUSE_S)  # between two launches of this host, none after the last
        if sweep_.run.join(cfg):
            joined += 1
    return joined
