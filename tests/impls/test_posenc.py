"""impls/posenc.py and the GPT's pos_encoding: RoPE's defining properties,
the two layouts, PI and NTK, the sinusoidal table and ALiBi by hand, each
against float64, and the GPT with every encoding (decoding equals training,
the layouts' models equal under permuted weights)."""

import math

import pytest
import torch

from impls import posenc
from impls.gpt import GPT, GPTConfig

LAYOUTS = posenc.LAYOUTS
F64 = torch.float64


def rotate_reference(x: torch.Tensor, positions: torch.Tensor, layout: str, base: float = posenc.ROPE_BASE):
    """x (..., T, D) rotated pair by pair with explicit 2x2 rotation matrices, float64."""
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=F64)
    x = x.double()
    for i in range(D // 2):
        a, b = (i, i + D // 2) if layout == "neox" else (2 * i, 2 * i + 1)
        theta = positions.double() * base ** (-2.0 * i / D)  # (T,)
        c, s = theta.cos(), theta.sin()
        out[..., a] = c * x[..., a] - s * x[..., b]
        out[..., b] = s * x[..., a] + c * x[..., b]
    return out


def rope64(x, positions, layout):
    cos, sin = posenc.rope_angles(positions, x.shape[-1], dtype=F64)
    return posenc.apply_rope(x, cos, sin, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inner_product_depends_on_the_distance_only(layout):
    g = torch.Generator().manual_seed(0)
    D = 16
    q, k = torch.randn(2, 50, D, generator=g, dtype=F64)
    m = torch.randint(0, 40_000, (50,), generator=g)
    n = torch.randint(0, 40_000, (50,), generator=g)
    shift = torch.randint(-5_000, 5_000, (50,), generator=g)
    shift = torch.maximum(shift, -torch.minimum(m, n))  # positions stay >= 0

    def dot(i, j):  # row r of q at position i[r] against row r of k at j[r]
        return (rope64(q, i, layout) * rope64(k, j, layout)).sum(-1)

    before, after = dot(m, n), dot(m + shift, n + shift)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)
    # and it does depend on the distance: the rotation is not the identity
    assert (dot(m, n + 1) - before).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotation_preserves_norms(layout):
    x = torch.randn(3, 11, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = rope64(x, torch.arange(11) + 30_000, layout)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_layouts_are_one_rotation_under_a_permutation():
    D = 12
    P = posenc.neox_from_gptj(D)
    assert P.tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    x = torch.randn(2, 9, D, dtype=F64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(9) + 7
    torch.testing.assert_close(rope64(x[..., P], pos, "neox"), rope64(x, pos, "gptj")[..., P], rtol=0, atol=1e-12)
    # and the layouts differ as they are: the same vector rotates differently
    assert (rope64(x, pos, "neox") - rope64(x, pos, "gptj")).abs().max() > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("offset", [0, 30_000])
def test_apply_rope_against_rotation_matrices(layout, dtype, tol, offset):
    """Forward and gradient (a rotation's backward rotates by -theta) at an odd length."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 16, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(2, 3, 7, 16, generator=g).to(dtype)
    pos = torch.arange(7) + offset
    cos, sin = posenc.rope_angles(pos, 16)
    y = posenc.apply_rope(x, cos, sin, layout)
    (dx,) = torch.autograd.grad(y, x, dy)
    want = rotate_reference(x.detach(), pos, layout)
    want_dx = rotate_reference(dy, -pos, layout)  # R(-theta) = R(theta)^T
    assert y.dtype == dtype
    # bf16 rounds the inputs of each product and the sum to 8 bits
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol)


def test_angles_are_formed_in_float64():
    cos, sin = posenc.rope_angles(torch.tensor([30_000]), 4)
    # pair 0 turns one radian per position; pair 1 by 10000^(-1/2) = 0.01
    assert cos[0, 0].item() == pytest.approx(math.cos(30_000.0), abs=1e-7)
    assert sin[0, 1].item() == pytest.approx(math.sin(300.0), abs=1e-7)


def test_position_interpolation_divides_positions():
    pos = torch.arange(0, 64, 4)
    pi = posenc.rope_angles(pos, 8, scaling=posenc.RopeScaling("pi", 4.0), dtype=F64)
    plain = posenc.rope_angles(pos.double() / 4, 8, dtype=F64)
    for a, b in zip(pi, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ntk_keeps_the_fastest_pair_and_interpolates_the_slowest():
    D, s = 8, 4.0
    ntk = posenc.rope_frequencies(D, scaling=posenc.RopeScaling("ntk", s))
    plain = posenc.rope_frequencies(D)
    # base' = base * s^(D/(D-2)): pair 0 (exponent 0) unchanged, the last pair (exponent (D-2)/D) divided by s
    assert ntk[0].item() == 1.0 and plain[0].item() == 1.0
    assert ntk[-1].item() == pytest.approx(10000 ** (-6 / 8) / 4, rel=1e-12)
    assert ntk[1].item() == pytest.approx(10000 ** (-2 / 8) * 4 ** (-8 / 6 * 2 / 8), rel=1e-12)


@pytest.mark.parametrize("kind, factor", [("yarn", 2.0), ("pi", 0.5)])
def test_bad_scaling(kind, factor):
    with pytest.raises(ValueError):
        posenc.RopeScaling(kind, factor)


def test_scaling_for_an_eval_length():
    assert posenc.scaling_for("pi", 64, 64) is None
    assert posenc.scaling_for(None, 512, 64) is None
    assert posenc.scaling_for("ntk", 256, 64) == posenc.RopeScaling("ntk", 4.0)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head dimension"):
        posenc.apply_rope(torch.zeros(1, 3, 5), torch.zeros(3, 2), torch.zeros(3, 2))


def test_sinusoidal_by_hand():
    pe = posenc.sinusoidal(torch.tensor([0, 1, 30_000]), 4).double()
    want = torch.tensor([
        [0.0, 1.0, 0.0, 1.0],
        [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],  # 10000^(-2/4) = 0.01
        [math.sin(30_000), math.cos(30_000), math.sin(300), math.cos(300)],
    ], dtype=F64)
    torch.testing.assert_close(pe, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("heads, slopes", [
    (8, [2.0 ** -h for h in range(1, 9)]),  # 2^(-8h/8)
    (4, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]),  # 2^(-8h/4)
    # not a power of two: the 8 slopes of H = 8, then every other one of H = 16's, 2^(-h/2) for h = 1, 3, 5, 7
    (12, [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
    (6, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]),
])
def test_alibi_slopes_geometric(heads, slopes):
    torch.testing.assert_close(posenc.alibi_slopes(heads), torch.tensor(slopes, dtype=F64), rtol=0, atol=0)


def test_alibi_bias_by_hand():
    bias = posenc.alibi_bias(2, torch.tensor([2, 3]), torch.arange(4))  # slopes 2^-4, 2^-8
    want = -torch.tensor([[2.0, 1, 0, -1], [3, 2, 1, 0]])
    torch.testing.assert_close(bias, torch.stack((want / 16, want / 256)))


# -- the GPT with each encoding -----------------------------------------------------------------


def _gpt(encoding: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=96, n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_multiple=1,
                              pos_encoding=encoding), **kw})
    return GPT(cfg).eval()


def test_learned_is_the_default_and_its_keys_are_unchanged():
    default, learned = GPT(GPTConfig(n_layer=1)), GPT(GPTConfig(n_layer=1, pos_encoding="learned"))
    assert list(default.state_dict()) == list(learned.state_dict())
    assert "transformer.wpe.weight" in default.state_dict()
    for encoding in ("sinusoidal", "rope", "rope-gptj", "alibi", "none"):
        keys = set(GPT(GPTConfig(n_layer=1, pos_encoding=encoding)).state_dict())
        assert keys == set(default.state_dict()) - {"transformer.wpe.weight"}


@pytest.mark.parametrize("kw, message", [
    (dict(pos_encoding="xpos"), "unknown pos_encoding 'xpos'"),
    (dict(pos_encoding="rope", n_embd=36, n_head=4), "even head dimension"),  # head dim 9
])
def test_bad_config(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kw)


@pytest.mark.parametrize("encoding", posenc.ENCODINGS)
def test_decoding_with_a_cache_matches_the_training_forward(encoding):
    model = _gpt(encoding)
    x = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(x)
        model.setup_cache(2, 32)
        first, _ = model(x[:, :11], input_pos=torch.arange(11))
        rest, _ = model(x[:, 11:], input_pos=torch.arange(11, 19))
    torch.testing.assert_close(torch.cat((first, rest), 1), full, rtol=1e-5, atol=1e-5)


def test_position_matters_to_every_encoding_but_none():
    """Swapping two earlier tokens changes the last logits of a one-layer model
    except with no encoding: its causal attention is then a bag of the tokens
    before (a second layer would see the two positions' own, different, outputs)."""
    x = torch.tensor([[5, 9, 17, 3, 40, 41]])
    swapped = torch.tensor([[9, 5, 17, 3, 40, 41]])
    for encoding in posenc.ENCODINGS:
        with torch.no_grad():
            a, b = (_gpt(encoding, n_layer=1)(t)[0][0, -1] for t in (x, swapped))
        if encoding == "none":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert (a - b).abs().max() > 1e-5, encoding


def test_layouts_models_equal_under_permuted_q_k_weights():
    neox, gptj = _gpt("rope"), _gpt("rope-gptj")
    gptj.load_state_dict(neox.state_dict())
    C, H = 32, 4
    D = C // H
    inverse = torch.argsort(posenc.neox_from_gptj(D))
    rows = torch.cat([h * D + inverse for h in range(H)])
    rows = torch.cat((rows, C + rows, 2 * C + torch.arange(C)))  # q's and k's rows of c_attn, v's left alone
    with torch.no_grad():
        for block in gptj.transformer.h:
            block.attn.c_attn.weight.copy_(block.attn.c_attn.weight[rows])
            block.attn.c_attn.bias.copy_(block.attn.c_attn.bias[rows])
    x = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(gptj(x)[0], neox(x)[0], rtol=1e-5, atol=1e-5)
        # without the permutation the models differ
        gptj.load_state_dict(neox.state_dict())
        assert (gptj(x)[0] - neox(x)[0]).abs().max() > 1e-4


def test_rope_scaling_changes_only_lengths_past_training():
    plain = _gpt("rope")
    pi = _gpt("rope", rope_scaling=posenc.RopeScaling("pi", 2.0))
    pi.load_state_dict(plain.state_dict())
    x = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = plain(x)[0], pi(x)[0]
    assert (a - b).abs().max() > 1e-5  # positions 1..8 map to 0.5..4
    # the first token sees only itself: no relative position to scale
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-6)
