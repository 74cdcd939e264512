"""The gan suite: GAN objectives and their gradient penalties, trained and
timed; with --vq, vector quantizers: the nearest-code search and the
quantizer's step.

    genbench gan --device cpu                    # the mixtures, eager, 300 steps: a few minutes on 2 cores
    genbench gan --objective wgan-gp --data 8gaussians --mode eager --mode cudagraph --steps 2000
    genbench gan --vq --n 65536 --k 16384 --dim 256 --dtype bf16

Objectives (impls/gan.py): each row trains the same generator and critic
(the MLP on the 2-D mixtures, the DCGAN-shaped pair on the 8x8 digits) under
one objective, seeded, for a fixed number of steps (a step: n_critic critic
steps, then one generator step), in one mode:
- eager; compile (torch.compile of both networks; the penalties differentiate
  a gradient, which aot_autograd cannot: those rows say so); cudagraph (both
  steps captured as CUDA graphs after three eager ones; a CUDA device only).
Columns: the step (median_ms, the first tenth left out), the critic and the
generator step apart, the penalty's share of the critic step (eager rows: the
critic step timed again without it, after training), peak memory (CUDA), and
what the papers promise, measured after training: modes covered and the share
of high-quality samples on 2,500 samples (VEEGAN's metrics), WGAN-GP's mean
|‖∇D(x^)‖ - 1| over every critic step, WGAN's largest |weight| against c.
The `samples` column keeps 512 generated points ("x,y;x,y;...") for the chart.

Vector quantizers (impls/vq.py, impls/vq_triton.py), one table per
(N, K, D, dtype): the searches cdist, matmul, fused and, for fp32 inputs,
fused-tf32x3 (the fused kernel's products as 3xTF32 on the tensor cores
instead of IEEE fp32 on the CUDA cores), each first checked
against the float64 search on the same inputs (a different index beyond a
near-tie makes the row `mismatch`: never timed as a win), then timed, with
the memory the call needs beyond its inputs; the quantizer's forward and
backward (straight-through, commitment loss) and the EMA codebook update at
that shape; and, on the digits, codebook usage (perplexity, dead codes)
after a short seeded training of a small VQ autoencoder, EMA and gradient
codebooks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from bench import metrics
from bench.errors import BadInput, Unsupported
from bench.runner import Column, Context, Measurement, Sweep
from bench.timing import StepTimer
from impls import gan, vq, vq_triton

OBJECTIVES = tuple(gan.OBJECTIVES)
DATA = (*gan.MIXTURES, "digits")
MODES = ("eager", "compile", "cudagraph")
SEARCHES = ("cdist", "matmul", "fused", "fused-tf32x3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COVERAGE_SAMPLES = 2500  # VEEGAN and PacGAN count modes on 2,500 samples
CHART_SAMPLES = 512  # generated points kept in the CSV for the chart
GRAPH_WARMUP = 3  # eager steps before the CUDA graphs are captured
NO_SKLEARN = "scikit-learn not installed (install it, or genbench's gan extra): no digits"


@dataclass(frozen=True)
class GanConfig:
    objective: str
    data: str
    mode: str
    steps: int
    batch: int
    warmup_steps: int = 0


@dataclass(frozen=True)
class GanOptions:
    objectives: tuple[str, ...] = OBJECTIVES
    data: tuple[str, ...] = tuple(gan.MIXTURES)
    modes: tuple[str, ...] = ("eager",)
    steps: int = 300
    batch: int = 256

    def __post_init__(self):
        for option, given, known in (("--objective", self.objectives, OBJECTIVES), ("--data", self.data, DATA),
                                     ("--mode", self.modes, MODES)):
            if not given:
                raise BadInput(f"give at least one {option}")
            for name in given:
                if name not in known:
                    raise BadInput(f"unknown {option} {name!r}; known: {', '.join(known)}")
        for option, value in (("--steps", self.steps), ("--batch", self.batch)):
            if value <= 0:
                raise BadInput(f"{option} must be positive, got {value}")
        if "cudagraph" in self.modes and self.steps <= GRAPH_WARMUP:
            raise BadInput(f"--mode cudagraph needs --steps above its {GRAPH_WARMUP} eager warm-up steps, "
                           f"got {self.steps}")

    @property
    def warmup(self) -> int:
        """Steps left out of the timing: a tenth (compilation, capture, allocator growth)."""
        return min(max(GRAPH_WARMUP if "cudagraph" in self.modes else 1, self.steps // 10), self.steps - 1)

    def configs(self) -> list[GanConfig]:
        return [GanConfig(o, d, m, self.steps, self.batch, self.warmup)
                for d in self.data for m in self.modes for o in self.objectives]


@dataclass
class _Images:
    """The digits, read once per sweep."""

    tensors: dict = field(default_factory=dict)

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self.tensors:
            try:
                self.tensors[device] = gan.digits(device)
            except ImportError:
                raise Unsupported(NO_SKLEARN) from None
        return self.tensors[device]


def _trainer(cfg: GanConfig, ctx: Context, images: _Images, penalty_on: bool = True) -> gan.GanTrainer:
    objective = gan.OBJECTIVES[cfg.objective]
    with torch.random.fork_rng(devices=[]):  # the same initial weights for every row, from the seed
        torch.manual_seed(ctx.seed)
        if cfg.data == "digits":
            g, d, z_dim = gan.conv_generator(), gan.conv_critic(), gan.IMAGE_Z_DIM
        else:
            g, d, z_dim = gan.mlp_generator(), gan.mlp_critic(), gan.Z_DIM
    sample = gan.image_sampler(images.get(ctx.device)) if cfg.data == "digits" else \
        gan.MIXTURES[cfg.data].sampler(ctx.device)
    return gan.GanTrainer(objective, g, d, sample, cfg.batch, z_dim, ctx.device, seed=ctx.seed,
                          compile=cfg.mode == "compile", capturable=cfg.mode == "cudagraph", penalty_on=penalty_on)


class _Run:
    """One row's training loop, timed step by step (callable, so that the
    harness can take its peak memory)."""

    def __init__(self, cfg: GanConfig, ctx: Context, trainer: gan.GanTrainer):
        self.cfg, self.ctx, self.trainer = cfg, ctx, trainer
        self.step_timer, self.critic_timer, self.generator_timer = (StepTimer(ctx.device) for _ in range(3))
        self.untimed = 0  # steps run before the timers start: the CUDA graphs' eager warm-up

    def __call__(self) -> None:
        cfg, steps = self.cfg, self.trainer
        if cfg.mode == "cudagraph":
            steps = gan.GraphedSteps(self.trainer, warmup=GRAPH_WARMUP)  # its eager steps count as training
            self.untimed = GRAPH_WARMUP
        n_critic = self.trainer.objective.n_critic
        for i in range(self.untimed, cfg.steps):
            with self.step_timer.step():
                for _ in range(n_critic):
                    with self.critic_timer.step():
                        steps.critic_step()
                with self.generator_timer.step():
                    steps.generator_step()
            self.ctx.step(i + 1, cfg.steps)


def _compile_refused(exc: RuntimeError) -> bool:
    """Whether torch.compile refused a backward with create_graph=True: aot_autograd
    says "does not currently support double backward", or, with donated buffers,
    asks for "create_graph=False"."""
    return "double backward" in str(exc) or "create_graph" in str(exc)


def _gan_row(cfg: GanConfig, ctx: Context, images: _Images) -> Measurement:
    objective = gan.OBJECTIVES[cfg.objective]
    if cfg.mode == "cudagraph" and ctx.device.type != "cuda":
        raise Unsupported("CUDA graphs need a CUDA device")
    trainer = _trainer(cfg, ctx, images)
    run = _Run(cfg, ctx, trainer)
    if cfg.mode == "compile":
        torch.compiler.reset()
    try:
        if ctx.device.type == "cuda":
            peak_mib = ctx.peak_memory_mib(run)
        else:
            run()
            peak_mib = None
    except RuntimeError as exc:
        if cfg.mode == "compile" and _compile_refused(exc):
            raise Unsupported(f"torch.compile cannot differentiate the {objective.penalty} penalty, a gradient "
                              f"(create_graph=True): "
                              f"{str(exc).splitlines()[0]}") from None
        raise
    finally:
        if cfg.mode == "compile":
            torch.compiler.reset()
    warmup = cfg.warmup_steps - run.untimed
    stats = run.step_timer.stats(warmup=warmup)
    critic = run.critic_timer.stats(warmup=warmup * objective.n_critic)
    generator = run.generator_timer.stats(warmup=warmup)
    notes = [f"{objective.n_critic} critic steps per step"] if objective.n_critic > 1 else []
    values = dict(n_critic=objective.n_critic, critic_ms=critic.median, generator_ms=generator.median,
                  peak_mem_MiB=peak_mib, first_step_ms=run.step_timer.samples()[0])
    if cfg.data in gan.MIXTURES:
        samples = trainer.sample(COVERAGE_SAMPLES, seed=ctx.seed)
        cov = gan.coverage(samples, gan.MIXTURES[cfg.data])
        values.update(modes=cov.modes, modes_covered=cov.covered, high_quality=cov.high_quality,
                      samples=format_points(samples[:CHART_SAMPLES]))
    if objective.penalty == "gp":
        values["grad_norm_gap"] = trainer.grad_norm_gap()
    if objective.clip is not None:
        w = trainer.max_abs_weight()
        values.update(max_abs_weight=w, weights_in_range=w <= objective.clip)
        if w > objective.clip:
            notes.append(f"a weight left [-{objective.clip}, {objective.clip}]: {w:.3g}")
    if objective.penalty and cfg.mode == "eager":
        values.update(_penalty_share(cfg, ctx, images, trainer))
    values["note"] = "; ".join(notes)
    return Measurement(values, stats=stats)


def _penalty_share(cfg: GanConfig, ctx: Context, images: _Images, trained: gan.GanTrainer) -> dict:
    """The critic step timed with and without its penalty, on copies of the
    trained networks: (with - without) / with."""
    timed = {}
    for on in (True, False):
        t = _trainer(cfg, ctx, images, penalty_on=on)
        t.G.load_state_dict(trained.G.state_dict())
        t.D.load_state_dict(trained.D.state_dict())
        timed[on] = ctx.time(t.critic_step).median
    with_ms, without_ms = timed[True], timed[False]
    return dict(penalty_ms=with_ms - without_ms, penalty_share=(with_ms - without_ms) / with_ms)


def format_points(points: torch.Tensor) -> str:
    """(n, 2) points as 'x,y;x,y;...', three decimals."""
    return ";".join(f"{x:.3f},{y:.3f}" for x, y in points.detach().cpu().tolist())


GAN_METRICS = ("n_critic", "critic_ms", "generator_ms", "penalty_ms", "penalty_share", "peak_mem_MiB", "first_step_ms",
               "modes", "modes_covered", "high_quality", "grad_norm_gap", "max_abs_weight", "weights_in_range",
               "note", "samples")


def gan_sweep(opts: GanOptions, device: torch.device) -> Sweep:
    memory = (Column("peak_mem_MiB", "MiB", "{:,.0f}"),) if device.type == "cuda" else ()
    return Sweep(
        suite="gan",
        configs=opts.configs(),
        run=functools.partial(_gan_row, images=_Images()),
        params=("objective", "data", "mode", "steps", "batch"),
        metrics=GAN_METRICS,
        display=(
            Column("median_ms", "step ms", "{:.3g}"),
            Column("critic_ms", "critic", "{:.3g}"),
            Column("generator_ms", "gen", "{:.3g}"),
            Column("penalty_share", "penalty", "{:.0%}"),
            *memory,
            Column("modes_covered", "modes", "{:.0f}"),
            Column("high_quality", "HQ", "{:.0%}"),
            Column("grad_norm_gap", "|‖∇D‖-1|", "{:.3g}"),
            Column("max_abs_weight", "max|w|", "{:.3g}"),
        ),
        label="objective",
        note="note",
        cost=lambda c: c.steps * (gan.OBJECTIVES[c.objective].n_critic + 1),
    )


# -- vector quantizers -----------------------------------------------------------------------------

VQ_OPS = ("search", "quantizer", "ema-update")
AE_K, AE_D, AE_BATCH = 64, 16, 64  # the small VQ autoencoder: 64 codes of 16 dims, 4 latents an image


@dataclass(frozen=True)
class VqConfig:
    impl: str  # the search (SEARCHES); index_add for the EMA update; ema or grad for the autoencoder
    op: str  # search | quantizer | ema-update | autoencoder
    N: int
    K: int
    D: int
    dtype: str
    steps: int | None = None  # the autoencoder's training steps


@dataclass(frozen=True)
class VqOptions:
    n: tuple[int, ...] = (2048,)
    k: tuple[int, ...] = (256, 1024)
    dim: tuple[int, ...] = (64,)
    dtypes: tuple[str, ...] = tuple(DTYPES)
    searches: tuple[str, ...] = SEARCHES
    ops: tuple[str, ...] = VQ_OPS
    autoencoder_steps: int = 200  # 0: no autoencoder rows

    def __post_init__(self):
        for option, values in (("--n", self.n), ("--k", self.k), ("--dim", self.dim)):
            if not values:
                raise BadInput(f"give at least one {option}")
            for v in values:
                if v <= 0:
                    raise BadInput(f"{option} must be positive, got {v}")
        for option, given, known in (("--dtype", self.dtypes, tuple(DTYPES)), ("--search", self.searches, SEARCHES),
                                     ("--op", self.ops, VQ_OPS)):
            if not given:
                raise BadInput(f"give at least one {option}")
            for name in given:
                if name not in known:
                    raise BadInput(f"unknown {option} {name!r}; known: {', '.join(known)}")
        if self.autoencoder_steps < 0:
            raise BadInput(f"--autoencoder-steps must be 0 or more, got {self.autoencoder_steps}")

    def configs(self) -> list[VqConfig]:
        """Per shape and dtype: the searches, the quantizer step with each search, the EMA update;
        then the autoencoder rows."""
        out = []
        for dt in self.dtypes:
            for d in self.dim:
                for n in self.n:
                    for k in self.k:
                        for op in self.ops:
                            impls = ("index_add",) if op == "ema-update" else self.searches
                            out += [VqConfig(impl, op, n, k, d, dt) for impl in impls]
        if self.autoencoder_steps:
            out += [VqConfig(impl, "autoencoder", AE_BATCH * 4, AE_K, AE_D, "fp32", self.autoencoder_steps)
                    for impl in ("ema", "grad")]
        return out


@dataclass
class _VqShared:
    """Inputs and the float64 search, made once per shape."""

    images: _Images = field(default_factory=_Images)
    _key: tuple | None = None
    _inputs: tuple | None = None

    def inputs(self, cfg: VqConfig, ctx: Context):
        """(x, codebook, float64 (idx, best)) of this shape, seeded."""
        key = (cfg.N, cfg.K, cfg.D, cfg.dtype, ctx.seed)
        if key != self._key:
            self._key, self._inputs = None, None  # free the last shape's first
            g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
            dtype = DTYPES[cfg.dtype]
            x = torch.randn(cfg.N, cfg.D, generator=g, device=ctx.device).to(dtype)
            e = torch.randn(cfg.K, cfg.D, generator=g, device=ctx.device).to(dtype)
            self._inputs = (x, e, vq.nearest_float64(x, e))
            self._key = key
        return self._inputs


def _search(name: str):
    return {"cdist": vq.nearest_cdist, "matmul": vq.nearest_matmul, "fused": vq_triton.nearest_fused,
            "fused-tf32x3": functools.partial(vq_triton.nearest_fused, precision="tf32x3")}[name]


def distance_dtype(impl: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a search's distances are rounded to: the fused kernel's are
    fp32 whatever its inputs; cdist's and the matmul form's product are in the inputs' dtype."""
    return torch.float32 if impl.startswith("fused") else dtype


