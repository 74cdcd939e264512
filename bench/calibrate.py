"""Measured ceilings of this device, for "% of peak" and MFU.

`genbench env --calibrate` times a large matrix product in each of fp32 (IEEE),
tf32, fp16 and bf16, and a large device-to-device copy, with the same timer as
every benchmark. Each peak is the best of several timed rounds, each round the
median of its repetitions after warm-up: other work on the machine can only
slow a round down, so the fastest round is the nearest to what the device does.
Nothing here comes from a datasheet: on a GPU the datasheet figure is a lead,
the measured one is what code can reach, often a fifth below it.

The peaks are cached in the genbench cache, one file per device and software
(`peaks/cuda-<gpu>-driver-<v>-torch-<v>-cuda-<v>.json`; on a CPU its model and
torch), and the file records them: `load` refuses a file recorded for other
versions, and a corrupt one, by raising `Unusable`, and the caller measures
again. Nothing here prints: `on_step(name)` says what is being measured.

A run takes every share of a peak through one `Peaks` (`Peaks.share`). A share
above 100% proves the peak wrong, so that peak is measured again, once per run,
and a higher result replaces the cached one; a share still above the
re-measured peak is not reported (None), and a note says why.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import metrics, timing
from bench.env import cache_dir, device_name, nvidia_driver

# What is measured, by the key it is stored under.
RATES = {
    "fp32_tflops": "fp32 matmul",
    "tf32_tflops": "tf32 matmul",
    "fp16_tflops": "fp16 matmul",
    "bf16_tflops": "bf16 matmul",
    "copy_GBps": "copy bandwidth",
}
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# Square matmul sizes: large enough to fill the device, small enough to take
# seconds, not minutes, in all four precisions (x86 CPUs without fp16/bf16
# matrix instructions run those at about a thousandth of fp32 speed, hence the
# smaller size there).
_MATMUL_N = {"cuda": {}, "cpu": {"fp16": 256, "bf16": 256}}
_MATMUL_N_DEFAULT = {"cuda": 8192, "cpu": 1024}
# Timing budgets (ms) of one round. Only the first round warms up (a GPU's
# clocks need a longer warm-up to settle); the others follow it at once.
_BUDGETS = {"cuda": (100.0, 200.0), "cpu": (10.0, 50.0)}
ROUNDS = {"cuda": 5, "cpu": 3}
_COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}


class Unusable(Exception):
    """A cached peaks file that cannot be used (corrupt, or measured with other
    versions); the message says which file and why."""


def matmul_key(dtype: torch.dtype, tf32: bool = False) -> str:
    """The peak that bounds matrix products done in `dtype`."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "tf32" if tf32 else "fp32")
    return f"{name}_tflops"


def _unit(key: str) -> str:
    return "GB/s" if key.endswith("GBps") else "TFLOP/s"


def identity(device: torch.device) -> dict:
    """What a peak holds for: the device, and the software that drove it."""
    if device.type != "cuda":
        return {"device_name": device_name(device), "torch": torch.__version__}
    return {"device_name": device_name(device), "driver": nvidia_driver(), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def cache_path(device: torch.device) -> Path:
    ident = identity(device)
    parts = [device.type, ident["device_name"], *(f"{k}-{v}" for k, v in ident.items() if k != "device_name")]
    slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(p)).strip("-").lower() for p in parts)
    return cache_dir() / "peaks" / f"{slug}.json"


def _best(key: str, device: torch.device) -> float | None:
    """The best rate of ROUNDS timed rounds; None where the device has no such mode."""
    if key == "tf32_tflops" and device.type != "cuda":
        return None  # TF32 is a tensor-core mode of NVIDIA GPUs
    # Its own generator: calibrating must not move the global seed a run's data come from.
    g = torch.Generator(device=device).manual_seed(0)
    if key == "copy_GBps":
        nbytes = _COPY_BYTES[device.type]
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_(generator=g)
        dst = torch.empty_like(src)
        fn = functools.partial(dst.copy_, src)

        def rate(ms: float) -> float:
            return 2 * nbytes / (ms * 1e-3) / 1e9  # a copy reads and writes every byte once
    else:
        precision = key.removesuffix("_tflops")
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        n = _MATMUL_N[device.type].get(precision, _MATMUL_N_DEFAULT[device.type])
        # Random data: a matmul on zeros runs measurably faster (see the device notes).
        a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
        fn = functools.partial(torch.matmul, a, b)

        def rate(ms: float) -> float:
            return metrics.tflops(2.0 * n**3, ms)
    warmup_ms, rep_ms = _BUDGETS[device.type]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = key == "tf32_tflops"
    try:
        medians = [timing.measure(fn, device=device, warmup_ms=warmup_ms if i == 0 else 0.0, rep_ms=rep_ms).median
                   for i in range(ROUNDS[device.type])]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return rate(min(medians))


