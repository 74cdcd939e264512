"""The command line, through Typer's CliRunner: exit codes and files written."""

import csv
import errno
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench
from bench import cli
from bench.cli import app
from bench.results import ResultWriter
from bench.stats import Stats, stat_columns
from suites import attention as suite

runner = CliRunner()
SMALL = ["--seq", "64,100", "--heads", "2", "--head-dim", "16", "--batch", "2", "--warmup-ms", "1", "--rep-ms", "5",
         "--device", "cpu"]


def _rows(out):
    (path,) = out.glob("attention-*.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_attention_writes_csv_and_env_json(tmp_path):
    # Every row but our Triton kernels', which run through Triton's interpreter here, seconds a call
    # (tests/suites/test_attention.py runs them on CPU).
    impls = [name for name in suite.IMPLS if name not in ("tiled", "tiled-triton")]
    result = runner.invoke(app, ["attention", *SMALL, *[a for name in impls for a in ("--impl", name)],
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path)
    # 2 lengths × 2 masks × each impl, every one a row
    assert len(rows) == 2 * 2 * len(impls)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"naive", "tiled-torch", "flex", "sdpa", "sdpa-math"}
    assert all(float(r["rel_err"]) < 1e-4 for r in ok)
    assert {r["status"] for r in rows} <= {"ok", "unsupported"}
    (meta_path,) = tmp_path.glob("attention-*.json")
    meta = json.loads(meta_path.read_text())
    env = meta["env"]
    for key in ("torch", "triton", "ptxas", "cuda", "cudnn", "driver", "gpu_name", "gpu_count", "genbench",
                "git_commit", "hostname", "command_line", "timestamp", "seed", "settings"):
        assert key in env
    assert meta["complete"] is True and env["seed"] == 0
    assert "speedup" in result.output and "against naive" in result.output
    titles = [line.split()[1] for line in result.output.splitlines() if line.startswith("attention  seq=")]
    assert titles == ["seq=64", "seq=64", "seq=100", "seq=100"]  # non-causal then causal, shorter first


def test_interleave_times_each_table_in_turns_and_says_so(tmp_path):
    result = runner.invoke(app, ["attention", *SMALL, "--impl", "naive", "--impl", "sdpa", "--interleave", "3",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path)
    assert [(r["impl"], r["seq"], r["causal"]) for r in rows] == [
        (impl, seq, causal) for seq in ("64", "100") for causal in ("False", "True") for impl in ("naive", "sdpa")]
    assert all(r["status"] == "ok" and int(r["n"]) % 3 == 0 for r in rows)  # three rounds' worth each
    (meta_path,) = tmp_path.glob("attention-*.json")
    assert json.loads(meta_path.read_text())["env"]["interleave_rounds"] == 3


def test_interleave_defaults_to_rounds_on_a_gpu_only(tmp_path):
    import torch

    from bench.commands import GPU_INTERLEAVE, RunOptions

    assert RunOptions(torch.device("cuda"), tmp_path).interleave == GPU_INTERLEAVE > 1
    assert RunOptions(torch.device("cpu"), tmp_path).interleave == 0
    assert RunOptions(torch.device("cuda"), tmp_path, interleave=0).interleave == 0
    result = runner.invoke(app, ["attention", *SMALL, "--impl", "naive", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (meta_path,) = tmp_path.glob("attention-*.json")
    assert "interleave_rounds" not in json.loads(meta_path.read_text())["env"], "each row alone on a CPU"


@pytest.mark.parametrize("args, message", [
    (["--seq", "8q"], "cannot read '8q'"),
    (["--seq", "0"], "positive"),
    (["--heads", "6", "--kv-heads", "4"], "not divisible"),
    (["--impl", "flash3"], "known: naive"),
    (["--dtype", "fp8"], "--dtype"),
    (["--batch", "-1"], "--batch"),
    (["--device", "tpu"], "--device"),
    (["--interleave", "-1"], "--interleave"),
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


# --- what the light commands import --------------------------------------------------------

HEAVY = ("torch", "scipy", "matplotlib")
ROOT = Path(__file__).resolve().parents[2]
# Runs each command line (argv[1]) in one fresh interpreter, in order, and prints
# after each which of the modules in argv[2] are loaded by then.
PROBE = """
import json, sys
from bench.cli import app
loaded = {}
for argv in json.loads(sys.argv[1]):
    try:
        app(argv, prog_name="genbench")
    except SystemExit:
        pass
    loaded[" ".join(argv)] = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print("\\n" + json.dumps(loaded))
"""


def _loaded_after(lines: list[list[str]], modules: tuple[str, ...]) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(lines), json.dumps(modules)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def _small_run(folder: Path, median_ms: float) -> Path:
    """A one-row attention run without raw samples: compare judges it by the IQRs, without scipy."""
    meta = {"params": ["impl"], "label": "impl", "metrics": [], "primary": "median_ms", "higher_is_better": False}
    writer = ResultWriter(folder, "attention", ["suite", "impl", "status", "reason", *stat_columns()], {},
                          stamp="run", meta=meta)
    row = {"suite": "attention", "impl": "naive", "status": "ok", "reason": ""}
    writer.write({**row, **Stats.of([median_ms * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)]).columns()})
    writer.close(complete=True)
    return writer.csv_path


def test_help_compare_plot_and_argument_errors_import_no_torch_or_scipy(tmp_path):
    from tests.bench.test_plot import attention_run

    base, new = _small_run(tmp_path / "a", 1.0), _small_run(tmp_path / "b", 2.0)
    plot = ["plot", str(attention_run(tmp_path / "p")), "-o", str(tmp_path / "chart.png")]
    lines = [["--help"], ["--version"],
             *([command, "--help"] for command in ("attention", "compare", "precision", "ddp", "env", "plot", "medusa")),
             ["medusa", "train", "--help"],
             ["attention", "--no-such-option"], ["precision", "--steps", "many"], ["compare", str(base)],
             ["compare", str(base), str(new), "--format", "xml"],
             ["compare", str(base), str(new)], ["compare", str(base), str(new), "--format", "md"],
             plot]  # last, in the same interpreter: plot needs matplotlib, which none of the others may load
    loaded, output = _loaded_after(lines, HEAVY)
    assert loaded == {**{" ".join(line): [] for line in lines[:-1]}, " ".join(plot): ["matplotlib"]}
    assert "worse" in output  # compare did run: 1 ms -> 2 ms
    assert (tmp_path / "chart.png").is_file()


def test_help_names_what_the_suites_define():
    # The command modules spell these out so that --help needs no torch; they must not drift.
    from suites.cli import attention as attention_command, medusa as medusa_command, precision as precision_command
    from impls import data, gpt, medusa as medusa_impl, precision
    from suites import medusa as medusa_suite, precision as precision_suite

    assert attention_command.IMPLS == tuple(suite.IMPLS)
    assert attention_command.GROUP == suite.GROUP
    assert precision_command.MODELS == tuple(gpt.PRESETS)
    assert precision_command.DATA_PRESETS == tuple(data.PRESETS)
    assert precision_command.PRECISIONS == tuple(precision.PRECISIONS) == tuple(precision_suite.PRECISIONS)
    assert precision_command.DEFAULT_PRECISIONS == precision_suite.DEFAULT_PRECISIONS
    assert precision_command.LR == precision_suite.LR
    assert medusa_command.PRESETS == tuple(medusa_suite.PRESETS)
    assert medusa_command.METHODS == medusa_suite.METHODS
    assert medusa_command.DEFAULT_TREE_SIZE == medusa_impl.DEFAULT_TREE_SIZE
    assert medusa_command.TREE_ATTENTION == medusa_suite.TREE_ATTENTION


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"genbench {bench.__version__}\n"  # the installed package's, the same number


@pytest.mark.parametrize("command", [[], ["attention"], ["compare"], ["plot"], ["env"], ["precision"], ["ddp"],
                                     ["medusa"], ["medusa", "train"]])
def test_help_shows_flags_without_a_value(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--help " in result.output and "<bool>" not in result.output


def test_usage_names_arguments_in_capitals():
    assert "compare [OPTIONS] BASE NEW" in runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "200"}).output
    assert "plot [OPTIONS] RESULTS" in runner.invoke(app, ["plot", "--help"], env={"COLUMNS": "200"}).output
    missing = runner.invoke(app, ["compare", "a.csv"])
    assert missing.exit_code == 2 and "NEW" in missing.output


# --- faults outside the arguments: one line, before anything runs ------------------------------


def _no_sweep(monkeypatch):
    monkeypatch.setattr(suite, "run", lambda cfg, ctx: pytest.fail("measured although --out cannot be written"))


def _one_line_error(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_out_naming_a_file(tmp_path, monkeypatch):
    _no_sweep(monkeypatch)
    file = tmp_path / "results.csv"
    file.write_text("")
    result = runner.invoke(app, ["attention", *SMALL, "--out", str(file)])
    _one_line_error(result, 2, f"--out: {file} is a file, not a folder")
    result = runner.invoke(app, ["attention", *SMALL, "--out", str(file / "runs")])  # a file in the way: ENOTDIR
    _one_line_error(result, 2, f"--out: {file} is a file, not a folder")


def test_out_on_a_read_only_disk(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: the write is refused as a read-only mount would.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    _no_sweep(monkeypatch)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = runner.invoke(app, ["attention", *SMALL, "--out", str(tmp_path / "runs")])
    _one_line_error(result, 2, f"--out: cannot write into {tmp_path / 'runs'}: Read-only file system")


def test_a_write_refused_mid_run_is_one_line_and_exit_1(tmp_path, monkeypatch):
    # The folder passed the check, then the file system turned read-only.
    def refuse(self):
        raise OSError(errno.EROFS, "Read-only file system", str(self.json_path) + ".tmp")

    monkeypatch.setattr(ResultWriter, "_write_json", refuse)
    result = runner.invoke(app, ["attention", *SMALL, "--impl", "naive", "--out", str(tmp_path)])
    _one_line_error(result, 1, ".json.tmp: Read-only file system")


def test_a_damaged_cache_names_the_file_not_data(tmp_path, monkeypatch):
    from suites.cli.training import data_config
    from impls.data import load_data
    from suites import precision as precision_suite

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    built = load_data(data_config([str(corpus)], "byte", None, "tiny"), tmp_path / "cache")
    tokens = built.path / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    monkeypatch.setattr(precision_suite, "sweep", lambda *a: pytest.fail("trained on a damaged cache"))
    result = runner.invoke(app, ["precision", "--device", "cpu", "--data", str(corpus), "--tokenizer", "byte",
                                 "--out", str(tmp_path / "out")])
    _one_line_error(result, 1, f"the cached corpus file {tokens} cannot be read")
    assert "--data" not in result.output and f"delete {built.path}" in result.output


def test_main_drops_torchs_warning_about_the_autograd_threads_cuda_context(monkeypatch):
    def app():  # the warning as torch's backward raises it on a GPU, and any other
        warnings.warn("Attempting to run cuBLAS, but there was no current CUDA context! "
                      "Attempting to set the primary context...", UserWarning)
        warnings.warn("any other warning", UserWarning)

    monkeypatch.setattr(cli, "app", app)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        cli.main()
    assert [str(w.message) for w in shown] == ["any other warning"]
