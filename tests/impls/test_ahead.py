"""Tests for impls/attention/ahead.py, compiling the flash kernels side by side before a sweep launches them.

Compiling needs a GPU, so here the kernels are stand-ins: these tests check
that inside compiling() a launch becomes a warmup run under Triton's
AsyncCompileMode, that nothing is timed or launched for a configuration not
chosen yet (autotuner, Gluon tuner, Gluon self-check), that everything is put
back on leaving, and the attention suite's compile_ahead() driver. On a
Hopper GPU the real thing is the cold `genbench attention` run, whose first
line says how many kernels compiled and how long it took.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls.attention import ahead, gluon_check, tuning  # noqa: E402
from impls.attention import flash_triton as ft  # noqa: E402

triton = pytest.importorskip("triton")
needs_async = pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"), reason="Triton without AsyncCompileMode")


class FutureKernel:
    """Named as Triton's placeholder for a compile in progress, which is what ahead counts."""


class FakeKernel:
    """Records how it was launched or compiled; `arg_names` and `fn` as triton.autotune wants them."""

    arg_names = ["x", "n"]

    def __init__(self):
        self.calls = []
        self.fn = lambda x, n: None  # autotune walks .fn down to a plain function

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        from triton.runtime import _async_compile
        self.calls.append({"grid": grid, "warmup": warmup, "async": _async_compile.active_mode.get() is not None,
                           **kwargs})
        if warmup:
            self.future = getattr(self, "future", FutureKernel())  # one compile per kernel, as Triton's cache keeps
            return self.future
        return "launched"


@pytest.fixture
def can_compile(monkeypatch):
    """ahead.available() says yes, as on a GPU; one stand-in autotuned kernel with two configs."""
    monkeypatch.setattr(ahead, "available", lambda: None)
    inner = FakeKernel()
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])(inner)
    monkeypatch.setattr(ft, "AUTOTUNED", {"fake": tuned})
    return inner, tuned


def test_outside_compiling_a_launch_is_the_kernels_launch():
    kernel = FakeKernel()
    assert ahead.launch(kernel, (4, 2), 1, n=8) == "launched"
    assert kernel.calls == [{"grid": (4, 2), "warmup": False, "async": False, "n": 8}]
    assert not ahead.active()


@needs_async
def test_inside_compiling_a_launch_only_compiles_in_the_pool(can_compile):
    kernel = FakeKernel()
    other = FakeKernel()
    with ahead.compiling(workers=2) as pool:
        assert ahead.active()
        assert isinstance(ahead.launch(kernel, (4, 2), 1, n=8), FutureKernel)
        ahead.launch(kernel, (4, 2), 1, n=8)  # the same kernel again: no second compile
        ahead.launch(other, (1,), 1, n=8)
    assert kernel.calls[0] == {"grid": (4, 2), "warmup": True, "async": True, "n": 8}
    assert pool.workers == 2 and pool.kernels == 2 and not ahead.active()


@needs_async
def test_an_untuned_key_is_neither_timed_nor_compiled(can_compile):
    inner, tuned = can_compile
    with ahead.compiling(workers=2):
        assert ahead.launch(tuned, (1,), "x", 100) is None
    assert inner.calls == [] and tuned.cache == {}
    assert "_bench" not in vars(tuned), "the autotuner's timing was not put back"


@needs_async
def test_a_tuned_key_compiles_its_chosen_config(can_compile):
    inner, tuned = can_compile
    tuned.cache[(100,)] = tuned.configs[1]  # as a shipped or cached choice is
    with ahead.compiling(workers=2):
        ahead.launch(tuned, (1,), "x", 100)
    assert len(inner.calls) == 1
    call = inner.calls[0]
    assert call["warmup"] and call["async"] and call["BLOCK"] == 64


@needs_async
def test_an_exception_inside_still_puts_everything_back(can_compile):
    _, tuned = can_compile
    with pytest.raises(KeyError), ahead.compiling(workers=1):
        raise KeyError("a configuration went wrong")
    assert not ahead.active() and "_bench" not in vars(tuned)


