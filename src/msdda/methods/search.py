"""The search methods: ``code`` (blockwise controlled decoding) and ``target`` (the exact
step-level optimum by importance resampling), and their shared machinery.

Both are a blockwise search (:func:`_blockwise_search`): at a block's first step, N
reference continuations of the block are drawn through :func:`msdda.sample_chain` and each
sample keeps one, scored by :func:`weighted_step_reward` where the block lands; the block's
steps then follow the kept one as point masses. Candidate 0 takes the sampling loop's own
noise (read from the shared :class:`NoiseTape`), so a search over one candidate is the base
sampler exactly; the other candidates and the random choices come from the method's
:class:`SampleGenerators` (a :class:`Search` holds both).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..experts import expert_policy
from ..fusion import Gaussian
from ..rewards import StepReward, tweedie_step_reward
from ..sampling import StepPolicy, sample_chain
from ..validation import ArgumentKindError, check_callable
from .common import (
    MethodContext,
    NoiseTape,
    SampleGenerators,
    check_context,
    repeat_cond,
    step_index,
    weighted_reward,
)
from .kl import KLMeter, best_of_n_kl

__all__ = [
    "weighted_step_reward",
    "MAX_CANDIDATES",
    "Search",
    "check_count",
    "code_policy",
    "target_policy",
]


def weighted_step_reward(ctx: MethodContext, weights: Sequence[float]) -> StepReward:
    """sum_i w_i r_i of the reference's Tweedie x0 at the landing timestep (one denoiser call)."""
    check_context(ctx)
    ctx.require_rewards("weighted step reward")
    return tweedie_step_reward(
        weighted_reward(ctx, weights),
        ctx.reference.denoiser,
        ctx.schedule,
        ctx.decode,
        ctx.reference.spec.prediction_type,
    )


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
    index = step_index(ctx)
    reference = expert_policy(ctx.reference, ctx.schedule, cond)
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
    check_context(ctx)
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
    check_context(ctx)
    if not isinstance(search, Search):
        raise TypeError(f"search must be a Search, got {type(search).__name__}")
    beta = ctx.target_kl_coef()
    m = search.candidates

    def resample(r: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(r.to(torch.float64) / beta, dim=0)  # (M, B)
        kl = torch.xlogy(probs, probs * m).sum(dim=0)  # KL(probs || uniform) >= the step's KL
        return search.rng.categorical(probs.T), kl

    return _blockwise_search(ctx, weights, cond, search, 1, resample)
