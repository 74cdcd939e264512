"""impls/posenc_triton.py's fused RoPE kernel against float64 rotations:
forward and gradient, both layouts, cached and computed cos/sin, in place and
out of place, odd lengths, position offsets, strided inputs, GQA.

Without a GPU the kernel runs through Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); on
the GPU machine: python3 -m pytest tests/impls/test_posenc_triton.py -m gpu
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported; the suite's conftest does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls import posenc  # noqa: E402
from impls import posenc_triton as pt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(pt.why_not(torch.device(DEVICE)) is not None,
                                                  reason=str(pt.why_not(torch.device(DEVICE))))]


def reference(x: torch.Tensor, positions: torch.Tensor, layout: str, sign: float = 1.0) -> torch.Tensor:
    """x (B, S, H, D) rotated by sign·p·θ in float64 (impls/posenc.py, itself checked by hand)."""
    cos, sin = posenc.rope_angles(positions.cpu(), x.shape[-1], dtype=torch.float64)
    out = posenc.apply_rope(x.detach().cpu().double().transpose(1, 2), cos, sign * sin, layout)
    return out.transpose(1, 2)


def tolerance(dtype: torch.dtype, table: bool, last_pos: int, x: torch.Tensor) -> float:
    """Absolute error allowed. The kernel rounds its result to the input dtype
    (bf16: 2^-8 relative). Cos and sin computed in the kernel carry the angle's
    float32 error, up to last_pos·2^-23 radians (the product and the rounded
    frequency), times the element's size."""
    scale = x.abs().max().item()
    tol = (2e-6 if dtype == torch.float32 else 2 ** -7) * scale
    if not table:
        tol += last_pos * 2 ** -22 * scale
    return tol


def _inputs(B, S, H, Hkv, D, dtype, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, H, S, D) storage, passed as its (B, S, H, D) view
        q = torch.randn(B, H, S, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, S, H, D, generator=g).to(dtype)
        k = torch.randn(B, S, Hkv, D, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE)


@pytest.mark.parametrize("layout", posenc.LAYOUTS)
@pytest.mark.parametrize("table", [True, False], ids=["cached", "computed"])
@pytest.mark.parametrize("offset", [0, 30_000])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_forward_and_gradient(layout, table, offset, inplace):
    B, S, H, Hkv, D = 2, 7, 4, 2, 16  # odd length, grouped-query k
    q0, k0 = _inputs(B, S, H, Hkv, D, torch.float32)
    dq_out, dk_out = _inputs(B, S, H, Hkv, D, torch.float32, seed=1)
    pos = torch.arange(S) + offset
    tab = pt.RopeTable(offset + S, D, DEVICE) if table else None
    q0.requires_grad_(), k0.requires_grad_()
    q, k = (q0.clone(), k0.clone()) if inplace else (q0, k0)  # in place needs non-leaf inputs
    qo, ko = pt.rope(q, k, offset=offset, layout=layout, table=tab, inplace=inplace)
    if inplace:
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    else:
        assert qo.data_ptr() != q0.data_ptr()
        assert torch.equal(q0, _inputs(B, S, H, Hkv, D, torch.float32)[0])  # inputs untouched
    dq, dk = torch.autograd.grad((qo, ko), (q0, k0), (dq_out, dk_out))
    for got, x, sign in ((qo, q0, 1.0), (ko, k0, 1.0), (dq, dq_out, -1.0), (dk, dk_out, -1.0)):
        want = reference(x, pos, layout, sign)
        tol = tolerance(torch.float32, table, offset + S, x)
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("layout", posenc.LAYOUTS)
def test_bf16_strided_positions_and_head_blocks(layout, monkeypatch):
    """bf16, (B, H, S, D) storage, explicit positions (a decode-like step), a
    head dim whose half is not a power of two (D = 12), and more heads than one
    block holds, so the kernel loops over head blocks."""
    monkeypatch.setattr(pt, "ROW_ELEMENTS", 32)  # 2 heads of BLOCK_HALF 8 per block: 5 heads take 3 blocks
    B, S, H, Hkv, D = 1, 3, 5, 3, 12
    q, k = _inputs(B, S, H, Hkv, D, torch.bfloat16, transposed=True)
    pos = torch.tensor([40, 3, 17])
    qo, ko = pt.rope(q, k, positions=pos.to(DEVICE), layout=layout, table=pt.RopeTable(64, D, DEVICE))
    assert qo.dtype == torch.bfloat16 and qo.stride() == q.stride()  # empty_like kept the layout
    for got, x in ((qo, q), (ko, k)):
        torch.testing.assert_close(got.cpu().double(), reference(x, pos, layout), rtol=0,
                                   atol=tolerance(torch.bfloat16, True, 40, x))


def test_inverse_undoes_the_rotation():
    q, k = _inputs(1, 5, 2, 2, 8, torch.float32)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    pt.apply(q, k, qo, ko, offset=100)
    pt.apply(qo, ko, qo, ko, offset=100, inverse=True)  # in place
    torch.testing.assert_close(qo, q, rtol=0, atol=1e-5)
    # and the forward alone did move it
    pt.apply(q, k, qo, ko, offset=100)
    assert (qo - q).abs().max() > 1e-2


def test_scaling_reaches_the_kernel():
    q, k = _inputs(1, 4, 1, 1, 8, torch.float32)
    pi = posenc.RopeScaling("pi", 4.0)
    qo, _ = pt.rope(q, k, offset=8, scaling=pi)
    cos, sin = posenc.rope_angles(torch.arange(8, 12), 8, scaling=pi, dtype=torch.float64)
    want = posenc.apply_rope(q.cpu().double().transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(qo.cpu().double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(D=7), "even head dimension"),
    (dict(layout="llama"), "unknown RoPE layout"),
    (dict(offset=60), "past the table's 64 positions"),
])
def test_bad_input(kw, message):
    D = kw.get("D", 8)
    q, k = _inputs(1, 5, 1, 1, D, torch.float32)
    table = pt.RopeTable(64, D, DEVICE) if D % 2 == 0 else None
    with pytest.raises(ValueError, match=message):
        pt.rope(q, k, layout=kw.get("layout", "neox"), offset=kw.get("offset", 0), table=table)
