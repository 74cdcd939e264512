"""Your own implementation in the attention table: `--impl module:function`,
and a package that registers one under the entry-point group
genbench.attention (or a whole suite under genbench.suites); your own model
in the precision table: `--model module:function`, or one registered under
genbench.precision. The packages are written here into a temporary folder
with their dist-info, which importlib.metadata finds on sys.path as it finds
an installed package's."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from suites import attention as suite, precision as precision_suite

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

MODELS = '''
import torch
import torch.nn.functional as F

from impls.gpt import GPT, GPTConfig


def gpt(vocab_size, seq_len):
    """One block of width 32: it has flops_per_token, so its rows have MFU."""
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=seq_len))


class Bigram(torch.nn.Module):
    """The next token's logits from the current token alone; no flops_per_token."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 32)
        self.head = torch.nn.Linear(32, vocab_size)

    def forward(self, idx, targets):
        logits = self.head(self.embed(idx))
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def bigram(vocab_size, seq_len):
    return Bigram(vocab_size)


class LogitsOnly(Bigram):
    def forward(self, idx, targets):
        return super().forward(idx, targets)[0]


def logits_only(vocab_size, seq_len):
    return LogitsOnly(vocab_size)


def with_config(vocab_size, seq_len):
    return gpt(vocab_size, seq_len), {"n_layer": 1}


def raises(vocab_size, seq_len):
    raise ValueError("no weights for this vocabulary")


def one_arg(vocab_size):
    return Bigram(vocab_size)


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


@pytest.fixture(scope="module")
def models_path(tmp_path_factory):
    yield _package(tmp_path_factory.mktemp("site"), "genbench_test_models", {"zoo": MODELS}, """
        [genbench.precision]
        mygpt = genbench_test_models.zoo:gpt
        mybroken = genbench_test_models.zoo:raises
        """)
    precision_suite._factory.cache_clear()


@pytest.fixture
def models(models_path, monkeypatch):
    monkeypatch.syspath_prepend(str(models_path))


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
    assert result.exit_code == 2 and "xformers, myflash, mywrong, or your own as module:function" in result.output


