"""Shipped autotuning choices for the flash kernels, so that a first run does not tune.

Autotuning the Triton and Gluon kernels compiles and times every block
configuration of every kernel for each new shape key, which is most of a cold
`genbench attention` run on a Hopper GPU. The choices the tuner made on one GPU
architecture and Triton release are shipped as data under `tuned/`, one file per
(architecture, Triton version):

    tuned/sm90-triton3.6.0.json
        {"arch": "sm90", "triton": "3.6.0", "gpu": "NVIDIA H100 80GB HBM3",
         "triton_kernels": {"_fwd_kernel": {"(8192, 128, False, False, 'torch.bfloat16', ...)": CONFIG}},
         "gluon": {"fwd": {"(8192, 128, False, 'torch.bfloat16')": [128, 128, 2, "ws"]}}}

`seed(device)` loads the matching file once per process and hands each choice to
the kernel's tuner as if it had been timed here: triton.autotune's per-key cache
and flash_gluon's Tuner. A choice is used only if it is still one of the
kernel's configs; a shape key not in the file is tuned as before, and
`retune()` (the attention suite's `--retune`) ignores the shipped file and the
on-disk caches so that every key is timed again on this machine.

The files are written by `tools/tune_attention.py` on the GPU they describe.
"""

from __future__ import annotations

import ast
import functools
import json
from contextlib import contextmanager
from pathlib import Path

import torch

FOLDER = Path(__file__).with_name("tuned")
_seeded: set[tuple[str, str]] = set()  # (device, "triton" | "gluon") already seeded in this process
_retune = False
_untimed = False  # inside first_configs()


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def path_for(device: torch.device, triton_version: str) -> Path:
    return FOLDER / f"{arch(device)}-triton{triton_version}.json"


def config_record(config) -> dict:
    """A triton.Config as plain data."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "maxnreg": getattr(config, "maxnreg", None)}


def _matching(configs, record: dict):
    """The config of `configs` that `record` describes, or None when the list no longer has it."""
    for c in configs:
        if config_record(c) == record:
            return c
    return None


def retune() -> None:
    """Time every configuration again on this machine: no shipped choices, no cached ones."""
    global _retune
    _retune = True
    from impls.attention import flash_triton
    for kernel in flash_triton.AUTOTUNED.values():
        kernel.cache.clear()
        kernel.cache_results = False  # not read back from Triton's disk cache either
    fg = _gluon()
    if fg is not None:
        for tuner in fg.TUNERS.values():
            tuner.forget()


@contextmanager
def first_configs():
    """Within: every autotuned flash kernel takes, untimed, the first config its
    pruning keeps (Gluon's tuners their first config), where no choice is known
    yet. For checks of what the kernels compute, which any config computes
    alike: tuning a new shape key compiles every config. Choices made within
    are forgotten on leaving."""
    global _untimed
    if _untimed:  # nested (gluon_check inside a test's): the outer one restores
        yield
        return
    from impls.attention import flash_triton
    kernels = list(flash_triton.AUTOTUNED.values())
    known = [set(kernel.cache) for kernel in kernels]
    for kernel in kernels:
        kernel.prune_configs = functools.partial(_first, kernel.prune_configs)
    _untimed = True
    seeded = set(_seeded)
    try:
        yield
    finally:
        for kernel, keys in zip(kernels, known):
            del kernel.prune_configs  # back to the class's method
            for key in set(kernel.cache) - keys:
                del kernel.cache[key]
        _seeded.intersection_update(seeded)  # choices shipped within went too: seed() hands them over again
        _untimed = False


def _first(prune, kwargs):
    return prune(kwargs)[:1]


def untimed() -> bool:
    """Whether the tuners take their first config untimed (inside first_configs())."""
    return _untimed


def _gluon():
    from impls.attention import flash
    return flash.loaded_gluon()


def _load(device: torch.device) -> dict:
    import triton

    path = path_for(device, triton.__version__)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # a damaged file only costs the tuning it would have saved


def seed(device: torch.device) -> None:
    """Hand the shipped choices for this device and Triton to the kernels' tuners:
    the Triton kernels' once per process and device, flash_gluon's once it is
    imported. Nothing on CPU, without a file, or after retune()."""
    if _retune or device.type != "cuda":
        return
    from impls.attention import flash_triton
    fg = _gluon()
    todo = [part for part in ("triton", "gluon") if (str(device), part) not in _seeded
            and (part == "triton" or fg is not None)]
    if not todo:
        return
    data = _load(device)
    _seeded.update((str(device), part) for part in todo)
    if "triton" in todo:
        for name, choices in data.get("triton_kernels", {}).items():
            kernel = flash_triton.AUTOTUNED.get(name)
            for text, record in (choices.items() if kernel is not None else ()):
                config = _matching(kernel.configs, record)
                if config is not None:
                    kernel.cache.setdefault(ast.literal_eval(text), config)
    if "gluon" in todo:
        gpu = torch.cuda.get_device_name(device)
        for name, choices in data.get("gluon", {}).items():
            tuner = fg.TUNERS.get(name)
            for text, config in (choices.items() if tuner is not None else ()):
                tuner.prefer(ast.literal_eval(text), tuple(config), gpu)
