"""bench/launch.py: real launches of two gloo processes through torch's
elastic launcher, and the diagnosis of failed ones from what ranks left behind."""

import os
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from bench import launch
from bench.errors import BadInput, Fatal, Unsupported
from bench.launch import LaunchFailed, LaunchSpec, RankError


# -- what the launched workers run (module level: spawn pickles them by name) ---------------------


def sum_of_ranks(rank: launch.Rank, steps: int):
    total = torch.tensor([float(rank.rank)])
    for step in range(steps):
        rank.beat(step=step)
        dist.all_reduce(total) if step == 0 else dist.barrier()
        time.sleep(0.05)
    return {"rank": rank.rank, "world": rank.world_size, "sum": total.item(), "device": rank.device.type,
            "nvls": os.environ.get("NCCL_NVLS_ENABLE")}


def unsupported_on_rank_1(rank: launch.Rank):
    for step in range(3):
        rank.beat(step=step)
        if rank.rank == 1 and step == 1:
            raise Unsupported("no such kernel here")
        dist.barrier()
    return rank.rank


# -- helpers ----------------------------------------------------------------------------------------


def live_children() -> list[str]:
    """Processes whose parent is this one, not counting multiprocessing's
    resource tracker (which lives as long as its parent) or zombies."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(ppid) == os.getpid() and state != "Z" and b"resource_tracker" not in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def kept_folders(tmp: Path) -> list[Path]:
    # (torch.multiprocessing leaves its own pytorch-errorfile-*.pickle after a failure: not ours)
    return list(tmp.glob("genbench-launch-*"))


@pytest.fixture
def launch_tmp(tmp_path, monkeypatch):
    """Launch folders go under tmp_path, so a test can see which were kept."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def spec(**kw) -> LaunchSpec:
    return LaunchSpec(**{"nproc": 2, "device_type": "cpu", "timeout_s": 20.0, **kw})


# -- launches ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_rank_answers_rank_0_and_nothing_is_left_behind(launch_tmp, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # the GPU machine's setting must reach the workers unchanged
    monkeypatch.delenv(launch.FAULT_ENV, raising=False)
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    values = launch.launch(sum_of_ranks, (3,), spec())
    assert values == [{"rank": r, "world": 2, "sum": 1.0, "device": "cpu", "nvls": "0"} for r in (0, 1)]
    # The agent's signal handlers and environment variable are gone again (pytest-xdist's workers
    # start with SIGINT ignored, a terminal's pytest with Python's handler: whichever it was).
    assert signal.getsignal(signal.SIGINT) == sigint
    assert signal.getsignal(signal.SIGTERM) == sigterm
    assert "TORCHELASTIC_SIGNALS_TO_HANDLE" not in os.environ
    assert live_children() == []
    assert kept_folders(launch_tmp) == []  # a clean launch keeps no folder


@pytest.mark.slow
def test_an_exception_in_a_rank_is_a_rank_error(launch_tmp, monkeypatch):
    monkeypatch.delenv(launch.FAULT_ENV, raising=False)
    with pytest.raises(RankError) as info:
        launch.launch(unsupported_on_rank_1, (), spec())
    assert (info.value.kind, info.value.rank) == ("unsupported", 1)
    assert "Unsupported: no such kernel here" in str(info.value)
    assert live_children() == []
    assert kept_folders(launch_tmp) == []


@pytest.mark.slow
def test_a_dead_worker_ends_the_launch_with_its_rank_and_cause(launch_tmp, monkeypatch):
    monkeypatch.setenv(launch.FAULT_ENV, "rank=1,step=2,kind=exit")
    start = time.time()
    with pytest.raises(LaunchFailed) as info:
        launch.launch(sum_of_ranks, (6,), spec())
    message = str(info.value)
    # The exit code is known when the launcher saw rank 1 go first, not when rank 0's error overtook it.
    assert message.startswith(("rank 1 exited with code 3 without raising an exception (last: step 2)",
                               "rank 1 stopped without raising an exception (last: step 2): it exited")), message
    assert info.value.rank == 1
    assert time.time() - start < 60
    assert live_children() == []
    # The folder with the workers' output is kept and named.
    log = Path(message.split("its output: ", 1)[1])
    assert log.exists() and log.is_relative_to(launch_tmp)


@pytest.mark.slow
def test_a_hung_worker_is_named_once_its_peers_collective_times_out(launch_tmp, monkeypatch):
    monkeypatch.setenv(launch.FAULT_ENV, "rank=1,step=1,kind=hang")
    start = time.time()
    with pytest.raises(LaunchFailed) as info:
        launch.launch(sum_of_ranks, (4,), spec(timeout_s=3.0))
    message = str(info.value)
    assert message.startswith("rank 1 (last: step 1) made no progress for"), message
    assert "hung; rank 0's collective gave up" in message
    assert time.time() - start < 60
    assert live_children() == []


