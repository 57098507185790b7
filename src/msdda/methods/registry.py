"""The methods by name, their hyperparameters, and one call that samples with any of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..measure import peak_memory, timed
from ..sampling import StepPolicy, check_seed_arg, sample_chain
from ..validation import check_callable, check_number, check_seeds
from . import strategies as s
from .common import EvalCounter, MethodContext, NoiseTape, SampleGenerators, check_weights
from .kl import KLMeter, metered

__all__ = [
    "MethodSettings",
    "MethodInfo",
    "METHODS",
    "MethodRun",
    "check_method",
    "build_policy",
    "run_method",
]


@dataclass(frozen=True)
class MethodSettings:
    """Hyperparameters of the methods that have any (tune them on separate seeds)."""

    rgg_scale: float = 1.0  # guidance strength s of rgg
    rgg_schedule: str = "constant"  # named step schedule of s (see GUIDANCE_SCHEDULES)
    code_candidates: int = 4  # N continuations per block of code
    code_block: int = 5  # B steps per block of code
    target_candidates: int = 8  # M reference candidates per step of target

    def __post_init__(self) -> None:
        check_number(self.rgg_scale, "rgg_scale", low=0.0)
        s.guidance_schedule(self.rgg_schedule, "rgg_schedule")
        s.check_count(self.code_candidates, "code_candidates", high=s.MAX_CANDIDATES)
        s.check_count(self.code_block, "code_block")
        s.check_count(self.target_candidates, "target_candidates", high=s.MAX_CANDIDATES)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    uses_weights: bool = True  # False: one run serves every weight (base)
    needs_rewards: bool = False  # reads reward values or gradients at sampling time
    needs_oracle: bool = False  # runs only at weights with a trained oracle
    parameters: tuple[str, ...] = ()  # the MethodSettings fields it reads
    search: bool = False  # picks x_{t-1} among candidates (point masses; meters its own KL)
    kl_is_bound: bool = False  # its measured KL to the base is an upper bound, not exact
    needs_student: bool = False  # runs only where the context has a trained student


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("base", "the reference model alone", uses_weights=False),
        MethodInfo("rs", "rewarded soups: parameters sum_i w_i theta_i"),
        MethodInfo("db", "Diffusion Blend: experts' epsilons mixed, variances ignored"),
        MethodInfo(
            "db-ls",
            "Diffusion Blend, one expert drawn per step with probability w_i",
            kl_is_bound=True,
        ),
        MethodInfo(
            "rgg",
            "reward gradient guidance on the reference",
            needs_rewards=True,
            parameters=("rgg_scale", "rgg_schedule"),
        ),
        MethodInfo(
            "code",
            "blockwise controlled decoding: best of N every B steps",
            needs_rewards=True,
            parameters=("code_candidates", "code_block"),
            search=True,
        ),
        MethodInfo(
            "target",
            "exact step-level optimum by importance resampling",
            needs_rewards=True,
            parameters=("target_candidates",),
            search=True,
            kl_is_bound=True,
        ),
        MethodInfo("msdda", "MSDDA: closed-form product of the experts' Gaussians"),
        MethodInfo("oracle", "a model trained on the weighted reward", needs_oracle=True),
        MethodInfo(
            "student",
            "one weight-conditioned model distilled from MSDDA (one forward per step)",
            needs_student=True,
        ),
    )
}


def check_method(method: str) -> MethodInfo:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


@dataclass(frozen=True, eq=False)
class _Draws:
    """Where a method's randomness comes from: the loop's tape and its own seeded stream."""

    seeds: int | Sequence[int]
    noise: NoiseTape
    kl: KLMeter | None = None  # a search method's choices add their KL here

    def __post_init__(self) -> None:
        check_seed_arg(self.seeds)
        check_callable(self.noise, "noise", "the NoiseTape the sampling loop reads")
        if self.kl is not None and not isinstance(self.kl, KLMeter):
            raise TypeError(f"kl must be a KLMeter or None, got {type(self.kl).__name__}")

    def rng(self, method: str) -> SampleGenerators:
        return SampleGenerators(self.seeds, method)

    def search(self, method: str, candidates: int) -> s.Search:
        return s.Search(self.noise, self.rng(method), candidates, kl=self.kl)


#: method -> (context, weights, condition, draws, settings) -> step policy
_BUILDERS: dict[str, Callable[..., StepPolicy]] = {
    "base": lambda ctx, w, cond, draws, cfg: s.base_policy(ctx, cond),
    "rs": lambda ctx, w, cond, draws, cfg: s.rs_policy(ctx, w, cond),
    "db": lambda ctx, w, cond, draws, cfg: s.db_policy(ctx, w, cond),
    "db-ls": lambda ctx, w, cond, draws, cfg: s.db_ls_policy(ctx, w, cond, rng=draws.rng("db-ls")),
    "rgg": lambda ctx, w, cond, draws, cfg: s.rgg_policy(
        ctx, w, cond, scale=cfg.rgg_scale, schedule=cfg.rgg_schedule
    ),
    "code": lambda ctx, w, cond, draws, cfg: s.code_policy(
        ctx, w, cond, search=draws.search("code", cfg.code_candidates), block=cfg.code_block
    ),
    "target": lambda ctx, w, cond, draws, cfg: s.target_policy(
        ctx, w, cond, search=draws.search("target", cfg.target_candidates)
    ),
    "msdda": lambda ctx, w, cond, draws, cfg: s.msdda_policy(ctx, w, cond),
    "oracle": lambda ctx, w, cond, draws, cfg: s.oracle_policy(ctx, w, cond),
    "student": lambda ctx, w, cond, draws, cfg: s.student_policy(ctx, w, cond),
}


def build_policy(
    method: str,
    ctx: MethodContext,
    weights,
    cond: Any,
    *,
    seeds: int | Sequence[int],
    noise: NoiseTape,
    settings: MethodSettings | None = None,
    kl: KLMeter | None = None,
) -> StepPolicy:
    """The step policy of ``method`` for these weights and this condition.

    ``weights`` may be None for a method that does not use them (``base``); ``seeds``
    seed the method's own randomness (stream named after the method); ``noise`` must
    be the tape the sampling loop reads; a search method adds its choices' KL to ``kl``.
    """
    info = check_method(method)
    if not isinstance(ctx, MethodContext):
        raise TypeError(f"ctx must be a MethodContext, got {type(ctx).__name__}")
    if info.uses_weights or weights is not None:
        weights = check_weights(weights, ctx.num_objectives)
    if settings is not None and not isinstance(settings, MethodSettings):
        raise TypeError(f"settings must be a MethodSettings or None, got {type(settings).__name__}")
    draws = _Draws(seeds, noise, kl)
    return _BUILDERS[method](ctx, weights, cond, draws, settings or MethodSettings())


@dataclass(frozen=True)
class MethodRun:
    """Samples of one method and what they cost."""

    samples: Tensor  # (B, *sample_shape) in model space
    seconds: float  # wall time of the chain
    denoiser_rows: int  # rows through any denoiser (network evaluations)
    reward_rows: int  # rows through any reward
    kl: Tensor | None = None  # (B,) path KL to the base per image (nats), when measured
    peak_memory_bytes: int | None = None  # peak memory of the chain (see msdda.measure)
    peak_memory_kind: str = ""  # what that peak is: msdda.measure.MEMORY_KINDS
    peak_memory_increase: int | None = None  # bytes the peak rose above what was held at start

    @property
    def images(self) -> int:
        return int(self.samples.shape[0])

    @property
    def nfe_per_image(self) -> float:
        return self.denoiser_rows / self.images

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images


def run_method(
    method: str,
    ctx: MethodContext,
    weights,
    cond: Any,
    seeds: Sequence[int],
    *,
    settings: MethodSettings | None = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    measure_kl: bool = False,
) -> MethodRun:
    """Sample ``len(seeds)`` images with ``method``; sample b's noise comes from ``seeds[b]``.

    Every method run with equal seeds starts from equal x_T and sees equal step noise
    (``SeededNoise`` with per-sample seeds, read through one :class:`NoiseTape`). With
    ``measure_kl`` the run also measures each image's path KL to the base (nats): exact
    for Gaussian steps (the reference is evaluated again, uncounted and untimed), the
    choices' KL for search methods (exact for ``code``, an upper bound for ``target``).

    x_T is drawn on the CPU and moved to ``ctx.device``. The run's peak memory on that
    device is :func:`msdda.measure.peak_memory` of the chain (CUDA: the most bytes held by
    tensors; CPU: the process's peak resident memory), including the reference
    evaluations of ``measure_kl``.
    """
    if isinstance(seeds, (int, str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise TypeError(
            "seeds must be a non-empty sequence of per-sample ints (one seed per image), "
            f"got {type(seeds).__name__}"
        )
    seeds = check_seeds(seeds)
    info = check_method(method)
    if not isinstance(ctx, MethodContext):
        raise TypeError(f"ctx must be a MethodContext, got {type(ctx).__name__}")
    if callback is not None:
        check_callable(callback, "callback", "a callable (step_index, t, x) or None")
    if not isinstance(measure_kl, bool):
        raise TypeError(f"measure_kl must be a bool, got {type(measure_kl).__name__}")
    counter = EvalCounter()
    counted = ctx.counted(counter)
    tape = NoiseTape.seeded(list(seeds))
    x_T = tape.initial((len(seeds), *ctx.sample_shape)).to(device=ctx.device, dtype=ctx.dtype)
    meter = KLMeter(len(seeds)) if measure_kl else None
    with torch.no_grad(), peak_memory(ctx.device) as peak, timed(ctx.device) as clock:
        policy = build_policy(
            method,
            counted,
            weights,
            cond,
            seeds=list(seeds),
            noise=tape,
            settings=settings,
            kl=meter,
        )
        if meter is not None and not info.search and method != "base":
            policy = metered(policy, s.base_policy(ctx, cond), ctx.schedule, meter)
        x0 = sample_chain(policy, x_T, ctx.schedule.timesteps, tape, callback=callback)
    seconds = clock.seconds - (meter.seconds if meter else 0.0)
    kl = meter.total if meter is not None else None
    return MethodRun(
        x0,
        seconds,
        counter.denoiser_rows,
        counter.reward_rows,
        kl,
        peak.bytes,
        peak.kind,
        peak.increase,
    )
