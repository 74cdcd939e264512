"""The sweep loop: statuses, isolation, files, interruption, fatal errors, progress, tables as groups finish."""

import csv
import dataclasses
import io
import json
import time
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

from bench import report, runner
from bench.errors import Fatal, Unsupported
from bench.results import load_samples
from bench.runner import Context, Interrupted, Measurement, Sweep, run_sweep
from bench.stats import Stats


@dataclass(frozen=True)
class Toy:
    impl: str
    size: int


def _run(cfg: Toy, ctx: Context) -> Measurement:
    if cfg.impl == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
    if cfg.impl == "nope":
        raise Unsupported("head dim 80 not supported")
    if cfg.impl == "broken":
        raise ValueError("something else\nwith a second line")
    if cfg.impl == "wrong":
        return Measurement({"rel_err": 0.5}, status="mismatch", reason="rel_err too large")
    if cfg.impl == "ctrl-c":
        raise KeyboardInterrupt
    if cfg.impl == "fatal":
        raise Fatal("rank 1 exited with code 3")
    ms = {"fast": 1.0, "slow": 2.0}[cfg.impl]
    return Measurement({"rel_err": 0.0}, stats=Stats.of([ms, ms * 1.01, ms * 0.99, ms, ms]))


def _sweep(impls, sizes=(1,)):
    return Sweep(
        suite="toy", configs=[Toy(i, s) for s in sizes for i in impls], run=_run,
        params=("impl", "size"), metrics=("rel_err",), baseline="slow",
    )


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_failure_becomes_a_row_and_the_sweep_goes_on(tmp_path):
    sweep = _sweep(["slow", "oom", "nope", "broken", "wrong", "fast"])
    writer = run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {"x": 1}, Console(file=open("/dev/null", "w")))
    rows = _read(writer.csv_path)
    assert [r["status"] for r in rows] == ["ok", "oom", "unsupported", "error", "mismatch", "ok"]
    assert rows[1]["reason"].startswith("OutOfMemoryError")
    assert rows[2]["reason"] == "head dim 80 not supported"
    assert rows[3]["reason"] == "ValueError: something else"
    assert rows[4]["median_ms"] == ""  # a mismatch is never timed
    assert float(rows[5]["median_ms"]) == 1.0
    meta = json.loads(writer.json_path.read_text())
    assert meta["complete"] is True and meta["rows"] == 6 and meta["env"] == {"x": 1}
    samples = load_samples(writer.json_path)
    assert sorted(samples) == [0, 5] and len(samples[5]) == 5


def test_each_row_says_how_long_its_configuration_took(tmp_path, monkeypatch):
    # wall_s is the whole wait for a row (compile, check, warm-up, timing), not its timed samples.
    clock = iter([10.0, 10.5, 13.5, 14.0, 14.25, 15.0])  # start, (began, done) per configuration, end
    monkeypatch.setattr(runner, "_clock", lambda: next(clock))
    writer = run_sweep(_sweep(["slow", "fast"]), Context(torch.device("cpu")), tmp_path, {},
                       Console(file=open("/dev/null", "w")))
    assert [float(r["wall_s"]) for r in _read(writer.csv_path)] == [3.0, 0.25]
    meta = json.loads(writer.json_path.read_text())
    assert meta["wall_s"] == 5.0


def test_interrupted_run_keeps_finished_rows(tmp_path):
    sweep = _sweep(["slow", "fast", "ctrl-c", "fast"])
    with pytest.raises(Interrupted) as info:
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    assert info.value.rows == 2
    text = info.value.csv_path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3  # header + 2 whole rows
    meta = json.loads(info.value.csv_path.with_suffix(".json").read_text())
    assert meta["complete"] is False and meta["rows"] == 2


def test_a_fatal_error_ends_the_run_keeping_finished_rows(tmp_path):
    sweep = _sweep(["slow", "fatal", "fast"])
    with pytest.raises(Fatal, match="rank 1 exited with code 3") as info:
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    (csv_path,) = tmp_path.glob("toy-*.csv")
    assert (info.value.suite, info.value.csv_path, info.value.rows) == ("toy", csv_path, 1)
    rows = _read(csv_path)
    assert [(r["impl"], r["status"]) for r in rows] == [("slow", "ok")]  # no row for the fatal config, none after
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    assert meta["complete"] is False and meta["rows"] == 1