@pytest.mark.slow
def test_the_watchdog_stops_a_launch_where_every_rank_hangs(launch_tmp, monkeypatch):
    # No collective is pending, so no process-group timeout can fire: only the watchdog can end this.
    monkeypatch.setenv(launch.FAULT_ENV, "rank=all,step=1,kind=hang")
    # Its margin past --timeout is for a collective's own timeout to fire first, and none is pending
    # here: a short one leaves the same path, a few seconds sooner.
    monkeypatch.setattr(launch, "WATCHDOG_MARGIN_S", 0.5)
    sigint = signal.getsignal(signal.SIGINT)
    start = time.time()
    with pytest.raises(LaunchFailed) as info:
        launch.launch(sum_of_ranks, (4,), spec(timeout_s=2.0))
    message = str(info.value)
    assert message.startswith("no progress from rank 0 (last: step 1, "), message
    assert ", rank 1 (last: step 1, " in message and "hung, past --timeout 2 s; the workers were stopped" in message
    assert time.time() - start < 60
    assert live_children() == []
    assert signal.getsignal(signal.SIGINT) == sigint


# -- options and diagnosis (no launch) -------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(nproc=0), "at least one process"),
    (dict(nnodes=2), "--rdzv-endpoint"),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="node0:29500"), "--node-rank"),
    (dict(timeout_s=0), "--timeout"),
    (dict(device_type="tpu"), "cpu or cuda"),
])
def test_bad_specs(kw, message):
    with pytest.raises(BadInput, match=message):
        spec(**kw)


def test_ranks_on_each_host_are_node_major():
    assert list(spec(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500").ranks) == [4, 5, 6, 7]
    assert spec(nproc=4, nnodes=2, rdzv_endpoint="node0:29500").world_size == 8


def _report(rank, kind, t, error="RuntimeError: x"):
    return {"rank": rank, "kind": kind, "error": error, "time": t}


def test_diagnose_prefers_a_ranks_own_exception_the_earliest():
    reports = {0: _report(0, "comm", 10.0), 1: _report(1, "oom", 11.0, "OutOfMemoryError: CUDA"),
               2: _report(2, "error", 12.0)}
    cause = launch.diagnose({0: SimpleNamespace(exitcode=1)}, reports, {}, spec(nproc=3))
    assert isinstance(cause, RankError) and (cause.kind, cause.rank) == ("oom", 1)


def test_diagnose_names_a_rank_that_died_without_an_exception():
    beats = {1: ("step 4", 100.0)}
    cause = launch.diagnose({1: SimpleNamespace(exitcode=-9)}, {0: _report(0, "comm", 101.0)}, beats, spec())
    assert isinstance(cause, LaunchFailed) and isinstance(cause, Fatal)  # it ends the run, not just the row
    assert str(cause) == "rank 1 was killed by SIGKILL without raising an exception (last: step 4)"


def test_diagnose_tells_a_hung_peer_from_a_dead_one():
    comm = {0: _report(0, "comm", 130.0, "RuntimeError: Timed out waiting 30000ms")}
    failed = {0: SimpleNamespace(exitcode=1)}
    hung = launch.diagnose(failed, comm, {1: ("step 7", 100.0)}, spec(timeout_s=30.0))
    assert str(hung).startswith("rank 1 (last: step 7) made no progress for 30 s: hung;")
    gone = launch.diagnose(failed, comm, {1: ("step 7", 129.0)}, spec(timeout_s=30.0))
    assert str(gone).startswith("rank 1 stopped without raising an exception (last: step 7): it exited, crashed")


def test_exceptions_are_sorted_into_kinds():
    assert launch._kind(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert launch._kind(Unsupported("no")) == "unsupported"
    assert launch._kind(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1")) == "comm"
    # An error that merely mentions NCCL is the configuration's, not a lost peer.
    assert launch._kind(TypeError("hook requires NCCL 2.10+")) == "error"


def test_the_watchdog_hands_on_the_first_local_ranks_new_heartbeats(tmp_path):
    labels = []
    dog = launch._Watchdog(tmp_path, spec(nproc=2, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500"),
                           on_beat=labels.append)
    dog.relay()  # no heartbeat yet
    launch.Rank(2, 0, 4, torch.device("cpu"), str(tmp_path)).beat(step=3)  # global rank 2: this host's first
    launch.Rank(3, 1, 4, torch.device("cpu"), str(tmp_path)).beat(step=9)
    dog.relay()
    dog.relay()  # unchanged: not handed on again
    launch.Rank(2, 0, 4, torch.device("cpu"), str(tmp_path)).beat(label="gathering results")
    dog.relay()
    assert labels == ["step 3", "gathering results"]


def test_a_failing_heartbeat_callback_stops_only_itself(tmp_path):
    def broken(label):
        raise ValueError(f"cannot show {label}")

    dog = launch._Watchdog(tmp_path, spec(), on_beat=broken)
    launch.Rank(0, 0, 2, torch.device("cpu"), str(tmp_path)).beat(step=0)
    dog.relay()
    assert dog.on_beat is None and str(dog.beat_error) == "cannot show step 0"  # launch() raises it afterwards