def test_list_shows_built_in_installed_and_your_own(kernels):
    result = runner.invoke(app, ["attention", "--list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split(None, 2)[2] == ", ".join(suite.IMPLS)
    assert "installed  myflash  (genbench_test_kernels.flash:attention, from genbench_test_kernels 0.1)" in lines
    assert "installed  mywrong  (genbench_test_kernels.flash:wrong, from genbench_test_kernels 0.1)" in lines
    assert lines[-1].startswith("your own   --impl module:function")


def test_an_installed_package_adds_to_help_and_adds_a_suite(kernels_path, models_path, tmp_path):
    """As a user sees it: a fresh process, the package on its path. A suite
    whose entry point cannot be loaded is a warning, and the rest still works."""
    site = _package(tmp_path, "genbench_test_suite", {"suite": SUITE}, """
        [genbench.suites]
        hello = genbench_test_suite.suite:SUITE
        broken = genbench_test_suite.missing:SUITE
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(kernels_path), str(models_path), str(site)]),
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
    assert "Installed: mybroken, mygpt." in genbench("precision", "--help").stdout
    hello = genbench("hello", "--name", "genbench")
    assert hello.returncode == 0 and hello.stdout == "hello genbench\n"



def test_list_imports_no_torch():
    from tests.bench.test_cli import HEAVY, _loaded_after

    loaded, output = _loaded_after([["attention", "--list"], ["precision", "--list"]], HEAVY)
    assert loaded == {"attention --list": [], "precision --list": []}
    assert "sdpa-math" in output and "gpt2-small" in output


# -- your model in the precision table -------------------------------------------------------------

# A byte corpus (vocabulary 256, no tokenizer to train), 4 steps of 2 x 32 tokens.
PRECISION = ["precision", "--device", "cpu", "--data", "bytes", "--steps", "4", "--batch", "2", "--seq-len", "32",
             "--eval-batches", "1"]


def _precision(out: Path, model: str, *args: str) -> list[dict]:
    result = runner.invoke(app, [*PRECISION, "--model", model, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    (path,) = out.glob("precision-*.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_your_model_trains_under_each_precision_with_parity(models, tmp_path):
    rows = _precision(tmp_path, "genbench_test_models.zoo:gpt", "--precision", "bf16")
    assert [(r["precision"], r["model"], r["status"]) for r in rows] == [
        ("fp32", "genbench_test_models.zoo:gpt", "ok"), ("fp32-band", "genbench_test_models.zoo:gpt", "ok"),
        ("bf16", "genbench_test_models.zoo:gpt", "ok")]
    for row in rows:
        curve = [float(v) for v in row["loss_curve"].split(";")]
        assert len(curve) == 4 and curve[-1] < curve[0], row  # it learns
        # The model's own count: one block of width 32 over 256 tokens, 12·32² weights in the block, 13·32
        # biases and gains, 256·32 in the tied token table, 2·32 in the final norm: N = 20,960 (positions left
        # out), and 6·N + 12·1·32·32 FLOPs per token at 32 tokens (impls/gpt.py).
        assert int(row["n_params"]) == 12 * 32**2 + 13 * 32 + 256 * 32 + 2 * 32 == 20_960
        assert float(row["flops_per_token"]) == 6 * 20_960 + 12 * 32 * 32 == 138_048
        assert float(row["tflops"]) > 0
    assert rows[2]["verdict"] in precision_suite.VERDICTS


def test_your_model_by_its_installed_name(models, tmp_path):
    (row,) = _precision(tmp_path, "mygpt", "--precision", "fp32", "--no-parity")
    assert (row["model"], row["status"]) == ("mygpt", "ok")
    assert "model genbench_test_models.zoo:gpt" in row["note"]  # what the name built


def test_a_model_without_flops_per_token_has_no_mfu_and_says_why(models, tmp_path):
    rows = _precision(tmp_path, "genbench_test_models.zoo:bigram", "--precision", "fp32", "--precision", "bf16",
                      "--no-parity")
    assert [(r["precision"], r["status"]) for r in rows] == [("fp32", "ok"), ("bf16", "ok")]
    for row in rows:
        assert float(row["tokens_per_s"]) > 0 and float(row["median_ms"]) > 0
        assert row["flops_per_token"] == row["tflops"] == row["mfu"] == ""  # not guessed
        assert "no TFLOP/s nor MFU: Bigram has no flops_per_token(seq_len)" in row["note"]
        # every parameter: the 256 x 32 table, the 32 -> 256 head and its bias
        assert int(row["n_params"]) == 256 * 32 + 32 * 256 + 256


@pytest.mark.parametrize("model, reason", [
    ("genbench_test_models.zoo:raises", "RuntimeError: genbench_test_models.zoo:raises(256, 32) raised ValueError: "
                                        "no weights for this vocabulary"),
    ("mybroken", "RuntimeError: genbench_test_models.zoo:raises(256, 32) raised ValueError: "
                 "no weights for this vocabulary"),
    ("genbench_test_models.zoo:with_config", "TypeError: genbench_test_models.zoo:with_config(256, 32) returned a "
                                             "tuple, not a torch.nn.Module"),
    ("genbench_test_models.zoo:logits_only", "TypeError: --model genbench_test_models.zoo:logits_only: "
                                             "forward(idx, targets) returned Tensor(1, 16, 256); genbench expects "
                                             "(logits, loss) with a scalar loss"),
])
def test_a_factory_that_fails_is_an_error_row(models, tmp_path, model, reason):
    rows = _precision(tmp_path, model, "--precision", "fp32", "--precision", "bf16", "--no-parity")
    assert [(r["precision"], r["status"], r["reason"]) for r in rows] == [
        ("fp32", "error", reason), ("bf16", "error", reason)]


@pytest.mark.parametrize("model, message", [
    ("nosuchpkg.models:gpt", "--model nosuchpkg.models:gpt: cannot import nosuchpkg.models: ModuleNotFoundError: "
                             "No module named 'nosuchpkg'"),
    ("genbench_test_models.zoo:nothing", "genbench_test_models.zoo has no nothing"),
    ("genbench_test_models.zoo:NOT_CALLABLE", "is a int, not a function of (vocab_size, seq_len)"),
    ("genbench_test_models.zoo:one_arg", "--model genbench_test_models.zoo:one_arg: genbench_test_models.zoo:one_arg "
                                         "takes (vocab_size); genbench calls it as factory(vocab_size, seq_len)"),
    ("gpt5", "unknown --model 'gpt5'; known: tiny, small, gpt2-small, medium, mybroken, mygpt, or your own as "
             "module:function"),
])
def test_a_model_that_cannot_be_had_is_one_line_and_exit_2(models, tmp_path, model, message):
    result = runner.invoke(app, [*PRECISION, "--model", model, "--out", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not list(tmp_path.glob("*.csv"))  # nothing started


def test_precision_list_shows_presets_installed_and_your_own(models):
    from suites.cli import precision as command

    assert command.GROUP == precision_suite.GROUP
    result = runner.invoke(app, ["precision", "--list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "built in   tiny, small, gpt2-small, medium"
    assert lines[1:3] == ["installed  mybroken  (genbench_test_models.zoo:raises, from genbench_test_models 0.1)",
                          "installed  mygpt  (genbench_test_models.zoo:gpt, from genbench_test_models 0.1)"]
    assert lines[3].startswith("your own   --model module:function, a factory(vocab_size, seq_len)")
