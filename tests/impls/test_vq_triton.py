"""impls/vq_triton.py's fused search against the float64 search. Without a
GPU the kernel runs through Triton's interpreter on CPU tensors:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/impls/test_vq_triton.py

Ties go to the lowest index, as torch.argmin; a different index whose float64
distance is within vq.TIE_RTOL[float32] (relative to ||x||^2 + ||e||^2) of the
best is a near-tie, counted, and anything else a mismatch.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported; the suite's conftest does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls import vq  # noqa: E402
from impls import vq_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(vq_triton.why_not(torch.device(DEVICE), torch.float32) is not None,
                                 reason=str(vq_triton.why_not(torch.device(DEVICE), torch.float32)))]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(N, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    return x.to(DEVICE, dtype), e.to(DEVICE, dtype)


# K not a multiple of the block (16 under the interpreter), D not a power of two, D below one block;
# slice_d 16: D walked in slices (the path beyond MAX_RESIDENT_D), the last slice partial.
@pytest.mark.parametrize("N, K, D", [(37, 50, 20), (64, 16, 8), (5, 3, 33)])
@pytest.mark.parametrize("slice_d", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_against_float64(N, K, D, slice_d, dtype):
    x, e = _inputs(N, K, D, dtype)
    ref_idx, ref_best = vq.nearest_float64(x, e)  # on the same (bf16-rounded) inputs
    idx, dist = vq_triton.nearest_fused(x, e, slice_d=slice_d)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == dist.shape == (N,)
    a = vq.agreement(idx, x, e, vq.TIE_RTOL[torch.float32], reference=(ref_idx, ref_best))
    assert a.mismatches == 0 and a.same + a.near_ties == N
    assert a.near_ties <= N // 10  # random codes: near-ties are rare, not the rule
    torch.testing.assert_close(dist.double().cpu(), ref_best.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("slice_d", [None, 16])
def test_3xtf32_against_float64(slice_d):
    # On the GPU three TF32 products per pair; the interpreter multiplies in fp32. Either way the
    # indices are float64's up to near-ties, and D = 80 > 64 walks the code dim in slices.
    x, e = _inputs(37, 50, 80 if slice_d is None else 20, torch.float32, seed=3)
    ref = vq.nearest_float64(x, e)
    assert vq_triton.block_d(80, torch.float32, "tf32x3") == 64 and vq_triton.block_d(80, torch.float32) == 32
    idx, dist = vq_triton.nearest_fused(x, e, slice_d=slice_d, precision="tf32x3")
    a = vq.agreement(idx, x, e, vq.TIE_RTOL[torch.float32], reference=ref)
    assert a.mismatches == 0 and a.same + a.near_ties == len(idx)
    torch.testing.assert_close(dist.double().cpu(), ref[1].cpu(), rtol=1e-5, atol=1e-4)


def test_bf16_inputs_ignore_3xtf32():
    x, e = _inputs(20, 30, 16, torch.bfloat16, seed=4)
    a, _ = vq_triton.nearest_fused(x, e, precision="tf32x3")
    b, _ = vq_triton.nearest_fused(x, e)
    assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="precision"):
        vq_triton.nearest_fused(x, e, precision="tf32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slice_d", [None, 16])
def test_exact_ties_go_to_the_lowest_index(dtype, slice_d):
    x, e = _inputs(40, 50, 20, dtype, seed=1)
    e[7] = e[5]  # the same block as code 5
    e[33] = e[5]  # a later block
    e[49] = e[2]  # the last, partial block
    x[:10] = e[5]
    x[10:20] = e[2]
    idx, _ = vq_triton.nearest_fused(x, e, slice_d=slice_d)
    assert idx[:10].tolist() == [5] * 10 and idx[10:20].tolist() == [2] * 10
    torch.testing.assert_close(idx.cpu(), vq.nearest_float64(x, e)[0].cpu(), rtol=0, atol=0)
    # torch.argmin breaks ties the same way
    assert torch.cdist(x.float(), e.float())[:20].argmin(1).tolist() == [5] * 10 + [2] * 10


def test_a_tie_between_different_codes_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], device=DEVICE)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], device=DEVICE)  # x0: 1, 1, 18; x1: 20, 18, 1
    idx, dist = vq_triton.nearest_fused(x, e)
    assert idx.tolist() == [0, 2]
    torch.testing.assert_close(dist.cpu(), torch.tensor([1.0, 1.0]))


def test_near_ties_are_counted_not_mismatched():
    # Pairs of codes 1e-7 apart (relative): beyond what fp32 distances resolve, so the fused
    # search may take either; each such choice must be a near-tie, never a mismatch.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(20, 16, generator=g)
    e = torch.cat([base, base * (1 + 1e-7)]).to(DEVICE)
    x = (base[torch.randint(20, (60,), generator=g)] + 1e-3 * torch.randn(60, 16, generator=g)).to(DEVICE)
    idx, _ = vq_triton.nearest_fused(x, e)
    a = vq.agreement(idx, x, e, vq.TIE_RTOL[torch.float32])
    assert a.mismatches == 0 and a.same + a.near_ties == 60
    assert a.near_ties > 0  # the case is there: some choices did differ from float64's
    # at a tolerance of zero every differing choice would count as a mismatch
    assert vq.agreement(idx, x, e, 0.0).mismatches == a.near_ties


def test_bad_inputs():
    x, e = _inputs(4, 4, 8, torch.float32)
    with pytest.raises(AssertionError, match="codebook"):
        vq_triton.nearest_fused(x, e[:, :4])
    with pytest.raises(AssertionError, match="power of two"):
        vq_triton.nearest_fused(x, e, slice_d=24)
    assert "fp32 or bf16" in vq_triton.why_not(torch.device(DEVICE), torch.float16)
    assert [vq_triton.block_d(d) for d in (8, 20, 256, 257)] == [16, 32, 256, 64]
    assert [vq_triton.block_d(d, torch.float32) for d in (8, 20, 32, 33, 256)] == [16, 32, 32, 32, 32]
