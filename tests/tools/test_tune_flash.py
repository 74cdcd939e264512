"""tools/tune_flash.py: its correctness phase, on CPU through Triton's interpreter (--dry-run)."""

import csv

import pytest

pytest.importorskip("triton")


def test_dry_run_checks_configs_against_float64(run_tool, tmp_path):
    # CUDA hidden: --dry-run is the CPU path, run in the tool's worker process as on the GPU machine.
    done = run_tool("tune_flash", "--dry-run", "--workers", "1", "--out", str(tmp_path),
                    TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "correctness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all("error" not in r or not r["error"] for r in rows), rows
    # Each job's forward and gradients against float64 within the tests' tolerances (bf16 2e-2, fp16 2e-3).
    for r in rows:
        tol = 2e-2 if r["dtype"] == "bfloat16" else 2e-3
        assert r["nan"] == "False" and max(float(r[n]) for n in ("out", "dq", "dk", "dv")) < tol, r


def test_help_lists_the_experiments(run_tool):
    done = run_tool("tune_flash", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(flag in done.stdout for flag in ("--gluon", "--gluon-bwd", "--schedule", "--dry-run"))
