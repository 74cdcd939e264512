"""Measured ceilings of this device, for "% of peak" and MFU.

`genbench env --calibrate` times a large matrix product in each of fp32 (IEEE),
tf32, fp16 and bf16, and a large device-to-device copy, with the same timer as
every benchmark; the result is cached per device under the genbench cache
(`peaks/<device>.json`) and read back by the suites. Nothing here comes from a
datasheet: on a GPU the datasheet figure is a lead, the measured one is what
code can reach (on our H200, about 790 TFLOP/s bf16 against 990 on paper).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bench import metrics, timing
from bench.env import cache_dir, device_name

# Square matmul sizes: large enough to fill the device, small enough to take
# seconds, not minutes, in all four precisions (CPU fp16 matmuls run at about
# a thousandth of fp32 speed on x86, hence the smaller size there).
_MATMUL_N = {"cuda": {}, "cpu": {"fp16": 256}}
_MATMUL_N_DEFAULT = {"cuda": 8192, "cpu": 1024}
# Timing budgets (ms): a GPU's clocks need a longer warm-up to settle.
_BUDGETS = {"cuda": (100.0, 500.0), "cpu": (10.0, 50.0)}
_COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


def _path(device: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    suffix = f"-{torch.cuda.get_device_capability(device)[0]}x" if device.type == "cuda" else ""
    return cache_dir() / "peaks" / f"{device.type}-{slug}{suffix}.json"


def _matmul_tflops(precision: str, device: torch.device, warmup_ms: float, rep_ms: float) -> float | None:
    if precision == "tf32" and device.type != "cuda":
        return None  # TF32 is a tensor-core mode of NVIDIA GPUs
    dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    n = _MATMUL_N[device.type].get(precision, _MATMUL_N_DEFAULT[device.type])
    # Random data: a matmul on zeros runs measurably faster (see the device notes).
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        stats = timing.measure(lambda: a @ b, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return metrics.tflops(2.0 * n**3, stats.median)


def _copy_GBps(device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    nbytes = _COPY_BYTES[device.type]
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stats = timing.measure(lambda: dst.copy_(src), device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    # A copy reads and writes every byte once.
    return 2 * nbytes / (stats.median * 1e-3) / 1e9


def calibrate(device: torch.device) -> dict:
    warmup_ms, rep_ms = _BUDGETS[device.type]
    peaks = {f"{p}_tflops": _matmul_tflops(p, device, warmup_ms, rep_ms) for p in PRECISIONS}
    peaks["copy_GBps"] = _copy_GBps(device, warmup_ms, rep_ms)
    peaks["device_name"] = device_name(device)
    peaks["torch"] = torch.__version__
    path = _path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(peaks, indent=2))
    return peaks


def load(device: torch.device) -> dict | None:
    """The cached peaks of this device, or None when it was never calibrated."""
    path = _path(device)
    return json.loads(path.read_text()) if path.exists() else None


def peaks(device: torch.device) -> dict:
    """Cached peaks, calibrating once (a few seconds) if there are none yet."""
    return load(device) or calibrate(device)


def matmul_peak(peaks: dict | None, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The measured matmul rate that bounds work done in `dtype`."""
    if not peaks:
        return None
    key = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "tf32" if tf32 else "fp32")
    return peaks.get(f"{key}_tflops")
