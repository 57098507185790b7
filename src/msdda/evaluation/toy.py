"""A two-dimensional toy domain with exact experts, for quick sweeps and tests.

Data is a Gaussian mixture; the objectives are quadratic, r_i(x) = -a/2 ||x - g_i||^2.
Each expert is the exact denoiser of the data distribution tilted by exp(r_i / beta)
(again a Gaussian mixture, in closed form), and so is each oracle, for the weighted
reward sum_i w_i r_i = -a/2 ||x - sum_i w_i g_i||^2 + const. Every model is a
:class:`MixtureDenoiser` of one architecture, so rewarded soups apply too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import Expert
from ..gaussians import Schedule
from ..methods import MethodContext
from ..testbed import GaussianMixture, testbed_schedule
from ..validation import check_positive, check_seed

__all__ = ["MixtureDenoiser", "tilt_mixture", "toy_context", "TOY_GOALS", "TOY_CURVATURE"]

TOY_DIM = 2
TOY_STEPS = 25
TOY_CURVATURE = 0.5  # a
TOY_GOALS = ((2.0, 0.0), (0.0, 2.0))  # g_1, g_2
TOY_ORACLE_WEIGHTS = ((0.25, 0.75), (0.5, 0.5), (0.75, 0.25))


class MixtureDenoiser(nn.Module):
    """The exact epsilon prediction of an isotropic Gaussian mixture, as a network.

    Parameters: mixture logits (M,), means (M, d), log standard deviations (M,).
    ``(x_t (B, d), t (B,) long, cond ignored) -> eps (B, d)``, differentiable in x_t.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(mixture.weights.log().float())
        self.means = nn.Parameter(mixture.means.float())
        self.log_stds = nn.Parameter(mixture.stds.log().float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        abar = self.alphas_cumprod[t.long()].to(x_t)[:, None]  # (B, 1)
        var = abar * torch.exp(2 * self.log_stds.to(x_t))[None] + (1 - abar)  # (B, M)
        diff = x_t[:, None, :] - abar.sqrt()[:, :, None] * self.means.to(x_t)[None]  # (B, M, d)
        logp = (
            torch.log_softmax(self.logits.to(x_t), 0)[None]
            - 0.5 * x_t.shape[1] * torch.log(var)
            - 0.5 * (diff**2).sum(-1) / var
        )
        resp = torch.softmax(logp, dim=1)
        score = -(resp[:, :, None] * diff / var[:, :, None]).sum(1)
        return -torch.sqrt(1 - abar) * score


def tilt_mixture(
    mixture: GaussianMixture, goal: Tensor, curvature: float, beta: float
) -> GaussianMixture:
    """p(x) exp(-a/(2 beta) ||x - g||^2), normalised: again an isotropic mixture.

    Component k: precision 1/s_k^2 + a/beta, mean by precision, weight
    pi_k N(g; m_k, (s_k^2 + beta/a) I).
    """
    c = curvature / beta
    s2 = mixture.stds**2
    precision = 1 / s2 + c
    means = (mixture.means / s2[:, None] + c * goal[None]) / precision[:, None]
    spread = s2 + 1 / c
    d = mixture.dim
    logw = (
        mixture.weights.log()
        - 0.5 * d * spread.log()
        - 0.5 * ((goal[None] - mixture.means) ** 2).sum(-1) / spread
    )
    return GaussianMixture(torch.softmax(logw, 0), means, (1 / precision).sqrt())


def _quadratic(goal: Tensor, curvature: float):
    def reward(images: Tensor, cond=None) -> Tensor:
        return -0.5 * curvature * ((images - goal.to(images)) ** 2).sum(-1)

    return reward


def toy_context(
    seed: int = 0, kl_coef: float = 1.0, schedule: Schedule | None = None
) -> tuple[MethodContext, dict]:
    """The toy problem as a :class:`MethodContext`, and its rewards by name (``goal_a``, ``goal_b``)."""
    seed = check_seed(seed)
    kl_coef = check_positive(kl_coef, "kl_coef")
    schedule = schedule or testbed_schedule(TOY_STEPS)
    table = schedule.alphas_cumprod
    data = GaussianMixture.random(dim=TOY_DIM, components=3, seed=seed)
    goals = [torch.tensor(g, dtype=torch.float64) for g in TOY_GOALS]

    def model(mixture: GaussianMixture, name: str) -> Expert:
        return Expert(MixtureDenoiser(mixture, table).eval(), kl_coef=kl_coef, name=name)

    experts = tuple(
        model(tilt_mixture(data, g, TOY_CURVATURE, kl_coef), f"goal_{n}")
        for g, n in zip(goals, "ab", strict=True)
    )
    oracles = {
        w: model(
            tilt_mixture(
                data, sum(wi * g for wi, g in zip(w, goals, strict=True)), TOY_CURVATURE, kl_coef
            ),
            f"oracle {w}",
        )
        for w in TOY_ORACLE_WEIGHTS
    }
    rewards = {f"goal_{n}": _quadratic(g, TOY_CURVATURE) for g, n in zip(goals, "ab", strict=True)}
    ctx = MethodContext(
        schedule=schedule,
        reference=model(data, "data"),
        experts=experts,
        sample_shape=(TOY_DIM,),
        rewards=tuple(rewards.values()),
        oracles=oracles,
        kl_coef=kl_coef,
    )
    return ctx, rewards
