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

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..experts import Denoiser, Expert, Member, expert_policy, joint_policy, msdda_step
from ..fusion import Gaussian
from ..gaussians import StepSpec, step_gaussian
from ..rewards import StepReward, tweedie_step_reward
from ..sampling import StepPolicy, sample_chain
from ..validation import ArgumentKindError, check_callable, check_number, check_sequence
from .common import (
    EvalCounter,
    MethodContext,
    NoiseTape,
    SampleGenerators,
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
    "MAX_CANDIDATES",
    "Search",
    "check_count",
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


def _check_ctx(ctx: MethodContext) -> None:
    if not isinstance(ctx, MethodContext):
        raise TypeError(f"ctx must be a MethodContext, got {type(ctx).__name__}")


def _step_index(ctx: MethodContext) -> Callable[[int], int]:
    index = {int(t): i for i, t in enumerate(ctx.schedule.timesteps)}

    def lookup(t: int) -> int:
        if int(t) not in index:
            raise ValueError(
                f"timestep {t} is not in this schedule: t must be one of ctx.schedule.timesteps"
            )
        return index[int(t)]

    return lookup


def _t_batch(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


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


def _weighted_reward(ctx: MethodContext, weights: Sequence[float]):
    items = check_sequence(weights, "weights")
    if len(items) != len(ctx.rewards):
        raise ValueError(
            f"weights must hold one weight per objective (K = {len(ctx.rewards)}), got {len(items)}"
        )
    items = [check_number(w, f"weights[{i}]") for i, w in enumerate(items)]
    active = [(w, r) for w, r in zip(items, ctx.rewards, strict=True) if w != 0]

    def reward(images: Tensor, cond: Any) -> Tensor:
        total = None
        for w, r in active:
            term = w * r(images, cond)
            total = term if total is None else total + term
        return total

    return reward


def weighted_step_reward(ctx: MethodContext, weights: Sequence[float]) -> StepReward:
    """sum_i w_i r_i of the reference's Tweedie x0 at the landing timestep (one denoiser call)."""
    _check_ctx(ctx)
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
    _check_ctx(ctx)
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
    _check_ctx(ctx)
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
    _check_ctx(ctx)
    ids, lambdas = _members(ctx, weights)
    spec = _mixing_spec([_expert(ctx, m) for m in ids])
    outputs = _model_outputs(ctx, ids, cond)
    schedule = ctx.schedule

    def step(x_t: Tensor, t: int) -> Gaussian:
        mixed = None
        for out, lam in zip(outputs(x_t, _t_batch(x_t, t)), lambdas, strict=True):
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
    _check_ctx(ctx)
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
    _check_ctx(ctx)
    ctx.require_rewards("rgg")
    scale = check_number(scale, "scale", low=0.0)
    shape_of = guidance_schedule(schedule, "schedule")
    reward = _weighted_reward(ctx, weights)
    index = _step_index(ctx)
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
            g = step_gaussian(ref.denoiser(x, _t_batch(x, t), cond), x, t, ctx.schedule, ref.spec)
            objective = reward(ctx.decode(g.pred_x0), cond).sum()
            (grad,) = torch.autograd.grad(objective, x)
        variance = g.variance.detach()
        return Gaussian(g.mean.detach() + s * variance * grad, variance)

    return step


#: The most candidates a search may draw per step or block: each is one more copy of the
#: batch through the reference model.
MAX_CANDIDATES = 4096


def check_count(value: int, name: str, high: int | None = None) -> int:
    """A positive int (a bool or a float is refused, as a TypeError that is also a ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentKindError(
            f"{name} must be a positive int, got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be a positive int <= {high}, got {value!r}")
    return int(value)


_check_count = check_count


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
        check_count(self.candidates, "candidates", high=MAX_CANDIDATES)
        check_callable(self.noise, "noise", "the NoiseTape the sampling loop reads")
        if not isinstance(self.rng, SampleGenerators):
            raise TypeError(f"rng must be a SampleGenerators, got {type(self.rng).__name__}")
        if self.kl is not None and not isinstance(self.kl, KLMeter):
            raise TypeError(f"kl must be a KLMeter or None, got {type(self.kl).__name__}")

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


def _continuations(
    reference: StepPolicy,
    ref_many: StepPolicy,
    search: Search,
    timesteps: Sequence[int],
    x_t: Tensor,
    start: int,
    end: int,
) -> list[Tensor]:
    """(N B, ...) states of the N reference continuations of ``x_t`` after steps start..end-1.

    One :func:`sample_chain` on the slice of the timesteps, with each step's noise from
    ``search.step_noise`` (candidate 0: the loop's tape) at its index in the schedule.
    """
    n = search.candidates

    def candidates_step(x: Tensor, t: int) -> Gaussian:
        if t != timesteps[start]:
            return ref_many(x, t)
        g = reference(x_t, t)  # every candidate starts at x_t: one evaluation
        return Gaussian(*(torch.cat([v.expand_as(x_t)] * n) for v in (g.mean, g.variance)))

    path: list[Tensor] = []
    sample_chain(
        candidates_step,
        torch.cat([x_t] * n),
        timesteps[start:end],
        lambda j, like: search.step_noise(j, x_t),
        callback=lambda j, t, x: path.append(x),
        first_index=start,
        ends_chain=end == len(timesteps),
    )
    return path


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

    def run_block(x_t: Tensor, start: int) -> None:
        end = min(start + block, len(ts))
        path = _continuations(reference, ref_many, search, ts, x_t, start, end)
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
            return Gaussian.point_mass(reference(x_t, t).mean)
        if i not in chosen:
            run_block(x_t, i)
        return Gaussian.point_mass(chosen.pop(i))

    return step


def code_policy(
    ctx: MethodContext, weights, cond: Any = None, *, search: Search, block: int
) -> StepPolicy:
    """Blockwise controlled decoding (CoDe): best of N reference continuations every B steps.

    At a block's first step, N continuations of B reference steps (fewer at the end)
    are drawn; each sample keeps the one whose x0_hat at the block's end scores best on
    sum_i w_i r_i; the block's steps then follow it as point masses.
    """
    _check_ctx(ctx)
    block = check_count(block, "block (B)")
    if not isinstance(search, Search):
        raise TypeError(f"search must be a Search, got {type(search).__name__}")
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
    _check_ctx(ctx)
    if not isinstance(search, Search):
        raise TypeError(f"search must be a Search, got {type(search).__name__}")
    beta = ctx.target_kl_coef()
    m = search.candidates

    def resample(r: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(r.to(torch.float64) / beta, dim=0)  # (M, B)
        kl = torch.xlogy(probs, probs * m).sum(dim=0)  # KL(probs || uniform) >= the step's KL
        return search.rng.categorical(probs.T), kl

    return _blockwise_search(ctx, weights, cond, search, 1, resample)


def msdda_policy(ctx: MethodContext, weights, cond: Any = None) -> StepPolicy:
    """MSDDA: the closed-form weighted product of the experts' step Gaussians.

    With ``ctx.joint`` the active experts and, when lambda_0 != 0, the reference are
    evaluated in one joint call per step.
    """
    _check_ctx(ctx)
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
    _check_ctx(ctx)
    key = weight_key(weights)
    for k, expert in ctx.oracles.items():
        if weight_key(k) == key:
            return expert_policy(expert, ctx.schedule, cond)
    have = sorted(weight_key(k) for k in ctx.oracles)
    raise ValueError(f"no oracle for weights {list(key)}; oracles exist for {have}")
