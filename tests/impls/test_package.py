"""Importing impls keeps Triton's floating-point contraction on unless the user set it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _value_after_import(env: dict) -> str:
    code = "import os, impls; print(os.environ.get('TRITON_DEFAULT_FP_FUSION'))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_fp_fusion_defaults_on():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    assert _value_after_import(env) == "1"


def test_a_users_choice_stands():
    assert _value_after_import({**os.environ, "TRITON_DEFAULT_FP_FUSION": "0"}) == "0"
