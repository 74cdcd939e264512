"""The precision suite: one GPT, from the same initial weights, trained on the
same batches under each numeric precision, then compared for speed and for
the loss it reaches.

    genbench precision --device cpu                     # tiny model, 30 steps, about a minute on 2 cores
    genbench precision --model gpt2-small --steps 300 --precision fp32 --precision bf16 --precision bf16+compile
    genbench precision --matmul                         # also the calibrated matmul rate of each dtype

Rows, in order:
- with --matmul, first (they take a second), one row per dtype: the matmul
  rate this device reached when calibrated (`genbench env --calibrate`; the
  ceiling MFU is taken against), and fp8's rate measured here (calibration
  has no fp8). They form their own table, model "matmul";
- the reference, fp32 (IEEE fp32 products), trained first whenever parity is
  on, so that every later row can be compared with its loss curve;
- the band row, `fp32-band`: fp32 again on the same batches, from the same
  initial weights with every parameter nudged by one ulp, up or down at
  random (seed + 1): the smallest difference two equally valid fp32 runs can
  have (another summation order makes as much), which training then amplifies
  (the butterfly effect). The largest relative difference between the two
  fp32 loss curves (`band`) is how far equally valid runs drift apart on
  these batches; every other precision is judged against it (see `verdict`
  and `tolerance`). Batches drawn with another seed would measure the text
  instead: the loss of one batch differs from the next's by far more than any
  precision does;
- each precision asked for; `bf16+compile` trains bf16 under torch.compile
  (`--compile` compiles every row), whose compilation falls in the discarded
  warm-up steps.

Every training row first checks, in one untimed forward, that its matrix
products ran in the dtype it is named for (Precision.matmul_dtypes); a row
whose products did not is `unsupported`, never fp32 under another name.

On a GPU with NVML (bench/telemetry.py), the energy of the timed steps gives
joules_per_step and tokens_per_J (training tokens); empty on a CPU.

Loss curves go in the `loss_curve` column: the training loss of every step,
step 0 first, as floats joined by ';' (e.g. "9.01;8.87;...", "nan" for a
non-finite step); `[float(v) for v in row["loss_curve"].split(";")]` reads one.

Your own model trains the same way (`find_model`): `--model mypkg.models:gpt`,
or the name an installed package gives it under the entry-point group
`genbench.precision`. It is a factory(vocab_size, seq_len) -> torch.nn.Module
whose forward(idx, targets) returns (logits, loss); its rows have MFU when
the module has a flops_per_token(seq_len) method, as impls/gpt.GPT has.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bench import calibrate, metrics, registry
from bench.errors import BadInput, Unsupported
from bench.runner import Column, Context, Measurement, Sweep
from bench.timing import StepTimer
from impls import fp8
from impls.data import TextData
from impls.gpt import GPT, PRESETS as MODELS, GPTConfig
from impls.precision import PRECISIONS, Precision, cpu_has_matmul_instructions
from impls.train import cosine_lr, evaluate, train_step

REFERENCE = "fp32"
COMPILE = "+compile"  # suffix of a precision trained under torch.compile
BAND = "-band"  # suffix of the reference's run from nudged weights
DEFAULT_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8")
MATMUL_DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
# AdamW as GPT-3 trained its 125M model (Brown et al. 2020, table 2.1 and appendix B).
LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
FP8_MATMUL_N = 8192  # the square fp8 product timed for the matmul-fp8 row, as calibration's bf16 one
GROUP = "genbench.precision"  # where installed packages register model factories (bench/registry.py)


@dataclass(frozen=True)
class PrecisionConfig:
    """One row. Training rows carry the run's shape; matmul rows leave it empty."""

    precision: str  # the row's label: bf16, bf16+compile, fp32-band, matmul-bf16
    model: str | None
    steps: int | None  # length of the schedule (the band run may stop earlier)
    batch: int | None
    seq_len: int | None
    base: str = REFERENCE  # key of PRECISIONS (training) or the matmul dtype
    role: str = "train"  # reference | band | train | matmul
    compile: bool = False
    train_steps: int | None = None  # steps actually trained
    warmup_steps: int = 0  # first steps left out of the timing


