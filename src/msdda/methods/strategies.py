"""Every compared method as a step policy ``(x_t, t) -> Gaussian`` on one sampling loop.

Each builder takes the problem (:class:`MethodContext`), the preference weights and
the condition, and returns the per-step rule; :func:`msdda.sample_chain` does the
rest, identically for all. A method that picks x_{t-1} itself (``code``, ``target``)
returns a point mass. Candidate 0 of a search is always the reference step taken
with the loop's own noise (read from the shared :class:`NoiseTape`), so a search over
one candidate is the base sampler exactly; other candidates and random choices come
from the method's :class:`SampleGenerators`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..experts import Expert, expert_policy, msdda_step
from ..fusion import Gaussian
from ..gaussians import StepSpec, step_gaussian
from ..rewards import StepReward, tweedie_step_reward
from ..sampling import StepPolicy
from .common import (
    EvalCounter,
    MethodContext,
    NoiseTape,
    SampleGenerators,
    point_mass,
    repeat_cond,
    unwrap,
    weight_key,
)
from .kl import KLMeter, best_of_n_kl
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
    "Search",
    "code_policy",
    "target_policy",
    "msdda_policy",
    "oracle_policy",
]

#: ``(step_index, num_steps) -> multiplier`` of the guidance scale at that step.
GuidanceSchedule = Callable[[int, int], float]

GUIDANCE_SCHEDULES: dict[str, GuidanceSchedule] = {
    "constant": lambda i, n: 1.0,
    "increasing": lambda i, n: (i + 1) / n,  # weak at high noise, full at the last step
    "decreasing": lambda i, n: (n - i) / n,  # full at the first step, weak at the end
}


def guidance_schedule(schedule: str | GuidanceSchedule) -> GuidanceSchedule:
    """A named schedule of :data:`GUIDANCE_SCHEDULES`, or a callable ``(i, n) -> float``."""
    if callable(schedule):
        return schedule
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"guidance schedule must be one of {sorted(GUIDANCE_SCHEDULES)} or a callable "
            f"(step_index, num_steps) -> float, got {schedule!r}"
        )
    return GUIDANCE_SCHEDULES[schedule]


def _step_index(ctx: MethodContext) -> Callable[[int], int]:
    index = {int(t): i for i, t in enumerate(ctx.schedule.timesteps)}

    def lookup(t: int) -> int:
        if int(t) not in index:
            raise ValueError(f"timestep {t} is not in this schedule")
        return index[int(t)]

    return lookup


def _t_batch(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _select_cond(cond: Any, idx: Tensor) -> Any:
    if isinstance(cond, Tensor) and cond.ndim:
        return cond[idx]
    if isinstance(cond, (list, tuple)):
        return type(cond)(cond[i] for i in idx.tolist())
    return cond


def _weighted_reward(ctx: MethodContext, weights: Sequence[float]):
    active = [(float(w), r) for w, r in zip(weights, ctx.rewards, strict=True) if w != 0]

    def reward(images: Tensor, cond: Any) -> Tensor:
        total = None
        for w, r in active:
            term = w * r(images, cond)
            total = term if total is None else total + term
        return total

    return reward


def weighted_step_reward(ctx: MethodContext, weights: Sequence[float]) -> StepReward:
    """sum_i w_i r_i of the reference's Tweedie x0 at the landing timestep (one denoiser call)."""
    ctx.require_rewards("weighted step reward")
    return tweedie_step_reward(
        _weighted_reward(ctx, weights),
        ctx.reference.denoiser,
        ctx.schedule,
        ctx.decode,
        ctx.reference.spec.prediction_type,
    )


def base_policy(ctx: MethodContext, cond: Any = None) -> StepPolicy:
    """The reference model alone."""
    return expert_policy(ctx.reference, ctx.schedule, cond)


def _members(ctx: MethodContext, weights) -> tuple[list[Expert], list[float]]:
    """The models with a nonzero exponent and their lambdas (reference last if lambda_0 != 0)."""
    coefs = ctx.coefficients(weights)
    members = [e for e, lam in zip(ctx.experts, coefs.lambdas, strict=True) if lam != 0.0]
    lambdas = [lam for lam in coefs.lambdas if lam != 0.0]
    if coefs.lambda0 != 0.0:
        members.append(ctx.reference)
        lambdas.append(coefs.lambda0)
    return members, lambdas


