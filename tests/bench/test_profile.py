"""--profile: torch.profiler traces and the top-10 table, on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from bench import profile
from bench.cli import app
from bench.runner import Context, Measurement, Sweep, run_sweep
from bench.stats import Stats
from tests.conftest import requires_cuda

runner = CliRunner()
CPU = torch.device("cpu")


def test_profile_fn_writes_a_chrome_trace_and_ranks_operators(tmp_path):
    a = torch.randn(768, 768)  # large enough that a preempted relu (pytest-xdist's other worker) cannot pass it
    calls = []

    def step():
        calls.append(1)
        return torch.relu(a @ a)

    trace = tmp_path / "traces" / "row0.pt.trace.json"
    top = profile.profile_fn(step, CPU, trace)
    assert len(calls) == profile.WAIT + profile.WARMUP + profile.ACTIVE == 5
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names and "aten::relu" in names
    # Only the active steps are in the trace: three ProfilerStep spans.
    assert len([n for n in names if n and n.startswith("ProfilerStep")]) == profile.ACTIVE
    assert top[0].name == "aten::mm" and top[0].calls_per_step == 1  # a 768^3 matmul dwarfs the relu
    assert len(top) <= profile.TOP and not any(op.name.startswith("ProfilerStep") for op in top)
    assert [op.ms_per_step for op in top] == sorted((op.ms_per_step for op in top), reverse=True)
    assert 0 < sum(op.share for op in top) <= 1 + 1e-9


def test_context_profile_is_a_no_op_without_the_flag():
    calls = []
    assert Context(CPU).profile(lambda: calls.append(1)) is None
    assert calls == []


def test_a_failing_profile_is_reported_not_raised(tmp_path):
    profiler = profile.Profiler(CPU)
    profiler.folder, profiler.row = tmp_path, (2, "impl=x")

    def broken():
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")

    result = profiler.profile(broken)
    assert result.error == "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" and result.trace is None
    console = Console(record=True, width=200)
    profile.render(profiler, console)
    assert "profile of row 2 (impl=x) failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in console.export_text()


@dataclass(frozen=True)
class Toy:
    impl: str
    size: int


def _run(cfg: Toy, ctx: Context) -> Measurement:
    if cfg.impl == "nope":
        raise RuntimeError("never profiled")
    a = torch.randn(cfg.size, cfg.size)
    ctx.profile(lambda: a @ a)
    return Measurement(stats=Stats.of([1.0, 1.1, 0.9]))


def test_runner_names_traces_after_csv_rows(tmp_path):
    sweep = Sweep(suite="toy", configs=[Toy("mm", 64), Toy("nope", 64), Toy("mm", 128)], run=_run,
                  params=("impl", "size"), metrics=())
    ctx = Context(CPU, profiler=profile.Profiler(CPU))
    writer = run_sweep(sweep, ctx, tmp_path, {}, Console(file=open("/dev/null", "w")))
    folder = tmp_path / f"{writer.csv_path.stem}-traces"
    assert ctx.profiler.folder == folder
    # A folder per row (HTA reads every file of a folder as a rank of one job), the plugin's worker name in it.
    assert sorted(p.name for p in folder.iterdir()) == ["row0-impl=mm-size=64", "row2-impl=mm-size=128"]
    assert [p.name for p in (folder / "row0-impl=mm-size=64").iterdir()] == ["rank0.pt.trace.json"]
    assert [p.row for p in ctx.profiler.profiles] == [0, 2]


SMALL = ["--seq", "32", "--heads", "2", "--head-dim", "16", "--batch", "1", "--warmup-ms", "1", "--rep-ms", "3",
         "--device", "cpu", "--causal", "--impl", "naive", "--impl", "sdpa", "--impl", "sdpa-cudnn"]


def test_cli_profile_flag(tmp_path):
    result = runner.invoke(app, ["attention", *SMALL, "--profile", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("attention-*-traces")
    rows = sorted(p.name for p in folder.iterdir())
    assert len(rows) == 2 and rows[0].startswith("row0-impl=naive-seq=32")  # sdpa-cudnn: unsupported on CPU
    assert all(json.loads((folder / r / "rank0.pt.trace.json").read_text())["traceEvents"] for r in rows)
    out = result.output
    assert "top 10 by self CPU time" in out and "aten::bmm" in out  # naive attention: two batched matmuls
    assert "https://ui.perfetto.dev" in out and f"tensorboard --logdir {folder}" in out
    # Timed rows are unaffected: the same CSV as without --profile.
    assert len((tmp_path / f"{folder.name[:-len('-traces')]}.csv").read_text().splitlines()) == 4


def test_cli_without_profile_writes_no_traces(tmp_path):
    result = runner.invoke(app, ["attention", *SMALL, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("*-traces")) and "perfetto" not in result.output


# -- the trace analysers, where their extras are installed (genbench[tb], genbench[hta]) ---------------

NAIVE = [*SMALL[:SMALL.index("--impl")], "--impl", "naive"]


def _traces(tmp_path, device: str = "cpu") -> Path:
    """One profiled row of naive attention, which calls two batched matmuls (QK^T, PV) per step."""
    args = [a if a != "cpu" else device for a in NAIVE]
    result = runner.invoke(app, ["attention", *args, "--profile", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("attention-*-traces")
    return folder


def _tensorboard_runs(folder: Path):
    """The runs TensorBoard's profiler plugin finds under --logdir `folder`, each loaded by its own loader."""
    io = pytest.importorskip("torch_tb_profiler.io")
    from torch_tb_profiler.plugin import TorchProfilerPlugin
    from torch_tb_profiler.profiler.loader import RunLoader

    # The plugin's own run discovery, which only reads `logdir`.
    run_dirs = list(TorchProfilerPlugin._get_run_dirs(SimpleNamespace(logdir=str(folder))))
    return [RunLoader(Path(d).name, d, io.Cache()).load() for d in run_dirs]


