"""Every compared method as a step policy ``(x_t, t) -> Gaussian`` on one sampling loop.

Each builder takes the problem (:class:`MethodContext`), the preference weights and
the condition, and returns the per-step rule; :func:`msdda.sample_chain` does the
rest, identically for all. This module holds the methods that return a Gaussian step
(``base``, ``rs``, ``db``, ``db-ls``, ``rgg``, ``msdda``, ``oracle``); the search methods
``code`` and ``target``, which pick x_{t-1} themselves and return a point mass, live in
:mod:`msdda.methods.search` and are re-exported here with their :class:`Search`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..experts import Denoiser, Expert, Member, expert_policy, joint_policy, msdda_step
from ..fusion import Gaussian
from ..gaussians import StepSpec, step_gaussian
from ..sampling import StepPolicy
from ..validation import ArgumentKindError, check_number
from .common import (
    EvalCounter,
    MethodContext,
    SampleGenerators,
    check_context,
    step_index,
    t_batch,
    unwrap,
    weight_key,
    weighted_reward,
)
from .search import (  # re-exported: the search methods' names are importable from here too
    MAX_CANDIDATES,
    Search,
    check_count,
    code_policy,
    target_policy,
    weighted_step_reward,
)
from .soup import parameter_soup

__all__ = [
    "GUIDANCE_SCHEDULES",
    "GuidanceSchedule",
    "guidance_schedule",
    "weighted_step_reward",
    "base_policy",
    "rs_policy",
    "db_policy",
    "db_ls_policy",
    "rgg_policy",
    "MAX_CANDIDATES",
    "Search",
    "check_count",
    "code_policy",
    "target_policy",
    "msdda_policy",
    "oracle_policy",
    "student_policy",
]

#: ``(step_index, num_steps) -> multiplier`` of the guidance scale at that step.
GuidanceSchedule = Callable[[int, int], float]

GUIDANCE_SCHEDULES: dict[str, GuidanceSchedule] = {
    "constant": lambda i, n: 1.0,
    "increasing": lambda i, n: (i + 1) / n,  # weak at high noise, full at the last step
    "decreasing": lambda i, n: (n - i) / n,  # full at the first step, weak at the end
}


def guidance_schedule(schedule: str | GuidanceSchedule, name: str = "schedule") -> GuidanceSchedule:
    """A named schedule of :data:`GUIDANCE_SCHEDULES`, or a callable ``(i, n) -> float``."""
    if callable(schedule):
        return schedule
    if not isinstance(schedule, str) or schedule not in GUIDANCE_SCHEDULES:
        error = ValueError if isinstance(schedule, str) else ArgumentKindError
        raise error(
            f"guidance schedule ({name}) must be one of {sorted(GUIDANCE_SCHEDULES)} or a "
            f"callable (step_index, num_steps) -> float, got {schedule!r}"
        )
    return GUIDANCE_SCHEDULES[schedule]


def _select_cond(cond: Any, idx: Tensor) -> Any:
    """The condition of rows ``idx`` of a batch; a domain's own condition type may define
    ``select(idx)`` (and ``repeat(n)``, see :func:`repeat_cond`)."""
    if hasattr(cond, "select") and not isinstance(cond, Tensor):
        return cond.select(idx)
    if isinstance(cond, Tensor) and cond.ndim:
        return cond[idx]
    if isinstance(cond, (list, tuple)):
        return type(cond)(cond[i] for i in idx.tolist())
    return cond


def base_policy(ctx: MethodContext, cond: Any = None) -> StepPolicy:
    """The reference model alone."""
    check_context(ctx)
    return expert_policy(ctx.reference, ctx.schedule, cond)


def _members(ctx: MethodContext, weights) -> tuple[list[Member], list[float]]:
    """The members with a nonzero exponent and their lambdas (None, the reference, last)."""
    coefs = ctx.coefficients(weights)
    members: list[Member] = [i for i, lam in enumerate(coefs.lambdas) if lam != 0.0]
    lambdas = [lam for lam in coefs.lambdas if lam != 0.0]
    if coefs.lambda0 != 0.0:
        members.append(None)
        lambdas.append(coefs.lambda0)
    return members, lambdas


def _expert(ctx: MethodContext, member: Member) -> Expert:
    return ctx.reference if member is None else ctx.experts[member]


def _model_outputs(
    ctx: MethodContext, members: Sequence[Member], cond: Any
) -> Callable[[Tensor, Tensor], list[Tensor]]:
    """``(x_t, t (B,)) -> [output of m for m in members]``: one joint call when ``ctx.joint``."""
    if ctx.joint is not None:
        return lambda x_t, tb: list(ctx.joint(x_t, tb, cond, members))
    experts = [_expert(ctx, m) for m in members]
    return lambda x_t, tb: [e.denoiser(x_t, tb, cond) for e in experts]


def _module_soup(members: Sequence[Expert], lambdas: Sequence[float]) -> Denoiser:
    """:func:`parameter_soup` of the members' ``nn.Module`` denoisers, counted like them."""
    modules = [unwrap(e.denoiser) for e in members]
    for e, m in zip(members, modules, strict=True):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(
                f"rs needs denoisers that are torch.nn.Module; {e.name!r} is {type(m).__name__}"
            )
    soup = parameter_soup(modules, lambdas)
    counter = getattr(members[0].denoiser, "counter", None)
    return counter.wrap_denoiser(soup) if isinstance(counter, EvalCounter) else soup