def parse_precision(name: str) -> tuple[str, bool]:
    """'bf16' -> ('bf16', False), 'bf16+compile' -> ('bf16', True)."""
    base, compiled = (name[: -len(COMPILE)], True) if name.endswith(COMPILE) else (name, False)
    if base not in PRECISIONS:
        raise BadInput(f"unknown --precision {name!r}; known: {', '.join(PRECISIONS)} "
                       f"(add {COMPILE} to compile one, e.g. bf16{COMPILE})")
    return base, compiled


@dataclass(frozen=True)
class Factory:
    """Your model, as the suite sees it: what builds it and where it comes from."""

    build: Callable[[int, int], torch.nn.Module]  # factory(vocab_size, seq_len)
    target: str  # module:attribute, for messages and notes


def find_model(name: str) -> Factory | None:
    """None for a GPT preset (impls/gpt.PRESETS); else the factory an
    installed package registers by that name under genbench.precision, or
    yours, `module:function`. A factory is called as factory(vocab_size,
    seq_len) and returns a torch.nn.Module, built on the CPU, whose
    forward(idx, targets) with idx and targets (B, T) token ids, T <= seq_len,
    returns (logits, loss), loss a scalar tensor; a flops_per_token(seq_len)
    method gives its rows MFU, a num_params() method their n_params (else
    every parameter is counted). A name that cannot be found or imported, is
    not callable, or cannot take (vocab_size, seq_len), is a BadInput."""
    if name in MODELS:
        return None
    return _factory(name)


@functools.cache
def _factory(name: str) -> Factory:
    if ":" not in name and name not in registry.names(GROUP):
        raise BadInput(f"unknown --model {name!r}; known: {', '.join([*MODELS, *registry.names(GROUP)])}, "
                       "or your own as module:function")
    target, obj = registry.load(name, GROUP, "--model")
    if not callable(obj):
        raise BadInput(f"--model {name}: {target} is a {type(obj).__name__}, not a function of (vocab_size, seq_len)")
    try:
        signature = inspect.signature(obj)
    except ValueError:  # no signature to read (a builtin): the call will tell
        return Factory(obj, target)
    try:
        signature.bind(1, 1)
    except TypeError:
        raise BadInput(f"--model {name}: {target} takes {signature}; genbench calls it as "
                       "factory(vocab_size, seq_len)") from None
    return Factory(obj, target)