def test_tensorboard_plugin_reads_our_traces(tmp_path):
    pytest.importorskip("torch_tb_profiler")
    (run,) = _tensorboard_runs(_traces(tmp_path))
    assert run.name.startswith("row0-impl=naive-seq=32")
    (prof,) = run.get_profiles()
    assert prof.worker == "rank0" and prof.span is None
    ops = {op["name"]: op for op in prof.operation_table_by_name["data"]}
    assert ops["aten::bmm"]["calls"] == 2 * profile.ACTIVE  # 2 per step, 3 active steps


@requires_cuda
@pytest.mark.gpu
def test_tensorboard_plugin_finds_the_kernels_on_a_gpu(tmp_path):
    pytest.importorskip("torch_tb_profiler")
    (run,) = _tensorboard_runs(_traces(tmp_path, "cuda"))
    (prof,) = run.get_profiles()
    assert prof.has_kernel and prof.kernel_table["data"]["rows"], "no kernel in the plugin's kernel view"


def test_holistic_trace_analysis_reads_a_row(tmp_path):
    pytest.importorskip("hta")
    from hta.trace_analysis import TraceAnalysis

    (row,) = _traces(tmp_path).iterdir()
    # HTA drops a trace's last step unless told (its kernels may outlast the trace); ours synchronize each step.
    analysis = TraceAnalysis(trace_dir=str(row), include_last_profiler_step=True)
    trace = analysis.t.get_trace(0)  # rank 0: the one file of the row
    names = analysis.t.symbol_table.sym_table
    bmm = trace[trace["name"] == names.index("aten::bmm")]
    assert len(bmm) == 2 * profile.ACTIVE  # 2 per step, 3 active steps


@requires_cuda
@pytest.mark.gpu
def test_holistic_trace_analysis_breaks_down_the_kernels_on_a_gpu(tmp_path):
    pytest.importorskip("hta")
    from hta.trace_analysis import TraceAnalysis

    (row,) = _traces(tmp_path, "cuda").iterdir()
    analysis = TraceAnalysis(trace_dir=str(row), include_last_profiler_step=True)
    by_type, by_kernel = analysis.get_gpu_kernel_breakdown(visualize=False)
    assert len(by_type) and len(by_kernel)  # computation kernels at least