def rs_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """Rewarded soups: the model with parameters sum_i lambda_i theta_i (+ lambda_0 theta_ref).

    The soup is ``ctx.soup(members, lambdas)`` when the domain gives one; otherwise the
    experts' denoisers must be ``torch.nn.Module`` s of one architecture. The soup steps
    with the experts' common :class:`StepSpec`.
    """
    check_context(ctx)
    ids, lambdas = _members(ctx, weights)
    members = [_expert(ctx, m) for m in ids]
    specs = {e.spec for e in members}
    if len(specs) != 1:
        raise ValueError(f"rs needs experts with one StepSpec, got {sorted(map(str, specs))}")
    if ctx.soup is not None:
        denoiser = ctx.soup(tuple(ids), tuple(lambdas))
    else:
        denoiser = _module_soup(members, lambdas)
    souped = Expert(denoiser, members[0].spec, members[0].kl_coef, name="rewarded soup")
    return expert_policy(souped, ctx.schedule, cond)


def _mixing_spec(members: Sequence[Expert]) -> StepSpec:
    kinds = {e.spec.prediction_type for e in members}
    if len(kinds) != 1:
        raise ValueError(
            f"db mixes model outputs: the experts must share prediction_type, got {kinds}"
        )
    spec = members[0].spec
    if spec.learned_variance:
        spec = replace(spec, variance_type="fixed_small")
    return spec


def db_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """Diffusion Blend (DB-MPA): the step of sum_i lambda_i eps_i, variances ignored.

    The model outputs' prediction channels are mixed with the fusion exponents (the
    weights, for experts of one beta on the simplex); a learned variance channel is
    dropped and the step uses ``fixed_small``. With equal step variances this is the
    MSDDA step (DDPM and DDIM means are affine in the model output). With ``ctx.joint``
    all members are evaluated in one joint call.
    """
    check_context(ctx)
    ids, lambdas = _members(ctx, weights)
    spec = _mixing_spec([_expert(ctx, m) for m in ids])
    outputs = _model_outputs(ctx, ids, cond)
    schedule = ctx.schedule

    def step(x_t: Tensor, t: int) -> Gaussian:
        mixed = None
        for out, lam in zip(outputs(x_t, t_batch(x_t, t)), lambdas, strict=True):
            out = out[:, : x_t.shape[1]]
            mixed = lam * out if mixed is None else mixed + lam * out
        g = step_gaussian(mixed, x_t, t, schedule, spec)
        return Gaussian(g.mean, g.variance)

    return step