def _check_fused(cfg: VqConfig, ctx: Context) -> None:
    if not cfg.impl.startswith("fused"):
        return
    if cfg.impl == "fused-tf32x3" and cfg.dtype != "fp32":
        raise Unsupported("3xTF32 splits fp32 inputs; bf16 inputs take bf16 products (the fused row)")
    reason = vq_triton.why_not(ctx.device, DTYPES[cfg.dtype])
    if reason:
        raise Unsupported(reason)
    if ctx.device.type != "cuda":
        raise Unsupported("timed on a CUDA GPU only: the Triton interpreter runs it in Python "
                          "(tests/impls/test_vq_triton.py checks it on CPU)")


def _search_row(cfg: VqConfig, ctx: Context, shared: _VqShared) -> Measurement:
    dtype = DTYPES[cfg.dtype]
    _check_fused(cfg, ctx)
    x, e, reference = shared.inputs(cfg, ctx)
    search = _search(cfg.impl)
    idx, _ = search(x, e)
    rtol = vq.TIE_RTOL[distance_dtype(cfg.impl, dtype)]
    a = vq.agreement(idx, x, e, rtol, reference=reference)
    del idx
    values = dict(same=a.same, near_ties=a.near_ties, mismatches=a.mismatches, max_gap=a.max_gap, tie_rtol=rtol,
                  note=f"near-tie: float64 gap <= {rtol:.2g} x (||x||^2 + ||e||^2)")
    if a.mismatches:
        return Measurement(values, status="mismatch",
                           reason=f"{a.mismatches} of {a.rows} indices differ from the float64 search beyond a "
                                  f"near-tie (largest gap {a.max_gap:.3g})")
    stats = ctx.time(lambda: search(x, e))
    values.update(peak_mem_MiB=ctx.peak_memory_mib(lambda: search(x, e)),
                  tflops=metrics.tflops(2.0 * cfg.N * cfg.K * cfg.D, stats.median))  # the x.e^T product
    return Measurement(values, stats=stats)


