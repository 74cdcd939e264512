"""tools/compile_flash.py: the Triton kernels with every feature flag on compile for Hopper without a GPU
(all variants: `python3 -m tools.compile_flash`, under a minute on two cores).

The interpreter the other CPU tests use accepts code the compiler refuses;
this is the check that the compiled path still builds. Speed and results
are checked on the GPU (tests/impls/test_flash_triton.py, test_flash_serving.py).
"""

import re

import pytest

pytest.importorskip("triton.experimental.gluon")  # tools.compile_gluon's resources() imports it


def test_masked_varlen_forward_and_paged_decode_compile(run_tool):
    # One run, the variants side by side: the paged decode with every mask, the forward with every
    # mask and varlen, and the three RoPE kernels (forward, dK/dV, dQ).
    done = run_tool("compile_flash", "--only", "masks", "--only", "fwd window", "--only", "rope", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    labels = [line.split("  ")[0] for line in done.stdout.splitlines()]
    assert labels == ["fwd window softcap alibi varlen causal", "fwd rope causal", "dkdv rope causal",
                      "dq rope causal", "decode rows=128 paged masks"], done.stdout
    assert re.search(r"^decode rows=128 paged masks\s+smem=\d+", done.stdout, re.M), done.stdout
    assert re.search(r"^fwd window softcap alibi varlen causal\s+smem=\d+ regs=\d+ stack=\d+ wgmma_serialized=False",
                     done.stdout, re.M), done.stdout
    for kernel in ("fwd", "dkdv", "dq"):
        assert re.search(rf"^{kernel} rope causal\s+smem=\d+ regs=\d+ stack=\d+", done.stdout, re.M), done.stdout
