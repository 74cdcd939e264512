"""Compiling the flash kernels a run will launch, side by side, before it launches any.

A Triton or Gluon kernel compiles on its first launch, and the launches of a
sweep come one after another: on a cold cache `tiled`'s forward, delta, dK/dV
and dQ kernels (causal and not, Triton's and Gluon's) compile one at a time,
each a few seconds with one host core busy. Triton compiles in a thread pool
instead when the kernel's warmup() is called inside triton.AsyncCompileMode,
so every kernel of a sweep can compile at once; its compiler passes and ptxas
leave the GIL but its Python front end does not, so threads overlap only part
of each compile (the attention suite also compiles in other processes:
suites/attention.py, Ahead):

    from impls.attention import ahead
    with ahead.compiling() as pool:        # launches become compiles, in the pool
        out = flash.attention(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), do)
    pool.kernels                           # how many compiles the launches started
    # on leaving, every compile has finished: the real calls launch at once

Inside compiling() the flash kernels' launches (launch()) only compile, so
their outputs are never written: run there only to compile. A launch whose
block configuration is not chosen yet (no shipped, cached or tuned choice for
its shape key) compiles nothing, because choosing means timing the kernel on
real launches: it is left to the first real call. So is the Gluon self-check
(gluon_check), which must launch. A kernel that fails to compile is left to
its first real call too, which then reports the error.

Outside compiling(), launch(kernel, grid, ...) is kernel[grid](...).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

_pool: Pool | None = None  # the pool of the compiling() in progress


class Untuned(Exception):
    """A kernel's configuration would have to be timed first, which compiling() cannot do."""


def active() -> bool:
    """Whether launches only compile (inside compiling())."""
    return _pool is not None


def available() -> str | None:
    """None if compiling() compiles in parallel here, else why not."""
    from impls.attention import flash_triton as ft
    if ft.TRITON_ERROR is not None:
        return f"Triton is not usable: {ft.TRITON_ERROR}"
    if ft.INTERPRET:
        return "the interpreter compiles nothing"
    import triton
    if not hasattr(triton, "AsyncCompileMode"):
        return f"Triton {triton.__version__} has no AsyncCompileMode"
    return None


def cores() -> int:
    """The host cores this process may run on: the default number of compile threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs); inside compiling(), only its compilation,
    in the pool (nothing, where the configuration must be tuned first)."""
    if _pool is None:
        return kernel[grid](*args, **kwargs)
    try:
        compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    except Untuned:
        return None
    if type(compiled).__name__ == "FutureKernel":  # a compile it started, not one already done
        _pool.started.add(id(compiled))
    return compiled


def _refuse_timing(*args, **kwargs):
    raise Untuned("choosing a configuration launches the kernel")


@dataclass
class Pool:
    workers: int
    started: set = field(default_factory=set)  # the compiles launches started (ids of Triton's FutureKernels)

    @property
    def kernels(self) -> int:
        return len(self.started)


@contextmanager
def compiling(workers: int | None = None):
    """Within: the flash kernels' launches compile in a pool of `workers`
    threads (default: this process's cores) and launch nothing; on leaving,
    every compile has finished. Raises RuntimeError where available() says no."""
    global _pool
    reason = available()
    if reason is not None:
        raise RuntimeError(f"cannot compile ahead: {reason}")
    if _pool is not None:
        raise RuntimeError("compiling() is already active")
    import triton

    from impls.attention import flash_triton as ft
    pool = Pool(workers or cores())
    tuners = list(ft.AUTOTUNED.values())
    with ThreadPoolExecutor(pool.workers, thread_name_prefix="genbench-compile") as executor:
        # ignore_errors: a kernel that does not compile is reported by its first real launch.
        with triton.AsyncCompileMode(executor, ignore_errors=True):
            for tuner in tuners:  # an untuned key raises Untuned instead of timing configs
                tuner._bench = _refuse_timing
            _pool = pool
            try:
                yield pool
            finally:
                _pool = None
                for tuner in tuners:
                    del tuner._bench  # back to the class's method
