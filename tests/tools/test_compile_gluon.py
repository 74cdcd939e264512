"""The Gluon kernels compile for Hopper on a machine without a GPU.

No interpreter runs Gluon, so this is the only check CI can make of the
kernels' code: that every kernel kind still builds for sm_90a, with the
wgmma instructions left asynchronous. Their results and speed are checked on
the GPU (tests/impls/test_flash_gluon.py, docs/attention-kernels.md).

The compiles run in a child process without TRITON_INTERPRET: the test
session sets it on CPU machines (conftest.py), and under it Triton's own
library functions (gl.max's combine function, ...) are interpreter objects
that the compiler refuses. They compile side by side, one per core
(tools/fork_map.py).
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

# Versions whose Gluon these kernels are known to compile with; another version
# may have renamed what they use, which is a skip here, not a failure.
COMPILES_WITH = gluon_compat.COMPILES

LABELS = ["fwd D=128 causal=True pingpong 128x128 s2", "fwd D=64 persistent 128x128 s2",
          "fwd D=64 causal=True ws 192x128 s2",
          "dkdv D=128 causal=False 64 s2", "dkdv D=64 causal=True 64 s3", "dq D=128 causal=True 64 s3",
          "dq D=64 causal=False 64 s3", "bwd D=128 causal=True s2 slots1 ds1"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import json, sys
from tools import compile_gluon as cg
print(json.dumps(cg.compile_labels(sys.argv[1:])))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CHILD, *LABELS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="triton.experimental.gluon not importable")
@pytest.mark.parametrize("label", LABELS)
def test_gluon_kernel_compiles_for_sm90(compiled, label):
    r = compiled[label]
    if "error" in r:
        if not triton.__version__.startswith(COMPILES_WITH):
            pytest.skip(f"Triton {triton.__version__}'s Gluon: {r['error'][:200]}")
        pytest.fail(f"{label}: {r['error'][-600:]}")
    assert r["smem"] <= 227 * 1024 and not r["wgmma_serialized"], r


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="triton.experimental.gluon not importable")
def test_tool_prints_a_row_per_kernel(compiled):
    # The tool as a developer runs it, on the installed Triton, for one kernel: its header and a compiled row.
    # A kernel `compiled` built: Triton's on-disk cache hands the tool that compile, the rest is its own.
    label = LABELS[-1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tools.compile_gluon", "-k", label], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"triton {triton.__version__}, target sm_90a")
    rows = [line for line in lines if line.startswith(label + "  ")]  # the label, then the padding
    assert len(rows) == 1, run.stdout
    if not triton.__version__.startswith(COMPILES_WITH):
        pytest.skip(f"Triton {triton.__version__} is not one the kernels are known to compile with: {rows[0]}")
    assert rows[0].split()[-1] == "async", rows[0]
