"""All of genbench's timing: `measure(fn)` returns the raw samples of many
repetitions of `fn`, after a warm-up that is discarded.

Modelled on `triton.testing.do_bench`:
- warm-up and repetitions are given as time budgets (ms) and turned into counts
  from a first estimate, so a 10 us kernel and a 2 s training step both get a
  sensible number of repetitions;
- on CUDA each repetition is timed by its own pair of CUDA events, and the L2
  cache is flushed (a buffer larger than L2 is zeroed) before each one, outside
  the timed window, so a kernel never finds its inputs left warm in L2 by the
  previous repetition;
- on CPU the same budgets apply, timed with `time.perf_counter` around a
  synchronous call. CPU caches are not flushed: the inputs of one repetition
  are usually warm for the next, which is what a loop on a CPU sees too.

Usage:
    stats = measure(lambda: attention(q, k, v), device=torch.device("cuda"))
    stats.median, stats.iqr, stats.samples
    ours, theirs = measure_interleaved([f, g], device=..., rounds=10)   # in turns, for a steadier ratio
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Callable, Sequence

import torch

from bench.stats import Stats

# Floor on repetitions so that the median and IQR mean something even when one
# call outlasts the whole budget (a slow CPU configuration).
MIN_REPS = 5
MAX_REPS = 10_000
# do_bench flushes with 256 MB; we take at least twice the L2 so the flush
# stays sufficient on parts with a larger cache.
_MIN_FLUSH_BYTES = 256 * 2**20


def _flush_buffer(device: torch.device) -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return torch.empty(max(_MIN_FLUSH_BYTES, 2 * l2), dtype=torch.int8, device=device)


def _counts(estimate_ms: float, warmup_ms: float, rep_ms: float) -> tuple[int, int]:
    estimate_ms = max(estimate_ms, 1e-4)
    n_warmup = max(1, math.ceil(warmup_ms / estimate_ms))
    n_rep = min(MAX_REPS, max(MIN_REPS, math.ceil(rep_ms / estimate_ms)))
    return n_warmup, n_rep


def _timed_cuda(fn, n: int, cache: torch.Tensor | None) -> list[float]:
    """n repetitions of fn, each between its own pair of CUDA events, L2 flushed before each (outside them)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        if cache is not None:
            cache.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _timed_cpu(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _warm_cuda(fn, device, warmup_ms, rep_ms, cache) -> int:
    """First call (compilation, autotuning, handle creation), an estimate, then the warm-up; the repetitions due."""
    fn()
    torch.cuda.synchronize(device)
    estimate = sorted(_timed_cuda(fn, 3, cache))[1]
    n_warmup, n_rep = _counts(estimate, warmup_ms, rep_ms)
    for _ in range(n_warmup):
        fn()
    return n_rep


def _warm_cpu(fn, warmup_ms, rep_ms) -> int:
    first = _timed_cpu(fn, 1)[0]  # includes one-off costs; discarded
    estimate = first if first > rep_ms else min(_timed_cpu(fn, 2))
    n_warmup, n_rep = _counts(estimate, warmup_ms, rep_ms)
    if estimate <= warmup_ms:  # past it, the first calls already warmed up a slow configuration
        _timed_cpu(fn, n_warmup)
    return n_rep


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    flush_l2: bool = True,
    window: contextlib.AbstractContextManager | None = None,
) -> Stats:
    """Time `fn` repeatedly; return the samples (ms) of the timed repetitions.
    `window`, if given, is entered around the timed repetitions only, after
    the warm-up (the telemetry sampler: bench/telemetry.py)."""
    assert warmup_ms >= 0 and rep_ms > 0, "budgets must be positive"
    return measure_interleaved([fn], device=device, rounds=1, warmup_ms=warmup_ms, rep_ms=rep_ms,
                               flush_l2=flush_l2, window=window)[0]


def measure_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    rounds: int,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    flush_l2: bool = True,
    window: contextlib.AbstractContextManager | None = None,
) -> list[Stats]:
    """Time several callables in turns: each is warmed up as `measure` would,
    then `rounds` rounds each run every callable for its share of the
    repetitions `measure` would give it, and its samples are pooled. Callables
    timed one after the other see different stretches of a GPU's clocks
    (power capping moves them within seconds); in turns, each sees the same
    mix, so their ratio holds steadier. `window` is entered around the rounds.

    With more than one round each turn runs one more repetition than it
    keeps: its first. That one starts on an idle GPU, just after the previous
    turn's synchronize, so it waits on the host launching it, where the later
    ones are launched while the one before runs; with two repetitions a turn
    it was half the samples and moved a ratio (docs/measurements.md,
    2026-12-07, session 20)."""
    assert rounds >= 1, "at least one round"
    assert warmup_ms >= 0 and rep_ms > 0, "budgets must be positive"
    window = window if window is not None else contextlib.nullcontext()
    if device.type == "cuda":
        cache = _flush_buffer(device) if flush_l2 else None
        place = torch.cuda.device(device)
        warm = functools.partial(_warm_cuda, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms, cache=cache)
        timed = functools.partial(_timed_cuda, cache=cache)
    else:
        place = contextlib.nullcontext()
        warm = functools.partial(_warm_cpu, warmup_ms=warmup_ms, rep_ms=rep_ms)
        timed = _timed_cpu
    samples: list[list[float]] = [[] for _ in fns]
    first = 1 if rounds > 1 else 0  # a turn's first repetition, dropped (above); one turn follows its warm-up
    with place:
        reps = [warm(fn) for fn in fns]
        with window:
            for _ in range(rounds):
                for fn, n, kept in zip(fns, reps, samples):
                    kept += timed(fn, math.ceil(n / rounds) + first)[first:]
    return [Stats.of(kept) for kept in samples]


class StepTimer:
    """Times each step of a loop that cannot be rerun on the same inputs, such
    as a training run, where every step changes the weights.

        timer = StepTimer(device)
        for step in range(steps):
            with timer.step():
                train_step()
        stats = timer.stats(warmup=5)   # the first 5 steps discarded

    On CUDA each step gets its own event pair (read once, at the end, so the
    loop never waits on the device); on CPU, perf_counter around the step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_ms: list[float] = []

    @contextlib.contextmanager
    def step(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms.append((time.perf_counter() - t0) * 1e3)

    def samples(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in self._events]
        return list(self._cpu_ms)

    def stats(self, warmup: int) -> Stats:
        """Statistics of the steps after the first `warmup` (compilation, allocator growth)."""
        samples = self.samples()
        assert len(samples) > warmup, f"{len(samples)} steps timed, {warmup} of them warm-up: nothing left"
        return Stats.of(samples[warmup:])


def do_bench_median(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """Triton's own timer on the same callable, for cross-checking ours."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
