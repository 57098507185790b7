"""Experts and the MSDDA step policy.

An :class:`Expert` is a denoiser ``(x_t, t, cond) -> model output`` plus what its
Gaussian needs. :func:`msdda_step` fuses K experts' step Gaussians in closed form
at every step; it is a step policy for :func:`msdda.sampling.sample_chain`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .fusion import Gaussian, fuse_with_coefficients, fusion_coefficients
from .gaussians import Schedule, StepSpec, step_gaussian
from .sampling import StepPolicy

__all__ = ["Denoiser", "Expert", "expert_policy", "msdda_step", "JointPolicy"]

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]

#: K experts evaluated together: ``(x_t, t, active) -> [Gaussian for i in active]``
#: (for instance LoRA adapters of one base in one batched forward).
JointPolicy = Callable[[Tensor, int, Sequence[int]], Sequence[Gaussian]]


@dataclass(frozen=True, eq=False)
class Expert:
    """A single-objective model: a denoiser and what its reverse-step Gaussian needs."""

    denoiser: Denoiser  # (x_t (B, C, ...), t (B,) long, cond) -> model output
    spec: StepSpec = field(default_factory=StepSpec)  # prediction type, variance kind, eta
    kl_coef: float = 1.0  # beta_i the expert was aligned with
    name: str = "expert"

    def __post_init__(self) -> None:
        if not callable(self.denoiser):
            raise TypeError(f"denoiser of expert {self.name!r} must be callable")
        if not isinstance(self.spec, StepSpec):
            raise TypeError(f"spec of expert {self.name!r} must be a StepSpec")
        if not (isinstance(self.kl_coef, (int, float)) and 0 < self.kl_coef < float("inf")):
            raise ValueError(
                f"kl_coef of expert {self.name!r} must be positive, got {self.kl_coef!r}"
            )


def expert_policy(expert: Expert, schedule: Schedule, cond: Any = None) -> StepPolicy:
    """The expert's reverse step ``(x_t, t) -> StepGaussian`` under ``schedule`` for ``cond``."""

    def step(x_t: Tensor, t: int):
        t_batch = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        return step_gaussian(expert.denoiser(x_t, t_batch, cond), x_t, t, schedule, expert.spec)

    return step


def msdda_step(
    experts: Sequence[StepPolicy] | JointPolicy,
    weights,
    *,
    kl_coefs=None,
    kl_coef: float | None = None,
    reference: StepPolicy | None = None,
    num_experts: int | None = None,
) -> StepPolicy:
    """The MSDDA policy: the closed-form weighted product of the experts' steps.

    Args:
        experts: K step policies, or one :data:`JointPolicy` evaluating them together
            (then give ``num_experts``).
        weights: K non-negative preference weights.
        kl_coefs, kl_coef: as in :func:`msdda.fuse_gaussians`.
        reference: the reference step policy; needed only when lambda_0 != 0.

    Experts whose lambda is 0 are not evaluated.
    """
    joint = callable(experts) and not isinstance(experts, Sequence)
    if joint:
        if num_experts is None:
            raise ValueError("num_experts is required with a joint expert policy")
        k = num_experts
    else:
        experts = list(experts)
        k = len(experts)
        for i, e in enumerate(experts):
            if not callable(e):
                raise TypeError(f"experts[{i}] must be a step policy (callable)")
    if k == 0:
        raise ValueError("experts is empty (K = 0)")
    coefs = fusion_coefficients(weights, kl_coefs, kl_coef, num_experts=k)
    if coefs.lambda0 != 0.0 and reference is None:
        raise ValueError(
            f"reference is required: lambda_0 = {coefs.lambda0:.6g} != 0 (the weights are "
            "not on the simplex, or kl_coef differs from the experts' coefficients)"
        )
    active = [i for i, lam in enumerate(coefs.lambdas) if lam != 0.0]
    active_coefs = type(coefs)(tuple(coefs.lambdas[i] for i in active), coefs.lambda0)

    def step(x_t: Tensor, t: int) -> Gaussian:
        if joint:
            gs = list(experts(x_t, t, active))
        else:
            gs = [experts[i](x_t, t) for i in active]
        ref = None
        if coefs.lambda0 != 0.0:
            r = reference(x_t, t)
            ref = (r.mean, r.variance)
        return fuse_with_coefficients(
            [g.mean for g in gs], [g.variance for g in gs], active_coefs, reference=ref
        )

    return step
