"""GANs: a generator and a critic, the objectives they train under, the toy
mixtures of the GAN literature and the mode-coverage metric on them.

    objective = OBJECTIVES["wgan-gp"]
    trainer = GanTrainer(objective, mlp_generator(), mlp_critic(), sample_real=MIXTURES["8gaussians"].sample)
    for _ in range(steps):
        trainer.step()                     # n_critic critic steps, then one generator step
    coverage(trainer.sample(2500), MIXTURES["8gaussians"])

The objectives, each written from its paper's formula (D the critic's raw
output, a logit for the GANs, x real, x~ = G(z) generated):
- `nsgan`: Goodfellow et al. 2014, the critic maximizes log D(x) + log(1 - D(x~))
  with D = sigmoid(logit); the generator maximizes log D(x~) (the non-saturating
  loss of their section 3);
- `wgan`: Arjovsky et al. 2017, algorithm 1: the critic maximizes
  E[D(x)] - E[D(x~)], its weights clipped to [-c, c] after every step, RMSProp;
- `wgan-gp`: Gulrajani et al. 2017, algorithm 1: WGAN's loss plus
  lambda E[(||grad D(x^)|| - 1)^2] on x^ = eps x + (1 - eps) x~, Adam(0, 0.9);
- `r1`: Mescheder et al. 2018, eq. 9: the non-saturating GAN plus
  gamma/2 E[||grad D(x)||^2] on real data;
- `hinge`: Lim & Ye 2017, Miyato et al. 2018: the critic minimizes
  E[max(0, 1 - D(x))] + E[max(0, 1 + D(x~))], the generator -E[D(x~)].

Models: a small MLP on 2-D points, and a DCGAN-shaped (Radford et al. 2016)
pair of strided convolutions for 8x8 one-channel images. The critic has no
batch norm: a gradient penalty is taken per sample, which batch norm mixes
(Gulrajani et al. section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# -- models ----------------------------------------------------------------------------------------

Z_DIM = 2  # the toy generator's noise; the 2-D literature uses 2 to a few
HIDDEN = 128


def mlp_generator(z_dim: int = Z_DIM, hidden: int = HIDDEN, out: int = 2) -> nn.Module:
    """z (B, z_dim) -> points (B, out)."""
    return nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


def mlp_critic(inp: int = 2, hidden: int = HIDDEN) -> nn.Module:
    """points (B, inp) -> one score each (B,)."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Flatten(0))


IMAGE_Z_DIM = 64


def conv_generator(z_dim: int = IMAGE_Z_DIM, width: int = 64) -> nn.Module:
    """DCGAN's generator at 8x8: z (B, z_dim) -> images (B, 1, 8, 8) in [-1, 1];
    a projection to 2x2, then two stride-2 transposed convolutions with batch norm."""
    return nn.Sequential(
        nn.Linear(z_dim, 2 * width * 2 * 2), nn.Unflatten(1, (2 * width, 2, 2)), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),  # 4x4
        nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1), nn.Tanh(),  # 8x8
    )


def conv_critic(width: int = 64) -> nn.Module:
    """DCGAN's discriminator at 8x8, without batch norm: images (B, 1, 8, 8) -> (B,)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 4x4
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 2x2
        nn.Flatten(), nn.Linear(2 * width * 2 * 2, 1), nn.Flatten(0),
    )


# -- losses ----------------------------------------------------------------------------------------
# Each takes the critic's raw outputs on real (B,) and generated (B,) samples
# and returns the scalar its player minimizes. log sigmoid(a) = -softplus(-a)
# and log(1 - sigmoid(a)) = -softplus(a), without the overflow of the literal form.


def nsgan_critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-E[log D(x)] - E[log(1 - D(x~))], D = sigmoid."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nsgan_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[log D(x~)]: the non-saturating generator loss."""
    return F.softplus(-fake).mean()


