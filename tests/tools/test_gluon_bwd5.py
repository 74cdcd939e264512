"""The five-product backward (tools/gluon_bwd5.py) builds for Hopper on a machine without a GPU.

Its check against the shipped kernels and its timing need the GPU; what CI can
check is that it still compiles for sm_90a with every wgmma asynchronous and
within shared memory, as tests/tools/test_compile_gluon.py does for the
shipped kernels (and, as there, in a child process without TRITON_INTERPRET).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from impls.attention import flash_gluon as fg  # noqa: E402
from impls.attention import gluon_compat  # noqa: E402
from tests.tools.conftest import ROOT  # noqa: E402


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="triton.experimental.gluon not importable")
def test_compiles_for_sm90_causal_and_not():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tools.gluon_bwd5", "--compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("bwd5 ")]
    assert len(rows) == 4, run.stdout  # one and two dS^T buffers, causal and not
    for row in rows:
        if "does not compile" in row:
            if not triton.__version__.startswith(gluon_compat.COMPILES):
                pytest.skip(f"Triton {triton.__version__}'s Gluon: {row[:200]}")
            pytest.fail(row)
        r = json.loads(row.split(": ", 1)[1])
        assert r["smem"] <= 227 * 1024 and not r["wgmma_serialized"], row
