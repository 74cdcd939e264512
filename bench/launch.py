"""Run one function on N processes through PyTorch's elastic launcher, the
machinery behind torchrun, and hand back what every rank returned.

    spec = LaunchSpec(nproc=4, device_type="cuda", timeout_s=90)
    per_rank = launch(fn, (config,), spec)      # [fn's value on rank 0, on rank 1, ...]

`fn(rank, *args)` runs in every worker with the default process group
already up (NCCL with one GPU per local rank, or gloo on CPU); `rank` is a
`Rank` (rank, local_rank, world_size, device) whose `beat()` the function
calls at each step so that a worker that stops making progress is noticed.
The values are gathered to global rank 0 and returned by the process that
launched it; every other launching process gets None. `launch(..., on_beat=f)`
also hands the launching process the heartbeats of this host's first rank as
they change (`f("step 12")`, polled with the watchdog's heartbeat files), for
a progress display.

One host: a standalone c10d rendezvous on a free local port, as
`torchrun --standalone` does. Several hosts: every host runs the same
command with its own `node_rank`, and the hosts meet at `rdzv_endpoint`
(host:port of node 0) through the static rendezvous that torchrun uses when
given --node-rank, so global rank 0 always lives on node 0.

Failures, so that a suite can tell a bad configuration from a broken run:
- a rank raises (out of memory, `Unsupported`, any other exception):
  `RankError` with its kind, the rank and the exception; the other ranks are
  stopped by the launcher. A suite turns it into a row and the sweep goes on.
- a rank dies without an exception (killed, crashed, exited), a collective
  times out, or no rank makes progress within the timeout: `LaunchFailed`,
  whose one-line message names the rank and the cause. It is a `Fatal`
  (bench/errors.py): it ends the run, the finished rows staying on disk.
  Timeouts: the process group's own (`timeout_s`, which ends a collective
  that waits on a hung peer), and a watchdog here that stops the workers when
  a rank's heartbeat is older than `timeout_s` plus a margin.

No orphans: the launcher stops the workers whenever it returns or raises,
and each worker asks the kernel (Linux) to kill it if its parent dies.

The parent's environment reaches the workers unchanged (NCCL settings such as
NCCL_NVLS_ENABLE included); torch adds RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.

Workers' stdout and stderr, and the launcher's own log, go to files in a
temporary folder, deleted after a clean launch and named in the message of a
failed one.

Test hook: GENBENCH_DDP_FAULT="rank=1,step=3,kind=exit" makes rank 1 exit
(kind=exit), hang (kind=hang) or be killed (kind=kill) when it reports step 3;
add world=N to fault only launches of N ranks; rank=all faults every rank.
Tests use it to check that a dead or hung worker ends the run cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from bench.errors import BadInput, Fatal, Unsupported

FAULT_ENV = "GENBENCH_DDP_FAULT"
# The watchdog waits this much longer than the process group's timeout (a share
# of it, at least some seconds), so that a collective stuck on a hung peer fails
# first and the rank waiting in it has time to report, with the more precise message.
WATCHDOG_MARGIN, WATCHDOG_MARGIN_S = 0.25, 5.0
# Before a rank's first heartbeat: spawning it and importing torch, CUDA and NCCL
# set-up. Several hosts also wait for each other there (the rendezvous).
STARTUP_S = 120.0
MULTI_NODE_RENDEZVOUS_S = 900  # torchrun's default rendezvous timeout
STARTING, DONE = "started", "done"  # heartbeat labels judged by the start-up allowance, or not at all
# Signals the elastic agent turns into exceptions while workers run (torch's default set).
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# Words of gloo's errors (plain RuntimeErrors) when a peer went away or a collective
# timed out; NCCL's and the store's errors are torch.distributed.DistError.
_COMM_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out")


@dataclass(frozen=True)
class LaunchSpec:
    """Where and how to launch: processes on this host, hosts, timeout."""

    nproc: int  # processes on this host (one GPU each with CUDA)
    device_type: str = "cpu"  # "cuda": NCCL; "cpu": gloo
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # host:port of node 0, needed when nnodes > 1
    rdzv_id: str = "genbench"  # the same on every host; one run id per launch is derived from it
    timeout_s: float = 90.0

    def __post_init__(self):
        if self.nproc < 1:
            raise BadInput(f"need at least one process per host, got {self.nproc}")
        if self.device_type not in ("cpu", "cuda"):
            raise BadInput(f"device type must be cpu or cuda, not {self.device_type!r}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise BadInput(f"--node-rank must be in [0, --nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise BadInput("--nnodes > 1 needs --rdzv-endpoint HOST:PORT: node 0's address, reachable from every host")
        if self.timeout_s <= 0:
            raise BadInput(f"--timeout must be positive, got {self.timeout_s}")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def ranks(self) -> range:
        """Global ranks on this host: node-major, as the static rendezvous assigns them."""
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)


class RankError(Exception):
    """A rank raised: `kind` is oom, unsupported or error."""

    def __init__(self, kind: str, rank: int, message: str):
        super().__init__(f"rank {rank}: {message}")
        self.kind, self.rank, self.message = kind, rank, message


class LaunchFailed(Fatal):
    """A worker died, hung or lost its peers: the run cannot go on (the next
    launch would meet the same fault, or wait on it)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


