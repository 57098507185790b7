"""KL of a method's sampling path to the base's, the budget MSDDA's objective charges for.

MSDDA, the experts and the oracle solve max E[r] - beta KL(p || p_ref); comparing a
method that reads rewards at sampling time with them is fair only at an equal KL.
The path KL (x_T..x_0) is the sum over steps of the step KL given the state (chain
rule) and bounds the KL between the final images' distributions. Gaussian steps give
it exactly (:func:`gaussian_kl`, the float64 :meth:`msdda.Gaussian.kl`, against the reference step, via :func:`metered`); a
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
from ..validation import check_callable, check_int

__all__ = ["gaussian_kl", "best_of_n_kl", "KLMeter", "metered"]


def gaussian_kl(p: Gaussian, q: Gaussian) -> Tensor:
    """(B,) KL(p || q) in nats, in float64: :meth:`msdda.Gaussian.kl` of the upcast steps.

    A zero variance gives inf or nan: the KL of a point mass is not finite.
    """
    return p.to(torch.float64).kl(q.to(torch.float64))


class KLMeter:
    """Per-sample KL of a method's path x_T..x_0 to the base's, summed over its steps (nats).

    By the chain rule the path KL is the sum over steps of the expected step KL given
    the state; it bounds the KL between the final images' distributions. Methods add
    each step's KL (or an upper bound of it) per sample; ``seconds`` is the time spent
    measuring, which :func:`~msdda.methods.run_method` leaves out of the method's time.
    """

    def __init__(self, batch: int) -> None:
        batch = check_int(batch, "batch", low=1)
        self.total = torch.zeros(batch, dtype=torch.float64)
        self.seconds = 0.0

    def add(self, kl: Tensor) -> None:
        """Add one step's (B,) KL."""
        self.total += kl.detach().to(torch.float64).cpu()


def best_of_n_kl(n: int) -> float:
    """KL (nats) of the best of n i.i.d. draws (continuous scores) to one draw: log n - (n-1)/n."""
    n = check_int(n, "n", low=1)
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
    check_callable(policy, "policy", "a step policy (x_t, t) -> Gaussian")
    check_callable(reference, "reference", "a step policy (x_t, t) -> Gaussian")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a msdda.Schedule, got {type(schedule).__name__}")
    if not isinstance(meter, KLMeter):
        raise TypeError(f"meter must be a KLMeter, got {type(meter).__name__}")
    last = int(schedule.timesteps[-1])

    def step(x_t: Tensor, t: int) -> Gaussian:
        g = policy(x_t, t)
        if int(t) != last:
            start = time.perf_counter()
            meter.add(gaussian_kl(g, reference(x_t, t)))
            meter.seconds += time.perf_counter() - start
        return g

    return step
