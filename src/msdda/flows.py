"""Flow-matching step Gaussians: a velocity prediction turned into its reverse step N(mean, variance).

Rectified flow on diffusers' convention: x_sigma = (1 - sigma) x0 + sigma eps, the model
predicts v = eps - x0, so x0_hat = x - sigma v and x1_hat = x + (1 - sigma) v (the noise
estimate). The deterministic sampler is Euler's step x' = x + (sigma' - sigma) v, with
dt = sigma' - sigma < 0. RL fine-tuning makes the sampler stochastic, each step a Gaussian
policy; :class:`FlowStepSpec` names the rule and its noise level (docs/flow-models.md):

- ``"sde"`` (Flow-GRPO): std_t = a sqrt(sigma / (1 - sigma)),
  mean = x + [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt, variance = std_t^2 |dt|;
  at sigma = 1 the 1 - sigma is that of the schedule's second sigma, as Flow-GRPO does.
- ``"cps"`` (coefficients-preserving): std = sigma' sin(a pi / 2),
  mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat, variance = std^2;
  a = 1 is diffusers' ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True``.
- ``"dance"`` (DanceGRPO): the SDE with a constant std_t = eta.

With noise level 0 every rule is the Euler step with variance 0 (deterministic: it cannot
be fused). Sigmas come from diffusers' scheduler (:class:`msdda.gaussians.FlowSchedule`);
the functions here only read them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .gaussian import Gaussian
from .validation import (
    ArgumentKindError,
    check_floating_tensor,
    check_instance,
    check_number,
    show_value,
)

__all__ = [
    "FlowRule",
    "FLOW_RULES",
    "FlowStepSpec",
    "flow_x0_x1",
    "euler_step",
    "flow_sde_std",
    "sde_mean",
    "cps_std",
    "cps_mean",
    "flow_noise_factor",
    "flow_step_gaussian",
]

FlowRule = Literal["sde", "cps", "dance"]
FLOW_RULES = ("sde", "cps", "dance")


@dataclass(frozen=True)
class FlowStepSpec:
    """A flow expert's step: the stochastic rule and its noise level (a, or DanceGRPO's eta)."""

    rule: FlowRule = "sde"  # "sde" (Flow-GRPO), "cps" (coefficients-preserving), "dance"
    noise_level: float = 0.7  # a (sde, cps: in [0, 1]) or eta (dance); 0 is deterministic

    def __post_init__(self) -> None:
        if self.rule not in FLOW_RULES:
            raise ValueError(f"rule must be one of {FLOW_RULES}, got {show_value(self.rule)}")
        high = 1.0 if self.rule == "cps" else None
        what = "in [0, 1]" if high is not None else ">= 0"
        try:
            check_number(self.noise_level, "noise_level", low=0.0, high=high)
        except TypeError:  # a bool or a string is no noise level
            raise ArgumentKindError(
                f"noise_level must be a finite number {what}, got {show_value(self.noise_level)} "
                f"({type(self.noise_level).__name__})"
            ) from None
        except ValueError:
            raise ValueError(
                f"noise_level of rule {self.rule!r} must be a finite number {what}, "
                f"got {show_value(self.noise_level)}"
            ) from None

    @property
    def prediction_type(self) -> str:
        """What the model outputs: the velocity v = eps - x0."""
        return "flow"

    @property
    def learned_variance(self) -> bool:
        return False

    @property
    def deterministic(self) -> bool:
        """Noise level 0: the Euler ODE step, variance 0 (fusion refuses it)."""
        return self.noise_level == 0


Sigma = float | Tensor


def flow_x0_x1(velocity: Tensor, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
    """(x0_hat, x1_hat) = (x - sigma v, x + (1 - sigma) v): the clean and the noise estimates."""
    return x - sigma * velocity, x + (1 - sigma) * velocity


def euler_step(velocity: Tensor, x: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """The ODE step x + (sigma' - sigma) v (diffusers' ``step()`` without stochastic sampling)."""
    return x + (sigma_next - sigma) * velocity


def flow_sde_std(sigma: Sigma, noise_level: float, sigma_max: float | None = None) -> Sigma:
    """Flow-GRPO's std_t = a sqrt(sigma / (1 - sigma)), with 1 - sigma_max where sigma = 1.

    ``sigma_max`` is the schedule's second sigma (``scheduler.sigmas[1]``), what Flow-GRPO's
    ``sde_step_with_logprob`` puts in place of sigma in 1 - sigma at sigma = 1.
    """
    at_one = bool((torch.as_tensor(sigma) == 1).any())
    if at_one and sigma_max is None:
        raise ValueError("sigma = 1 needs sigma_max (the schedule's sigmas[1]) for the sde rule")
    if isinstance(sigma, Tensor):
        denominator = 1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max or 0.0), sigma)
        return noise_level * torch.sqrt(sigma / denominator)
    return noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))


def sde_mean(velocity: Tensor, x: Tensor, sigma: Sigma, sigma_next: Sigma, std2: Sigma) -> Tensor:
    """x + [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt, dt = sigma' - sigma."""
    dt = sigma_next - sigma
    return x + (velocity + std2 / (2 * sigma) * (x + (1 - sigma) * velocity)) * dt


def cps_std(sigma_next: Sigma, noise_level: float) -> Sigma:
    """The coefficients-preserving std = sigma' sin(a pi / 2)."""
    return sigma_next * math.sin(noise_level * math.pi / 2)


def cps_mean(x0: Tensor, x1: Tensor, sigma_next: Sigma, std: Sigma) -> Tensor:
    """(1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat (round-off below 0 clamped)."""
    rest = sigma_next**2 - std**2
    rest = rest.clamp_min(0) if isinstance(rest, Tensor) else max(rest, 0.0)
    return (1 - sigma_next) * x0 + rest**0.5 * x1


def flow_noise_factor(spec: FlowStepSpec) -> float:
    """How the step variance scales with the noise level: a^2 (sde, dance), sin^2(a pi/2) (cps).

    A variance floor times this keeps the floored variances of two noise levels in the
    ratio of their true variances (the cps step at sigma' = 0 has variance 0 for every a).
    """
    if spec.rule == "cps":
        return math.sin(spec.noise_level * math.pi / 2) ** 2
    return float(spec.noise_level) ** 2


def _sigma_value(value, name: str, x: Tensor) -> Sigma:
    """A sigma as a float, or a (B,) tensor as (B, 1, ...) in x's dtype and device."""
    if isinstance(value, Tensor):
        if value.ndim == 0:
            return _sigma_value(float(value), name, x)
        if value.shape != (x.shape[0],):
            raise ValueError(
                f"{name} must be one number or one per sample, shape ({x.shape[0]},), "
                f"got {tuple(value.shape)}"
            )
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must hold finite floating-point sigmas")
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a (B,) tensor, got {type(value).__name__}")
    return check_number(value, name, low=0.0, high=1.0)


def _check_sigmas(sigma: Sigma, sigma_next: Sigma) -> None:
    s, s_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    if not bool(((s > 0) & (s <= 1)).all()):
        raise ValueError(f"sigma must be in (0, 1], got {show_value(sigma)}")
    if not bool(((s_next >= 0) & (s_next < s)).all()):
        raise ValueError(
            f"sigma_next must be in [0, sigma): a reverse step lowers sigma, got "
            f"sigma = {show_value(sigma)}, sigma_next = {show_value(sigma_next)}"
        )


def flow_step_gaussian(
    velocity: Tensor,
    x: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    spec: FlowStepSpec,
    *,
    sigma_max: float | None = None,
    min_variance: float = 0.0,
) -> Gaussian:
    """The reverse step N(mean, variance) from sigma to sigma_next for a velocity prediction.

    Args:
        velocity: (B, C, ...) model output v = eps - x0.
        x: (B, C, ...) current sample x_sigma.
        sigma, sigma_next: the step's sigmas, numbers or (B,) tensors (one per sample),
            with 0 <= sigma_next < sigma <= 1.
        spec: the rule and its noise level.
        sigma_max: the schedule's ``sigmas[1]``; the sde rule needs it where sigma = 1.
        min_variance: a floor, times :func:`flow_noise_factor`, on the variance (0: exact).

    Returns:
        ``Gaussian(mean, variance, pred_x0 = x - sigma v)``; half precision is computed and
        returned in float32, float32 and float64 in their own dtype.
    """
    check_floating_tensor(velocity, "velocity")
    check_floating_tensor(x, "x")
    check_instance(spec, FlowStepSpec, "spec", "a msdda.flows.FlowStepSpec")
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal x's {tuple(x.shape)}")
    if x.ndim == 0:
        raise ValueError("x must have a leading batch axis (B, ...), got a scalar")
    if x.dtype in (torch.float16, torch.bfloat16):  # step maths in float32
        x = x.float()
    velocity = velocity.to(x.dtype)
    s, s_next = _sigma_value(sigma, "sigma", x), _sigma_value(sigma_next, "sigma_next", x)
    _check_sigmas(s, s_next)
    a = float(spec.noise_level)
    x0, x1 = flow_x0_x1(velocity, x, s)
    if spec.rule == "cps":
        std = cps_std(s_next, a)
        mean, variance = cps_mean(x0, x1, s_next, std), std**2
    else:
        std2 = flow_sde_std(s, a, sigma_max) ** 2 if spec.rule == "sde" else a**2
        mean, variance = sde_mean(velocity, x, s, s_next, std2), std2 * (s - s_next)
    floor = check_number(min_variance, "min_variance", low=0.0) * flow_noise_factor(spec)
    variance = torch.as_tensor(variance, dtype=x.dtype, device=x.device).clamp_min(floor)
    return Gaussian(mean, variance.expand_as(mean).clone(), x0)
