"""Your own implementation in the attention table: `--impl module:function`,
and a package that registers one under the entry-point group
genbench.attention (or a whole suite under genbench.suites). The package is
written here into a temporary folder with its dist-info, which
importlib.metadata finds on sys.path as it finds an installed package's."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from suites import attention as suite

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--seq", "64", "--heads", "2", "--head-dim", "16", "--batch", "2", "--warmup-ms", "1", "--rep-ms", "5",
         "--device", "cpu"]

KERNELS = '''
import torch


def attention(q, k, v, causal):
    """Softmax attention written out, (B, H, S, D) in and out; no causal mask."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def _why_not(q, k, v, causal):
    return "genbench_test_kernels masks nothing" if causal else None


attention.why_not = _why_not


def wrong(q, k, v, causal):
    return attention(q, k, v, causal) * 1.01


def two_args(q, k):
    return q


def raises(q, k, v, causal):
    raise RuntimeError("kernel launch failed")


NOT_CALLABLE = 3
'''

SUITE = '''
import typer

from bench.registry import Suite


def hello(name: str = "world"):
    """Say hello: a suite an installed package adds."""
    typer.echo(f"hello {name}")


SUITE = Suite("hello", hello)
'''


def _package(root: Path, name: str, files: dict[str, str], entry_points: str) -> Path:
    """A package `name` under root, and the dist-info that installs it with these entry points."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    for module, text in files.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(text))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


@pytest.fixture(scope="module")
def kernels_path(tmp_path_factory):
    yield _package(tmp_path_factory.mktemp("site"), "genbench_test_kernels", {"flash": KERNELS}, """
        [genbench.attention]
        myflash = genbench_test_kernels.flash:attention
        mywrong = genbench_test_kernels.flash:wrong
        """)
    suite._plugin.cache_clear()


@pytest.fixture
def kernels(kernels_path, monkeypatch):
    monkeypatch.syspath_prepend(str(kernels_path))


def _rows(out: Path) -> list[dict]:
    (path,) = out.glob("attention-*.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(out: Path, *impls: str, mask: tuple[str, ...] = ()) -> list[dict]:
    args = [a for impl in impls for a in ("--impl", impl)]
    result = runner.invoke(app, ["attention", *SMALL, *mask, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return _rows(out)


def test_your_function_is_measured_beside_the_built_in_ones(kernels, tmp_path):
    rows = _run(tmp_path, "naive", "genbench_test_kernels.flash:attention", "myflash")
    by = {(r["impl"], r["causal"]): r for r in rows}
    assert len(rows) == 3 * 2  # causal off and on
    for impl in ("genbench_test_kernels.flash:attention", "myflash"):
        mine = by[(impl, "False")]
        assert mine["status"] == "ok" and float(mine["rel_err"]) < 1e-5, mine["reason"]
        assert float(mine["median_ms"]) > 0 and float(mine["tflops"]) > 0
        assert mine["kernel"] == "genbench_test_kernels.flash:attention"  # what ran
        # Its why_not turns away the causal mask: a row saying so, not a wrong answer.
        assert by[(impl, "True")]["status"] == "unsupported"
        assert by[(impl, "True")]["reason"] == "genbench_test_kernels masks nothing"
    assert by[("naive", "True")]["status"] == "ok"


def test_a_wrong_answer_is_a_mismatch_and_not_timed(kernels, tmp_path):
    rows = _run(tmp_path, "mywrong", "genbench_test_kernels.flash:wrong", mask=("--no-causal",))
    assert [r["status"] for r in rows] == ["mismatch"] * 2
    assert all(float(r["rel_err"]) == pytest.approx(0.01, rel=1e-3) and r["median_ms"] == "" for r in rows)
    assert "above the fp32 tolerance" in rows[0]["reason"]


@pytest.mark.parametrize("impl, reason", [
    ("two_args", "TypeError: --impl genbench_test_kernels.flash:two_args takes (q, k); genbench calls it as "
                 "fn(q, k, v, causal)"),
    ("raises", "RuntimeError: kernel launch failed"),
])
def test_a_function_that_cannot_run_is_an_error_row(kernels, tmp_path, impl, reason):
    rows = _run(tmp_path, "naive", f"genbench_test_kernels.flash:{impl}")
    mine = [r for r in rows if r["impl"] != "naive"]
    assert [(r["status"], r["reason"]) for r in mine] == [("error", reason)] * 2
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "naive")  # the others are measured


@pytest.mark.parametrize("impl, message", [
    ("nosuchpkg.kernels:attention", "--impl nosuchpkg.kernels:attention: cannot import nosuchpkg.kernels: "
                                    "ModuleNotFoundError: No module named 'nosuchpkg'"),
    ("genbench_test_kernels.flash:nothing", "genbench_test_kernels.flash has no nothing"),
    ("genbench_test_kernels.flash:NOT_CALLABLE", "is a int, not a function of (q, k, v, causal)"),
    ("genbench_test_kernels.flash:", "expected module:attribute"),
    ("flash4", "unknown --impl flash4; known: naive, tiled"),
])
def test_a_name_that_cannot_be_had_is_one_line_and_exit_2(kernels, tmp_path, impl, message):
    result = runner.invoke(app, ["attention", *SMALL, "--impl", "naive", "--impl", impl, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not list(tmp_path.glob("*.csv"))  # nothing started


def test_unknown_names_list_the_installed_ones(kernels):
    result = runner.invoke(app, ["attention", "--device", "cpu", "--impl", "flash4"])
    assert result.exit_code == 2 and "sdpa-math, myflash, mywrong, or your own as module:function" in result.output


def test_list_shows_built_in_installed_and_your_own(kernels):
    result = runner.invoke(app, ["attention", "--list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split(None, 2)[2] == ", ".join(suite.IMPLS)
    assert "installed  myflash  (genbench_test_kernels.flash:attention, from genbench_test_kernels 0.1)" in lines
    assert "installed  mywrong  (genbench_test_kernels.flash:wrong, from genbench_test_kernels 0.1)" in lines
    assert lines[-1].startswith("your own   --impl module:function")


def test_an_installed_package_adds_to_help_and_adds_a_suite(kernels_path, tmp_path):
    """As a user sees it: a fresh process, the package on its path. A suite
    whose entry point cannot be loaded is a warning, and the rest still works."""
    site = _package(tmp_path, "genbench_test_suite", {"suite": SUITE}, """
        [genbench.suites]
        hello = genbench_test_suite.suite:SUITE
        broken = genbench_test_suite.missing:SUITE
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(kernels_path), str(site)]),
           "COLUMNS": "400"}  # each option's help on one line

    def genbench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)

    top = genbench("--help")
    assert top.returncode == 0, top.stderr
    assert "hello" in top.stdout and "Say hello" in top.stdout and "attention" in top.stdout
    assert top.stderr.count("warning:") == 1
    assert "suite broken (genbench_test_suite.missing:SUITE, from genbench_test_suite 0.1): cannot import " \
           "genbench_test_suite.missing: ModuleNotFoundError" in top.stderr
    assert "Installed: myflash, mywrong." in genbench("attention", "--help").stdout
    hello = genbench("hello", "--name", "genbench")
    assert hello.returncode == 0 and hello.stdout == "hello genbench\n"



def test_list_imports_no_torch():
    from tests.bench.test_cli import HEAVY, _loaded_after

    loaded, output = _loaded_after([["attention", "--list"]], HEAVY)
    assert loaded == {"attention --list": []} and "sdpa-math" in output