def test_full_float_precision_in_csv(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("fast", 1)], params=("impl", "size"), metrics=("rel_err",),
                  run=lambda c, ctx: Measurement({"rel_err": 1 / 3}, stats=Stats.of([0.1 + 0.2])))
    writer = run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    row = _read(writer.csv_path)[0]
    assert float(row["rel_err"]) == 1 / 3 and float(row["median_ms"]) == 0.1 + 0.2


def test_undeclared_column_is_a_bug(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("fast", 1)], params=("impl", "size"), metrics=(),
                  run=lambda c, ctx: Measurement({"surprise": 1}))
    with pytest.raises(AssertionError, match="surprise"):
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))


def test_best_row_and_speedup_skip_failures():
    sweep = _sweep([])
    rows = [
        {"impl": "slow", "status": "ok", "median_ms": 2.0},
        {"impl": "wrong", "status": "mismatch", "median_ms": 0.1},
        {"impl": "fast", "status": "ok", "median_ms": 1.0},
    ]
    assert report.best_row(sweep, rows)["impl"] == "fast"
    assert report.speedup(sweep, rows[2], rows[0]) == 2.0
    assert report.speedup(sweep, rows[1], rows[0]) is None
    assert report.speedup(sweep, {"impl": "calibration", "status": "ok"}, rows[0]) is None
    console = Console(record=True, width=200)
    report.render(sweep, [dict(r, suite="toy", size=1, reason="") for r in rows], console)
    text = console.export_text()
    assert "2.00x" in text and "mismatch" in text


# -- progress: work-weighted bar and ETA, a row's own steps, tables as groups finish ------------------


def test_eta_is_the_work_left_at_the_pace_of_the_work_done():
    assert runner.eta_seconds(10.0, 2.0, 8.0) == 30.0  # 2 units in 10 s: 6 units left take 30 s
    assert runner.eta_seconds(10.0, 8.0, 8.0) == 0.0
    assert runner.eta_seconds(10.0, 0.0, 8.0) is None  # no pace before any work is done
    assert runner.eta_seconds(None, 1.0, 8.0) is None


def _keep_bar(monkeypatch) -> list:
    """The sweep's Progress, kept for the test to look at."""
    bars, make = [], runner.progress_bar

    def keep(console):
        bars.append(make(console))
        return bars[-1]

    monkeypatch.setattr(runner, "progress_bar", keep)
    return bars


def test_the_bar_counts_cost_and_a_rows_own_steps(tmp_path, monkeypatch):
    bars = _keep_bar(monkeypatch)
    seen = []

    def run(cfg: Toy, ctx: Context) -> Measurement:
        task = bars[0].tasks[0]
        seen.append((task.completed, task.total, task.fields["rows"]))
        if cfg.size == 3:  # a long row: half of its 4 steps done is half of its cost
            ctx.step(2, 4)
            task = bars[0].tasks[0]
            seen.append((task.completed, task.fields["step"]))
        return Measurement(stats=Stats.of([1.0]))

    sweep = Sweep(suite="toy", configs=[Toy("fast", s) for s in (1, 2, 3)], run=run, params=("impl", "size"),
                  metrics=(), cost=lambda cfg: cfg.size)
    run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    assert seen == [(0.0, 6.0, "0/3"), (1.0, 6.0, "1/3"), (3.0, 6.0, "2/3"), (4.5, ("step", 2, 4))]
    task = bars[0].tasks[0]
    assert (task.completed, task.fields["rows"], task.fields["step"]) == (6.0, "3/3", None)


def test_without_costs_every_row_counts_the_same():
    assert _sweep(["slow", "fast"], sizes=(1, 2)).costs() == [1.0] * 4
    with pytest.raises(AssertionError, match="positive"):
        Sweep(suite="toy", configs=[Toy("fast", 0)], run=_run, params=("impl", "size"), metrics=(),
              cost=lambda cfg: cfg.size).costs()


def test_the_progress_line_at_160_columns_keeps_its_bar_and_cuts_the_configuration(tmp_path, monkeypatch):
    bars = _keep_bar(monkeypatch)
    lines = []

    @dataclass(frozen=True)
    class Wide:
        setup: str
        knobs: str

    def run(cfg: Wide, ctx: Context) -> Measurement:
        ctx.step(37, 300)
        screen = Console(file=io.StringIO(), width=160, record=True, color_system=None)
        screen.print(bars[0].make_tasks_table(bars[0].tasks))
        lines.extend(screen.export_text().splitlines())
        return Measurement(stats=Stats.of([1.0]))

    knobs = " ".join(f"knob{i}=value{i}" for i in range(20))  # about 280 characters
    sweep = Sweep(suite="ddp", configs=[Wide("no-ddp", knobs), Wide("ddp-1", knobs)], run=run,
                  params=("setup", "knobs"), metrics=(), label="setup")
    run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, Console(file=open("/dev/null", "w")))
    first, second = lines
    assert len(first) <= 160 and first.startswith("ddp ━")
    assert first.index("0/2") - len("ddp ") > 40  # the whole bar (40 wide), then the rows done
    assert "1/2" in second and "step 37/300" in first
    assert "setup=no-ddp" in first and first.rstrip().endswith("…")


