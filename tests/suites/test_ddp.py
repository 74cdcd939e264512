"""The DDP suite: options, the rows' arithmetic on hand-made rank results, and
real two-process gloo runs of the command (rows, a killed worker, two "hosts"
on this machine). The collectives' rows: tests/suites/test_collectives.py."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from bench import launch, metrics
from bench.calibrate import Peaks
from bench.cli import app
from bench.errors import BadInput
from bench.runner import Context
from impls.data import DataConfig
from suites import ddp as suite
from suites.cli.ddp import _processes

ROOT = Path(__file__).resolve().parents[2]
# A model and run small enough that a launch is mostly process start-up.
SMALL = ["--device", "cpu", "--procs", "2", "--model", "tiny", "--data", "bytes", "--batch", "2", "--seq", "32",
         "--steps", "3", "--warmup-steps", "1", "--timeout", "30"]


def hosts(**kw) -> suite.Hosts:
    return suite.Hosts(**{"nproc": 4, "device_type": "cpu", **kw})


def scaling(**kw) -> suite.ScalingOptions:
    return suite.ScalingOptions(**{"hosts": hosts(), "data": DataConfig.from_name("bytes"), "model": "tiny",
                                   "precision": "fp32", "batch": 8, "seq": 64, **kw})


# -- options ----------------------------------------------------------------------------------------


def test_world_size_ladder():
    assert hosts().ladder() == (1, 2, 4)
    assert hosts(nproc=3).ladder() == (1, 2, 3)
    assert hosts(nproc=1).ladder() == (1,)
    assert hosts(nnodes=2, rdzv_endpoint="node0:29500").ladder() == (1, 2, 4, 8)
    assert hosts(nnodes=3, rdzv_endpoint="node0:29500").ladder() == (1, 2, 4, 8, 12)


def test_who_takes_part_in_each_launch():
    node0, node1 = (hosts(nnodes=2, node_rank=r, rdzv_endpoint="node0:29500") for r in (0, 1))
    # Worlds that fit on one host run on node 0 alone, standalone.
    assert node1.spec(2, "k") is None
    local = node0.spec(2, "k")
    assert (local.nproc, local.nnodes, local.node_rank) == (2, 1, 0)
    # Wider worlds span hosts, every host deriving the same run id from the row.
    a, b = node0.spec(8, "row"), node1.spec(8, "row")
    assert (a.nproc, a.nnodes, a.node_rank, b.node_rank) == (4, 2, 0, 1)
    assert a.rdzv_id == b.rdzv_id != node0.spec(8, "another row").rdzv_id
    assert a.rdzv_endpoint == "node0:29500"


@pytest.mark.parametrize("kw, message", [
    (dict(world_sizes=(1, 8)), "outside 1..4"),
    (dict(hosts=hosts(nnodes=2, rdzv_endpoint="h:1"), world_sizes=(6,)), "multiple of the 4"),
    (dict(strong=True, batch=6), "--strong splits --batch 6 over 4"),
    (dict(seq=512), "longer than tiny's context"),
    (dict(precision="fp64"), "unknown --precision"),
    (dict(compression=("zip",)), "unknown --compression"),
    (dict(bucket_mb=(0.0,)), "--bucket-mb"),
    (dict(steps=0), "--steps"),
    (dict(compile=True, warmup_steps=0), "--compile needs --warmup-steps 1"),
    (dict(compile=True, optimize_ddp=("python_reducer",)), "unknown --optimize-ddp python_reducer"),
    (dict(optimize_ddp=("no_optimization",)), "--optimize-ddp applies to compiled rows"),
])
def test_bad_options(kw, message):
    with pytest.raises(BadInput, match=message):
        scaling(**kw)


def test_rows_baseline_first_then_every_knob_set_and_world():
    configs = scaling(bucket_mb=(10.0, 100.0), compression=("none", "bf16")).configs()
    assert [c.setup for c in configs[:4]] == ["no-ddp", "ddp-1", "ddp-2", "ddp-4"]
    assert len(configs) == 1 + 4 * 3
    knob_sets = {(b, c) for b in (10.0, 100.0) for c in ("none", "bf16")}
    assert {(c.bucket_mb, c.compression) for c in configs[1:]} == knob_sets
    # Weak scaling keeps the per-rank batch; strong splits the global one.
    weak = configs[3]
    assert (weak.batch_per_rank, weak.global_batch) == (8, 32)
    strong = scaling(strong=True).configs()[-1]
    assert (strong.world_size, strong.batch_per_rank, strong.global_batch) == (4, 2, 8)
    # --compile compiles every row, the baseline included: its efficiency compares compiled with compiled.
    assert {c.compile for c in scaling(compile=True).configs()} == {True}
    assert {c.compile for c in configs} == {False}
    # --optimize-ddp is one more knob: a DDP row per mode and world, the baseline once.
    modes = scaling(compile=True, world_sizes=(2,), optimize_ddp=("ddp_optimizer", "no_optimization")).configs()
    assert [(c.setup, c.optimize_ddp) for c in modes] == [
        ("no-ddp", "ddp_optimizer"), ("ddp-2", "ddp_optimizer"), ("ddp-2", "no_optimization")]


# -- the rows' arithmetic ---------------------------------------------------------------------------


def test_rank_heartbeats_become_the_rows_steps():
    reported = []
    ctx = Context(torch.device("cpu"), on_step=lambda done, total, what: reported.append((done, total, what)))
    on_beat = suite.relay_steps(ctx, 12)
    for label in ("started", "joined the process group", "step 0", "step 7", "", "gathering results"):
        on_beat(label)
    assert reported == [(0, 12, "step"), (0, 12, "step"), (7, 12, "step")]  # the first as the launch begins


def test_training_row_by_hand():
    cfg = scaling().configs()[2]  # ddp-2, weak: 8 sequences of 64 tokens per rank
    per_rank = [
        {"step_ms": [10.0, 12.0, 11.0], "no_sync_ms": [9.0, 9.0, 9.5], "peak_mem_MiB": None, "params": 1000},
        {"step_ms": [11.0, 13.0, 14.0], "no_sync_ms": [9.5, 10.0, 10.5], "peak_mem_MiB": None, "params": 1000},
    ]
    m = suite.train_measurement(cfg, per_rank, nodes=1, base_tokens_per_s=40_000.0, peaks=None)
    v = m.values
    # The job's step is its slowest rank's, step by step: max -> [11, 13, 14], median 13 ms.
    assert m.stats.samples == (11.0, 13.0, 14.0) and m.stats.median == 13.0
    assert (v["slowest_rank"], v["slowest_rank_median_ms"]) == (1, 13.0)
    # 2 ranks x 8 x 64 = 1024 tokens in 13 ms.
    assert v["tokens_per_s"] == pytest.approx(1024 / 0.013)
    assert v["samples_per_s"] == pytest.approx(16 / 0.013)
    assert v["efficiency"] == pytest.approx(1024 / 0.013 / (2 * 40_000.0))
    # no_sync, per-step max [9.5, 10, 10.5]: median 10. Paired differences 1.5, 3, 3.5: median 3 ms,
    # IQR 3.25 - 2.25 = 1; but 3 pairs of 3 positive is p = 2/8 under a sign test: within noise, 0.
    assert v["no_sync_median_ms"] == 10.0
    assert (v["exposed_comm_ms"], v["exposed_comm_iqr_ms"], v["exposed_comm_p"]) == (0.0, 1.0, 0.25)
    assert v["note"].startswith("exposed comm within noise (+3 ms")
    assert v["world_size"] == 2 and v["mfu"] is None and v["peak_mem_MiB"] is None
    # MFU per device: each of the 2 ranks does half the tokens, against the fp32 peak.
    per_device = metrics.per_second(1024, 13.0) / 2
    flops = metrics.transformer_train_flops_per_token(1000, suite.MODELS[cfg.model].n_layer,
                                                      suite.MODELS[cfg.model].n_embd, 64)
    peak = 2 * per_device * flops / 1e12  # a peak twice the achieved rate: MFU 50%
    m = suite.train_measurement(cfg, per_rank, 1, 40_000.0, Peaks(torch.device("cpu"), {"fp32_tflops": peak}))
    assert m.values["mfu"] == pytest.approx(50.0) and m.reason == ""
    # Above the peak, and re-measured no higher: no MFU, and the row says why.
    low = Peaks(torch.device("cpu"), {"fp32_tflops": peak / 4}, measure=lambda key: peak / 4)
    m = suite.train_measurement(cfg, per_rank, 1, 40_000.0, low)
    assert m.values["mfu"] is None and "unreliable" in m.reason


def _exposed_row(diffs: list[float]) -> dict:
    """A ddp-2 row whose synced steps outlast their no_sync pairs by `diffs`."""
    cfg = scaling().configs()[2]
    step = [20.0 + i for i in range(len(diffs))]
    per_rank = [{"step_ms": step, "no_sync_ms": [s - d for s, d in zip(step, diffs)], "peak_mem_MiB": None,
                 "params": 1000}] * 2
    return suite.train_measurement(cfg, per_rank, nodes=1, base_tokens_per_s=None, peaks=None).values


def test_exposed_comm_is_zero_within_noise_with_its_spread():
    # 6 of 10 pairs 6 ms apart, 4 the other way by 1 ms: median 6, but a sign test gives
    # p = 2 * P(X >= 6 | n=10, 1/2) = 2 * 386/1024 = 0.754: within noise. A difference of the
    # two medians (here 24.5 - 19.5 = 5) would have reported 5 ms.
    v = _exposed_row([6, -1, 6, -1, 6, -1, 6, 6, -1, 6])
    assert v["exposed_comm_ms"] == 0.0
    assert v["exposed_comm_p"] == pytest.approx(772 / 1024)
    assert v["exposed_comm_iqr_ms"] == 7.0  # sorted: q1 at 2.25 -> -1, q3 at 6.75 -> 6
    assert "within noise (+6 ms, IQR 7 ms over 10 pairs" in v["note"]


def test_exposed_comm_that_stands_out_is_kept_with_its_sign():
    # 9 of 10 pairs 2 ms apart: median 2, p = 2 * 11/1024.
    v = _exposed_row([2, 2, 2, 2, 2, 2, 2, 2, 2, -1])
    assert (v["exposed_comm_ms"], v["exposed_comm_iqr_ms"], v["note"]) == (2.0, 0.0, "")
    assert v["exposed_comm_p"] == pytest.approx(22 / 1024)
    # A no_sync step slower than its synced pair every time is no noise: kept negative, and said so.
    v = _exposed_row([-1.0] * 10)
    assert v["exposed_comm_ms"] == -1.0 and v["exposed_comm_p"] == pytest.approx(2 / 1024)
    assert v["note"].startswith("no_sync step slower than its synced pair (-1 ms")


class _Bytes:
    """Data that costs nothing to draw: the training step below is a fake."""

    vocab_size = 256

    def get_batch(self, split, batch, seq, generator=None, device="cpu"):
        return torch.zeros(batch, seq, dtype=torch.long), torch.zeros(batch, seq, dtype=torch.long)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_slower_machine_halfway_through_a_row_is_not_exposed_communication(one_rank_group, tmp_path, monkeypatch):
    """The cause of a negative exposed time: the machine slows down between
    the synced steps and the no_sync steps. Timed as two blocks, one after the
    other, the no_sync block met the slower machine (-8 ms here); timed in
    pairs, each pair meets the same machine."""
    clock_ms = [0.0]
    monkeypatch.setattr("bench.timing.time", SimpleNamespace(perf_counter=lambda: clock_ms[0] / 1e3))
    job = suite.TrainJob(DataConfig.from_name("bytes"), steps=10, warmup_steps=1, seed=0, threads=1)
    half = 2 * (job.warmup_steps + job.steps) // 2
    synced = []

    def train_step(model, *args):
        sync = model.require_backward_grad_sync  # False inside DDP's no_sync()
        # 10 ms of compute, 20 ms once the machine slows down; the all-reduce leaves 2 ms exposed.
        clock_ms[0] += (10.0 if len(synced) < half else 20.0) + (2.0 if sync else 0.0)
        synced.append(sync)

    barriers = []
    barrier = dist.barrier
    monkeypatch.setattr(suite, "load_data", lambda *args: _Bytes())
    monkeypatch.setattr(suite, "train_step", train_step)
    monkeypatch.setattr(suite.dist, "barrier", lambda: barriers.append(len(synced)) or barrier())
    cfg = scaling(world_sizes=(1,)).configs()[1]  # ddp-1
    rank = launch.Rank(0, 0, 1, torch.device("cpu"), str(tmp_path))
    result = suite.train_rank(rank, cfg, job)
    # Pair 5 straddles the change (no_sync at 10 ms, then synced at 22 ms), every other pair is 2 ms apart.
    v = suite.train_measurement(cfg, [result], nodes=1, base_tokens_per_s=None, peaks=None).values
    assert v["exposed_comm_ms"] == pytest.approx(2.0) and v["exposed_comm_p"] == pytest.approx(2 / 1024)
    # Pairs alternate their order (ABBA), and every step starts at a barrier.
    assert synced[:4] == [True, False, False, True] and synced.count(True) == synced.count(False) == 11
    assert barriers == list(range(22))


# -- the command ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2", "--device", "cpu"], "--gpus needs CUDA GPUs"),
    (["--procs", "0", "--device", "cpu"], "--procs must be at least 1"),
    (["--device", "cpu", "--strong", "--batch", "3"], "--strong splits"),
    (["--device", "cpu", "--precision", "tf32"], "cannot run here"),
    (["--device", "cpu", "--nnodes", "2"], "--rdzv-endpoint"),
    (["--device", "cpu", "--static-graph", "maybe"], "off, on or both"),
    (["--device", "cpu", "--collectives", "--max-size", "1Q"], "as a size"),
])
def test_bad_input_is_one_line_before_anything_launches(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("launched despite bad input"))
    result = CliRunner().invoke(app, ["ddp", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_more_gpus_than_the_machine_has_is_bad_input(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    with pytest.raises(BadInput, match="asked for 8 GPUs, this machine has 4"):
        _processes(8, None, torch.device("cuda", 0))
    assert _processes(None, None, torch.device("cuda", 0)) == 4


def _run(tmp_path: Path, *args: str):
    result = CliRunner().invoke(app, ["ddp", *SMALL, *args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (csv,) = tmp_path.glob("*.csv")
    return pd.read_csv(csv), json.loads(csv.with_suffix(".json").read_text())


@pytest.mark.slow
def test_scaling_rows_from_two_gloo_processes(tmp_path, monkeypatch):
    # The baseline and the two-process row: each launch costs seconds of start-up, and the ladder's
    # middle row (ddp-1, the same code on one rank) adds no check that these two lack.
    monkeypatch.delenv(launch.FAULT_ENV, raising=False)
    df, meta = _run(tmp_path, "--world-sizes", "2")
    assert meta["complete"] and meta["label"] == "setup" and meta["primary"] == "tokens_per_s"
    assert list(df["setup"]) == ["no-ddp", "ddp-2"]
    assert list(df["status"]) == ["ok"] * 2, df["reason"].tolist()
    assert list(df["world_size"]) == [1, 2] and list(df["global_batch"]) == [2, 4]
    base = df["tokens_per_s"][0]
    for _, row in df.iterrows():
        assert row["tokens_per_s"] == pytest.approx(row["global_batch"] * 32 / (row["median_ms"] / 1e3))
        assert row["efficiency"] == pytest.approx(row["tokens_per_s"] / (row["world_size"] * base))
        assert row["n"] == 3 and row["min_ms"] <= row["slowest_rank_median_ms"] <= row["max_ms"]
    ddp_rows = df[df["setup"] != "no-ddp"]
    # 3 pairs cannot pass a sign test at 5% (p >= 2/8): 0, with the spread and the measured median in the note.
    assert (ddp_rows["exposed_comm_ms"] == 0.0).all() and (ddp_rows["exposed_comm_iqr_ms"] >= 0).all()
    assert ddp_rows["note"].str.startswith("exposed comm within noise (").all()
    assert np.isnan(df["exposed_comm_ms"][0])  # no DDP, nothing to expose


@pytest.mark.slow
def test_compiled_rows_from_gloo_processes(tmp_path, monkeypatch):
    # Two ranks, as the several-GPU runs: the model compiled inside DDP, with DDP's hooks eager; 1 MB
    # buckets (the smallest dynamo's splitter takes) give the tiny model's 2 MB of fp32 weights several.
    monkeypatch.delenv(launch.FAULT_ENV, raising=False)
    df, _ = _run(tmp_path, "--world-sizes", "2", "--compile", "--bucket-mb", "1",
                 "--optimize-ddp", "ddp_optimizer,no_optimization")
    assert list(df["setup"]) == ["no-ddp", "ddp-2", "ddp-2"] and df["compile"].all()
    assert list(df["optimize_ddp"]) == ["ddp_optimizer", "ddp_optimizer", "no_optimization"]
    assert list(df["status"]) == ["ok"] * 3, df["reason"].tolist()
    # One graph each: the synced and the no_sync steps share it (no recompile).
    assert list(df["compiled_graphs"]) == [1, 1, 1]
    # Split at the buckets by default, compiled whole with no_optimization (and without DDP).
    assert df["compiled_pieces"][1] > 1 and df["compiled_pieces"][0] == df["compiled_pieces"][2] == 1


def test_a_failed_launch_is_one_line_and_keeps_the_rows_before_it(tmp_path, monkeypatch):
    # No real launch: the baseline's fails as a row would, the next one ends the run.
    failures = iter([launch.RankError("error", 0, "ValueError: bad row"), launch.LaunchFailed("rank 1 was killed", 1)])

    def fail(*args):
        raise next(failures)

    monkeypatch.setattr(launch, "launch", fail)
    result = CliRunner().invoke(app, ["ddp", *SMALL, "--world-sizes", "1,2", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    (csv,) = tmp_path.glob("ddp-*.csv")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1] == f"error: ddp run stopped: rank 1 was killed. 1 finished row(s) kept in {csv}", lines
    assert "Traceback" not in result.output
    df = pd.read_csv(csv)
    assert list(df["setup"]) == ["no-ddp"] and list(df["status"]) == ["error"]
    assert json.loads(csv.with_suffix(".json").read_text())["complete"] is False


def _processes_in_session(sid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of /proc/PID/stat: the session id
            found.append(stat.parent.name)
    return found


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_cleanly(tmp_path):
    # Rank 1 of the 2-process row exits at its second step; the baseline row has finished by then.
    scratch = tmp_path / "tmp"  # where the failed launch keeps its workers' output (TMPDIR)
    scratch.mkdir()
    env = {**os.environ, launch.FAULT_ENV: "rank=1,step=1,kind=exit,world=2", "TMPDIR": str(scratch)}
    cmd = [sys.executable, "-m", "bench", "ddp", *SMALL, "--world-sizes", "2", "--out", str(tmp_path)]
    # In a session of its own, so that whatever it leaves behind can be found.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ddp run stopped: rank 1 "), lines[0]
    assert "without raising an exception (last: step 1)" in lines[0]
    assert "1 finished row(s) kept in" in lines[0] and f"its output: {scratch}" in lines[0]
    (csv,) = tmp_path.glob("ddp-*.csv")
    df = pd.read_csv(csv)
    assert list(df["setup"]) == ["no-ddp"] and df["status"][0] == "ok"
    assert json.loads(csv.with_suffix(".json").read_text())["complete"] is False
    time.sleep(0.5)
    assert _processes_in_session(proc.pid) == []  # no orphan worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_on_one_machine(tmp_path):
    """Two `genbench ddp` processes play node 0 and node 1 of a two-host run:
    the 2-rank row spans both through the static rendezvous, node 0 alone writes.
    Each "host" has a core of its own where there are two: a host gives its rank
    all of its cores' threads (suites/ddp.py cpu_threads), and two hosts sharing
    every core would run twice as many threads as there are cores."""
    env = {k: v for k, v in os.environ.items() if k != launch.FAULT_ENV}
    common = [sys.executable, "-m", "bench", "ddp", *SMALL, "--procs", "1", "--nnodes", "2",
              "--rdzv-endpoint", f"localhost:{_free_port()}", "--world-sizes", "2"]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def start(r: int) -> subprocess.Popen:
        if len(cores) >= 2:  # the child inherits this thread's affinity, set for the moment it is started
            os.sched_setaffinity(0, {cores[r]})
        try:
            return subprocess.Popen([*common, "--node-rank", str(r), "--out", str(tmp_path / f"node{r}")], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finally:
            if len(cores) >= 2:
                os.sched_setaffinity(0, cores)

    nodes = [start(r) for r in (1, 0)]
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert "node 1: took part in 1 launch(es)" in outputs[0][0]
    assert not (tmp_path / "node1").exists()
    (csv,) = (tmp_path / "node0").glob("ddp-*.csv")
    df = pd.read_csv(csv)
    assert list(df["setup"]) == ["no-ddp", "ddp-2"] and (df["status"] == "ok").all(), df["reason"].tolist()
    assert list(df["nodes"]) == [1, 2] and list(df["world_size"]) == [1, 2]