def wgan_critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[D(x~)] - E[D(x)]: minus the critic's estimate of the Wasserstein-1 distance."""
    return fake.mean() - real.mean()


def wgan_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(x~)]."""
    return -fake.mean()


def hinge_critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(x~))]."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


hinge_generator_loss = wgan_generator_loss  # -E[D(x~)] (Miyato et al. 2018, eq. 17)


def input_gradient(critic: Callable, x: torch.Tensor) -> torch.Tensor:
    """d(sum of D(x)) / dx, one row per sample, flattened: (B, features). Kept
    in the graph (create_graph) so that a penalty on it trains the critic:
    the double backward."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return grad.flatten(1)


def interpolates(real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x^ = eps x + (1 - eps) x~, eps (B,) uniform on [0, 1], one per sample."""
    eps = eps.view(-1, *([1] * (real.dim() - 1)))
    return eps * real + (1 - eps) * fake


def gradient_penalty(critic: Callable, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WGAN-GP's E[(||grad D(x^)||_2 - 1)^2] on interpolates (without lambda),
    and the gradient norms (B,) it was taken on (detached)."""
    norms = input_gradient(critic, interpolates(real, fake.detach(), eps)).norm(dim=1)
    return (norms - 1).pow(2).mean(), norms.detach()


def r1_penalty(critic: Callable, real: torch.Tensor) -> torch.Tensor:
    """R1's E[||grad D(x)||^2] on real samples (without gamma / 2)."""
    return input_gradient(critic, real).pow(2).sum(dim=1).mean()


# -- objectives ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """An objective as its paper trains it."""

    name: str
    critic_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator_loss: Callable[[torch.Tensor], torch.Tensor]
    penalty: str | None = None  # "gp" (on interpolates) | "r1" (on real data) | None
    weight: float = 0.0  # lambda of WGAN-GP; gamma / 2 of R1
    clip: float | None = None  # WGAN: the critic's weights clamped to [-clip, clip] after each step
    n_critic: int = 1  # critic steps per generator step
    optimizer: str = "adam"  # adam | rmsprop
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def make_optimizer(self, params, capturable: bool = False) -> torch.optim.Optimizer:
        if self.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, capturable=capturable)
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, capturable=capturable)


R1_GAMMA = 10.0  # Mescheder et al. 2018 on their 2-D and CelebA runs
OBJECTIVES = {
    # DCGAN's Adam (lr 2e-4, beta1 0.5), as most non-saturating GANs train.
    "nsgan": Objective("nsgan", nsgan_critic_loss, nsgan_generator_loss, lr=2e-4),
    # WGAN, algorithm 1: c = 0.01, n_critic = 5, RMSProp at 5e-5.
    "wgan": Objective("wgan", wgan_critic_loss, wgan_generator_loss, clip=0.01, n_critic=5, optimizer="rmsprop",
                      lr=5e-5),
    # WGAN-GP, algorithm 1: lambda = 10, n_critic = 5, Adam(1e-4, 0, 0.9).
    "wgan-gp": Objective("wgan-gp", wgan_critic_loss, wgan_generator_loss, penalty="gp", weight=10.0, n_critic=5,
                         betas=(0.0, 0.9)),
    "r1": Objective("r1", nsgan_critic_loss, nsgan_generator_loss, penalty="r1", weight=R1_GAMMA / 2, lr=2e-4),
    # SNGAN's hinge runs: Adam(2e-4, 0.5, 0.999) with n_critic 1 on the standard CNN.
    "hinge": Objective("hinge", hinge_critic_loss, hinge_generator_loss, lr=2e-4),
}