class Tables:
    """on_group as the CLI's, rendering each group, into a recording console; keeps what it was handed."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.handed = sweep, []
        self.console = Console(file=io.StringIO(), record=True, width=200)

    def __call__(self, rows, partial, pool):
        self.handed.append(([(r["impl"], r["size"]) for r in rows], partial))
        report.render(self.sweep, rows, self.console, partial, pool)

    def titles(self) -> list[str]:
        return [line.strip() for line in self.console.export_text().splitlines() if line.startswith("toy")]


def test_each_group_is_handed_on_once_as_soon_as_it_is_done(tmp_path):
    tables_at_start = []

    def run(cfg: Toy, ctx: Context) -> Measurement:
        tables_at_start.append(len(tables.handed))
        return _run(cfg, ctx)

    sweep = dataclasses.replace(_sweep(["slow", "fast"], sizes=(1, 2, 3)), run=run)
    tables = Tables(sweep)
    run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, tables.console, on_group=tables)
    assert tables.handed == [([("slow", s), ("fast", s)], False) for s in (1, 2, 3)]
    assert tables_at_start == [0, 0, 1, 1, 2, 2]  # each table before the next group's rows run
    assert tables.titles() == ["toy  size=1", "toy  size=2", "toy  size=3"]


def test_a_group_whose_rows_are_apart_is_handed_on_once_after_its_last(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("slow", 1), Toy("slow", 2), Toy("fast", 1)], run=_run,
                  params=("impl", "size"), metrics=("rel_err",), baseline="slow")
    tables = Tables(sweep)
    run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, tables.console, on_group=tables)
    assert tables.handed == [([("slow", 2)], False), ([("slow", 1), ("fast", 1)], False)]


def test_ctrl_c_hands_on_the_begun_group_as_partial(tmp_path):
    # The 4th configuration is interrupted: size 1 is done, size 2 has one row of two.
    calls = []

    def run(cfg, ctx):
        calls.append(cfg)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return _run(cfg, ctx)

    sweep = dataclasses.replace(_sweep(["slow", "fast"], sizes=(1, 2)), run=run)
    tables = Tables(sweep)
    with pytest.raises(Interrupted) as info:
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, tables.console, on_group=tables)
    assert info.value.rows == 3 and len(_read(info.value.csv_path)) == 3
    assert tables.handed == [([("slow", 1), ("fast", 1)], False), ([("slow", 2)], True)]
    assert tables.titles() == ["toy  size=1", "toy  size=2  (partial)"]


def test_a_fatal_error_hands_on_the_begun_group_as_partial(tmp_path):
    sweep = _sweep(["slow", "fatal", "fast"])
    tables = Tables(sweep)
    with pytest.raises(Fatal):
        run_sweep(sweep, Context(torch.device("cpu")), tmp_path, {}, tables.console, on_group=tables)
    assert tables.handed == [([("slow", 1)], True)]


def test_ctrl_c_before_any_row_hands_on_nothing(tmp_path):
    handed = []
    with pytest.raises(Interrupted):
        run_sweep(_sweep(["ctrl-c", "fast"]), Context(torch.device("cpu")), tmp_path, {},
                  Console(file=open("/dev/null", "w")), on_group=lambda rows, partial: handed.append(rows))
    assert handed == []


@pytest.mark.parametrize("left_behind, full", [(0, False), (4096, True)])
def test_a_full_collection_only_when_a_row_left_device_memory(monkeypatch, left_behind, full):
    # A full gc walks every object torch's compilers made: on a GPU it runs only when the row
    # left more allocated than it found (a cycle may hold it), the young generations always.
    allocated = iter([1000, 1000 + left_behind])
    collected, emptied = [], []
    monkeypatch.setattr(runner, "_allocated", lambda device: next(allocated))
    monkeypatch.setattr(runner.gc, "collect", lambda *gen: collected.append(gen))
    monkeypatch.setattr(runner.torch.cuda, "empty_cache", lambda: emptied.append(True))
    sweep = Sweep(suite="toy", configs=[], run=_run, params=("impl", "size"), metrics=("rel_err",))
    ctx = Context(device=torch.device("cuda"))
    assert runner.measure_one(sweep, Toy("nope", 1), ctx).status == "unsupported"
    assert collected == ([(1,), ()] if full else [(1,)]) and emptied == [True]


def _timed_sweep(impls, calls, sizes=(1,)):
    """A sweep split at its timing (Sweep.timed): its steps sleep and log their calls; "flaky" fails on
    its fourth call and every call after, as a kernel faulting on some inputs would."""

    def prepare(cfg: Toy, ctx: Context):
        if cfg.impl not in ("fast", "slow", "flaky"):
            return _run(cfg, ctx)  # its failure, or its Measurement

        def step():
            calls.append(cfg.impl)
            if cfg.impl == "flaky" and calls.count("flaky") >= 4:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            time.sleep(0.0005 if cfg.impl == "fast" else 0.001)

        return runner.Timed(step, lambda stats: Measurement({"rel_err": 0.0}, stats=stats))

    configs = [Toy(i, s) for s in sizes for i in impls]
    return Sweep(suite="toy", configs=configs, run=runner.timed_run(prepare), timed=prepare,
                 params=("impl", "size"), metrics=("rel_err",), baseline="slow")


def test_interleave_times_a_tables_rows_in_turns_and_failures_stay_rows(tmp_path):
    calls = []
    sweep = _timed_sweep(["slow", "oom", "nope", "fast", "wrong"], calls, sizes=(1, 2))
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=8, interleave=3)
    writer = run_sweep(sweep, ctx, tmp_path, {}, Console(file=io.StringIO()))
    rows = _read(writer.csv_path)
    assert [(r["impl"], r["size"], r["status"]) for r in rows] == [
        (impl, size, status) for size in ("1", "2")
        for impl, status in (("slow", "ok"), ("oom", "oom"), ("nope", "unsupported"), ("fast", "ok"),
                             ("wrong", "mismatch"))]
    turns = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert turns.count("slow") >= 2 * 3  # three rounds in each of the two tables, the two rows in turns
    assert all(int(r["n"]) % 3 == 0 for r in rows if r["status"] == "ok")


def test_a_row_failing_during_the_rounds_fails_alone(tmp_path):
    calls = []
    sweep = _timed_sweep(["slow", "flaky", "fast"], calls)
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=8, interleave=3)
    rows = _read(run_sweep(sweep, ctx, tmp_path, {}, Console(file=io.StringIO())).csv_path)
    assert [(r["impl"], r["status"]) for r in rows] == [("slow", "ok"), ("flaky", "error"), ("fast", "ok")]
    assert "illegal memory access" in rows[1]["reason"]


def test_without_interleave_a_timed_sweep_times_each_row_alone(tmp_path):
    calls = []
    sweep = _timed_sweep(["slow", "fast"], calls)
    rows = _read(run_sweep(sweep, Context(torch.device("cpu"), warmup_ms=1, rep_ms=8), tmp_path, {},
                           Console(file=io.StringIO())).csv_path)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name] == ["slow", "fast"]



def test_a_tables_inputs_are_gone_before_its_memory_is_released(monkeypatch):
    # Timed in turns, a table's rows hold their inputs together; they must be freed before the
    # release, or every table would look as if it left device memory behind.
    import weakref

    class Inputs:
        pass

    refs, alive_at_release = [], []

    def prepare(cfg: Toy, ctx: Context):
        inputs = Inputs()
        refs.append(weakref.ref(inputs))
        return runner.Timed(lambda: inputs, lambda stats: Measurement({"rel_err": 0.0}, stats=stats))

    monkeypatch.setattr(runner, "_release_memory",
                        lambda device, before: alive_at_release.append([ref() is not None for ref in refs]))
    sweep = Sweep(suite="toy", configs=[], run=runner.timed_run(prepare), timed=prepare, params=("impl", "size"),
                  metrics=("rel_err",))
    ctx = Context(torch.device("cpu"), warmup_ms=1, rep_ms=2, interleave=2)
    measured = runner.measure_group(sweep, [Toy("fast", 1), Toy("slow", 1)], ctx, lambda i: None)
    assert [m.status for m in measured] == ["ok", "ok"]
    assert alive_at_release == [[False, False]]
