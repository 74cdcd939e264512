"""tools/compile_warp_spec.py compiles the Triton forward with and without warp specialization, on CPU."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tool_prints_a_row_per_variant():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    # Two of the five variants, one through pointers and one through TMA descriptors (all five: no --only).
    run = subprocess.run([sys.executable, "-m", "tools.compile_warp_spec", "--only", "w8 s2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"triton {triton.__version__}, target sm_90a, _fwd_kernel D=128 128x64 non-causal"
    rows = lines[1:]
    assert [r.split()[:3] for r in rows] == [["pointer", "w8", "s2"], ["tma", "w8", "s2"]]
    assert all("plain: compiles;" in r for r in rows), run.stdout  # the forward without it always builds


def test_tool_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "tools.compile_warp_spec"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and "unset TRITON_INTERPRET" in run.stderr and "Traceback" not in run.stderr