def _quantizer_row(cfg: VqConfig, ctx: Context, shared: _VqShared) -> Measurement:
    """The quantizer's forward and backward with this search, or the EMA update (its indices found beforehand)."""
    _check_fused(cfg, ctx)
    x, e, (ref_idx, _) = shared.inputs(cfg, ctx)
    if cfg.op == "quantizer":
        q = vq.VectorQuantizer(cfg.K, cfg.D, search=_search(cfg.impl)).to(ctx.device, x.dtype)
        with torch.no_grad():
            q.codebook.copy_(e)
        z = x.clone().requires_grad_(True)

        def step():
            z_q, _, loss = q(z)
            (z_q.float().square().mean() + loss).backward()  # a stand-in decoder loss, then back to z and e
    else:
        q = vq.VectorQuantizer(cfg.K, cfg.D, ema=True).to(ctx.device)
        q.codebook.copy_(e.float())
        z = x.float()

        def step():
            q.ema_update(z, ref_idx)
    stats = ctx.time(step)
    return Measurement(dict(peak_mem_MiB=ctx.peak_memory_mib(step)), stats=stats)


def _autoencoder_row(cfg: VqConfig, ctx: Context, shared: _VqShared) -> Measurement:
    images = shared.images.get(ctx.device)
    ema = cfg.impl == "ema"
    model, losses = vq.train_autoencoder(images, cfg.steps, AE_BATCH, ctx.seed, K=AE_K, D=AE_D, ema=ema)
    ppl, dead = vq.codebook_usage(model, images)
    return Measurement(dict(perplexity=ppl, dead_codes=dead, loss_final=losses[-1],
                            note=f"{cfg.steps} steps on the 1,797 digits, K={AE_K}, D={AE_D}, "
                                 f"{'EMA' if ema else 'gradient'} codebook"))


