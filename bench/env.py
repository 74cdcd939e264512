"""What machine and software a run happened on, and where genbench keeps its cache.

`cache_dir()` is the single place that decides where built artefacts live; the
harness and the suites pass it down to impls/ (e.g. `load_data(config, cache_dir())`).

`collect(...)` returns the dictionary written as each run's JSON sidecar; the
`compare` command reads it back to warn when two runs differ in hardware or
software. `resolve_device` turns `--device auto|cuda|cpu` into a torch.device
or a clear BadInput.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import bench
from bench import telemetry
from bench.errors import BadInput

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _cache_location() -> tuple[Path, str]:
    """The cache folder and the variable that chose it."""
    if os.environ.get("GENBENCH_CACHE"):
        return Path(os.environ["GENBENCH_CACHE"]), "$GENBENCH_CACHE"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "genbench", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "genbench", "$HOME"


_WRITABLE: set[Path] = set()  # folders already found writable by this process


def cache_dir() -> Path:
    """The one folder genbench keeps what it builds in (calibrated peaks, tokenized
    corpora, trained checkpoints), created if missing: $GENBENCH_CACHE, else
    $XDG_CACHE_HOME/genbench, else ~/.cache/genbench. An empty variable counts as unset.

    The first call for a folder checks that a file can be written in it (a
    read-only folder, or a path through a file, fails here and not in the
    middle of a run), raising BadInput that says what to change. The CLI calls
    it before the first configuration runs."""
    path, source = _cache_location()
    if path in _WRITABLE:
        return path
    fix = ("unset GENBENCH_CACHE or point it at a writable folder" if source == "$GENBENCH_CACHE"
           else "set GENBENCH_CACHE to a writable folder")
    if path.exists() and not path.is_dir():
        raise BadInput(f"the genbench cache {path} (from {source}) is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Permission bits say nothing for root, and not all of a read-only mount: write a file.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise BadInput(f"the genbench cache {path} (from {source}) cannot be written "
                       f"({exc.strerror or type(exc).__name__}): {fix}") from None
    _WRITABLE.add(path)
    return path


def resolve_device(name: str) -> torch.device:
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {name}: no CUDA device is visible here (try --device cpu)")
        try:
            return torch.device(name)
        except RuntimeError:  # cuda:x, cudaa
            raise BadInput(f"--device must be auto, cuda, cuda:N or cpu, not {name!r}") from None
    raise BadInput(f"--device must be auto, cuda, cuda:N or cpu, not {name!r}")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        cap = torch.cuda.get_device_capability(device)
        raise BadInput(f"--dtype bf16: {torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) has no native bf16")
    return DTYPES[name]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def ptxas(device: torch.device | None) -> str | None:
    """The release of the ptxas that Triton assembles `device`'s kernels with ("12.8", "13.4"), after any
    TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH; None off CUDA or where Triton does not say.

    The assembler is the last compiler of every Triton kernel, and releases of it allocate registers
    differently: Triton 3.9 assembles Hopper kernels with CUDA 13's where 3.8 used CUDA 12's.
    """
    if device is None or device.type != "cuda":
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        major, minor = torch.cuda.get_device_capability(device)
        return get_ptxas(major * 10 + minor).version
    except Exception:  # noqa: BLE001 - no Triton, or one without this function: not known
        return None


# Environment variables that change what the libraries under a run compile or choose.
SETTING_PREFIXES = ("GENBENCH_", "TRITON_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "CUDA_", "CUBLAS", "CUDNN_",
                    "NCCL_", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS")


def settings() -> dict[str, str]:
    """The environment variables set for this run that can change its numbers (SETTING_PREFIXES)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SETTING_PREFIXES)}


def _git_commit() -> str | None:
    """HEAD of the project's checkout (with -dirty for local changes), or
    $GENBENCH_GIT_COMMIT for a copy without .git (a CI artifact, an export)."""
    if not (PROJECT_ROOT / ".git").exists() or not shutil.which("git"):
        return os.environ.get("GENBENCH_GIT_COMMIT")
    try:
        rev = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) or None


def _command_line() -> str:
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = "python -m bench"
    return " ".join([program, *sys.argv[1:]])


@functools.cache  # a process runs on one driver; nvidia-smi takes a while to answer
def nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def collect(device: torch.device | None = None, seed: int | None = None) -> dict:
    """The environment of a run, for its JSON sidecar."""
    cuda = torch.cuda.is_available()
    info = {
        "genbench": bench.__version__,
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "command_line": _command_line(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "device": str(device) if device is not None else None,
        "device_name": device_name(device) if device is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "ptxas": ptxas(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "driver": nvidia_driver(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        **telemetry.device_info(device),  # clocks_locked, max_sm_clock_MHz, power_limit_W (NVML; None on a CPU)
        "settings": settings(),
    }
    return info