@needs_async
def test_compiling_does_not_nest(can_compile):
    with ahead.compiling(workers=1), pytest.raises(RuntimeError, match="already active"):
        with ahead.compiling(workers=1):
            pass


def test_compiling_says_why_not_where_it_cannot(monkeypatch):
    monkeypatch.setattr(ahead, "available", lambda: "the interpreter compiles nothing")
    with pytest.raises(RuntimeError, match="interpreter"), ahead.compiling():
        pass


def test_the_interpreter_compiles_nothing_ahead():
    if not ft.INTERPRET:
        pytest.skip("runs under TRITON_INTERPRET=1 (the CPU suite)")
    assert "interpreter" in ahead.available()


def test_the_gluon_tuner_refuses_to_time_while_compiling(monkeypatch, tmp_path):
    from impls.attention import flash_gluon as fg
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ahead, "_pool", ahead.Pool(1))  # as inside compiling()
    tuner = fg.Tuner("test")
    timed = []
    with pytest.raises(ahead.Untuned):
        tuner.pick((1024,), [(1,), (2,)], lambda c: timed.append(c) or 1.0, "gpu")
    tuner.prefer((1024,), (2,), "gpu")  # a shipped choice needs no timing
    assert tuner.pick((1024,), [(1,), (2,)], lambda c: timed.append(c) or 1.0, "gpu") == (2,)
    assert timed == []


def test_the_gluon_self_check_waits_for_a_real_call(monkeypatch):
    monkeypatch.setattr(gluon_check, "_memo", {})
    monkeypatch.setattr(gluon_check, "_folder", None)
    monkeypatch.delenv(gluon_check.ENV, raising=False)
    monkeypatch.setattr(ahead, "_pool", ahead.Pool(1))
    with pytest.raises(ahead.Untuned):
        gluon_check.verdict(torch.device("cpu"), version="3.9.0", device_name="NVIDIA H100 80GB HBM3")
    assert gluon_check._memo == {}, "a verdict was kept without a check"


# spawn, wait and stop: real processes, each running a line of Python on its payload.
ECHO = "from impls.attention import ahead; import pathlib; p, text = ahead.payload(); pathlib.Path(p).write_text(text)"
SLEEP = "from impls.attention import ahead; import time; time.sleep(ahead.payload())"


def test_each_process_gets_its_payload(tmp_path):
    outs = [tmp_path / f"{i}.txt" for i in range(3)]
    procs = ahead.spawn(ECHO, [(str(out), f"share {i}") for i, out in enumerate(outs)])
    ahead.wait(procs, 120)
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert [out.read_text() for out in outs] == ["share 0", "share 1", "share 2"]


def test_wait_stops_the_processes_still_running_at_its_deadline():
    procs = ahead.spawn(SLEEP, [0, 600])
    ahead.wait(procs, 10)  # the first ends in a fraction of a second; the second would sleep ten minutes
    assert procs[0].returncode == 0
    assert procs[1].returncode is not None and procs[1].returncode < 0, "killed, and reaped"




def test_a_lone_config_is_taken_untimed_where_compiling_refuses_timing(monkeypatch, tmp_path):
    # compiling() swaps each Triton autotuner's timing for a refusal. Triton up to 3.8 still
    # times the one config first_configs() leaves, so that refusal stopped the Gluon
    # self-check's reference kernels, which then compiled nothing ahead (the GPU test of
    # compile_elsewhere found Triton's cache empty). Here a real autotuner with two configs
    # (the flash kernels have one under the interpreter), as one of flash_triton's.
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
    @triton.jit
    def double(x, y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, 2 * tl.load(x + offs, mask=offs < n), mask=offs < n)

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(ft.AUTOTUNED, "double", double)
    double._bench = ahead._refuse_timing  # as compiling() does
    x = torch.arange(40, dtype=torch.float32)
    y = torch.zeros_like(x)
    grid = lambda meta: (triton.cdiv(40, meta["BLOCK"]), )  # noqa: E731
    with pytest.raises(ahead.Untuned):  # two configs: choosing one needs timing
        double[grid](x, y, 40)
    with tuning.first_configs():
        double[grid](x, y, 40)
    assert torch.equal(y, 2 * x) and double.best_config.kwargs == {"BLOCK": 16}