@dataclass(frozen=True)
class PrecisionOptions:
    """The sweep, as given on the command line."""

    model: str = "tiny"
    steps: int = 30
    batch: int = 4
    seq_len: int = 64
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    compile: bool = False  # compile every row
    parity: bool = True  # train the fp32 reference and band first, and judge every row against them
    band_steps: int | None = None  # default: steps
    warmup_steps: int | None = None  # default: a tenth of the steps
    eval_batches: int = 10  # held-out batches of batch x seq_len for the validation loss
    lr: float = LR
    matmul: bool = False

    def __post_init__(self):
        yours = find_model(self.model)  # unknown, or yours not importable: an error now, before anything runs
        for name, value in (("--steps", self.steps), ("--batch", self.batch), ("--seq-len", self.seq_len)):
            if value <= 0:
                raise BadInput(f"{name} must be positive, got {value}")
        context = MODELS[self.model].block_size if yours is None else self.seq_len  # yours is built for seq_len
        if self.seq_len > context:
            raise BadInput(f"--seq-len {self.seq_len} is longer than {self.model}'s context of {context} tokens")
        if not self.precisions:
            raise BadInput("give at least one --precision")
        for name in self.precisions:
            parse_precision(name)
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise BadInput(f"--warmup-steps must be at least 0 and below --steps ({self.steps}), "
                           f"got {self.warmup_steps}")
        if self.band_steps is not None and not self.warmup < self.band_steps <= self.steps:
            raise BadInput(f"--band-steps must be above the {self.warmup} warm-up steps and at most --steps "
                           f"({self.steps}), got {self.band_steps}")
        if self.eval_batches < 0:
            raise BadInput(f"--eval-batches must be 0 or more, got {self.eval_batches}")
        if not self.lr > 0:
            raise BadInput(f"--lr must be positive, got {self.lr}")

    @property
    def warmup(self) -> int:
        """Warm-up steps: a tenth of the run (allocator growth, cuBLAS heuristics,
        compilation), at least one when there is a step to spare."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(max(1, self.steps // 10), self.steps - 1)

    def labels(self) -> tuple[list[tuple[str, bool]], str | None]:
        """(base, compiled) of each training row in order, and the reference's label.

        The reference, the first fp32 row asked for, runs first: speedups are
        taken against it and, with parity on, every loss curve is compared with
        its curve (parity adds fp32 when it was not asked for).
        """
        rows: list[tuple[str, bool]] = []
        for name in self.precisions:
            base, compiled = parse_precision(name)
            row = (base, compiled or self.compile)
            if row not in rows:  # the same row asked twice runs once
                rows.append(row)
        ref = next((r for r in rows if r[0] == REFERENCE), None)
        if ref is None and self.parity:
            ref = (REFERENCE, self.compile)
        if ref is None:
            return rows, None
        return [ref] + [r for r in rows if r != ref], _label(*ref)

    def configs(self) -> list[PrecisionConfig]:
        rows, reference = self.labels()
        shape = dict(model=self.model, steps=self.steps, batch=self.batch, seq_len=self.seq_len,
                     warmup_steps=self.warmup)
        # The ceilings first: they take a second, so a run cut short still has them.
        configs = [PrecisionConfig(f"matmul-{d}", "matmul", None, None, None, base=d, role="matmul")
                   for d in MATMUL_DTYPES] if self.matmul else []
        for base, compiled in rows:
            label = _label(base, compiled)
            role = "reference" if label == reference else "train"
            configs.append(PrecisionConfig(label, base=base, role=role, compile=compiled, train_steps=self.steps,
                                           **shape))
            if role == "reference" and self.parity:
                configs.append(PrecisionConfig(label + BAND, base=base, role="band", compile=compiled,
                                               train_steps=self.band_steps or self.steps, **shape))
        return configs

    def notes(self) -> list[str]:
        """What the command tells the user before the run starts."""
        _, reference = self.labels()
        if not self.parity:
            return ["parity off: no band run, and loss curves are not compared"]
        asked = [parse_precision(p) for p in self.precisions]
        added = "" if any(r[0] == REFERENCE for r in asked) else " (added: parity needs it)"
        band = self.band_steps or self.steps
        return [f"parity: {reference} trains first{added} as the reference, then {reference}{BAND}: {reference} "
                f"again on the same batches from weights nudged by one ulp, for {band} steps; their largest "
                f"relative loss difference (running mean over {window(self.steps)} step(s)) is the band; every "
                f"other precision must stay within max({FLOOR:.0%}, {FACTOR:g} x band)"]


def _label(base: str, compiled: bool) -> str:
    return base + (COMPILE if compiled else "")


# -- parity ----------------------------------------------------------------------------------------

VERDICTS = ("match", "drift", "diverged")
# The band grows from one ulp as training amplifies it, so over a short run it
# stays near zero while any rounding of a lower precision (2^-8 for bf16, at
# every product of every step) already shows: the verdict takes at least
# FLOOR. Once runs have separated, fp32 against its nudged self sits around a
# percent on the tiny model, hence 1%: a loss difference below it is less than
# equally valid runs show. The band is one pair of runs, and its largest
# difference changes about twofold from one nudge to another, hence FACTOR.
FLOOR = 0.01
FACTOR = 3.0


def tolerance(band: float | None) -> float | None:
    """The largest relative loss difference a precision may show and still
    match: max(FLOOR, FACTOR x band). None when there is no band."""
    if band is None or not np.isfinite(band):
        return None
    return max(FLOOR, FACTOR * band)


def window(steps: int) -> int:
    """Steps in the running mean the curves are compared through: a twentieth
    of the run. A loss spike lasts a step or two and two equally valid runs
    spike at different steps; a precision's systematic offset lasts, and
    survives the mean."""
    return max(1, steps // 20)


def running_mean(curve: np.ndarray, w: int) -> np.ndarray:
    """Means of every w consecutive steps (len - w + 1 of them; the curve itself for w = 1)."""
    curve = np.asarray(curve, dtype=np.float64)
    if w <= 1 or len(curve) < w:
        return curve
    return np.convolve(curve, np.ones(w) / w, mode="valid")


def rel_diff(curve: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|relative difference| to the reference per step, over the steps both have."""
    n = min(len(curve), len(reference))
    a, b = np.asarray(curve[:n], dtype=np.float64), np.asarray(reference[:n], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(metrics.relative_difference(a, b))


@dataclass(frozen=True)
class Parity:
    max_rel_diff: float | None
    final_rel_diff: float | None
    nonfinite: int  # steps whose loss is NaN or inf
    verdict: str  # match | drift | diverged, or "" when there is nothing to judge against


def verdict(curve, reference, band: float | None, w: int = 1) -> Parity:
    """A loss curve against the reference's, on the same batches, both through
    a running mean over w steps; `band` is the tolerance (see `tolerance`).

    match:    every step within the band (as close as fp32 is to itself from
              weights one ulp away);
    drift:    some step outside the band, the last step back inside it;
    diverged: a NaN or inf loss, or the last step outside the band.
    With no reference or band (its run failed, or parity is off) no verdict.
    """
    curve = np.asarray(curve, dtype=np.float64)
    nonfinite = int((~np.isfinite(curve)).sum())
    if reference is None or len(reference) == 0 or not np.isfinite(reference).all():
        return Parity(None, None, nonfinite, "")
    n = min(len(curve), len(reference))
    diff = rel_diff(running_mean(curve[:n], w), running_mean(np.asarray(reference)[:n], w))
    max_d = float(np.max(diff)) if np.isfinite(diff).all() else float("inf")
    final_d = float(diff[-1])
    if band is None or not np.isfinite(band):
        return Parity(max_d, final_d, nonfinite, "")
    if nonfinite or not final_d <= band:
        judged = "diverged"
    elif max_d <= band:
        judged = "match"
    else:
        judged = "drift"
    return Parity(max_d, final_d, nonfinite, judged)


def format_curve(curve) -> str:
    """Losses as 'v0;v1;...', each float written exactly (repr)."""
    return ";".join(repr(float(v)) for v in curve)


def parse_curve(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split(";")]) if text else np.array([])