def _save(device: torch.device, values: dict) -> None:
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file, nor two writers' halves


def calibrate(device: torch.device, on_step: Callable[[str], None] | None = None) -> dict:
    """Measure every peak now (seconds) and cache them; `on_step(name)` before each."""
    values = {}
    for key, name in RATES.items():
        if on_step is not None:
            on_step(name)
        values[key] = _best(key, device)
    values.update(identity(device), rounds=ROUNDS[device.type])
    _save(device, values)
    return values


def _problem(values, ident: dict) -> str | None:
    """Why a cached file's content cannot be used, or None."""
    if not isinstance(values, dict):
        return "hold no peaks"
    for key in RATES:
        v = values.get(key)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if key not in values or not (number or (v is None and key == "tf32_tflops")):
            return f"hold no valid {key} ({v!r})"
    differing = [f"{k} {values.get(k)!r} (now {v!r})" for k, v in ident.items() if values.get(k) != v]
    return f"were measured with {', '.join(differing)}" if differing else None


def load(device: torch.device) -> dict | None:
    """The cached peaks of this device and software; None when never calibrated.
    Raises Unusable for a file that is corrupt or recorded for other versions."""
    path = cache_path(device)
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unusable(f"the cached peaks {path} cannot be read ({type(exc).__name__}: {exc})") from None
    problem = _problem(values, identity(device))
    if problem:
        raise Unusable(f"the cached peaks {path} {problem}")
    return values


def remeasure(device: torch.device, key: str, on_step: Callable[[str], None] | None = None) -> float | None:
    """Measure one peak again (best of several rounds); a higher result
    replaces the cached one."""
    if on_step is not None:
        on_step(RATES[key])
    new = _best(key, device)
    try:
        cached = load(device)
    except Unusable:
        cached = None  # the next run measures everything again
    if cached is not None and new is not None and new > (cached[key] or 0.0):
        _save(device, {**cached, key: new})
    return new


@dataclass(frozen=True)
class Share:
    """A share of a peak in percent, never above 100 (None without a peak, or
    when the peak proved unreliable), the peak it was taken against, and a
    note when the peak had to be measured again."""

    pct: float | None = None
    peak: float | None = None
    note: str = ""


class Peaks:
    """The peaks one run takes its shares against.

    `share(key, of)` returns `of(peak)`, a share in percent computed by a
    formula in bench/metrics.py. A share above 100% proves the peak wrong (a
    calibration taken while the machine was busy): the first one re-measures
    that peak (once per run for each peak) and takes the higher of the two;
    a share still above it is left empty with a note, never reported. Each
    such event is kept in `notes`, for the CLI to print under the tables.
    `values` is updated in place, so what holds it sees the re-measured peaks.
    """

    def __init__(self, device: torch.device, values: dict | None,
                 measure: Callable[[str], float | None] | None = None):
        self.device = device
        self.values = dict(values or {})
        self._measure = measure or functools.partial(remeasure, device)
        self._remeasured: set[str] = set()
        self.notes: list[str] = []

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _remeasure(self, key: str) -> tuple[float, str]:
        self._remeasured.add(key)
        old = self.values[key]
        new = self._measure(key)
        name, unit = RATES[key], _unit(key)
        # Both are best-of-several: a busy moment can only have lowered one.
        peak = max(old, new or 0.0)
        self.values[key] = peak
        if peak > old:
            note = (f"a rate above the cached {name} peak ({old:.3g} {unit}): measured again, {peak:.3g} {unit}; "
                    f"rows before this one were taken against {old:.3g}")
        else:
            again = "nothing" if new is None else f"{new:.3g}"
            note = f"a rate above the cached {name} peak ({old:.3g} {unit}): measured again, no higher ({again})"
        self._note(note)
        return peak, note

    def share(self, key: str, of: Callable[[float], float | None]) -> Share:
        peak = self.values.get(key)
        if not peak:
            return Share()
        pct, note = of(peak), ""
        if pct is not None and pct > 100 and key not in self._remeasured:
            peak, note = self._remeasure(key)
            pct = of(peak)
        if pct is None or pct <= 100:
            return Share(pct, peak, note)
        unreliable = (f"above the re-measured {RATES[key]} peak {peak:.3g} {_unit(key)}: the peak measurement is "
                      "unreliable on this machine, no share given")
        self._note(unreliable)
        return Share(None, peak, "; ".join(filter(None, [note, unreliable])))
