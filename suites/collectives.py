"""The collectives under DDP: all_reduce, all_gather and reduce_scatter at
sizes doubling from 1 KiB to 1 GiB on every rank, on the processes of the DDP
suite (suites/ddp.py: `Hosts`, one launch for the whole sweep).

    genbench ddp --gpus 4 --collectives                     # 1 KiB .. 1 GiB
    genbench ddp --procs 2 --device cpu --collectives       # gloo, 1 KiB .. 16 MiB

nccl-tests' conventions: size = the whole tensor (all-reduced, gathered, or
scattered from), time per call averaged over ranks, algbw = size / time and
busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for the other two.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from bench import launch, metrics
from bench.errors import BadInput
from bench.runner import Column, Context, Measurement, Sweep
from bench.stats import Stats
from bench.timing import StepTimer
from impls import ddp
from suites.ddp import Hosts, cpu_threads, relay_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A collective's timed sample is this many back-to-back calls (at most MAX_CALLS),
# so that a 1 KiB call, a few microseconds, is not lost in the resolution and
# overhead of one event pair; from 2 MiB up each sample is one call.
CALLS_BYTES, MAX_CALLS = 2 * 2**20, 32
# A collective is tried only if its buffers fit in this share of the free GPU memory.
FREE_SHARE = 0.8


@dataclass(frozen=True)
class CollectiveConfig:
    collective: str
    size: str  # as shown: 1 KiB, 64 MiB
    size_bytes: int  # the whole tensor (nccl-tests' size), rounded down to split evenly over the ranks
    world_size: int
    dtype: str


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def parse_size(text: str) -> int:
    """'1K' or '1KiB' -> 1024, '64M' -> 64 MiB, '1G' -> 1 GiB, '4096' -> 4096 bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    if not digits.isdigit() or int(digits) <= 0:
        raise BadInput(f"cannot read {text!r} as a size (examples: 1K, 64M, 1G, 4096)")
    return int(digits) * scale