# -- one training run ------------------------------------------------------------------------------


def nudge(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every element of every parameter to its neighbouring float, up or
    down at random from `seed`: the smallest change of the weights (the band row)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=g) < 0.5
            p.copy_(torch.nextafter(p, torch.where(up, torch.inf, -torch.inf).to(p.dtype)))
    return model


@dataclass
class Shared:
    """What rows of one sweep share: the data, the initial weights, and the
    reference's loss curve and band once their rows have run."""

    data: TextData
    options: PrecisionOptions
    model_config: GPTConfig | None = field(init=False)  # None for your model
    factory: Factory | None = field(init=False)  # None for a GPT preset
    reference: np.ndarray | None = None
    reference_val: float | None = None
    reference_ms: float | None = None
    band: float | None = None
    tolerance: float | None = None
    _initial: tuple[int, torch.nn.Module] | None = None

    def __post_init__(self):
        self.factory = find_model(self.options.model)
        self.model_config = None if self.factory else GPTConfig.from_name(self.options.model,
                                                                          vocab_size=self.data.vocab_size)

    def nudged_model(self, seed: int, nudge_seed: int) -> torch.nn.Module:
        """The initial weights, each nudged one ulp (see `nudge`)."""
        return nudge(self.initial_model(seed), nudge_seed)

    def initial_model(self, seed: int) -> torch.nn.Module:
        """The same initial weights for every row: built once on the CPU from the
        seed, without touching the global random state, then deep-copied."""
        if self._initial is None or self._initial[0] != seed:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._initial = (seed, self._build())
        return copy.deepcopy(self._initial[1])  # deepcopy keeps the tied embedding tied

    def _build(self) -> torch.nn.Module:
        """The GPT preset, or what your factory returns: a factory that raises
        or returns something else fails the row, saying so."""
        if self.factory is None:
            return GPT(self.model_config)
        call = f"{self.factory.target}({self.data.vocab_size}, {self.options.seq_len})"
        try:
            model = self.factory.build(self.data.vocab_size, self.options.seq_len)
        except Exception as exc:  # whatever your factory raises, the row's reason says it in one line
            first = (str(exc).strip().splitlines() or [""])[0]
            raise RuntimeError(f"{call} raised {type(exc).__name__}: {first}") from exc
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{call} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def describe_data(self) -> str:
        config = self.data.config
        source = f"{len(config.paths)} path(s)" if config.paths else "stdlib"
        return f"{source}, {config.tokenizer} {self.data.vocab_size}, {len(self.data.tokens) / 1e6:.2f}M tokens"


