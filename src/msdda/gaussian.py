"""The one value type of the project: a diagonal Gaussian reverse step.

Every step msdda reasons about is ``N(mean, diag(variance))`` over a (B, ...) batch,
optionally with the clean sample x0_hat it implies (improved-diffusion's
``p_mean_variance``). The operations the code needs are methods here and nowhere else:
a draw with given noise, the log-density, the KL to another step, a point mass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Gaussian", "kl_divergence"]

_LOG_2PI = math.log(2 * math.pi)


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1) if x.ndim else x


class Gaussian(NamedTuple):
    """N(mean, diag(variance)); ``variance`` broadcasts to ``mean`` (B, ...).

    ``pred_x0`` is the clean sample the step implies (None where there is none, e.g.
    a fused step). A variance of 0 is a point mass: the step lands on ``mean``.
    """

    mean: Tensor
    variance: Tensor
    pred_x0: Tensor | None = None

    @classmethod
    def point_mass(cls, x: Tensor) -> Gaussian:
        """The step that lands exactly on ``x`` (variance 0)."""
        return cls(x, torch.zeros_like(x))

    @property
    def std(self) -> Tensor:
        """sqrt(variance), with negative round-off clamped to 0."""
        return self.variance.clamp_min(0).sqrt()

    def sample(self, noise: Tensor | float) -> Tensor:
        """mean + sqrt(variance) * noise (noise standard normal, shaped like the mean)."""
        return self.mean + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; mean, variance) summed over all but the batch axis: (B,)."""
        var = self.variance.expand_as(self.mean) if self.variance.ndim else self.variance
        terms = -0.5 * ((x - self.mean) ** 2 / var + torch.log(var) + _LOG_2PI)
        return _sum_per_sample(terms.expand_as(x))

    def kl(self, other: Gaussian) -> Tensor:
        """KL(self || other) in nats, summed over all but the batch axis: (B,).

        In the inputs' dtype and differentiable; a zero variance gives inf or nan
        (a point mass has no finite KL).
        """
        return kl_divergence(self, other)

    def to(self, dtype: torch.dtype) -> Gaussian:
        """The same step with every tensor in ``dtype``."""
        x0 = None if self.pred_x0 is None else self.pred_x0.to(dtype)
        return Gaussian(self.mean.to(dtype), self.variance.to(dtype), x0)

    def detach(self) -> Gaussian:
        x0 = None if self.pred_x0 is None else self.pred_x0.detach()
        return Gaussian(self.mean.detach(), self.variance.detach(), x0)


def kl_divergence(p: Gaussian, q: Gaussian) -> Tensor:
    """KL(N(p) || N(q)) = 1/2 sum [log(v_q / v_p) + (v_p + (m_p - m_q)^2) / v_q - 1]; (B,)."""
    mp, vp, mq, vq = torch.broadcast_tensors(p.mean, p.variance, q.mean, q.variance)
    terms = 0.5 * (torch.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1.0)
    return _sum_per_sample(terms)