@dataclass(frozen=True)
class CollectiveOptions:
    hosts: Hosts
    collectives: tuple[str, ...] = ddp.COLLECTIVES
    min_bytes: int = 2**10
    max_bytes: int = 2**30
    dtype: str = "fp32"
    world_size: int | None = None  # default: every process on every host
    steps: int = 20
    warmup_steps: int = 5
    line_rate_GBps: float | None = None  # the link's rate per direction, from its datasheet, if given

    def __post_init__(self):
        unknown = [c for c in self.collectives if c not in ddp.COLLECTIVES]
        if unknown:
            raise BadInput(f"unknown collective {', '.join(unknown)}; known: {', '.join(ddp.COLLECTIVES)}")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.min_bytes > self.max_bytes:
            raise BadInput(f"--min-size {format_size(self.min_bytes)} is above "
                           f"--max-size {format_size(self.max_bytes)}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise BadInput(f"--steps must be >= 1 and --warmup-steps >= 0, got {self.steps} and {self.warmup_steps}")
        if self.line_rate_GBps is not None and self.line_rate_GBps <= 0:
            raise BadInput(f"--line-rate-gbps must be positive, got {self.line_rate_GBps}")
        self.hosts.check_world(self.world)

    @property
    def world(self) -> int:
        return self.world_size or self.hosts.max_world

    def configs(self) -> list[CollectiveConfig]:
        elem = DTYPES[self.dtype].itemsize
        sizes, n = [], self.min_bytes
        while n <= self.max_bytes:
            sizes.append(n)
            n *= 2
        rows = []
        for name in self.collectives:
            for nbytes in sizes:
                numel = nbytes // elem // self.world * self.world  # every rank an equal shard
                if numel == 0:
                    continue
                rows.append(CollectiveConfig(name, format_size(nbytes), numel * elem, self.world, self.dtype))
        return rows


def collectives_rank(rank: launch.Rank, configs: tuple[CollectiveConfig, ...], opts: CollectiveOptions,
                     threads: int) -> list[dict]:
    """Every collective row on one rank (runs in a launched process): µs per call, per timed sample."""
    torch.set_num_threads(threads)
    device = rank.device
    results = []
    for i, cfg in enumerate(configs):
        rank.beat(step=i)
        dtype = DTYPES[cfg.dtype]
        numel = cfg.size_bytes // dtype.itemsize
        need = cfg.size_bytes * (1 if cfg.collective == "all_reduce" else 1 + 1 / rank.world_size)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
        fits = torch.tensor([int(need <= FREE_SHARE * free)], device=device)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank runs it or none does
        if not fits.item():
            results.append({"skip": f"needs {need / 2**30:.2f} GiB on every rank, more than {FREE_SHARE:.0%} of "
                                    "the free memory of one of them"})
            continue
        inp, out = ddp.collective_buffers(cfg.collective, numel, rank.world_size, dtype, device)
        calls = min(MAX_CALLS, max(1, CALLS_BYTES // cfg.size_bytes))
        for _ in range(opts.warmup_steps):  # NCCL sets up channels and buffers at a size's first calls
            ddp.run_collective(cfg.collective, inp, out)
        timer = StepTimer(device)
        for _ in range(opts.steps):
            with timer.step():
                for _ in range(calls):
                    ddp.run_collective(cfg.collective, inp, out)
        results.append({"us": [ms * 1e3 / calls for ms in timer.samples()], "calls": calls})
        del inp, out
    return results


def collective_measurement(cfg: CollectiveConfig, per_rank: list[dict], nodes: int,
                           line_rate_GBps: float | None) -> Measurement:
    """One row: the time per call averaged over ranks, sample by sample (nccl-tests averages over ranks too)."""
    values = dict(size_bytes=cfg.size_bytes, nodes=nodes)
    if "skip" in per_rank[0]:
        return Measurement(values, status="oom", reason=per_rank[0]["skip"])
    stats = Stats.of(np.mean([r["us"] for r in per_rank], axis=0), unit="us")
    ms = stats.median / 1e3
    busbw = metrics.busbw_GBps(cfg.collective, cfg.size_bytes, ms, cfg.world_size)
    values.update(calls_per_sample=per_rank[0]["calls"], algbw_GBps=metrics.algbw_GBps(cfg.size_bytes, ms),
                  busbw_GBps=busbw, pct_of_line_rate=metrics.pct_of_peak(busbw, line_rate_GBps))
    return Measurement(values, stats=stats)


@dataclass
class CollectivesRun:
    """The collectives sweep's run function. One launch measures every row
    (a launch per size would mostly time process start-up); each row is then
    read from it in turn."""

    opts: CollectiveOptions
    configs: list[CollectiveConfig]
    results: dict = field(default_factory=dict)
    failure: launch.RankError | None = None

    def measure_all(self, on_beat=None) -> list[dict] | None:
        spec = self.opts.hosts.spec(self.opts.world, f"collectives-{self.configs!r}")
        if spec is None:
            return None
        args = (tuple(self.configs), self.opts, cpu_threads(self.opts.hosts.nproc))
        return launch.launch(collectives_rank, args, spec, on_beat)

    def join(self, cfg: CollectiveConfig) -> bool:
        """On a host other than node 0: take part in the one launch, at the first row."""
        if cfg != self.configs[0] or self.opts.hosts.spec(self.opts.world, "") is None:
            return False
        with contextlib.suppress(launch.RankError):
            self.measure_all()
        return True

    def __call__(self, cfg: CollectiveConfig, ctx: Context) -> Measurement:
        if not self.results and self.failure is None:
            try:
                per_rank = self.measure_all(relay_steps(ctx, len(self.configs), "collective"))  # beats once a row
                self.results = {c: [r[i] for r in per_rank] for i, c in enumerate(self.configs)}
            except launch.RankError as exc:
                self.failure = exc
        if self.failure is not None:
            return Measurement(status=self.failure.kind, reason=str(self.failure))
        return collective_measurement(cfg, self.results[cfg], self.opts.hosts.nodes(cfg.world_size),
                                      self.opts.line_rate_GBps)


COLLECTIVE_DISPLAY = (
    Column("median_us", "us", "{:.4g}"),
    Column("iqr_us", "IQR", "{:.2g}"),
    Column("algbw_GBps", "algbw GB/s", "{:.3g}"),
    Column("busbw_GBps", "busbw GB/s", "{:.3g}"),
    Column("pct_of_line_rate", "% line", "{:.0f}"),
)


def collectives_sweep(opts: CollectiveOptions) -> Sweep:
    configs = opts.configs()
    return Sweep(
        suite="ddp-collectives",
        configs=configs,
        run=CollectivesRun(opts, configs),
        params=("size", "collective", "world_size", "dtype"),
        metrics=("size_bytes", "nodes", "calls_per_sample", "algbw_GBps", "busbw_GBps", "pct_of_line_rate"),
        display=COLLECTIVE_DISPLAY,
        label="size",
        primary="busbw_GBps",
        higher_is_better=True,
        time_unit="us",
    )