class Trainer:
    """Trains one row's model; calling it runs the whole loop (so that the
    harness can take its peak memory) and leaves the results on the object."""

    def __init__(self, cfg: PrecisionConfig, ctx: Context, shared: Shared):
        self.cfg, self.ctx, self.shared = cfg, ctx, shared
        self.precision = PRECISIONS[cfg.base]
        band = cfg.role == "band"
        self.model = shared.nudged_model(ctx.seed, ctx.seed + 1) if band else shared.initial_model(ctx.seed)
        self.generator = torch.Generator().manual_seed(ctx.seed)  # the batches' order: the same for every row
        self.timer = StepTimer(ctx.device)
        self.window = None  # the timed steps' telemetry window (bench/telemetry.py)

    def batch(self):
        c = self.cfg
        return self.shared.data.get_batch("train", c.batch, c.seq_len, generator=self.generator, device=self.ctx.device)

    def step(self):
        return train_step(self.forward, self.optimizer, self.scaler, self.precision, *self.batch(), self.ctx.device)

    def __call__(self) -> None:
        c, device, opts = self.cfg, self.ctx.device, self.shared.options
        self.model = self.precision.prepare(self.model.to(device))
        # Your model trains with the GPT's AdamW too (configure_optimizer reads nothing but the parameters):
        # the rows differ in precision and model only.
        self.optimizer = GPT.configure_optimizer(self.model, WEIGHT_DECAY, opts.lr, BETAS, device.type)
        self.scaler = self.precision.scaler(device)
        self.forward = torch.compile(self.model) if c.compile else self.model
        warmup_lr = max(1, c.steps // 20)  # the learning rate ramps up over the first twentieth
        losses = []
        with contextlib.ExitStack() as timed:
            for i in range(c.train_steps):
                if i == c.warmup_steps:  # the timed steps begin: the GPU's clocks and energy over them
                    self.window = timed.enter_context(self.ctx.telemetry())
                for group in self.optimizer.param_groups:
                    group["lr"] = cosine_lr(i, c.steps, opts.lr, warmup_lr)
                x, y = self.batch()  # drawn outside the timed step: the loop times training, not sampling
                with self.timer.step():
                    losses.append(train_step(self.forward, self.optimizer, self.scaler, self.precision, x, y, device))
                self.ctx.step(i + 1, c.train_steps)  # steps queued: the device may still be working through them
        self.losses = torch.stack(losses).float().cpu().numpy()  # the loop's one synchronization
        # The eager module scores the held-out batches: the same weights, and no
        # recompilation for eval mode.
        self.val_loss = None
        if opts.eval_batches:
            self.val_loss = evaluate(self.model, self.shared.data, self.precision, device, opts.eval_batches,
                                     c.batch, c.seq_len, seed=self.ctx.seed)

    def applied_steps(self) -> int:
        """Optimizer steps actually taken: AdamW counts them per parameter, and a
        step GradScaler skips (inf/NaN gradients) is not counted, fused or not."""
        state = next(iter(self.optimizer.state.values()), None)
        return 0 if state is None else int(state["step"])


def _train_row(cfg: PrecisionConfig, ctx: Context, shared: Shared) -> Measurement:
    reason = PRECISIONS[cfg.base].why_not(ctx.device)
    if reason:
        raise Unsupported(reason)
    trainer = Trainer(cfg, ctx, shared)
    _check_lowered(trainer.precision, shared, cfg, ctx)
    if cfg.compile:
        torch.compiler.reset()  # a fresh compilation per row, paid in its own warm-up steps
    try:
        if ctx.device.type == "cuda":
            peak_mib = ctx.peak_memory_mib(trainer)  # the allocator's peak over the whole run
        else:
            trainer()
            peak_mib = None  # no allocator counter covers the CPU (see bench/memory.py)
        ctx.profile(trainer.step)  # --profile: a trace of a few more steps, after the timed ones
    finally:
        if cfg.compile:
            torch.compiler.reset()
    stats = trainer.timer.stats(warmup=cfg.warmup_steps)
    values = {"compiled": cfg.compile, "trained_steps": cfg.train_steps, "data": shared.describe_data(),
              "peak_mem_MiB": peak_mib, "first_step_ms": trainer.timer.samples()[0]}
    notes = ["compiled"] if cfg.compile else []
    if shared.factory is not None and shared.factory.target != cfg.model:  # an installed name: what it built
        notes.append(f"model {shared.factory.target}")
    dtype = trainer.precision.compute_dtype
    if ctx.device.type == "cpu" and cpu_has_matmul_instructions(dtype) is False:
        notes.append(f"this CPU has no {str(dtype).removeprefix('torch.')} matrix instructions: "
                     f"its products ran in ATen's generic kernels")
    if cfg.role == "reference":
        shared.reference_ms = stats.median
    values["speedup"] = metrics.speedup(shared.reference_ms, stats.median) if shared.reference_ms else None
    values.update(_rates(cfg, ctx, shared, trainer, stats.median, notes))
    values.update(_energy(cfg, trainer))
    values.update(_losses(cfg, ctx, shared, trainer, notes))
    values["note"] = "; ".join(notes)
    return Measurement(values, stats=stats)


def probe_shape(seq_len: int, rows: int = 16) -> tuple[int, int]:
    """(batch, tokens) of the dtype check's forward: a few tokens, and batch x
    tokens a multiple of `rows`, since fp8's products take only row counts
    that are multiples of 16 (impls/fp8.py)."""
    t = min(seq_len, rows)
    return rows // math.gcd(t, rows), t


def _check_lowered(precision: Precision, shared: Shared, cfg: PrecisionConfig, ctx: Context) -> None:
    """Unsupported unless this precision's products ran in its dtype, checked
    on one forward of a copy of the initial model (untimed): autocast lowers
    only the ops its device's lists name, and a row must not report fp32's
    arithmetic under another name. The same forward checks that the model
    returns (logits, loss), as training reads it."""
    device = ctx.device
    model = precision.prepare(shared.initial_model(ctx.seed).to(device))
    x = torch.zeros(probe_shape(cfg.seq_len), dtype=torch.long, device=device)
    dtypes = precision.matmul_dtypes(lambda idx: _logits_and_loss(model, idx, idx, cfg.model), x, device)
    want = precision.compute_dtype
    if want not in dtypes:
        ran = ", ".join(f"{n} in {str(d).removeprefix('torch.')}" for d, n in dtypes.items()) or "none seen"
        raise Unsupported(f"no matrix product ran in {str(want).removeprefix('torch.')} on this {device.type} "
                          f"(products: {ran}): the row would be another precision under this one's name")


def _logits_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str):
    """model(x, y), a TypeError saying what was expected unless it is (logits, loss) with a scalar loss."""
    out = model(x, y)
    loss = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        def kind(v):
            return f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

        got = f"({', '.join(map(kind, out))})" if isinstance(out, (tuple, list)) else kind(out)
        raise TypeError(f"--model {name}: forward(idx, targets) returned {got}; genbench expects (logits, loss) "
                        "with a scalar loss")
    return out


