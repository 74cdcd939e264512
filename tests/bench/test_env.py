"""genbench env: one screen about the machine, on CPU."""

from __future__ import annotations

import platform
import re
import tempfile

import pytest
import torch
from typer.testing import CliRunner

from bench import env
from bench.cli import app
from bench.commands import env as env_command
from bench.env import cache_dir
from bench.errors import BadInput

runner = CliRunner()


def test_cache_dir_env_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()  # created on first use
    monkeypatch.delenv("GENBENCH_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "genbench"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset (XDG base directory spec)
    assert cache_dir() == tmp_path / "home" / ".cache" / "genbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "genbench"


def test_env_on_cpu_without_peaks(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))  # nothing calibrated yet
    result = runner.invoke(app, ["env", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    for key in ("device", "driver", "cuda", "cudnn", "nccl", "torch", "triton", "ptxas", "python", "settings",
                "sdpa backends", "bf16", "tf32", "fp8 matmul", "genbench"):
        assert f"│ {key} " in out, key
    assert torch.__version__ in out and platform.python_version() in out
    assert "flash, math run here (fp32" in out
    assert re.search(r"│   efficient +│ no: the efficient backend needs a CUDA device", out)
    assert "no: TF32 is a tensor-core mode of NVIDIA GPUs" in out
    assert "not measured yet: genbench env --calibrate" in out
    assert len(out.splitlines()) < 40  # one screen


def test_settings_are_the_variables_that_change_a_run(monkeypatch):
    monkeypatch.setenv("TRITON_PTXAS_BLACKWELL_PATH", "/t/ptxas")
    monkeypatch.setenv("GENBENCH_GLUON_SELFCHECK", "1")
    monkeypatch.setenv("HF_TOKEN", "secret")  # not a setting, and never written out
    got = env.settings()
    assert got["TRITON_PTXAS_BLACKWELL_PATH"] == "/t/ptxas" and got["GENBENCH_GLUON_SELFCHECK"] == "1"
    assert "HF_TOKEN" not in got and list(got) == sorted(got)
    result = runner.invoke(app, ["env", "--device", "cpu"])
    assert "TRITON_PTXAS_BLACKWELL_PATH=/t/ptxas" in result.output.replace("\n", "")


def test_ptxas_is_the_assembler_triton_picks_for_the_device(monkeypatch):
    assert env.ptxas(torch.device("cpu")) is None and env.ptxas(None) is None
    triton = pytest.importorskip("triton")
    from triton.backends.nvidia.compiler import get_ptxas  # runs on any x86 host, GPU or not
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert env.ptxas(torch.device("cuda")) == get_ptxas(90).version
    assert re.fullmatch(r"\d+\.\d+", env.ptxas(torch.device("cuda"))), triton.__version__


def test_env_calibrate_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    first = runner.invoke(app, ["env", "--device", "cpu", "--calibrate"])
    assert first.exit_code == 0, first.output
    assert "fp32 matmul" in first.output and "TFLOP/s (measured)" in first.output
    assert re.search(r"│ tf32 matmul +│ unsupported", first.output)
    assert "GB/s (measured, read+write)" in first.output
    assert "sdpa backends" in first.output
    again = runner.invoke(app, ["env", "--device", "cpu"])  # read back from the cache
    assert "not measured yet" not in again.output and "TFLOP/s (measured)" in again.output


def test_backend_and_format_probes_report_reasons():
    dtype, backends = env_command._sdpa_backends(torch.device("cpu"))
    assert dtype == "fp32" and backends["math"] == "yes"
    assert backends["cudnn"].startswith("no: ")
    assert env_command._tf32(torch.device("cpu")).startswith("no: ")
    assert re.fullmatch(r"yes \(torch\._scaled_mm\)|no: .+", env_command._fp8(torch.device("cpu")))
    assert re.fullmatch(r"runs.*|no: .+", env_command._bf16(torch.device("cpu")))


def test_bad_device_exits_2():
    result = runner.invoke(app, ["env", "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be auto, cuda, cuda:N or cpu" in result.output


def test_fp8_answer_is_the_precision_suites(cpu):
    from impls import fp8

    assert fp8.why_not(cpu)  # on a CPU, never "yes"
    assert env_command._fp8(cpu) == f"no: {fp8.why_not(cpu)}"


def test_cache_dir_naming_a_file_or_under_one_is_bad_input(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("GENBENCH_CACHE", str(afile))
    with pytest.raises(BadInput, match=r"afile \(from \$GENBENCH_CACHE\) is a file, not a folder: unset GENBENCH_CACHE"):
        cache_dir()
    # Root writes through permission bits, so a path through a file stands in for a read-only folder.
    monkeypatch.setenv("GENBENCH_CACHE", str(afile / "sub"))
    with pytest.raises(BadInput, match=r"afile/sub \(from \$GENBENCH_CACHE\) cannot be written \(Not a directory\)"):
        cache_dir()
    monkeypatch.delenv("GENBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(afile))
    with pytest.raises(BadInput, match=r"from \$XDG_CACHE_HOME\) cannot be written .*: set GENBENCH_CACHE to a"):
        cache_dir()


def test_cache_dir_that_refuses_a_file_is_bad_input(tmp_path, monkeypatch):
    def refuse(dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "read-only"))
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(BadInput, match=r"read-only \(from \$GENBENCH_CACHE\) cannot be written \(Permission denied\)"):
        cache_dir()


@pytest.mark.parametrize("command", [["env", "--device", "cpu"],
                                     ["attention", "--impl", "naive", "--seq", "32", "--device", "cpu"]])
@pytest.mark.parametrize("under", ["", "sub"])
def test_unusable_cache_is_one_line_and_exit_2(tmp_path, monkeypatch, command, under):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("GENBENCH_CACHE", str(afile / under))
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "out")] if command[0] != "env" else command)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: the genbench cache") and "point it at a writable folder" in line
    assert not list((tmp_path / "out").glob("*.csv"))  # before the first configuration


def test_clocks_row_says_what_nvml_gave():
    _clocks = env_command._clocks
    info = {"max_sm_clock_MHz": 1980.0, "power_limit_W": 700.0, "clocks_locked": True}
    assert _clocks(info) == "SM max 1980 MHz, power limit 700 W, clocks locked"
    assert _clocks({**info, "power_limit_W": None, "clocks_locked": None}) == "SM max 1980 MHz, clock locks unknown"
    assert _clocks({"max_sm_clock_MHz": None, "power_limit_W": None, "clocks_locked": None}).startswith("- (NVML")
