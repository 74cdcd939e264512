"""The command line, through Typer's CliRunner: exit codes and files written."""

import csv
import json

import pytest
from typer.testing import CliRunner

from bench.cli import app
from suites import attention as suite

runner = CliRunner()
SMALL = ["--seq", "64,100", "--heads", "2", "--head-dim", "16", "--batch", "2", "--warmup-ms", "1", "--rep-ms", "5",
         "--device", "cpu"]


def _rows(out):
    (path,) = out.glob("attention-*.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_attention_writes_csv_and_env_json(tmp_path):
    result = runner.invoke(app, ["attention", *SMALL, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path)
    # 2 lengths × 2 masks × 7 impls, every one a row
    assert len(rows) == 2 * 2 * len(suite.IMPLS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"naive", "tiled", "sdpa", "sdpa-math"}
    assert all(float(r["rel_err"]) < 1e-4 for r in ok)
    assert {r["status"] for r in rows} <= {"ok", "unsupported"}
    (meta_path,) = tmp_path.glob("attention-*.json")
    meta = json.loads(meta_path.read_text())
    env = meta["env"]
    for key in ("torch", "triton", "cuda", "cudnn", "driver", "gpu_name", "gpu_count", "genbench", "git_commit",
                "hostname", "command_line", "timestamp", "seed"):
        assert key in env
    assert meta["complete"] is True and env["seed"] == 0
    assert "speedup" in result.output and "against naive" in result.output
    titles = [line.split()[1] for line in result.output.splitlines() if line.startswith("attention  seq=")]
    assert titles == ["seq=64", "seq=64", "seq=100", "seq=100"]  # non-causal then causal, shorter first


@pytest.mark.parametrize("args, message", [
    (["--seq", "8q"], "cannot read '8q'"),
    (["--seq", "0"], "positive"),
    (["--heads", "6", "--kv-heads", "4"], "not divisible"),
    (["--impl", "flash3"], "known: naive"),
    (["--dtype", "fp8"], "--dtype"),
    (["--batch", "-1"], "--batch"),
    (["--device", "tpu"], "--device"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["attention", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))  # nothing started


def test_cuda_requested_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["attention", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_ctrl_c_keeps_finished_rows_and_exits_130(tmp_path, monkeypatch):
    calls = []
    real_run = suite.run

    def run(cfg, ctx):
        calls.append(cfg)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(cfg, ctx)

    monkeypatch.setattr(suite, "run", run)
    result = runner.invoke(app, ["attention", *SMALL, "--impl", "naive", "--impl", "tiled", "--out", str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert "interrupted: 2 finished rows" in result.output and "Traceback" not in result.output
    assert len(_rows(tmp_path)) == 2
    # The finished group's table (non-causal: naive, tiled) is printed, once; the causal group had no row yet.
    assert result.output.count("causal=False") == 1 and "causal=True" not in result.output
    assert result.output.index("causal=False") < result.output.index("interrupted: 2 finished rows")


def test_env_command(tmp_path):
    result = runner.invoke(app, ["env", "--device", "cpu", "--calibrate"])
    assert result.exit_code == 0, result.output
    assert "fp32 matmul" in result.output and "TFLOP/s (measured)" in result.output
    assert "sdpa backends" in result.output


def test_python_dash_m_bench_runs_and_records_its_command_line(tmp_path):
    import subprocess
    import sys

    args = ["attention", *SMALL, "--impl", "naive", "--seq", "32", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (meta_path,) = tmp_path.glob("attention-*.json")
    assert json.loads(meta_path.read_text())["env"]["command_line"] == " ".join(["python -m bench", *args])


def test_zero_head_dim_is_an_error_not_the_default(tmp_path):
    result = runner.invoke(app, ["attention", "--device", "cpu", "--head-dim", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--head-dim must be positive" in result.output
