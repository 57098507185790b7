"""Experts and the MSDDA step policy.

An :class:`Expert` is a denoiser ``(x_t, t, cond) -> model output`` plus what its
Gaussian needs. :func:`msdda_step` fuses K experts' step Gaussians in closed form
at every step; it is a step policy for :func:`msdda.sampling.sample_chain`.

Experts that are evaluated together (LoRA adapters of one base in one batched
forward, with the base itself as the reference) are a :class:`JointDenoiser`;
:func:`joint_policy` turns one into a :data:`JointPolicy`, which ``msdda_step``
accepts in place of the list of step policies. A *member* is an expert index, or
``None`` for the reference model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .flows import FlowStepSpec
from .fusion import FusionCoefficients, Gaussian, fuse_with_coefficients, fusion_coefficients
from .gaussians import AnyStepSpec, Schedule, StepSpec, step_gaussian
from .sampling import StepPolicy
from .validation import (
    ArgumentKindError,
    check_callable,
    check_instance,
    check_int,
    check_positive,
    check_sequence,
    show_value,
)

__all__ = [
    "Denoiser",
    "Expert",
    "JointDenoiser",
    "JointPolicy",
    "Member",
    "expert_policy",
    "joint_policy",
    "msdda_step",
]

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]

#: An expert index (0..K-1), or ``None`` for the reference model.
Member = int | None


class JointDenoiser(Protocol):
    """Several models evaluated together, e.g. LoRA adapters and their base in one forward."""

    def __call__(
        self, x_t: Tensor, t: Tensor, cond: Any, members: Sequence[Member]
    ) -> Sequence[Tensor]:
        """The model outputs of ``members`` at (x_t (B, C, ...), t (B,) long), one per member."""


#: ``(x_t, t, members) -> [Gaussian for m in members]``: the members' reverse steps,
#: evaluated together (member ``None`` is the reference).
JointPolicy = Callable[[Tensor, int, Sequence[Member]], Sequence[Gaussian]]


@dataclass(frozen=True, eq=False)
class Expert:
    """A single-objective model: a denoiser and what its reverse-step Gaussian needs."""

    denoiser: Denoiser  # (x_t (B, C, ...), t (B,) long, cond) -> model output
    #: prediction type, variance kind, eta; or a FlowStepSpec (rule, noise level) whose
    #: denoiser predicts the velocity (its t are a FlowSchedule's keys: model_timesteps(t))
    spec: AnyStepSpec = field(default_factory=StepSpec)
    kl_coef: float = 1.0  # beta_i the expert was aligned with
    name: str = "expert"

    def __post_init__(self) -> None:
        if not callable(self.denoiser):
            raise TypeError(f"denoiser of expert {self.name!r} must be callable")
        if not isinstance(self.spec, (StepSpec, FlowStepSpec)):
            raise TypeError(f"spec of expert {self.name!r} must be a StepSpec or a FlowStepSpec")
        try:
            check_positive(self.kl_coef, "kl_coef")
        except TypeError:  # a bool or a string is no kl_coef (a ValueError too, as it was)
            raise ArgumentKindError(
                f"kl_coef of expert {self.name!r} must be positive, got {show_value(self.kl_coef)} "
                f"({type(self.kl_coef).__name__}: not a number)"
            ) from None
        except ValueError:
            raise ValueError(
                f"kl_coef of expert {self.name!r} must be positive and finite, "
                f"got {show_value(self.kl_coef)}"
            ) from None


_POLICY = "a step policy (x_t, t) -> Gaussian"


def _check_policy(value, name: str) -> None:
    """Refuse, where it is given, what cannot be a step policy (a Gaussian or a pair is a step)."""
    if isinstance(value, tuple):
        raise TypeError(
            f"{name} must be {_POLICY}, got a {type(value).__name__}: a (mean, variance) pair "
            "is one step, not a policy; wrap it as lambda x_t, t: Gaussian(mean, variance)"
        )
    check_callable(value, name, _POLICY)


def _t_batch(x_t: Tensor, t: int) -> Tensor:
    return torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)


def expert_policy(expert: Expert, schedule: Schedule, cond: Any = None) -> StepPolicy:
    """The expert's reverse step ``(x_t, t) -> Gaussian`` under ``schedule`` for ``cond``."""
    check_instance(expert, Expert, "expert", "a msdda.Expert")
    check_instance(schedule, Schedule, "schedule", "a msdda.Schedule")

    def step(x_t: Tensor, t: int) -> Gaussian:
        out = expert.denoiser(x_t, _t_batch(x_t, t), cond)
        return step_gaussian(out, x_t, t, schedule, expert.spec)

    return step


