"""impls/vq.py: the nearest-code searches against float64 and by hand, the
agreement count, perplexity and dead codes, the quantizer's straight-through
gradient and loss, the EMA update by hand, and a short autoencoder run."""

import pytest
import torch

from impls import vq

SEARCHES = [vq.nearest_cdist, vq.nearest_matmul, vq.nearest_float64]
X = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
CODEBOOK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])


@pytest.mark.parametrize("search", SEARCHES)
def test_search_by_hand(search):
    # x0 is 1 from codes 0 and 1 (a tie: the lowest index) and 18 from code 2; x1 is 1 from code 2.
    idx, dist = search(X, CODEBOOK)
    assert idx.tolist() == [0, 2]
    torch.testing.assert_close(dist.double(), torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("search", SEARCHES[:2])
def test_search_against_float64(search):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(300, 24, generator=g), torch.randn(70, 24, generator=g)
    ref = vq.nearest_float64(x, e)
    idx, dist = search(x, e)
    a = vq.agreement(idx, x, e, vq.TIE_RTOL[torch.float32], reference=ref)
    assert a.mismatches == 0 and a.same + a.near_ties == 300
    torch.testing.assert_close(dist.double(), ref[1], rtol=1e-4, atol=1e-4)


def test_agreement_counts_near_ties_and_mismatches():
    # Code 1 is code 0 moved by 1e-6 away from x (a near-tie: gap 2e-6 / (1 + 1) = 1e-6 relative);
    # code 2 is far. Choosing 1 is a near-tie at rtol 1e-5, choosing 2 a mismatch.
    x = torch.tensor([[1.0], [1.0], [1.0]])
    e = torch.tensor([[0.0], [-1e-6], [-3.0]])
    a = vq.agreement(torch.tensor([0, 1, 2]), x, e, rtol=1e-5)
    assert (a.rows, a.same, a.near_ties, a.mismatches) == (3, 1, 1, 1)
    assert a.max_gap == pytest.approx((16 - 1) / (1 + 9))  # the mismatch: 16 against 1, over ||x||^2 + ||e||^2
    assert vq.agreement(torch.tensor([0, 1, 2]), x, e, rtol=1e-7).near_ties == 0


def test_perplexity_and_dead_codes_by_hand():
    assert vq.perplexity(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(2.0)
    assert vq.perplexity(torch.tensor([3, 3, 3]), 4) == pytest.approx(1.0)
    assert vq.perplexity(torch.arange(8), 8) == pytest.approx(8.0)
    assert vq.dead_codes(torch.tensor([0, 0, 1, 1]), 4) == 2 and vq.dead_codes(torch.arange(8), 8) == 0


def test_quantizer_straight_through_and_loss():
    q = vq.VectorQuantizer(3, 2, beta=0.25)
    with torch.no_grad():
        q.codebook.copy_(CODEBOOK)
    z = torch.tensor([[0.5, 0.25], [3.0, 4.0]], requires_grad=True)
    z_q, idx, loss = q(z)
    assert idx.tolist() == [0, 2]
    torch.testing.assert_close(z_q, CODEBOOK[[0, 2]])
    # mean squared error of z against its codes: ((0.5^2 + 0.25^2) + (0 + 1)) / 4 = 0.328125
    assert loss.item() == pytest.approx(1.25 * 0.328125)  # codebook term + 0.25 x commitment term
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (z_q * upstream).sum().backward()
    # The straight-through estimator: the encoder gets the decoder's gradient unchanged.
    torch.testing.assert_close(z.grad, upstream)
    z.grad = None
    q.codebook.grad = None
    z_q, idx, loss = q(z)
    loss.backward()
    # d/de of mean((e - sg z)^2) over 4 elements = (e - z) / 2 for the chosen codes, 0 for code 1
    torch.testing.assert_close(q.codebook.grad, torch.tensor([[0.25, -0.125], [0.0, 0.0], [0.0, -0.5]]))
    torch.testing.assert_close(z.grad, 0.25 * (z - CODEBOOK[[0, 2]]).detach() / 2)  # commitment only


def test_ema_update_by_hand():
    q = vq.VectorQuantizer(2, 1, ema=True, decay=0.5, eps=1e-12)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    q.ema_update(torch.tensor([[1.0], [3.0], [11.0]]), torch.tensor([0, 0, 1]))
    # N = 0.5 [1, 1] + 0.5 [2, 1] = [1.5, 1]; m = 0.5 [0, 10] + 0.5 [4, 11] = [2, 10.5]; e = m / N
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.codebook, torch.tensor([[2 / 1.5], [10.5]]))
    assert not any(p is q.codebook for p in q.parameters())  # no gradient moves an EMA codebook


@pytest.mark.parametrize("ema", [True, False])
def test_autoencoder_trains_and_reports_usage(ema):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    model, losses = vq.train_autoencoder(images, steps=6, batch=16, seed=0, K=16, D=8, ema=ema)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    ppl, dead = vq.codebook_usage(model, images)
    assert 1.0 <= ppl <= 16 and 0 <= dead < 16
    again, losses2 = vq.train_autoencoder(images, steps=6, batch=16, seed=0, K=16, D=8, ema=ema)
    assert losses2 == losses  # seeded
