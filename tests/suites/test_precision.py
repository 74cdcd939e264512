"""The precision suite: options, row order, the parity verdict, the MFU
accounting, real tiny training runs on CPU, and the command line."""

import csv
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from bench import metrics
from bench.cli import app
from bench.env import cache_dir
from bench.errors import BadInput
from bench.runner import Context, measure_one
from bench.telemetry import Telemetry
from impls.data import DataConfig, load_data
from impls.gpt import GPT, GPTConfig
from impls.precision import Precision, cpu_has_matmul_instructions
from suites import precision as suite
from tests.conftest import requires_cuda

runner = CliRunner()
CPU = torch.device("cpu")
# A byte-level corpus needs no tokenizer training; a 2 x 32 batch keeps CPU fp16 (slow on x86) quick.
SMALL = dict(model="tiny", steps=8, batch=2, seq_len=32, eval_batches=2, lr=3e-3)


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig.from_name("bytes"), cache_dir())


# -- options and rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="gpt5"), "known: tiny, small, gpt2-small, medium"),
    (dict(steps=0), "--steps must be positive"),
    (dict(batch=-2), "--batch must be positive"),
    (dict(seq_len=257), "longer than tiny's context of 256"),
    (dict(precisions=("fp64",)), "known: fp32, tf32, fp16, bf16, bf16-pure, fp8"),
    (dict(precisions=("bf16+jit",)), "unknown --precision 'bf16+jit'"),
    (dict(precisions=()), "at least one --precision"),
    (dict(steps=10, band_steps=11), "--band-steps"),
    (dict(steps=10, band_steps=1), "above the 1 warm-up steps"),
    (dict(steps=10, warmup_steps=10), "--warmup-steps"),
    (dict(eval_batches=-1), "--eval-batches"),
    (dict(lr=0.0), "--lr"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        suite.PrecisionOptions(**kwargs)


def _labels(**kwargs):
    return [c.precision for c in suite.PrecisionOptions(**kwargs).configs()]


def test_reference_and_band_run_first_even_when_not_asked():
    assert _labels(precisions=("bf16", "fp16")) == ["fp32", "fp32-band", "bf16", "fp16"]
    assert _labels(precisions=("bf16", "fp32", "bf16")) == ["fp32", "fp32-band", "bf16"]  # moved up, deduplicated
    assert _labels(precisions=("bf16", "fp16"), parity=False) == ["bf16", "fp16"]
    # without parity fp32 still runs first when asked for (speedups are taken against it), with no band
    assert _labels(precisions=("bf16", "fp32"), parity=False) == ["fp32", "bf16"]


def test_compile_suffix_and_flag():
    configs = suite.PrecisionOptions(precisions=("fp32", "bf16", "bf16+compile")).configs()
    assert [(c.precision, c.base, c.compile) for c in configs] == [
        ("fp32", "fp32", False), ("fp32-band", "fp32", False), ("bf16", "bf16", False), ("bf16+compile", "bf16", True)]
    # --compile compiles every row, the reference included
    assert _labels(precisions=("bf16",), compile=True) == ["fp32+compile", "fp32+compile-band", "bf16+compile"]


def test_band_steps_warmup_and_matmul_rows():
    configs = suite.PrecisionOptions(steps=300, band_steps=100, precisions=("bf16",), matmul=True).configs()
    by_label = {c.precision: c for c in configs}
    assert by_label["fp32"].train_steps == 300 and by_label["fp32-band"].train_steps == 100
    assert {c.steps for c in configs if c.role != "matmul"} == {300}  # one schedule, one table
    assert {c.warmup_steps for c in configs if c.role != "matmul"} == {30}
    assert [c.precision for c in configs[:5]] == [f"matmul-{d}" for d in suite.MATMUL_DTYPES]
    assert suite.PrecisionOptions(steps=1).warmup == 0 and suite.PrecisionOptions(steps=5).warmup == 1


# -- parity verdict on made-up curves --------------------------------------------------------------

REF = np.array([10.0, 8.0, 6.0, 5.0, 4.0])


@pytest.mark.parametrize("curve, expected", [
    (REF * 1.01, "match"),                                 # 1% everywhere, band 2%
    (REF * [1, 1, 1.05, 1.01, 1.0], "drift"),              # 5% at one step, back inside at the end
    (REF * [1, 1, 1, 1, 1.03], "diverged"),                # ends outside the band
    (REF * [1, 1, np.nan, 1, 1], "diverged"),              # a NaN anywhere
    (REF * [1, 1, 1, 1, np.inf], "diverged"),
])
def test_verdict(curve, expected):
    parity = suite.verdict(curve, REF, band=0.02)
    assert parity.verdict == expected


def test_verdict_numbers():
    parity = suite.verdict(REF * [1, 1, 1.05, 1.01, 1.0], REF, band=0.02)
    assert parity.max_rel_diff == pytest.approx(0.05) and parity.final_rel_diff == pytest.approx(0.0)
    assert parity.nonfinite == 0
    assert suite.verdict(REF * [1, np.nan, np.inf, 1, 1], REF, band=0.02).nonfinite == 2
    # the band itself: the nudged run's curve against the reference, over the steps both have
    band = suite.verdict(np.array([10.5, 8.0]), REF, band=None)
    assert band.max_rel_diff == pytest.approx(0.05) and band.verdict == ""


def test_tolerance_window_and_running_mean_by_hand():
    assert suite.tolerance(None) is None and suite.tolerance(float("nan")) is None
    assert suite.tolerance(1e-7) == 0.01  # a band that has not grown yet: the floor
    assert suite.tolerance(0.02) == pytest.approx(0.06)  # 3 x band
    assert [suite.window(s) for s in (8, 30, 60, 300)] == [1, 1, 3, 15]
    np.testing.assert_allclose(suite.running_mean(np.array([1.0, 2.0, 3.0, 6.0]), 2), [1.5, 2.5, 4.5])
    np.testing.assert_array_equal(suite.running_mean(np.array([1.0, 2.0]), 5), [1.0, 2.0])  # too short to average


def test_a_loss_15_percent_off_is_not_a_match_when_fp32_agrees_with_itself():
    # The case: a band from other batches was 19.4%, so 15% off passed. Against fp32 on
    # the same batches from nudged weights the band is tiny, and the 1% floor decides.
    ref = np.linspace(10.0, 6.0, 20)
    band = suite.verdict(ref * (1 + 1e-7), ref, None).max_rel_diff
    tol = suite.tolerance(band)
    assert tol == 0.01
    assert suite.verdict(ref * 1.15, ref, tol).verdict == "diverged"
    assert suite.verdict(ref * 1.005, ref, tol).verdict == "match"


def test_verdict_through_a_running_mean():
    # 20 steps, window 5: a one-step spike of 10% is 2% in the mean (a match at 3%);
    # a 5% offset held over the last 8 steps is 5% in the mean (diverged).
    ref = np.full(20, 4.0)
    spike = ref.copy()
    spike[9] *= 1.10
    assert suite.verdict(spike, ref, 0.03).verdict == "drift"  # step by step
    parity = suite.verdict(spike, ref, 0.03, w=5)
    assert parity.verdict == "match" and parity.max_rel_diff == pytest.approx(0.02)
    offset = ref * np.r_[np.ones(12), np.full(8, 1.05)]
    parity = suite.verdict(offset, ref, 0.03, w=5)
    assert parity.verdict == "diverged" and parity.final_rel_diff == pytest.approx(0.05)


def test_nudged_weights_are_one_ulp_away(data):
    shared = suite.Shared(data, suite.PrecisionOptions(**SMALL))
    before, after = shared.initial_model(0), shared.nudged_model(0, 1)
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        up, down = torch.nextafter(a, torch.tensor(torch.inf)), torch.nextafter(a, torch.tensor(-torch.inf))
        assert torch.all((b == up) | (b == down)), name  # every element moved to a float32 neighbour
    a, b = before.lm_head.weight, after.lm_head.weight
    assert 0.3 < (b > a).float().mean() < 0.7  # up or down at random
    assert torch.equal(shared.initial_model(0).lm_head.weight, a)  # the shared initial weights are untouched


def test_no_verdict_without_reference_or_band():
    assert suite.verdict(REF, None, 0.02).verdict == ""
    assert suite.verdict(REF, REF * [1, 1, np.nan, 1, 1], 0.02).verdict == ""  # the reference diverged
    assert suite.verdict(REF, REF, float("inf")).verdict == ""


def test_loss_curve_round_trip():
    curve = np.array([9.021062850952148, 4.5, float("nan"), float("inf")])
    text = suite.format_curve(curve)
    assert text.split(";")[:2] == ["9.021062850952148", "4.5"]
    np.testing.assert_array_equal(suite.parse_curve(text), curve)


# -- MFU accounting ---------------------------------------------------------------------------------


def test_flops_per_token_by_hand_and_against_torch_flop_counter():
    cfg = GPTConfig.from_name("tiny", vocab_size=256)
    model = GPT(cfg)
    L, d, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, 64
    # Per block: qkv (d x 3d + 3d), attention out (d x d + d), MLP (d x 4d + 4d, 4d x d + d), two LayerNorms (2d
    # each); then the tied token table (V x d) and the final LayerNorm. The position table is not counted.
    weights = L * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + V * d
    small = L * (3 * d + d + 4 * d + d + 2 * 2 * d) + 2 * d
    assert model.num_params() == weights + small == 429_568
    per_token = metrics.transformer_train_flops_per_token(model.num_params(), L, d, T)
    assert per_token == 6 * 429_568 + 12 * 2 * 128 * 64 == model.flops_per_token(T)

    # torch's own count of one training step: every weight matmul, 2 FLOPs per weight and token forward and 4
    # backward, i.e. 6 x the weight matrices; the formula's 6N also counts biases and gains (<1% here).
    x = torch.randint(0, V, (2, T))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    assert matmuls == 6 * weights * 2 * T
    assert 6 * model.num_params() * 2 * T == pytest.approx(matmuls, rel=0.01)

    # MFU: 10,000 tokens/s on a 1 TFLOP/s device
    assert metrics.mfu(10_000, per_token, 1.0) == pytest.approx(100 * 10_000 * per_token / 1e12)


# -- real training on CPU ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_rows(data):
    """Every precision trained for 8 steps on CPU, through the harness's isolation."""
    opts = suite.PrecisionOptions(**SMALL, matmul=True)
    sweep = suite.sweep(opts, data, CPU)
    peaks = {"fp32_tflops": 0.5, "tf32_tflops": None, "fp16_tflops": 0.01, "bf16_tflops": 1.0}
    ctx = Context(CPU, peaks=peaks, seed=0)
    return {c.precision: (c, measure_one(sweep, c, ctx)) for c in sweep.configs}


def test_every_precision_row_has_its_status_on_cpu(cpu_rows):
    status = {label: m.status for label, (_, m) in cpu_rows.items()}
    assert status == {
        "fp32": "ok", "fp32-band": "ok", "tf32": "unsupported", "fp16": "ok", "bf16": "ok", "bf16-pure": "ok",
        "fp8": "unsupported", "matmul-fp32": "ok", "matmul-tf32": "unsupported", "matmul-fp16": "ok",
        "matmul-bf16": "ok", "matmul-fp8": "unsupported",
    }
    assert "CPU" in cpu_rows["tf32"][1].reason and "CPU" in cpu_rows["fp8"][1].reason
    assert cpu_rows["matmul-bf16"][1].values["tflops"] == 1.0  # the calibrated figure, shown as is


def test_training_rows_learn_and_are_compared_with_fp32(cpu_rows):
    ref = suite.parse_curve(cpu_rows["fp32"][1].values["loss_curve"])
    band = cpu_rows["fp32-band"][1].values["max_rel_diff"]
    # weights one ulp apart move the loss by about 1e-9 of itself: over 8 steps the two fp32 curves
    # may differ in a last bit or not at all (the tolerance is then the floor)
    assert 0 <= band < 1e-3
    for label in ("fp32", "fp32-band", "fp16", "bf16", "bf16-pure"):
        cfg, m = cpu_rows[label]
        v = m.values
        curve = suite.parse_curve(v["loss_curve"])
        assert len(curve) == cfg.train_steps == SMALL["steps"] and np.isfinite(curve).all()
        assert curve[-2:].mean() < curve[:2].mean() - 0.3, f"{label} did not learn: {curve}"
        assert v["loss_first"] == curve[0] and v["loss_final"] == curve[-1]
        assert math.isfinite(v["val_loss"]) and v["nonfinite"] == 0
        # step times: the warm-up step left out, the rest kept as raw samples
        assert m.stats.n == SMALL["steps"] - cfg.warmup_steps and m.stats.median > 0
        assert v["tokens_per_s"] == pytest.approx(2 * 32 / (m.stats.median / 1e3))
        assert v["mfu"] == pytest.approx(metrics.mfu(v["tokens_per_s"], v["flops_per_token"], v["peak_tflops"]))
        assert v["peak_mem_MiB"] is None  # nothing measured on CPU, nothing invented
        assert v["joules_per_step"] is None and v["tokens_per_J"] is None  # no energy counter on a CPU
        if label in ("fp16", "bf16", "bf16-pure"):
            # same initial weights and batches: identical up to rounding at step 0, within the band after
            assert curve[0] == pytest.approx(ref[0], rel=1e-3)
            assert v["verdict"] == "match" and v["band"] == band
            assert v["max_rel_diff"] == pytest.approx(np.max(np.abs(curve - ref) / ref))
            assert abs(v["val_rel_diff"]) < 0.05
    assert cpu_rows["fp32"][1].values["verdict"] == "" and cpu_rows["fp32"][1].values["note"] == "parity reference"
    # the peak each row's MFU is taken against: its products' dtype
    assert [cpu_rows[p][1].values["peak_tflops"] for p in ("fp32", "fp16", "bf16", "bf16-pure")] == [0.5, 0.01, 1, 1]
    # speedup against fp32, both medians from this run
    fp32_ms = cpu_rows["fp32"][1].stats.median
    assert cpu_rows["fp32"][1].values["speedup"] == 1.0
    assert cpu_rows["bf16"][1].values["speedup"] == pytest.approx(fp32_ms / cpu_rows["bf16"][1].stats.median)
    # GradScaler: only fp16 has one
    fp16 = cpu_rows["fp16"][1].values
    assert fp16["skipped_steps"] >= 0 and fp16["final_scale"] > 0
    assert cpu_rows["bf16"][1].values["skipped_steps"] is None


def test_band_is_fp32_from_nudged_weights_on_the_same_batches(cpu_rows):
    ref = suite.parse_curve(cpu_rows["fp32"][1].values["loss_curve"])
    band = cpu_rows["fp32-band"][1].values
    curve = suite.parse_curve(band["loss_curve"])
    # the same first batch and weights one ulp apart: the same loss to fp32 rounding
    # (another batch's loss differs by a percent or more)
    assert curve[0] == pytest.approx(ref[0], rel=1e-5)
    assert band["max_rel_diff"] < 1e-3 and band["tolerance"] == suite.tolerance(band["max_rel_diff"])
    assert "nudged one ulp" in band["note"]


def test_verdict_tells_a_broken_precision_from_honest_ones(data, monkeypatch):
    """fp16 whose gradients all underflow (its loss scaled by 2^-24 instead of up)
    stops learning: diverged. fp32 from other nudged weights, and bf16: match."""

    class Underflows(Precision):
        def scaler(self, device):
            return torch.amp.GradScaler(device.type, init_scale=2.0**-24, growth_interval=10**6)

    class Nudged(Precision):  # another equally valid fp32 run: other weights one ulp away
        def prepare(self, model):
            return suite.nudge(model, seed=7)

    underflows = Underflows("fp16-underflow", autocast_dtype=torch.float16, grad_scaler=True)
    monkeypatch.setitem(suite.PRECISIONS, "fp16-underflow", underflows)
    monkeypatch.setitem(suite.PRECISIONS, "fp32-nudged", Nudged("fp32-nudged"))
    opts = suite.PrecisionOptions(**{**SMALL, "eval_batches": 0}, precisions=("bf16", "fp16-underflow", "fp32-nudged"))
    sweep = suite.sweep(opts, data, CPU)
    rows = {c.precision: measure_one(sweep, c, Context(CPU, seed=0)) for c in sweep.configs}
    assert {label: m.values["verdict"] for label, m in rows.items()} == {
        "fp32": "", "fp32-band": "", "bf16": "match", "fp16-underflow": "diverged", "fp32-nudged": "match"}
    broken = rows["fp16-underflow"].values
    assert broken["final_rel_diff"] > 0.1  # fp32 learned, it did not
    assert rows["bf16"].values["max_rel_diff"] > 10 * rows["fp32-band"].values["band"]  # the floor let bf16 match


def test_a_precision_whose_products_stay_fp32_is_unsupported(data, monkeypatch):
    """A bf16 row whose autocast lowers nothing (here: no autocast at all) would be
    fp32 under bf16's name; the row says so instead of reporting it."""

    class NoAutocast(Precision):
        def context(self, device):
            return self.matmul_mode()

    monkeypatch.setitem(suite.PRECISIONS, "bf16", NoAutocast("bf16", autocast_dtype=torch.bfloat16))
    sweep = suite.sweep(suite.PrecisionOptions(**SMALL, precisions=("bf16",), parity=False), data, CPU)
    m = measure_one(sweep, sweep.configs[0], Context(CPU, seed=0))
    assert m.status == "unsupported"
    assert "no matrix product ran in bfloat16 on this cpu (products: 11 in float32)" in m.reason


def test_cpu_rows_say_when_this_cpu_has_no_bf16_or_fp16_matrix_instructions(cpu_rows):
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        said = "matrix instructions" in cpu_rows[label][1].values["note"]
        assert said == (cpu_has_matmul_instructions(dtype) is False), label


def test_small_differences_are_shown_not_rounded_to_zero():
    columns = {c.name: c.fmt for c in suite.display(suite.PrecisionOptions(), CPU)}
    assert columns["max_rel_diff"].format(2.8e-5) == "2.8e-05"
    assert columns["val_rel_diff"].format(-2.06e-6) == "-2.1e-06"
    assert columns["tolerance"].format(0.01) == "0.01"


def test_energy_per_step_by_hand():
    # 30 J over 12 steps of which 2 warm up: 3 J per timed step; 4 x 8 tokens a step: 32 / 3 tokens per J
    cfg = SimpleNamespace(train_steps=12, warmup_steps=2, batch=4, seq_len=8)
    trainer = SimpleNamespace(window=SimpleNamespace(telemetry=Telemetry(energy_J=30.0)))
    assert suite._energy(cfg, trainer) == {"joules_per_step": 3.0, "tokens_per_J": pytest.approx(32 / 3)}
    trainer.window.telemetry = Telemetry()  # no energy (a CPU, an old GPU, a short window)
    assert suite._energy(cfg, trainer) == {"joules_per_step": None, "tokens_per_J": None}


def test_same_seed_same_weights_and_batches(data):
    """Two fp32 rows from one seed give the same curve to the bit: the rows
    differ only in what the precision changes."""
    sweep = suite.sweep(suite.PrecisionOptions(**{**SMALL, "steps": 3}, parity=False), data, CPU)
    cfg = sweep.configs[0]
    assert cfg.precision == "fp32"
    steps = []
    a, b = (measure_one(sweep, cfg, Context(CPU, seed=0, on_step=lambda *s: steps.append(s))) for _ in range(2))
    assert a.values["loss_curve"] == b.values["loss_curve"]
    assert steps == [(1, 3, "step"), (2, 3, "step"), (3, 3, "step")] * 2  # each row's steps, for the progress line
    c = measure_one(sweep, cfg, Context(CPU, seed=1))
    assert c.values["loss_curve"] != a.values["loss_curve"]


def test_fp16_overflow_is_counted_as_skipped_steps(data, monkeypatch):
    """A loss scale of 2^120 overflows fp16's gradients: GradScaler skips the
    step and halves the scale each time, and the row says how many it lost."""

    class HugeScale(Precision):
        def scaler(self, device):
            return torch.amp.GradScaler(device.type, init_scale=2.0**120)

    monkeypatch.setitem(suite.PRECISIONS, "fp16", HugeScale("fp16", autocast_dtype=torch.float16, grad_scaler=True))
    sweep = suite.sweep(suite.PrecisionOptions(**{**SMALL, "steps": 4}, precisions=("fp16",), parity=False), data, CPU)
    m = measure_one(sweep, sweep.configs[0], Context(CPU, seed=0))
    assert m.status == "ok", m.reason
    assert m.values["skipped_steps"] >= 1
    assert m.values["final_scale"] == 2.0 ** (120 - m.values["skipped_steps"])
    assert "GradScaler skipped" in m.values["note"]


# -- the command line -------------------------------------------------------------------------------

CLI = ["precision", "--device", "cpu", "--model", "tiny", "--steps", "4", "--batch", "2", "--seq-len", "32",
       "--eval-batches", "1"]


def _rows(out):
    (path,) = out.glob("precision-*.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_rows_with_fp32_first(tmp_path):
    result = runner.invoke(app, [*CLI, "--data", "bytes", "--precision", "bf16", "--precision", "tf32", "--matmul",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path)
    assert [(r["precision"], r["status"]) for r in rows] == [
        ("matmul-fp32", "ok"), ("matmul-tf32", "unsupported"), ("matmul-fp16", "ok"), ("matmul-bf16", "ok"),
        ("matmul-fp8", "unsupported"), ("fp32", "ok"), ("fp32-band", "ok"), ("bf16", "ok"), ("tf32", "unsupported")]
    assert "fp32 trains first (added: parity needs it)" in result.output
    assert rows[7]["verdict"] in suite.VERDICTS and len(rows[7]["loss_curve"].split(";")) == 4
    assert float(rows[0]["tflops"]) > 0  # the calibrated fp32 rate of this CPU
    meta = json.loads(next(tmp_path.glob("precision-*.json")).read_text())
    assert meta["complete"] and meta["label"] == "precision" and meta["baseline"] == "fp32"
    assert "speedup" in result.output and "against fp32" in result.output


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp64"], "unknown --precision 'fp64'; known: fp32"),
    (["--model", "gpt5"], "unknown --model 'gpt5'; known: tiny"),
    (["--steps", "0"], "--steps must be positive"),
    (["--batch", "0"], "--batch must be positive"),
    (["--seq-len", "4096"], "longer than tiny's context of 256 tokens"),
    (["--data", "/no/such/dir"], "neither a file nor a folder"),
    (["--vocab-size", "100"], "vocab_size"),
    (["--device", "tpu"], "--device"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, [*CLI, "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))  # nothing ran


def test_too_little_text_for_the_sequence_length(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 100)  # 600 bytes: a held-out split of 30 tokens
    result = runner.invoke(app, [*CLI, "--data", str(short), "--tokenizer", "byte", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "too few for --seq-len 32" in result.output, result.output
    assert not list(tmp_path.glob("*.csv"))


def test_cli_on_own_text_files(tmp_path):
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(3):
        (text / f"part{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400 + str(i))
    result = runner.invoke(app, [*CLI, "--data", str(text), "--tokenizer", "byte", "--precision", "fp32",
                                 "--no-parity", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (row,) = _rows(tmp_path / "out")
    assert row["status"] == "ok" and row["data"].startswith("1 path(s), byte 256")


# -- on the GPU machine -----------------------------------------------------------------------------


@requires_cuda
def test_gpu_rows(data):
    opts = suite.PrecisionOptions(**{**SMALL, "steps": 12}, precisions=("tf32", "bf16", "bf16+compile", "fp8"))
    sweep = suite.sweep(opts, data, torch.device("cuda"))
    ctx = Context(torch.device("cuda"), peaks={"fp32_tflops": 50.0, "tf32_tflops": 400.0, "bf16_tflops": 790.0})
    rows = {c.precision: measure_one(sweep, c, ctx) for c in sweep.configs}
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    for label, m in rows.items():
        expected = "ok" if label != "fp8" or fp8_ok else "unsupported"
        assert m.status == expected, f"{label}: {m.reason}"
        if m.status == "ok":
            assert m.values["peak_mem_MiB"] > 0 and m.values["verdict"] in ("",) + suite.VERDICTS
    assert rows["tf32"].values["peak_tflops"] == 400.0 and rows["bf16+compile"].values["compiled"] is True


@pytest.mark.parametrize("seq_len", [1, 7, 8, 16, 24, 64, 1024])
def test_dtype_check_forward_has_rows_fp8_can_multiply(seq_len):
    # fp8's products take row counts that are multiples of 16 only: the check's
    # forward once had 8 tokens, and every fp8 row on a GPU ended in an error.
    batch, tokens = suite.probe_shape(seq_len)
    assert tokens <= min(seq_len, 16)
    assert (batch * tokens) % 16 == 0
    assert batch * tokens <= 16 * 16
