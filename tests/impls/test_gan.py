"""impls/gan.py: the penalties' double backward against finite differences in
float64, each loss against its paper's formula on hand-made numbers, the
mode-coverage metric on made-up samples, and a few training steps of each
objective."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from impls import gan

CPU = torch.device("cpu")


def _smooth_critic() -> nn.Module:
    # tanh, not ReLU: a ReLU critic's input gradient is piecewise constant, so its second
    # derivative in x is zero almost everywhere and the check would test little.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1), nn.Flatten(0)).double()


def test_gradient_penalty_gradient_against_finite_differences():
    critic = _smooth_critic()
    names = [n for n, _ in critic.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in critic.parameters())
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    eps = torch.rand(5, generator=g, dtype=torch.float64)

    def d(x, *ps):
        return functional_call(critic, dict(zip(names, ps)), (x,))

    def gp(*ps):
        return gan.gradient_penalty(lambda x: d(x, *ps), real, fake, eps)[0]

    def r1(*ps):
        return gan.r1_penalty(lambda x: d(x, *ps), real)

    # The penalties' gradients in the weights go through d/dx of the critic: the double backward.
    assert torch.autograd.gradcheck(gp, params)
    assert torch.autograd.gradcheck(r1, params)
    # ... and the critic's second derivatives themselves, in its input and weights.
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(d, (x, *params))


def test_penalties_of_a_linear_critic_by_hand():
    # D(x) = w.x with w = (3, 4): the gradient is w everywhere, ||w|| = 5.
    critic = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
    real, fake = torch.randn(7, 2), torch.randn(7, 2)
    penalty, norms = gan.gradient_penalty(critic, real, fake, torch.rand(7))
    assert penalty.item() == pytest.approx(16.0)  # (5 - 1)^2
    torch.testing.assert_close(norms, torch.full((7,), 5.0))
    assert gan.r1_penalty(critic, real).item() == pytest.approx(25.0)  # ||w||^2


def test_interpolates_by_hand():
    real, fake = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 4.0], [3.0, 3.0]])
    torch.testing.assert_close(gan.interpolates(real, fake, torch.tensor([0.25, 1.0])),
                               torch.tensor([[0.5, 3.0], [1.0, 1.0]]))


REAL, FAKE = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])


def _sigmoid(a):
    return 1 / (1 + math.exp(-a))


def test_nsgan_losses_against_the_formula():
    # Goodfellow et al.: the critic minimizes -E[log D(x)] - E[log(1 - D(x~))], D = sigmoid.
    want = -(math.log(_sigmoid(0)) + math.log(_sigmoid(2))) / 2 - (math.log(1 - _sigmoid(0))
                                                                  + math.log(1 - _sigmoid(-1))) / 2
    assert gan.nsgan_critic_loss(REAL, FAKE).item() == pytest.approx(want)
    assert want == pytest.approx(0.913242, abs=1e-6)  # log 2 + (log(1 + e^-2) + log(1 + e^-1)) / 2
    # the non-saturating generator: -E[log D(x~)]
    assert gan.nsgan_generator_loss(FAKE).item() == pytest.approx(-(math.log(0.5) + math.log(_sigmoid(-1))) / 2)
    # no overflow where the literal form would take log(0)
    assert gan.nsgan_critic_loss(torch.tensor([200.0]), torch.tensor([-200.0])).item() == pytest.approx(0.0)


def test_wgan_and_hinge_losses_by_hand():
    assert gan.wgan_critic_loss(REAL, FAKE).item() == pytest.approx(-1.5)  # E[D(x~)] - E[D(x)] = -0.5 - 1
    assert gan.wgan_generator_loss(FAKE).item() == pytest.approx(0.5)
    # hinge: (max(0, 1 - 0) + max(0, 1 - 2)) / 2 + (max(0, 1 + 0) + max(0, 1 - 1)) / 2 = 0.5 + 0.5
    assert gan.hinge_critic_loss(REAL, FAKE).item() == pytest.approx(1.0)
    assert gan.hinge_critic_loss(REAL, torch.tensor([-3.0, 0.5])).item() == pytest.approx(0.5 + 0.75)
    assert gan.hinge_generator_loss(FAKE).item() == pytest.approx(0.5)


def test_objectives_as_their_papers_train_them():
    o = gan.OBJECTIVES
    assert (o["wgan"].clip, o["wgan"].n_critic, o["wgan"].optimizer, o["wgan"].lr) == (0.01, 5, "rmsprop", 5e-5)
    assert (o["wgan-gp"].penalty, o["wgan-gp"].weight, o["wgan-gp"].n_critic, o["wgan-gp"].betas) == ("gp", 10, 5,
                                                                                                   (0.0, 0.9))
    assert (o["r1"].penalty, o["r1"].weight) == ("r1", 5.0)  # gamma / 2 with gamma = 10
    assert o["hinge"].penalty is None and o["nsgan"].clip is None


# -- mixtures and coverage --------------------------------------------------------------------------


def test_mixtures():
    ring, grid = gan.MIXTURES["8gaussians"], gan.MIXTURES["25gaussians"]
    assert len(ring.centers) == 8 and len(grid.centers) == 25
    torch.testing.assert_close(ring.means().norm(dim=1), torch.full((8,), 2.0))
    x = ring.sample(4000, torch.Generator().manual_seed(0))
    # every sample within 5 std of a mode, and every mode drawn about 500 times
    cov = gan.coverage(x, ring)
    assert cov.covered == 8 and cov.high_quality > 0.98
    assert min(cov.per_mode) > 400


def test_coverage_on_made_up_samples():
    ring = gan.MIXTURES["8gaussians"]
    means, s = ring.means(), ring.std
    samples = torch.cat([
        means[0].expand(20, 2),                                      # 20 on mode 0
        (means[1] + torch.tensor([2 * s, 0.0])).expand(20, 2),       # 20 within 3 std of mode 1
        means[2].expand(19, 2),                                      # 19 on mode 2: one short of covered
        (means[3] + torch.tensor([0.0, 3.5 * s])).expand(5, 2),      # 5 just outside 3 std of mode 3
        torch.zeros(10, 2),                                          # 10 at the centre, 2 from every mode
    ])
    cov = gan.coverage(samples, ring)
    assert len(samples) == 74
    assert cov.modes == 8 and cov.covered == 2
    assert cov.per_mode == (20, 20, 19, 0, 0, 0, 0, 0)
    assert cov.high_quality == pytest.approx(59 / 74)
    assert gan.coverage(samples, ring, min_per_mode=1).covered == 3


# -- training --------------------------------------------------------------------------------------


def _trainer(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    g, d = gan.mlp_generator(hidden=32), gan.mlp_critic(hidden=32)
    return gan.GanTrainer(gan.OBJECTIVES[name], g, d, gan.MIXTURES["8gaussians"].sampler(CPU), batch=32,
                          z_dim=gan.Z_DIM, device=CPU, seed=seed, **kwargs)


@pytest.mark.parametrize("name", list(gan.OBJECTIVES))
def test_each_objective_trains_a_few_steps(name):
    t = _trainer(name)
    before = [p.detach().clone() for p in t.G.parameters()]
    for _ in range(3):
        t.step()
    assert all(torch.isfinite(p).all() for p in [*t.G.parameters(), *t.D.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(before, t.G.parameters()))  # the generator moved
    if name == "wgan":
        assert t.max_abs_weight() <= 0.01
    if name == "wgan-gp":
        assert t.grad_norm_gap() is not None and float(t.gap_steps) == 15  # 3 steps x 5 critic steps
    else:
        assert t.grad_norm_gap() is None


def test_training_is_seeded_and_the_penalty_can_be_left_out():
    a, b = _trainer("wgan-gp"), _trainer("wgan-gp")
    for t in (a, b):
        t.step()
    torch.testing.assert_close(a.sample(16), b.sample(16), rtol=0, atol=0)
    c = _trainer("wgan-gp", penalty_on=False)
    c.step()
    assert c.grad_norm_gap() is None and not torch.equal(a.sample(16), c.sample(16))


def test_conv_models_shapes():
    g, d = gan.conv_generator(), gan.conv_critic()
    images = g(torch.randn(3, gan.IMAGE_Z_DIM))
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    assert d(images).shape == (3,)