def _rates(cfg, ctx, shared: Shared, trainer: Trainer, step_ms: float, notes: list[str]) -> dict:
    """Tokens/s, achieved TFLOP/s and MFU against the calibrated peak of the
    dtype the products run in (fp8 rows: bf16's, as attention and the head stay bf16).
    The FLOPs are the model's own count, flops_per_token(seq_len) (impls/gpt.py:
    PaLM's, as bench/metrics.py has it); a model without one has no TFLOP/s nor MFU."""
    model, precision = trainer.model, trainer.precision
    n_params = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    tokens = cfg.batch * cfg.seq_len
    tokens_per_s = metrics.per_second(tokens, step_ms)
    if not hasattr(model, "flops_per_token"):
        notes.append(f"no TFLOP/s nor MFU: {type(model).__name__} has no flops_per_token(seq_len)")
        return dict(n_params=n_params, tokens_per_s=tokens_per_s)
    flops_per_token = float(model.flops_per_token(cfg.seq_len))
    share = ctx.share_of_peak(calibrate.matmul_key(precision.compute_dtype, tf32=precision.tf32),
                              functools.partial(metrics.mfu, tokens_per_s, flops_per_token))
    if share.note:
        notes.append(share.note)
    return dict(n_params=n_params, flops_per_token=flops_per_token, tokens_per_s=tokens_per_s,
                tflops=metrics.tflops(flops_per_token * tokens, step_ms), peak_tflops=share.peak, mfu=share.pct)


