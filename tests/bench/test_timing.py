import time

import pytest
import torch

from bench import timing
from tests.conftest import requires_cuda

CPU = torch.device("cpu")


def test_counts_from_estimate():
    # 2 ms calls: 25 ms of warm-up is 13 calls, 100 ms of timing 50 calls.
    assert timing._counts(2.0, 25.0, 100.0) == (13, 50)
    # A call slower than the budget still gets the floor of repetitions.
    assert timing._counts(500.0, 25.0, 100.0) == (1, timing.MIN_REPS)
    assert timing._counts(1e-6, 1.0, 1e9)[1] == timing.MAX_REPS


def test_cpu_samples_time_the_call():
    stats = timing.measure(lambda: time.sleep(0.004), device=CPU, warmup_ms=5, rep_ms=60)
    assert 4.0 <= stats.median < 12.0
    assert timing.MIN_REPS <= stats.n <= 16  # about 60 ms / 4 ms
    assert len(stats.samples) == stats.n


def test_first_calls_are_discarded():
    calls = []

    def fn():
        time.sleep(0.2 if not calls else 0.002)  # a slow first call, like a compile
        calls.append(1)

    stats = timing.measure(fn, device=CPU, warmup_ms=5, rep_ms=20)
    assert stats.max < 100  # the 200 ms call is not among the samples
    assert len(calls) > stats.n  # and some calls were not timed


def test_slow_call_gets_minimum_repetitions():
    stats = timing.measure(lambda: time.sleep(0.03), device=CPU, warmup_ms=1, rep_ms=1)
    assert stats.n == timing.MIN_REPS


@requires_cuda
@pytest.mark.gpu
def test_agrees_with_triton_do_bench_on_sdpa_8k():
    import torch.nn.functional as F

    q = torch.randn(2, 16, 8192, 128, device="cuda", dtype=torch.bfloat16)
    fn = lambda: F.scaled_dot_product_attention(q, q, q)  # noqa: E731
    # Interleaved rounds: a power-capped GPU's clock wanders by several percent
    # over seconds (seen: 1695 to 1980 MHz within one sweep on an H100), which
    # two back-to-back measurements would read as a disagreement.
    ours, theirs = [], []
    for _ in range(3):
        ours.append(timing.measure(fn, device=torch.device("cuda"), warmup_ms=50, rep_ms=200).median)
        theirs.append(timing.do_bench_median(fn, 50, 200))
    ours, theirs = sorted(ours)[1], sorted(theirs)[1]
    print(f"genbench median {ours:.4f} ms, triton do_bench median {theirs:.4f} ms")
    assert abs(ours / theirs - 1) < 0.03


class Window:
    """A timing window that notes how many calls had been made when it opened and when it closed."""

    def __init__(self, calls: list):
        self.calls, self.marks = calls, []

    def __enter__(self):
        self.marks.append(len(self.calls))

    def __exit__(self, *exc):
        self.marks.append(len(self.calls))


def test_interleaved_callables_take_turns_and_each_gets_its_repetitions():
    calls = []

    def short():
        calls.append("short")
        time.sleep(0.002)

    def long():
        calls.append("long")
        time.sleep(0.004)

    window = Window(calls)
    stats = timing.measure_interleaved([short, long], device=CPU, rounds=4, warmup_ms=1, rep_ms=40, window=window)
    timed = calls[window.marks[0]:]
    turns = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    assert turns == ["short", "long"] * 4  # four rounds, each running both
    assert [s.n for s in stats] == [timed.count("short") - 4, timed.count("long") - 4]  # each turn's first dropped
    assert all(s.n >= timing.MIN_REPS and s.n % 4 == 0 for s in stats)
    assert stats[1].n < stats[0].n  # each its own share of the budget
    assert stats[0].median < stats[1].median


def test_interleaved_drops_each_turns_first_repetition():
    # A callable whose first call after the other one ran is slow, as the first launch of a turn is on a GPU
    # (idle after the last turn's synchronize): with two repetitions a turn, half its samples, and the median
    # between the two levels, if that call were kept.
    last = []

    def make(name):
        def fn():
            time.sleep(0.012 if last[-1:] != [name] else 0.002)
            last.append(name)
        return fn

    stats = timing.measure_interleaved([make("a"), make("b")], device=CPU, rounds=5, warmup_ms=1, rep_ms=20)
    assert all(s.n == 5 * 2 for s in stats), [s.n for s in stats]  # two kept a turn
    assert all(s.max < 8 for s in stats), [s.max for s in stats]  # no slow first call among them


@requires_cuda
@pytest.mark.gpu
def test_interleaved_medians_agree_with_triton_do_bench():
    import torch.nn.functional as F

    q = torch.randn(2, 16, 8192, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    long, short = (lambda: F.scaled_dot_product_attention(q, q, q)), (lambda: F.scaled_dot_product_attention(q, k, k))
    ours = timing.measure_interleaved([long, short], device=torch.device("cuda"), rounds=5, warmup_ms=50, rep_ms=200)
    theirs = [timing.do_bench_median(fn, 50, 200) for fn in (long, short)]
    print(f"interleaved medians {[round(s.median, 4) for s in ours]} ms, do_bench {[round(t, 4) for t in theirs]} ms")
    assert all(abs(s.median / t - 1) < 0.05 for s, t in zip(ours, theirs))
    assert ours[0].median > ours[1].median


def test_window_holds_the_timed_repetitions_only():
    calls = []
    window = Window(calls)
    stats = timing.measure(lambda: calls.append(1), device=CPU, warmup_ms=1, rep_ms=2, window=window)
    start, end = window.marks
    assert start > 0  # the first call and the warm-up ran before the window opened
    assert end - start == stats.n and end == len(calls)  # every timed repetition, and nothing else, inside


def test_step_timer_discards_warmup_steps():
    timer = timing.StepTimer(CPU)
    for i in range(6):
        with timer.step():
            time.sleep(0.05 if i < 2 else 0.002)
    assert len(timer.samples()) == 6
    stats = timer.stats(warmup=2)
    assert stats.n == 4 and stats.max < 40
    with pytest.raises(AssertionError):
        timer.stats(warmup=6)
