"""The attention suite's kernels compiled ahead (suites/attention.py compile_ahead and Ahead).

Compiling needs a GPU, so here the compiling is a stand-in or skipped (the
interpreter compiles nothing): these tests check which rows are compiled
ahead, how they are split among processes, that the processes start, take
their configurations and end, and that the sweep waits for them. On a GPU,
the cold `genbench attention` run's first line says what was compiled.
"""

import pickle
import subprocess
import sys
import time

import pytest
import torch

from bench.runner import Context
from suites import attention as suite

GPU = torch.device("cuda")  # read by start() and compile_ahead(), never used to allocate here


def _configs(**kw):
    options = dict(seqs=(1024, 8192), impls=("naive", "tiled", "tiled-triton", "flex"), modes=("fwd", "fwd+bwd"))
    return suite.AttentionOptions(**{**options, **kw}).configs()


def test_groups_share_kernels_and_leave_the_other_rows_out():
    groups = suite.Ahead(_configs()).groups()
    # tiled and tiled-triton x 2 lengths x causal or not: 8 groups, each a configuration's fwd and fwd+bwd
    assert len(groups) == 8
    for group in groups:
        assert {cfg.impl for cfg in group} <= {"tiled", "tiled-triton"}
        assert sorted(cfg.mode for cfg in group) == ["fwd", "fwd+bwd"]
        assert len({(cfg.impl, cfg.seq, cfg.causal) for cfg in group}) == 1


def test_groups_are_capped_at_the_process_count(monkeypatch):
    monkeypatch.setattr(suite, "AHEAD_PROCESSES", 3)
    configs = _configs()
    groups = suite.Ahead(configs).groups()
    assert len(groups) == 3
    assert sorted(map(repr, sum(groups, []))) == sorted(repr(c) for c in configs if c.impl in suite.AHEAD)


def test_nothing_starts_on_a_cpu_or_where_triton_cannot_compile_ahead(monkeypatch):
    early = suite.Ahead(_configs())
    early.start(torch.device("cpu"), 0)
    assert early.procs == []
    monkeypatch.setattr(suite.ahead, "available", lambda: "the interpreter compiles nothing")
    early.start(GPU, 0)
    assert early.procs == []


def test_the_processes_start_take_their_configurations_and_end(monkeypatch):
    # Real processes: each imports the suite, reads its group and runs compile_ahead, which under the
    # interpreter (inherited TRITON_INTERPRET=1) compiles nothing and returns.
    monkeypatch.setattr(suite.ahead, "available", lambda: None)
    monkeypatch.setattr(suite, "AHEAD_PROCESSES", 2)
    early = suite.Ahead(_configs(seqs=(64,)))
    early.start(GPU, 3)
    assert len(early.procs) == 2
    assert [proc.wait(timeout=120) for proc in early.procs] == [0, 0]


def test_a_process_compiles_its_groups_small_configurations(monkeypatch):
    seen = []
    monkeypatch.setattr(suite, "compile_ahead",
                        lambda configs, ctx, threads: seen.append((configs, ctx.device, ctx.seed, threads)))
    small, big = _configs(seqs=(1024,))[0], _configs(seqs=(1024,))[0]
    big = suite.dataclasses.replace(big, batch=4096)  # 4096 x 16 heads x 1k x 128 bf16: over the limit
    assert suite._tensor_bytes(small) <= suite.AHEAD_PROCESS_BYTES < suite._tensor_bytes(big)
    stdin = type("Stdin", (), {"buffer": __import__("io").BytesIO(pickle.dumps(("cuda:1", 7, 3, [small, big])))})()
    monkeypatch.setattr(sys, "stdin", stdin)
    suite._compile_ahead_worker()
    assert seen == [([small], torch.device("cuda:1"), 7, 3)]


class _Sleeper:
    """A process that has not finished: counts the waits and the kill."""

    def __init__(self):
        self.waited, self.killed = [], False

    def wait(self, timeout=None):
        self.waited.append(timeout)
        if not self.killed:
            raise subprocess.TimeoutExpired("compile", timeout)

    def poll(self):
        return -9 if self.killed else None

    def kill(self):
        self.killed = True


def test_finish_waits_its_time_then_stops_the_processes_and_compiles_here(monkeypatch):
    monkeypatch.setattr(suite, "AHEAD_WAIT_S", 0.05)
    here = []
    monkeypatch.setattr(suite, "compile_ahead", lambda configs, ctx: here.append(configs) or "compiled 3 kernels")
    early = suite.Ahead(_configs(seqs=(64,)))
    early.procs, early.began = [_Sleeper(), _Sleeper()], time.perf_counter()
    line = early.finish(Context(GPU))
    assert all(p.killed for p in early.procs) and all(p.waited[0] <= 0.05 for p in early.procs)
    assert here == [early.configs]
    assert line.startswith("compiled 3 kernels; before that, 2 processes compiled for ")


def test_the_sweep_starts_before_calibrating_and_prepares_before_the_first_row():
    sweep = suite.sweep(suite.AttentionOptions(seqs=(64,), impls=("naive", "tiled")))
    (checking, check), (compiling, finish) = sweep.prepare
    assert "self-checking" in checking and "compiling" in compiling, "the check before compiling ahead"
    assert sweep.start.__self__ is finish.__self__, "one Ahead starts and finishes"
    cpu = Context(torch.device("cpu"))
    assert check(cpu) is None and finish(cpu) is None  # nothing to check or compile on a CPU


@pytest.fixture
def due(monkeypatch):
    """A device where the self-check is due for the dense inputs of head dim 128; records what it was asked."""
    asked, checks = [], []
    monkeypatch.setattr(suite, "_probe", lambda cfg, device: (torch.empty(1, 1, cfg.q_len, cfg.head_dim),
                                                              torch.empty(1, 1, cfg.kv_len, cfg.head_dim)))

    def gluon_check_due(q, k, v, masks):
        asked.append((q.shape[-1], bool(masks)))
        return q.shape[-1] == 128 and not masks and not checks

    monkeypatch.setattr(suite.flash, "gluon_check_due", gluon_check_due)
    monkeypatch.setattr(suite.gluon_check, "verdict", lambda device: checks.append(device) or suite.gluon_check.Verdict(
        True, "self-checked on Triton 9.9.9: 34 kernels within 6.1e-03 of Triton's"))
    return asked, checks


def test_self_check_runs_once_before_the_rows_and_says_its_verdict(due):
    asked, checks = due
    configs = (_configs(impls=("naive", "tiled-triton", "tiled"), head_dim=64, window=256, causal=(True,))
               + _configs(impls=("naive", "tiled"), head_dim=128))
    line = suite.self_check(configs, Context(GPU))
    assert checks == [GPU]
    assert line.startswith("tiled: self-checked on Triton 9.9.9: 34 kernels within 6.1e-03 of Triton's, in ")
    assert set(asked) == {(64, True), (128, False)}, "tiled's rows are asked, with their masks; naive's never"
    assert suite.self_check(configs, Context(GPU)) is None, "a verdict is kept: no second check"


def test_self_check_skips_rows_the_gluon_kernels_never_run(due):
    asked, checks = due
    configs = _configs(impls=("tiled",), seqs=(), lengths=(100, 200)) + _configs(impls=("tiled",), page_size=64, modes=("fwd",))
    assert suite.self_check(configs, Context(GPU)) is None
    assert asked == [] and checks == []