def _energy(cfg, trainer: Trainer) -> dict:
    """Joules per timed step and tokens per joule, where NVML measured the timed steps' energy."""
    telemetry = trainer.window.telemetry if trainer.window is not None else None
    energy = telemetry.energy_J if telemetry is not None else None
    per_step = metrics.joules_per_step(energy, cfg.train_steps - cfg.warmup_steps)
    return dict(joules_per_step=per_step,
                tokens_per_J=metrics.tokens_per_joule(cfg.batch * cfg.seq_len, per_step))


def _losses(cfg, ctx, shared: Shared, trainer: Trainer, notes: list[str]) -> dict:
    """The loss curve, validation loss, parity with the reference, the scaler."""
    curve, val = trainer.losses, trainer.val_loss
    if cfg.role == "reference" and shared.options.parity:
        parity = verdict(curve, None, None)
        finite = parity.nonfinite == 0
        shared.reference, shared.reference_val = (curve, val) if finite else (None, None)
        notes.append("parity reference" if finite else "reference diverged: no parity in this run")
    elif cfg.role == "band":
        parity = verdict(curve, shared.reference, None, window(cfg.steps))
        shared.band = parity.max_rel_diff
        shared.tolerance = tolerance(shared.band)
        if shared.band is not None:
            notes.append(f"the band: weights nudged one ulp (seed {ctx.seed + 1}), same batches")
    else:
        parity = verdict(curve, shared.reference, shared.tolerance, window(cfg.steps))
        if shared.options.parity and not parity.verdict:
            notes.append("no verdict: the reference or band run did not finish")
    scaler_on = trainer.scaler.is_enabled()
    skipped = cfg.train_steps - trainer.applied_steps() if scaler_on else None
    if skipped:
        notes.append(f"GradScaler skipped {skipped} step(s)")
    if parity.nonfinite:
        notes.append(f"{parity.nonfinite} NaN/inf loss(es)")
    ref_val = shared.reference_val if cfg.role != "reference" else None  # None with parity off
    return dict(
        loss_first=float(curve[0]),
        loss_final=float(curve[-1]),
        val_loss=val,
        val_rel_diff=metrics.relative_difference(val, ref_val) if val is not None and ref_val else None,
        max_rel_diff=parity.max_rel_diff,
        final_rel_diff=parity.final_rel_diff,
        band=shared.band,
        tolerance=shared.tolerance,
        verdict=parity.verdict,
        nonfinite=parity.nonfinite,
        skipped_steps=skipped,
        final_scale=trainer.scaler.get_scale() if scaler_on else None,
        loss_curve=format_curve(curve),
    )