def joint_policy(
    joint: JointDenoiser,
    experts: Sequence[Expert],
    reference: Expert | None,
    schedule: Schedule,
    cond: Any = None,
) -> JointPolicy:
    """The members' reverse steps from one call of ``joint``, each with its own StepSpec.

    Member ``i`` is stepped with ``experts[i].spec``, member ``None`` with
    ``reference.spec`` (``reference`` may be None when the reference is never asked for).
    """
    check_callable(joint, "joint", "a joint denoiser (x_t, t, cond, members) -> outputs")
    experts = tuple(check_sequence(experts, "experts"))
    for i, e in enumerate(experts):
        check_instance(e, Expert, f"experts[{i}]", "a msdda.Expert")
    if reference is not None:
        check_instance(reference, Expert, "reference", "a msdda.Expert or None")
    check_instance(schedule, Schedule, "schedule", "a msdda.Schedule")

    def spec_of(m: Member) -> AnyStepSpec:
        if m is None:
            if reference is None:
                raise ValueError("member None (the reference) was asked for, but reference is None")
            return reference.spec
        return experts[m].spec

    def step(x_t: Tensor, t: int, members: Sequence[Member]) -> list[Gaussian]:
        outs = list(joint(x_t, _t_batch(x_t, t), cond, members))
        if len(outs) != len(members):
            raise ValueError(f"joint returned {len(outs)} outputs for {len(members)} members")
        return [
            step_gaussian(out, x_t, t, schedule, spec_of(m))
            for out, m in zip(outs, members, strict=True)
        ]

    return step


def _num_experts(experts, joint: bool, num_experts: int | None) -> int:
    """K: ``num_experts`` for a joint policy, else the number of (callable) step policies."""
    if num_experts is not None:
        num_experts = check_int(num_experts, "num_experts", low=0)
    if joint:
        if num_experts is None:
            raise ValueError("num_experts is required with a joint expert policy")
        k = num_experts
    else:
        k = len(experts)
        for i, e in enumerate(experts):
            if not callable(e):
                raise TypeError(
                    f"experts[{i}] must be a step policy (callable) (x_t, t) -> Gaussian, "
                    f"got {type(e).__name__}"
                )
        if num_experts is not None and num_experts != k:
            raise ValueError(f"num_experts = {num_experts}, but experts holds {k} step policies")
    if k == 0:
        raise ValueError("experts is empty (K = 0)")
    return k


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
        reference: the reference step policy; needed only when lambda_0 != 0. With a
            joint policy and no ``reference``, the reference is member ``None`` of the
            same joint call (one evaluation of everything a step needs).

    Experts whose lambda is 0 are not evaluated. Every argument is checked here, before
    any step: a step policy that is not callable (a ``(mean, variance)`` pair is one step,
    not a policy), the weights and coefficients, ``num_experts``.
    """
    joint, experts, coefs = _check_msdda_arguments(
        experts, weights, kl_coefs, kl_coef, reference, num_experts
    )
    active, active_coefs = _active_coefficients(coefs)
    ref_in_joint = joint and coefs.lambda0 != 0.0 and reference is None
    members: list[Member] = [*active, None] if ref_in_joint else list(active)

    def step(x_t: Tensor, t: int) -> Gaussian:
        if joint:
            gs = _joint_steps(experts, x_t, t, members)
        else:
            gs = [experts[i](x_t, t) for i in active]
        ref = None
        if ref_in_joint:
            ref = gs.pop()
        elif coefs.lambda0 != 0.0:
            ref = reference(x_t, t)
        return _fuse_steps(gs, active_coefs, ref)

    return step


def _check_msdda_arguments(
    experts, weights, kl_coefs, kl_coef, reference, num_experts
) -> tuple[bool, Any, FusionCoefficients]:
    """Whether ``experts`` is a joint policy, the experts, and the fusion exponents."""
    joint = callable(experts) and not isinstance(experts, Sequence)
    if not joint:
        if isinstance(experts, Gaussian):
            raise TypeError(
                "experts must be K step policies or a joint policy, got a Gaussian: "
                "a step, not a policy"
            )
        experts = check_sequence(experts, "experts")
    if reference is not None:
        _check_policy(reference, "reference")
    k = _num_experts(experts, joint, num_experts)
    coefs = fusion_coefficients(weights, kl_coefs, kl_coef, num_experts=k)
    if coefs.lambda0 != 0.0 and reference is None and not joint:
        raise ValueError(
            f"reference is required: lambda_0 = {coefs.lambda0:.6g} != 0 (the weights are "
            "not on the simplex, or kl_coef differs from the experts' coefficients)"
        )
    return joint, experts, coefs


def _active_coefficients(coefs: FusionCoefficients) -> tuple[list[int], FusionCoefficients]:
    """The experts with a nonzero lambda, and the exponents restricted to them."""
    active = [i for i, lam in enumerate(coefs.lambdas) if lam != 0.0]
    return active, type(coefs)(tuple(coefs.lambdas[i] for i in active), coefs.lambda0)


def _joint_steps(
    experts: JointPolicy, x_t: Tensor, t: int, members: Sequence[Member]
) -> list[Gaussian]:
    gs = list(experts(x_t, t, members))
    if len(gs) != len(members):
        raise ValueError(
            f"experts (the joint policy) returned {len(gs)} steps for {len(members)} members"
        )
    return gs


def _fuse_steps(
    steps: Sequence[Gaussian], coefs: FusionCoefficients, reference: Gaussian | None
) -> Gaussian:
    """The fused step of the active experts' steps (and the reference's, when needed)."""
    return fuse_with_coefficients(
        [g.mean for g in steps],
        [g.variance for g in steps],
        coefs,
        reference=None if reference is None else (reference.mean, reference.variance),
    )
