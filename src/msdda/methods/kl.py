"""KL of a method's sampling path to the base's, the budget MSDDA's objective charges for.

MSDDA, the experts and the oracle solve max E[r] - beta KL(p || p_ref); comparing a
method that reads rewards at sampling time with them is fair only at an equal KL.
The path KL (x_T..x_0) is the sum over steps of the step KL given the state (chain
rule) and bounds the KL between the final images' distributions. Gaussian steps give
it exactly (:func:`gaussian_kl` against the reference step, via :func:`metered`); a
search method's steps are reference steps except for its choices, whose KL it adds
itself (:func:`best_of_n_kl` for a best-of-N choice).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..fusion import Gaussian
from ..gaussians import Schedule
from ..sampling import StepPolicy

__all__ = ["gaussian_kl", "best_of_n_kl", "KLMeter", "metered"]


def gaussian_kl(p: Gaussian, q: Gaussian) -> Tensor:
    """(B,) KL(N(p.mean, p.variance) || N(q.mean, q.variance)) in nats, float64.

    Diagonal Gaussians over (B, ...) tensors (variances broadcast to the means), summed
    over all but the batch dimension: 1/2 sum [log(v_q / v_p) + (v_p + (m_p - m_q)^2) / v_q - 1].
    A zero variance gives inf or nan: the KL of a point mass is not finite.
    """
    mp, vp, mq, vq = (v.to(torch.float64) for v in (p.mean, p.variance, q.mean, q.variance))
    mp, vp, mq, vq = torch.broadcast_tensors(mp, vp, mq, vq)
    terms = 0.5 * (torch.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1.0)
    return terms.flatten(1).sum(1)


class KLMeter:
    """Per-sample KL of a method's path x_T..x_0 to the base's, summed over its steps (nats).

    By the chain rule the path KL is the sum over steps of the expected step KL given
    the state; it bounds the KL between the final images' distributions. Methods add
    each step's KL (or an upper bound of it) per sample; ``seconds`` is the time spent
    measuring, which :func:`~msdda.methods.run_method` leaves out of the method's time.
    """

    def __init__(self, batch: int) -> None:
        self.total = torch.zeros(batch, dtype=torch.float64)
        self.seconds = 0.0

    def add(self, kl: Tensor) -> None:
        """Add one step's (B,) KL."""
        self.total += kl.detach().to(torch.float64).cpu()


def best_of_n_kl(n: int) -> float:
    """KL (nats) of the best of n i.i.d. draws (continuous scores) to one draw: log n - (n-1)/n."""
    return math.log(n) - (n - 1) / n


def metered(
    policy: StepPolicy, reference: StepPolicy, schedule: Schedule, meter: KLMeter
) -> StepPolicy:
    """``policy``, adding KL(step || reference step) per sample to ``meter`` at every step.

    The last step adds no noise (x_0 is a function of x_1), so it adds no KL. For a
    policy that draws a component per step (``db-ls``), the drawn step's KL bounds the
    KL of the mixture from above. The reference evaluations and their time are the
    meter's, not the method's.
    """
    last = int(schedule.timesteps[-1])

    def step(x_t: Tensor, t: int) -> Gaussian:
        g = policy(x_t, t)
        if int(t) != last:
            start = time.perf_counter()
            meter.add(gaussian_kl(g, reference(x_t, t)))
            meter.seconds += time.perf_counter() - start
        return g

    return step