def rs_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """Rewarded soups: the model with parameters sum_i lambda_i theta_i (+ lambda_0 theta_ref).

    The experts' denoisers must be ``torch.nn.Module`` s of one architecture; the soup
    steps with the experts' common :class:`StepSpec`.
    """
    members, lambdas = _members(ctx, weights)
    modules = [unwrap(e.denoiser) for e in members]
    for e, m in zip(members, modules, strict=True):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(
                f"rs needs denoisers that are torch.nn.Module; {e.name!r} is {type(m).__name__}"
            )
    specs = {e.spec for e in members}
    if len(specs) != 1:
        raise ValueError(f"rs needs experts with one StepSpec, got {sorted(map(str, specs))}")
    soup = parameter_soup(modules, lambdas)
    counter = getattr(members[0].denoiser, "counter", None)
    denoiser = counter.wrap_denoiser(soup) if isinstance(counter, EvalCounter) else soup
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
    MSDDA step (DDPM and DDIM means are affine in the model output).
    """
    members, lambdas = _members(ctx, weights)
    spec = _mixing_spec(members)
    schedule = ctx.schedule

    def step(x_t: Tensor, t: int) -> Gaussian:
        tb = _t_batch(x_t, t)
        mixed = None
        for e, lam in zip(members, lambdas, strict=True):
            out = e.denoiser(x_t, tb, cond)[:, : x_t.shape[1]]
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
    members, lambdas = _members(ctx, weights)
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
    ctx.require_rewards("rgg")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    shape_of = guidance_schedule(schedule)
    reward = _weighted_reward(ctx, weights)
    index = _step_index(ctx)
    n = len(ctx.schedule.timesteps)
    ref = ctx.reference
    reference = base_policy(ctx, cond)

    def step(x_t: Tensor, t: int) -> Gaussian:
        s = float(scale) * float(shape_of(index(t), n))
        if s == 0.0:
            return reference(x_t, t)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            g = step_gaussian(ref.denoiser(x, _t_batch(x, t), cond), x, t, ctx.schedule, ref.spec)
            objective = reward(ctx.decode(g.pred_x0), cond).sum()
            (grad,) = torch.autograd.grad(objective, x)
        variance = g.variance.detach()
        return Gaussian(g.mean.detach() + s * variance * grad, variance)

    return step


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class Search:
    """The candidates of a search method (``code``, ``target``) and where their noise comes from.

    Candidate 0 takes the sampling loop's own noise (read from the shared tape), so a
    search over one candidate is the base sampler exactly; candidates 1..N-1 take the
    method's own draws.
    """

    noise: NoiseTape  # the tape the sampling loop reads
    rng: SampleGenerators  # the method's own randomness
    candidates: int  # N >= 1 continuations
    kl: KLMeter | None = None  # where each choice's KL to the base is added, if measured

    def __post_init__(self) -> None:
        _check_count(self.candidates, "candidates")

    def step_noise(self, i: int, x: Tensor) -> Tensor:
        """(N B, ...) noise of step ``i`` for the N candidates of ``x`` (B, ...), candidate-major."""
        z0 = self.noise(i, x)
        if self.candidates == 1:
            return z0
        return torch.cat([z0, self.rng.randn(self.candidates - 1, x).flatten(0, 1)])


def _take(stacked: Tensor, n: int, pick: Tensor) -> Tensor:
    """Row b of candidate pick[b] from (n B, ...) candidate-major rows."""
    per = stacked.reshape(n, -1, *stacked.shape[1:])
    return per[pick.to(per.device), torch.arange(per.shape[1], device=per.device)]


#: ``scores (N, B) -> (pick (B,), kl (B,))``: the candidate each sample keeps, and the KL
#: (nats) of that choice against keeping a reference draw (an upper bound where not exact).
Choice = Callable[[Tensor], tuple[Tensor, Tensor]]


def _blockwise_search(
    ctx: MethodContext, weights, cond: Any, search: Search, block: int, choose: Choice
) -> StepPolicy:
    """Every ``block`` steps, N reference continuations of the block; each sample keeps one.

    The candidates are scored by sum_i w_i r_i of their Tweedie x0 where the block
    lands (:func:`weighted_step_reward`); the block's steps then follow the kept one as
    point masses. A block of the last step alone has nothing to choose (no noise).
    The choices' KL goes to ``search.kl``: the continuations themselves are reference
    steps, so the choices are the path's only departure from the base.
    """
    n = search.candidates
    score = weighted_step_reward(ctx, weights) if n > 1 else None
    ts, prev = ctx.schedule.timesteps, ctx.schedule.prev_timesteps
    last = len(ts) - 1
    index = _step_index(ctx)
    reference = base_policy(ctx, cond)
    ref_many = expert_policy(ctx.reference, ctx.schedule, repeat_cond(cond, n))
    chosen: dict[int, Tensor] = {}

    def continuations(x_t: Tensor, start: int, end: int) -> list[Tensor]:
        """(N B, ...) states of the N candidates after each step start..end-1."""
        g = reference(x_t, ts[start])  # every candidate starts at x_t: one evaluation
        mean, var = (torch.cat([v.expand_as(x_t)] * n) for v in (g.mean, g.variance))
        path = []
        for j in range(start, end):
            if j > start:
                g = ref_many(path[-1], ts[j])
                mean, var = g.mean, g.variance
            noise = search.step_noise(j, x_t) if j < last else 0.0
            path.append(mean + var.clamp_min(0).sqrt() * noise)
        return path

    def run_block(x_t: Tensor, start: int) -> None:
        end = min(start + block, len(ts))
        path = continuations(x_t, start, end)
        if n > 1:
            r = score(path[-1], prev[end - 1], repeat_cond(cond, n)).reshape(n, -1)
            pick, kl = choose(r)
            path = [_take(p, n, pick) for p in path]
            if search.kl is not None:
                search.kl.add(kl)
        chosen.clear()
        chosen.update(zip(range(start, end), path, strict=True))

    def step(x_t: Tensor, t: int) -> Gaussian:
        i = index(t)
        if i == last and i not in chosen:
            return point_mass(reference(x_t, t).mean)
        if i not in chosen:
            run_block(x_t, i)
        return point_mass(chosen.pop(i))

    return step


def code_policy(
    ctx: MethodContext, weights, cond: Any = None, *, search: Search, block: int
) -> StepPolicy:
    """Blockwise controlled decoding (CoDe): best of N reference continuations every B steps.

    At a block's first step, N continuations of B reference steps (fewer at the end)
    are drawn; each sample keeps the one whose x0_hat at the block's end scores best on
    sum_i w_i r_i; the block's steps then follow it as point masses.
    """
    block = _check_count(block, "block (B)")
    n = search.candidates
    kl = best_of_n_kl(n)

    def best(r: Tensor) -> tuple[Tensor, Tensor]:
        return r.argmax(dim=0), torch.full((r.shape[1],), kl, dtype=torch.float64)

    return _blockwise_search(ctx, weights, cond, search, block, best)


def target_policy(ctx: MethodContext, weights, cond: Any = None, *, search: Search) -> StepPolicy:
    """The exact step-level optimum of sum_i w_i r_i, by per-step importance resampling.

    M candidates x_{t-1} from the reference step are resampled with probabilities
    softmax(sum_i w_i r_i(x_{t-1}) / beta), the step reward being
    :func:`msdda.rewards.tweedie_step_reward` at the landing timestep and beta the
    target KL coefficient: a one-step block search that samples its choice. As M grows
    this samples p_ref exp(r / beta) exactly.
    """
    beta = ctx.target_kl_coef()
    m = search.candidates

    def resample(r: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(r.to(torch.float64) / beta, dim=0)  # (M, B)
        kl = torch.xlogy(probs, probs * m).sum(dim=0)  # KL(probs || uniform) >= the step's KL
        return search.rng.categorical(probs.T), kl

    return _blockwise_search(ctx, weights, cond, search, 1, resample)


def msdda_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """MSDDA: the closed-form weighted product of the experts' step Gaussians."""
    return msdda_step(
        [expert_policy(e, ctx.schedule, cond) for e in ctx.experts],
        weights,
        kl_coefs=[e.kl_coef for e in ctx.experts],
        kl_coef=ctx.kl_coef,
        reference=base_policy(ctx, cond),
    )


def oracle_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """The model trained on the weighted reward itself, where one exists for these weights."""
    key = weight_key(weights)
    for k, expert in ctx.oracles.items():
        if weight_key(k) == key:
            return expert_policy(expert, ctx.schedule, cond)
    have = sorted(weight_key(k) for k in ctx.oracles)
    raise ValueError(f"no oracle for weights {list(key)}; oracles exist for {have}")
