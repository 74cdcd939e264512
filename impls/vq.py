"""Vector quantization (van den Oord et al. 2017, "Neural Discrete
Representation Learning"), as VQ-VAE and VQGAN use it: every latent is
replaced by its nearest code in a codebook.

    idx, dist = nearest_matmul(x, codebook)       # x (N, D), codebook (K, D) -> (N,), (N,)
    vq = VectorQuantizer(K, D, ema=True)
    z_q, idx, loss = vq(z)                         # straight-through z_q, commitment (+ codebook) loss

The nearest-code searches, all returning the index of the nearest code
(ties: the lowest index, as torch.argmin) and its squared distance:
- `nearest_cdist`: torch.cdist then argmin, the N x K matrix stored;
- `nearest_matmul`: ||x||^2 - 2 x.e + ||e||^2, the cross term one matmul,
  also storing N x K; the product runs in the inputs' dtype;
- `nearest_float64`: the reference, in float64 and in row chunks;
- impls/vq_triton.py: fused, block by block with a running argmin.

`agreement` compares a search's indices with the float64 search's: a
differing index is a near-tie when its float64 distance exceeds the best one
by at most `tie_tolerance` (the rounding of the distance in the search's
arithmetic), and a mismatch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def nearest_cdist(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = torch.cdist(x, codebook)  # (N, K) Euclidean distances
    best, idx = dist.min(dim=1)
    return idx, best.float().square()


def nearest_matmul(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expanded form; the norms in fp32, the product x @ e^T in the inputs' dtype."""
    x2 = x.float().square().sum(1, keepdim=True)  # (N, 1)
    e2 = codebook.float().square().sum(1)  # (K,)
    dist = torch.addmm(e2, x, codebook.t(), beta=1, alpha=-2) if x.dtype == torch.float32 else \
        e2 - 2 * (x @ codebook.t()).float()  # (N, K)
    best, idx = dist.min(dim=1)
    return idx, best + x2.squeeze(1)


def nearest_float64(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 search, `chunk` rows at a time so that its memory stays
    chunk x K: the reference for every other search."""
    e = codebook.double()
    e2 = e.square().sum(1)
    idx, best = [], []
    for rows in x.split(chunk):
        r = rows.double()
        dist = r.square().sum(1, keepdim=True) - 2 * r @ e.t() + e2
        b, i = dist.min(dim=1)
        idx.append(i)
        best.append(b)
    return torch.cat(idx), torch.cat(best)


# Rounding of a squared distance d = ||x||^2 - 2 x.e + ||e||^2 computed in a
# dtype of unit roundoff u: about u times the size of its terms, ||x||^2 +
# ||e||^2, times a few for the sums. A differing index whose float64 distance
# is within TIE_RTOL[dtype] x (||x||^2 + ||e||^2) of the best is a near-tie.
TIE_RTOL = {
    torch.float32: 2.0**-16,  # fp32 distances: 2^-24 per rounding, with room for sums over D = 256 terms
    torch.bfloat16: 2.0**-6,  # bf16 products (the matmul form in bf16): 2^-8 per rounding
}


@dataclass(frozen=True)
class Agreement:
    rows: int
    same: int  # index identical to the float64 search's
    near_ties: int  # different, within the tolerance
    mismatches: int  # different, beyond it
    max_gap: float  # largest float64 distance gap over the differing rows, relative to ||x||^2 + ||e||^2


def agreement(idx: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor, rtol: float,
              reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> Agreement:
    """A search's indices against the float64 search on the same inputs (the
    bf16 inputs as they are, so that only the search's arithmetic differs)."""
    ref_idx, ref_best = reference if reference is not None else nearest_float64(x, codebook)
    idx = idx.to(ref_idx.device)
    differ = (idx != ref_idx).nonzero().squeeze(1)
    if len(differ) == 0:
        return Agreement(len(idx), len(idx), 0, 0, 0.0)
    xd, e = x[differ].double(), codebook.double()
    got = (xd - e[idx[differ]]).square().sum(1)
    scale = xd.square().sum(1) + e[idx[differ]].square().sum(1)
    gap = (got - ref_best[differ]) / scale
    near = int((gap <= rtol).sum())
    return Agreement(len(idx), len(idx) - len(differ), near, len(differ) - near, float(gap.max()))


# -- the quantizer ---------------------------------------------------------------------------------


def perplexity(idx: torch.Tensor, K: int) -> float:
    """exp of the entropy of code usage: K when every code is used equally, 1 when one code takes all."""
    p = torch.bincount(idx.flatten(), minlength=K).double() / idx.numel()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def dead_codes(idx: torch.Tensor, K: int) -> int:
    """Codes no latent chose."""
    return int((torch.bincount(idx.flatten(), minlength=K) == 0).sum())


class VectorQuantizer(nn.Module):
    """z (N, D) -> (z_q, idx, loss). z_q = z + sg[e - z] passes the gradient
    straight through to the encoder; loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2
    (eq. 3 of van den Oord et al.; beta = 0.25), each term a mean over elements.

    With ema=True the codebook is not trained by gradient but moved towards
    the mean of the latents assigned to it (their appendix A.1, with the
    Laplace smoothing of Razavi et al. 2019): the loss is the commitment term
    alone, and `ema_update(z, idx)` runs after each step."""

    def __init__(self, K: int, D: int, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, search=nearest_matmul):
        super().__init__()
        self.K, self.D, self.beta, self.ema, self.decay, self.eps, self.search = K, D, beta, ema, decay, eps, search
        codebook = torch.randn(K, D)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.zeros(K))  # N_k
            self.register_buffer("embed_sum", codebook.clone())  # m_k
        else:
            self.codebook = nn.Parameter(codebook)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            idx, _ = self.search(z.detach(), self.codebook.detach().to(z.dtype))
        e = F.embedding(idx, self.codebook)  # (N, D), differentiable in the codebook
        loss = self.beta * F.mse_loss(z, e.detach())
        if not self.ema:
            loss = loss + F.mse_loss(e, z.detach())
        return z + (e - z).detach(), idx, loss

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """N_k <- g N_k + (1 - g) n_k; m_k <- g m_k + (1 - g) sum of z_i with idx_i = k;
        e_k = m_k / N_k, N_k Laplace-smoothed so that an unused code never divides by zero."""
        # Counts and sums per code by index: a one-hot (N, K) matrix would be 4 GB at VQGAN's N and K.
        counts = torch.bincount(idx, minlength=self.K).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, z.float())
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))


