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
real launches: it is left to the first real call (inside tuning.first_configs()
the first config is taken untimed, and compiles). So is the Gluon self-check
(gluon_check), which must launch. A kernel that fails to compile is left to
its first real call too, which then reports the error.

Outside compiling(), launch(kernel, grid, ...) is kernel[grid](...).

A compile holds the GIL for much of its time, so one process's threads
overlap only part of it. spawn() starts other processes that compile into
Triton's on-disk cache, where this process's compiles then find them:

    procs = ahead.spawn("from mypkg import worker as w; w()", payloads)  # one process a payload
    ahead.wait(procs, timeout_s)           # then kills any still running
    # in each process, worker() reads its payload with ahead.payload()
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    # Inside tuning.first_configs() pruning keeps one config, which Triton's autotuner
    # still times: it is taken untimed, so it compiles (gluon_check compiles ahead so).
    from impls.attention import tuning
    if tuning.untimed():
        return [0.0, 0.0, 0.0]
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


def spawn(program: str, payloads: list) -> list[subprocess.Popen]:
    """One Python process a payload, each running `program` (Python source) with its payload
    pickled on stdin (read it with payload()) and genbench's root on its import path; their
    output is dropped. Any still running when this process exits is killed."""
    root = str(Path(__file__).resolve().parents[2])  # where `impls` imports from, wherever the run started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    procs = []
    for item in payloads:
        proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        proc.stdin.write(pickle.dumps(item))
        proc.stdin.close()
        procs.append(proc)
    atexit.register(stop, procs)  # a run that ends before wait() leaves none behind
    return procs


def payload():
    """In a process spawn() started: its payload."""
    return pickle.load(sys.stdin.buffer)


def wait(procs: list, timeout_s: float) -> None:
    """Wait for procs, at most timeout_s in all, then stop() those still running."""
    deadline = time.perf_counter() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            pass
    stop(procs)


def stop(procs: list) -> None:
    """Kill those of procs still running, and reap them."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