def _vq_row(cfg: VqConfig, ctx: Context, shared: _VqShared) -> Measurement:
    if cfg.op == "search":
        return _search_row(cfg, ctx, shared)
    if cfg.op == "autoencoder":
        return _autoencoder_row(cfg, ctx, shared)
    return _quantizer_row(cfg, ctx, shared)


VQ_METRICS = ("tflops", "peak_mem_MiB", "same", "near_ties", "mismatches", "max_gap", "tie_rtol", "perplexity",
              "dead_codes", "loss_final", "note")


def vq_sweep(opts: VqOptions, device: torch.device) -> Sweep:
    memory = (Column("peak_mem_MiB", "MiB", "{:,.0f}"),) if device.type == "cuda" else ()
    return Sweep(
        suite="gan-vq",
        configs=opts.configs(),
        run=functools.partial(_vq_row, shared=_VqShared()),
        params=("impl", "op", "N", "K", "D", "dtype"),
        metrics=VQ_METRICS,
        display=(
            Column("median_ms", "ms", "{:.4g}"),
            Column("iqr_ms", "IQR", "{:.2g}"),
            Column("tflops", "TFLOP/s", "{:.3g}"),
            *memory,
            Column("near_ties", "near-ties", "{:.0f}"),
            Column("mismatches", "mismatch", "{:.0f}"),
            Column("perplexity", "perplexity", "{:.3g}"),
            Column("dead_codes", "dead", "{:.0f}"),
        ),
        label="impl",
        baseline="cdist",
        note="note",
        cost=lambda c: (c.steps or 0) * 1e6 + c.N * c.K * c.D,
    )