# -- matmul ceilings -------------------------------------------------------------------------------


def _matmul_row(cfg: PrecisionConfig, ctx: Context) -> Measurement:
    if cfg.base == "fp8":
        return _fp8_matmul(ctx)
    reason = PRECISIONS[cfg.base].why_not(ctx.device)
    if reason:
        raise Unsupported(reason)
    rate = (ctx.peaks or {}).get(f"{cfg.base}_tflops")
    if rate is None:
        raise Unsupported("not calibrated on this device: run genbench env --calibrate")
    return Measurement({"tflops": rate, "note": "calibrated matmul rate (genbench env --calibrate)"})


def _fp8_matmul(ctx: Context) -> Measurement:
    reason = fp8.why_not(ctx.device)
    if reason:
        raise Unsupported(reason)
    n = FP8_MATMUL_N
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    a, b = (torch.randn(n, n, generator=g, device=ctx.device) for _ in range(2))
    a8, sa = fp8.quantize(a, fp8.E4M3)
    b8, sb = fp8.quantize(b, fp8.E4M3)
    b8 = b8.t()  # (n, n) column-major, as _scaled_mm wants its second operand
    stats = ctx.time(lambda: fp8.scaled_matmul(a8, b8, sa, sb, torch.bfloat16, fast_accum=True))
    return Measurement({"tflops": metrics.tflops(2.0 * n**3, stats.median),
                        "note": f"measured now: {n}x{n}x{n} torch._scaled_mm, e4m3, bf16 out"}, stats=stats)


# -- the sweep -------------------------------------------------------------------------------------


def run(cfg: PrecisionConfig, ctx: Context, shared: Shared) -> Measurement:
    if cfg.role == "matmul":
        return _matmul_row(cfg, ctx)
    return _train_row(cfg, ctx, shared)


METRICS = (
    "compiled", "trained_steps", "data", "n_params", "flops_per_token", "speedup", "tokens_per_s", "tflops",
    "peak_tflops", "joules_per_step", "tokens_per_J",
    "mfu", "peak_mem_MiB", "first_step_ms", "loss_first", "loss_final", "val_loss", "val_rel_diff", "max_rel_diff",
    "final_rel_diff", "band", "tolerance", "verdict", "nonfinite", "skipped_steps", "final_scale", "note", "loss_curve",
)

def display(opts: PrecisionOptions, device: torch.device) -> tuple[Column, ...]:
    """The terminal table (the CSV has every column): TFLOP/s when the matmul
    ceilings are shown beside the rows, tokens/s otherwise; memory on a GPU."""
    rate = Column("tflops", "TFLOP/s", "{:.3g}") if opts.matmul else Column("tokens_per_s", "tok/s", "{:,.0f}")
    memory = (Column("peak_mem_MiB", "MiB", "{:,.0f}"),) if device.type == "cuda" else ()
    return (
        Column("median_ms", "ms", "{:.4g}"),
        Column("iqr_ms", "IQR", "{:.2g}"),
        rate,
        Column("mfu", "MFU%", "{:.1f}"),
        *memory,
        # Relative differences with two significant digits: bf16 on a CPU can be
        # 3e-5 from fp32, which a percentage to two decimals would show as 0.00%.
        Column("val_rel_diff", "Δval", "{:+.2g}"),
        Column("max_rel_diff", "maxΔ", "{:.2g}"),
        Column("tolerance", "tol", "{:.2g}"),
        Column("verdict", "parity", "{}"),
    )


def sweep(opts: PrecisionOptions, data: TextData, device: torch.device) -> Sweep:
    shared = Shared(data, opts)
    configs = opts.configs()
    _, reference = opts.labels()
    return Sweep(
        suite="precision",
        configs=configs,
        run=functools.partial(run, shared=shared),
        params=("precision", "model", "steps", "batch", "seq_len"),
        metrics=METRICS,
        display=display(opts, device),
        label="precision",
        baseline=reference,
        note="note",
    )