# --------------------------------------------------------------------------- worker side


@dataclass
class Rank:
    """What the launched function knows about its place in the world."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    folder: str  # the launch's folder for heartbeats and failure reports

    def beat(self, step: int | None = None, label: str = "") -> None:
        """Tell the launcher this rank is making progress (called once per step)."""
        label = label or f"step {step}"
        Path(self.folder, f"rank{self.rank}.beat").write_text(label)
        if step is not None:
            _maybe_fault(self, step)


def _maybe_fault(rank: Rank, step: int) -> None:
    """The test hook (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if fields.get("rank") not in ("all", str(rank.rank)) or fields.get("step") != str(step):
        return
    if "world" in fields and fields["world"] != str(rank.world_size):
        return
    kind = fields.get("kind", "exit")
    if kind == "exit":
        os._exit(3)  # no exception, no clean-up: as a crash looks from outside
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:
            time.sleep(1)
    raise ValueError(f"{FAULT_ENV}: unknown kind {kind!r} (exit, kill or hang)")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker if the launching process dies, so that
    not even a launcher killed with SIGKILL leaves workers behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl took effect
        os._exit(1)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    if isinstance(exc, Unsupported):
        return "unsupported"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, getattr(dist, "DistError", ())):
        return "comm"
    if type(exc) is RuntimeError and any(w in str(exc).lower() for w in _COMM_WORDS):
        return "comm"
    return "error"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _init_process_group(device_type: str, local_rank: int, timeout_s: float) -> torch.device:
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this GPU
        # device_id (torch >= 2.3) sets up the NCCL communicator now rather than at the first collective.
        extra = {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        dist.init_process_group("nccl", timeout=timeout, **extra)
        return device
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def _wait_for_every_rank(rank: int, world_size: int) -> None:
    """Meet every rank at the launcher's store before creating the process
    group, whose timeout (--timeout, meant for a hung collective) would
    otherwise also bound how far apart the ranks finish importing torch."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=STARTUP_S))
    prefix = f"genbench/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/started/"
    store.set(f"{prefix}{rank}", "1")
    store.wait([f"{prefix}{r}" for r in range(world_size)])


def _worker(fn: Callable, args: tuple, folder: str, device_type: str, timeout_s: float):
    """What every launched process runs (the elastic agent's entry point)."""
    _die_with_parent()
    rank = int(os.environ["RANK"])
    local_rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    me = Rank(rank, local_rank, world_size, torch.device("cpu"), folder)
    me.beat(label=STARTING)
    try:
        _wait_for_every_rank(rank, world_size)
        me.beat(label="joining the process group")
        me.device = _init_process_group(device_type, local_rank, timeout_s)
        me.beat(label="joined the process group")
        value = fn(me, *args)
        me.beat(label="gathering results")
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
    except BaseException as exc:
        report = {"rank": rank, "kind": _kind(exc), "error": _one_line(exc), "time": time.time(),
                  "traceback": traceback.format_exc()}
        Path(folder, f"rank{rank}.error.json").write_text(json.dumps(report))
        raise
    me.beat(label=DONE)
    dist.destroy_process_group()
    return gathered


# --------------------------------------------------------------------------- launcher side


class _Stop(Exception):
    """SIGTERM before the elastic agent installed its own handler."""


class _Watchdog(threading.Thread):
    """Stops the launch when a local rank has not beaten for too long.

    It sends SIGTERM to this process: the elastic agent turns that into an
    exception in the main thread and stops its workers (SIGTERM, then SIGKILL
    after a grace period), which is torch's own shutdown path."""

    def __init__(self, folder: Path, spec: LaunchSpec, on_beat: Callable[[str], None] | None = None):
        super().__init__(daemon=True, name="genbench-launch-watchdog")
        self.folder, self.spec = folder, spec
        self.on_beat, self._last_label = on_beat, None
        self.beat_error: Exception | None = None
        self.stall_s = spec.timeout_s + max(WATCHDOG_MARGIN * spec.timeout_s, WATCHDOG_MARGIN_S)
        self.startup_s = max(STARTUP_S, spec.timeout_s) + (MULTI_NODE_RENDEZVOUS_S if spec.nnodes > 1 else 0)
        self.reason: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()  # no SIGTERM once stop() has returned
        self._start = time.time()

    def stop(self) -> None:
        with self._lock:
            self._done.set()

    def run(self) -> None:
        while not self._done.wait(0.25):
            reason = self._check(time.time())
            if reason:
                with self._lock:
                    if not self._done.is_set():
                        self.reason = reason
                        os.kill(os.getpid(), signal.SIGTERM)
                return
            with self._lock:  # no heartbeat handed on once stop() has returned
                if not self._done.is_set():
                    self.relay()

    def relay(self) -> None:
        """Hand on_beat the first local rank's heartbeat label, when it changed."""
        if self.on_beat is None:
            return
        label = read_beats(self.folder, self.spec.ranks[:1]).get(self.spec.ranks.start, (None, 0.0))[0]
        if label is None or label == self._last_label:
            return
        self._last_label = label
        try:
            self.on_beat(label)
        except Exception as exc:  # the watchdog goes on without it; launch() raises it once the workers are done
            self.on_beat, self.beat_error = None, exc

    def _check(self, now: float) -> str | None:
        beats = read_beats(self.folder, self.spec.ranks)
        if not beats:
            return f"no worker started within {self.startup_s:.0f} s" if now - self._start > self.startup_s else None
        allowed = {STARTING: self.startup_s, DONE: float("inf")}
        stale = {r: (label, now - t) for r, (label, t) in beats.items() if now - t > allowed.get(label, self.stall_s)}
        if not stale:
            return None
        who = ", ".join(f"rank {r} (last: {label}, {age:.0f} s ago)" for r, (label, age) in sorted(stale.items()))
        return f"no progress from {who}: hung, past --timeout {self.spec.timeout_s:g} s; the workers were stopped"


def read_beats(folder: Path, ranks) -> dict[int, tuple[str, float]]:
    """{rank: (last label, time written)} for the ranks that have beaten."""
    beats = {}
    for r in ranks:
        path = Path(folder, f"rank{r}.beat")
        try:
            beats[r] = (path.read_text(), path.stat().st_mtime)
        except OSError:
            continue
    return beats


def _read_reports(folder: Path) -> dict[int, dict]:
    reports = {}
    for path in Path(folder).glob("rank*.error.json"):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
            reports[int(report["rank"])] = report
    return reports


def _death(failure) -> str:
    """How a process ended, from the elastic agent's ProcessFailure."""
    code = failure.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def diagnose(failures: dict, reports: dict[int, dict], beats: dict[int, tuple[str, float]],
             spec: LaunchSpec) -> RankError | LaunchFailed | KeyboardInterrupt:
    """The root cause of a failed launch, from what each rank left behind.

    failures: the elastic agent's {global rank: ProcessFailure} (the first
    process it saw fail); reports: the exceptions ranks raised; beats: each
    rank's last heartbeat. A rank's own exception comes first (earliest);
    then a rank that ended without one; then, when only communication errors
    were raised, the rank they were waiting for: one that stopped beating
    (hung) or one that left no report (died)."""

    def last(r: int) -> str:
        return f" (last: {beats[r][0]})" if r in beats else ""

    if any(rep["kind"] == "interrupted" for rep in reports.values()):
        return KeyboardInterrupt()
    own = sorted((rep for rep in reports.values() if rep["kind"] != "comm"), key=lambda rep: rep["time"])
    if own:
        return RankError(own[0]["kind"], own[0]["rank"], own[0]["error"])
    for r, failure in sorted(failures.items()):
        if r not in reports:
            return LaunchFailed(f"rank {r} {_death(failure)} without raising an exception{last(r)}", r)
    comm = sorted(reports.values(), key=lambda rep: rep["time"])
    if comm:
        first = comm[0]
        silent = [r for r in spec.ranks if r not in reports]
        hung = [r for r in silent if r in beats and first["time"] - beats[r][1] > spec.timeout_s / 2]
        if hung:
            who = ", ".join(f"rank {r}{last(r)}" for r in hung)
            return LaunchFailed(f"{who} made no progress for {first['time'] - beats[hung[0]][1]:.0f} s: hung; "
                                f"rank {first['rank']}'s collective gave up: {first['error']}", hung[0])
        if silent:  # gone first, then seen by its peers' errors: its exit code went unrecorded
            who = ", ".join(f"rank {r}" for r in silent)
            return LaunchFailed(f"{who} stopped without raising an exception{last(silent[0])}: it exited, crashed "
                                f"or was killed; rank {first['rank']} then lost it: {first['error']}", silent[0])
        elsewhere = " (a worker on another host may have died: see that host's output)" if spec.nnodes > 1 else ""
        return LaunchFailed(f"rank {first['rank']}: communication failed: {first['error']}{elsewhere}", first["rank"])
    return LaunchFailed(f"the workers failed: {failures}")


def _launch_config(spec: LaunchSpec, folder: Path):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    kwargs: dict[str, Any] = dict(
        min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc,
        max_restarts=0,  # a benchmark is not retried: a failure is reported
        monitor_interval=0.1,
        start_method="spawn",  # the launching process may hold a CUDA context; fork would copy it
        logs_specs=DefaultLogsSpecs(log_dir=str(folder / "logs"), redirects=Std.ALL),
    )
    if spec.nnodes == 1:  # torchrun --standalone: c10d rendezvous on a free local port
        kwargs.update(rdzv_backend="c10d", rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()),
                      rdzv_configs={"timeout": int(STARTUP_S)})
    else:  # torchrun --node-rank: node 0 hosts the store at the endpoint and holds ranks 0..nproc-1
        kwargs.update(rdzv_backend="static", rdzv_endpoint=spec.rdzv_endpoint, run_id=spec.rdzv_id,
                      rdzv_configs={"rank": spec.node_rank, "timeout": MULTI_NODE_RENDEZVOUS_S})
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:  # recent torch only
        kwargs["shutdown_timeout"] = 5  # SIGKILL a worker that ignores SIGTERM for 5 s (default 30)
    return LaunchConfig(**kwargs)


@contextlib.contextmanager
def _quiet_agent(folder: Path):
    """The agent's signal handlers and log records, for the duration of one launch.

    Its handlers stay installed after it returns (a later Ctrl-C would raise its
    SignalException instead of KeyboardInterrupt), so the previous ones are put
    back. Its warnings (the stack of a failed worker, each SIGTERM it sends) go
    to the launch folder's launcher.log, not the terminal: the one-line
    message of LaunchFailed is what the user reads."""
    main = threading.current_thread() is threading.main_thread()
    saved = {}
    if main:
        for name in AGENT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                saved[sig] = signal.getsignal(sig)

        def stop(signum, frame):
            raise _Stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
    env_before = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    handler = logging.FileHandler(folder / "launcher.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.launcher",
                                              "torch.multiprocessing")]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    # Workers inherit this process's stderr (file descriptor 2). The agent
    # redirects it to their log files only while the function runs, so what a
    # dying worker prints after that (C++ threads torn down at exit, Python's
    # fatal-error dump) would land on the terminal: point it at the folder too.
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(folder / "stderr.log", "ab") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        for lg, p in zip(loggers, propagate):
            lg.removeHandler(handler)
            lg.propagate = p
        handler.close()
        if env_before is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = env_before
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def worker_log(folder: Path, rank: int, spec: LaunchSpec) -> Path | None:
    """The stderr file of a local rank, where torch's DefaultLogsSpecs put it."""
    local = rank - spec.ranks.start
    found = sorted(Path(folder, "logs").glob(f"*/attempt_*/{local}/stderr.log"))
    return found[-1] if found else None