class GanTrainer:
    """One generator and one critic under one objective; `step()` is n_critic
    critic steps then one generator step. Everything stays on the device: no
    step synchronizes, so that the steps can be timed, compiled and captured
    in a CUDA graph (`capturable` optimizers).

    `sample_real(n, generator)` draws real data; `penalty_on=False` leaves the
    penalty out (to measure what it costs); the gradient norms WGAN-GP's
    penalty sees are summed on the device (`grad_norm_gap` reads their mean
    |norm - 1|)."""

    def __init__(self, objective: Objective, generator: nn.Module, critic: nn.Module,
                 sample_real: Callable[[int, torch.Generator | None], torch.Tensor], batch: int,
                 z_dim: int, device: torch.device, *, seed: int = 0, compile: bool = False,
                 capturable: bool = False, penalty_on: bool = True):
        self.objective, self.batch, self.z_dim, self.device = objective, batch, z_dim, device
        self.G, self.D = generator.to(device), critic.to(device)
        self.g_fwd = torch.compile(self.G) if compile else self.G
        self.d_fwd = torch.compile(self.D) if compile else self.D
        self.opt_g = objective.make_optimizer(self.G.parameters(), capturable)
        self.opt_d = objective.make_optimizer(self.D.parameters(), capturable)
        self.sample_real = sample_real
        if capturable and torch.device(device).type == "cuda":
            # A CUDA graph replays the default generator's draws with fresh offsets; a
            # generator of our own would have to be registered with every graph.
            torch.cuda.manual_seed(seed)
            self.rng = None
        else:
            self.rng = torch.Generator(device=device).manual_seed(seed)
        self.penalty_on = penalty_on
        # Sum over critic steps of mean |grad norm - 1|, and their count: tensors, so that a
        # replayed CUDA graph adds to them too.
        self.gap_sum = torch.zeros((), device=device)
        self.gap_steps = torch.zeros((), device=device)

    def noise(self) -> torch.Tensor:
        return torch.randn(self.batch, self.z_dim, generator=self.rng, device=self.device)

    def critic_step(self) -> None:
        o = self.objective
        real = self.sample_real(self.batch, self.rng)
        with torch.no_grad():
            fake = self.g_fwd(self.noise())
        loss = o.critic_loss(self.d_fwd(real), self.d_fwd(fake))
        if self.penalty_on and o.penalty == "gp":
            eps = torch.rand(self.batch, generator=self.rng, device=self.device)
            penalty, norms = gradient_penalty(self.d_fwd, real, fake, eps)
            loss = loss + o.weight * penalty
            self.gap_sum += (norms - 1).abs().mean()
            self.gap_steps += 1
        elif self.penalty_on and o.penalty == "r1":
            loss = loss + o.weight * r1_penalty(self.d_fwd, real)
        self.opt_d.zero_grad(set_to_none=False)  # gradients stay allocated: a CUDA graph keeps their addresses
        loss.backward()
        self.opt_d.step()
        if o.clip is not None:
            with torch.no_grad():
                for p in self.D.parameters():
                    p.clamp_(-o.clip, o.clip)

    def generator_step(self) -> None:
        loss = self.objective.generator_loss(self.d_fwd(self.g_fwd(self.noise())))
        self.opt_g.zero_grad(set_to_none=False)
        loss.backward()
        self.opt_g.step()

    def step(self) -> None:
        for _ in range(self.objective.n_critic):
            self.critic_step()
        self.generator_step()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n generated samples, the generator in eval mode (batch norm's running statistics)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.G.eval()
        try:
            return self.G(torch.randn(n, self.z_dim, generator=g, device=self.device))
        finally:
            self.G.train()

    def grad_norm_gap(self) -> float | None:
        """Mean over critic steps of mean |‖∇D(x^)‖ - 1| (WGAN-GP); None when no penalty step ran."""
        steps = float(self.gap_steps)
        return float(self.gap_sum) / steps if steps else None

    def max_abs_weight(self) -> float:
        return max(float(p.detach().abs().max()) for p in self.D.parameters())


# -- the toy mixtures and mode coverage ------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    """An equal-weight mixture of isotropic 2-D Gaussians."""

    name: str
    centers: tuple[tuple[float, float], ...]
    std: float

    def means(self, device=None) -> torch.Tensor:
        return torch.tensor(self.centers, dtype=torch.float32, device=device)  # (M, 2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sampler(generator.device if generator is not None else None)(n, generator)

    def sampler(self, device=None) -> Callable[[int, torch.Generator | None], torch.Tensor]:
        """sample(n, generator) with the means already on `device`: no copy from
        the host per call, which a CUDA graph capture would refuse."""
        means = self.means(device)

        def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            which = torch.randint(len(means), (n,), generator=generator, device=means.device)
            return means[which] + self.std * torch.randn(n, 2, generator=generator, device=means.device)

        return sample


# The two mixtures of VEEGAN (Srivastava et al. 2017, section 5.1) and PacGAN:
# 8 modes on a circle of radius 2 with std 0.02; a 5 x 5 grid at spacing 2 with std 0.05.
MIXTURES = {
    "8gaussians": Mixture("8gaussians", tuple((2 * math.cos(2 * math.pi * i / 8), 2 * math.sin(2 * math.pi * i / 8))
                                              for i in range(8)), 0.02),
    "25gaussians": Mixture("25gaussians", tuple((float(i), float(j)) for i in (-4, -2, 0, 2, 4)
                                                for j in (-4, -2, 0, 2, 4)), 0.05),
}
HQ_SIGMAS = 3.0  # a sample is high quality within 3 standard deviations of its nearest mode (VEEGAN)
# A mode is covered when at least this many of 2,500 samples are high quality
# and nearest it (PacGAN, Lin et al. 2018, section 5.1: 20 of 2,500 on the grid).
MIN_PER_MODE = 20


@dataclass(frozen=True)
class Coverage:
    modes: int  # in the mixture
    covered: int  # modes with at least min_per_mode high-quality samples nearest them
    high_quality: float  # share of samples within HQ_SIGMAS std of their nearest mode
    per_mode: tuple[int, ...]  # high-quality samples nearest each mode


def coverage(samples: torch.Tensor, mixture: Mixture, min_per_mode: int = MIN_PER_MODE) -> Coverage:
    """Modes covered and the share of high-quality samples (VEEGAN's metrics)."""
    x = samples.detach().double().cpu()
    dist = torch.cdist(x, mixture.means().double())  # (n, M)
    nearest, which = dist.min(dim=1)
    hq = nearest <= HQ_SIGMAS * mixture.std
    counts = torch.bincount(which[hq], minlength=len(mixture.centers))
    return Coverage(modes=len(mixture.centers), covered=int((counts >= min_per_mode).sum()),
                    high_quality=float(hq.double().mean()) if len(x) else 0.0,
                    per_mode=tuple(int(c) for c in counts))


# -- images ----------------------------------------------------------------------------------------


def digits(device=None) -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the
    package, no download) as (1797, 1, 8, 8) floats in [-1, 1]; ImportError
    without scikit-learn."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
    return (images / 8 - 1).unsqueeze(1).to(device)


def image_sampler(images: torch.Tensor) -> Callable[[int, torch.Generator | None], torch.Tensor]:
    """sample(n, generator): n images drawn with replacement, on the images' device."""

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return images[torch.randint(len(images), (n,), generator=generator, device=images.device)]

    return sample


class GraphedSteps:
    """The trainer's critic and generator steps captured as two CUDA graphs
    (one memory pool), after `warmup` eager steps on a side stream, as
    torch.cuda.graphs' whole-network capture wants: the trainer must be built
    with capturable=True (capturable optimizers; its noise from the default
    CUDA generator, which each replay advances)."""

    def __init__(self, trainer: GanTrainer, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                trainer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.critic, self.generator = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.critic):
            trainer.critic_step()
        with torch.cuda.graph(self.generator, pool=self.critic.pool()):
            trainer.generator_step()
        self.n_critic = trainer.objective.n_critic

    def critic_step(self) -> None:
        self.critic.replay()

    def generator_step(self) -> None:
        self.generator.replay()
