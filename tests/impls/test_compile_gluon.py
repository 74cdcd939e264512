"""The Gluon kernels compile for Hopper on a machine without a GPU.

No interpreter runs Gluon, so this is the only check CI can make of the
kernels' code: that every kernel kind still builds for sm_90a, with the
wgmma instructions left asynchronous. Their results and speed are checked on
the H200 (tests/impls/test_flash_gluon.py, FLASH_NOTES.md).
"""

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from impls.attention import compile_gluon as cg  # noqa: E402
from impls.attention import flash_gluon as fg  # noqa: E402

# Versions whose Gluon these kernels are known to compile with; another version
# may have renamed what they use, which is a skip here, not a failure.
COMPILES_WITH = ("3.6.", "3.9.")

LABELS = ["fwd D=128 causal=True pingpong 128x128 s2", "fwd D=64 persistent 128x128 s2",
          "dkdv D=128 causal=False 64 s2", "dkdv+dq D=64 causal=True 64 s2", "dq D=128 causal=True 64 s3"]


@pytest.mark.skipif(fg.GLUON_ERROR is not None, reason="triton.experimental.gluon not importable")
@pytest.mark.parametrize("label", LABELS)
def test_gluon_kernel_compiles_for_sm90(label):
    jobs = {job[0]: job for job in cg.jobs()}
    assert label in jobs, sorted(jobs)
    _, fn, example, constexprs = jobs[label]
    try:
        kernel = cg.compile_sm90(fn, example, constexprs)
    except Exception as exc:  # noqa: BLE001
        if not triton.__version__.startswith(COMPILES_WITH):
            pytest.skip(f"Triton {triton.__version__}'s Gluon: {type(exc).__name__}")
        raise
    r = cg.resources(kernel)
    assert r["smem"] <= 227 * 1024 and not r["wgmma_serialized"], r