def launch(fn: Callable, args: tuple, spec: LaunchSpec, on_beat: Callable[[str], None] | None = None) -> list | None:
    """Run `fn(rank, *args)` on spec.world_size processes; return the list of
    their values (index = global rank) where rank 0 runs, None elsewhere.
    `on_beat(label)`: called from a thread of this process with each new
    heartbeat label of this host's first rank ("step 12", "gathering results")."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    folder = Path(tempfile.mkdtemp(prefix="genbench-launch-"))
    watchdog = _Watchdog(folder, spec, on_beat)
    keep = False  # the folder is kept, and named, only when the run failed
    try:
        with _quiet_agent(folder):
            watchdog.start()
            try:
                values = elastic_launch(_launch_config(spec, folder), _worker)(
                    fn, args, str(folder), spec.device_type, spec.timeout_s)
            except ChildFailedError as exc:
                cause = diagnose(exc.failures, _read_reports(folder), read_beats(folder, spec.ranks), spec)
                keep = isinstance(cause, LaunchFailed)
                raise (_with_logs(cause, folder, spec) if keep else cause) from None
            except (SignalException, _Stop) as exc:
                if watchdog.reason:
                    keep = True
                    raise _with_logs(LaunchFailed(watchdog.reason), folder, spec) from None
                sig = getattr(exc, "sigval", None)
                if sig == signal.SIGINT:
                    raise KeyboardInterrupt from None
                raise LaunchFailed(f"stopped by {getattr(sig, 'name', exc)}; the workers were stopped") from None
            except Exception as exc:  # rendezvous or start-up: no worker ran the function
                keep = True
                raise _with_logs(LaunchFailed(f"the launch failed: {_one_line(exc)}"), folder, spec) from None
            finally:
                watchdog.stop()
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    if watchdog.beat_error is not None:
        raise watchdog.beat_error
    return values.get(0) if spec.node_rank == 0 else None


def _with_logs(exc: LaunchFailed, folder: Path, spec: LaunchSpec) -> LaunchFailed:
    """The failure's message, plus where the rank's output was kept."""
    log = worker_log(folder, exc.rank, spec) if exc.rank in spec.ranks else None
    where = f"its output: {log}" if log else f"logs: {folder}"
    return LaunchFailed(f"{exc}; {where}", exc.rank)