def db_ls_policy(
    ctx: MethodContext, weights, cond: Any = None, *, rng: SampleGenerators
) -> StepPolicy:
    """Diffusion Blend, one expert per step: each sample draws expert i with probability lambda_i.

    One network evaluation per sample and step; the draw uses ``rng``, not the step noise.
    """
    check_context(ctx)
    if not isinstance(rng, SampleGenerators):
        raise TypeError(f"rng must be a SampleGenerators, got {type(rng).__name__}")
    ids, lambdas = _members(ctx, weights)
    members = [_expert(ctx, m) for m in ids]
    if min(lambdas) < 0:
        raise ValueError(
            f"db-ls draws models with probabilities lambda; got lambda = {lambdas} (lambda_0 < 0)"
        )
    total = sum(lambdas)
    probs = torch.tensor([lam / total for lam in lambdas], dtype=torch.float64)
    schedule = ctx.schedule

    def step(x_t: Tensor, t: int) -> Gaussian:
        pick = rng.categorical(probs.expand(x_t.shape[0], -1))
        mean = torch.empty_like(x_t)
        variance = torch.empty_like(x_t)
        for m in pick.unique().tolist():
            idx = torch.nonzero(pick == m).flatten().to(x_t.device)
            sub = x_t[idx]
            g = expert_policy(members[m], schedule, _select_cond(cond, idx))(sub, t)
            mean[idx] = g.mean.to(x_t.dtype)
            variance[idx] = g.variance.expand_as(sub).to(x_t.dtype)
        return Gaussian(mean, variance)

    return step


def rgg_policy(
    ctx: MethodContext,
    weights,
    cond: Any = None,
    *,
    scale: float,
    schedule: str | GuidanceSchedule = "constant",
) -> StepPolicy:
    """Reward gradient guidance: the reference step with mean + s_t var grad_x sum_i w_i r_i.

    The gradient is of the weighted reward of decode(x0_hat(x_t)) under the reference
    (one forward and one backward per step); s_t = scale * schedule(i, n). Steps with
    s_t = 0 take no gradient and are the reference step.
    """
    check_context(ctx)
    ctx.require_rewards("rgg")
    scale = check_number(scale, "scale", low=0.0)
    shape_of = guidance_schedule(schedule, "schedule")
    reward = weighted_reward(ctx, weights)
    index = step_index(ctx)
    n = len(ctx.schedule.timesteps)
    ref = ctx.reference
    reference = base_policy(ctx, cond)

    def step(x_t: Tensor, t: int) -> Gaussian:
        i = index(t)
        s = scale * check_number(shape_of(i, n), f"guidance schedule at step {i}")
        if s == 0.0:
            return reference(x_t, t)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            g = step_gaussian(ref.denoiser(x, t_batch(x, t), cond), x, t, ctx.schedule, ref.spec)
            objective = reward(ctx.decode(g.pred_x0), cond).sum()
            (grad,) = torch.autograd.grad(objective, x)
        variance = g.variance.detach()
        return Gaussian(g.mean.detach() + s * variance * grad, variance)

    return step


def msdda_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """MSDDA: the closed-form weighted product of the experts' step Gaussians.

    With ``ctx.joint`` the active experts and, when lambda_0 != 0, the reference are
    evaluated in one joint call per step.
    """
    check_context(ctx)
    if ctx.joint is not None:
        return msdda_step(
            joint_policy(ctx.joint, ctx.experts, ctx.reference, ctx.schedule, cond),
            weights,
            kl_coefs=[e.kl_coef for e in ctx.experts],
            kl_coef=ctx.kl_coef,
            num_experts=ctx.num_objectives,
        )
    return msdda_step(
        [expert_policy(e, ctx.schedule, cond) for e in ctx.experts],
        weights,
        kl_coefs=[e.kl_coef for e in ctx.experts],
        kl_coef=ctx.kl_coef,
        reference=base_policy(ctx, cond),
    )


def oracle_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """The model trained on the weighted reward itself, where one exists for these weights."""
    check_context(ctx)
    key = weight_key(weights)
    for k, expert in ctx.oracles.items():
        if weight_key(k) == key:
            return expert_policy(expert, ctx.schedule, cond)
    have = sorted(weight_key(k) for k in ctx.oracles)
    raise ValueError(f"no oracle for weights {list(key)}; oracles exist for {have}")


def student_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """The weight-conditioned student (:mod:`msdda.student`) at these weights: one forward
    per step, whatever the weights."""
    check_context(ctx)
    if ctx.student is None:
        raise ValueError(
            "method 'student' needs a trained student: this problem has none "
            "(digits: `msdda train-student`)"
        )
    return expert_policy(ctx.student(tuple(float(w) for w in weights)), ctx.schedule, cond)