class VQAutoencoder(nn.Module):
    """A small VQ autoencoder for 8x8 one-channel images: two stride-2
    convolutions to a 2x2 grid of D-dim latents, the quantizer, and back."""

    def __init__(self, K: int = 64, D: int = 16, width: int = 32, ema: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, D, 4, 2, 1))  # 2x2
        self.quantizer = VectorQuantizer(K, D, ema=ema)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(D, width, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, 1, 4, 2, 1))

    def forward(self, images: torch.Tensor):
        z = self.encoder(images)  # (B, D, 2, 2)
        B, D, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*H*W, D)
        z_q, idx, vq_loss = self.quantizer(flat)
        recon = self.decoder(z_q.view(B, H, W, D).permute(0, 3, 1, 2))
        return recon, F.mse_loss(recon, images) + vq_loss, flat, idx


def train_autoencoder(images: torch.Tensor, steps: int, batch: int, seed: int, K: int = 64, D: int = 16,
                      ema: bool = True, lr: float = 2e-3) -> tuple[VQAutoencoder, list[float]]:
    """A short seeded training run (Adam; the EMA update after each step); the codebook starts from encoder outputs
    of the first batch (as most VQ codebases initialize it), so that a run
    measures usage, not an unlucky random codebook. Returns the model and its losses."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQAutoencoder(K, D, ema=ema).to(images.device)
    opt = torch.optim.Adam([p for p in model.parameters()], lr=lr)
    with torch.no_grad():
        z = model.encoder(images[torch.randint(len(images), (max(batch, K),), generator=g, device=images.device)])
        init = z.permute(0, 2, 3, 1).reshape(-1, D)[:K]
        model.quantizer.codebook.copy_(init)
        if ema:
            model.quantizer.embed_sum.copy_(init)
            model.quantizer.cluster_size.fill_(1.0)
    losses = []
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g, device=images.device)]
        _, loss, flat, idx = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema:
            model.quantizer.ema_update(flat.detach(), idx)
        losses.append(loss.detach())
    return model, [float(v) for v in torch.stack(losses).cpu()]


@torch.no_grad()
def codebook_usage(model: VQAutoencoder, images: torch.Tensor) -> tuple[float, int]:
    """(perplexity, dead codes) of the codes `images` choose."""
    _, _, _, idx = model(images)
    K = model.quantizer.K
    return perplexity(idx, K), dead_codes(idx, K)
