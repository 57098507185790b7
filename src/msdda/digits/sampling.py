"""Sampling in the digits domain: the base, one expert, or MSDDA over the experts.

MSDDA's step is the methods registry's (:func:`msdda.methods.msdda_policy` on the
digits problem as the methods see it, :func:`method_context`); every method runs
through msdda's one loop (:func:`msdda.sample_chain`) with :class:`msdda.SeededNoise`,
so equal seeds give equal noise across methods and preference weights. Samples come
back as images in [0, 1], (N, 1, 8, 8).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..experts import Expert, expert_policy
from ..methods import MethodContext
from ..methods import msdda_policy as registry_msdda_policy
from ..sampling import SeededNoise, StepPolicy, sample_chain
from ..validation import check_callable, check_int, check_positive, check_seed, check_seeds
from .bundle import DigitsBundle, load_digits_bundle
from .data import IMAGE_SHAPE, check_prompts, decode
from .rewards import check_reward_weights
from .store import check_expert_kind

__all__ = [
    "torch_threads",
    "run_policy",
    "sample_expert",
    "method_context",
    "fused_policy",
    "sample_msdda",
    "generate",
    "check_weights",
    "msdda_policy",
]

Callback = Callable[[int, int, Tensor], None]

#: The most samples one call draws (each is 64 floats per step and model).
MAX_SAMPLES = 1_000_000


def _check_seed_arg(seed: Any, num_samples: int) -> int | list[int]:
    """One seed for the batch, or one per sample: ints in [0, 2**63 - 1]."""
    if isinstance(seed, (Sequence, Tensor)) and not isinstance(seed, (str, bytes)):
        seeds = check_seeds(seed, "seed")
        if len(seeds) != num_samples:
            raise ValueError(f"seed holds {len(seeds)} seeds for {num_samples} samples")
        return seeds
    return check_seed(seed)


def _check_callback(callback: Any) -> Any:
    return None if callback is None else check_callable(callback, "callback")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore.

    The digits models are small: one thread is as fast as several and does not slow
    down badly when the cores are shared.
    """
    if n is None:
        yield
        return
    check_int(n, "threads", low=1, high=4096)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def run_policy(
    policy: StepPolicy,
    num_samples: int,
    schedule,
    seed: int | Sequence[int] = 0,
    callback: Callback | None = None,
) -> Tensor:
    """Run ``policy`` from seeded noise through ``schedule``; returns images in [0, 1]."""
    check_callable(policy, "policy", "a step policy (x_t, t) -> Gaussian")
    num_samples = check_int(num_samples, "num_samples", low=1, high=MAX_SAMPLES)
    noise = SeededNoise(_check_seed_arg(seed, num_samples))
    callback = _check_callback(callback)
    x_T = noise.initial((num_samples, *IMAGE_SHAPE))
    return decode(sample_chain(policy, x_T, schedule.timesteps, noise, callback=callback))


def sample_expert(
    expert: Expert,
    prompts: Tensor,
    schedule,
    seed: int | Sequence[int] = 0,
    callback: Callback | None = None,
) -> Tensor:
    """Samples of one expert (or the base: ``bundle.reference``) for ``prompts`` (B,)."""
    prompts = check_prompts(prompts)
    _check_seed_arg(seed, prompts.shape[0])
    policy = expert_policy(expert, schedule, prompts)
    return run_policy(policy, prompts.shape[0], schedule, seed, callback)


def method_context(
    bundle: DigitsBundle,
    objectives: Sequence[str],
    expert_kind: str = "fixed",
    *,
    kl_coef: float | None = None,
) -> MethodContext:
    """The digits problem for :mod:`msdda.methods`: the experts of ``objectives`` (in order).

    Experts of variance ``expert_kind``, their standardised rewards, the base as
    reference, images (1, 8, 8) decoded to [0, 1]; ``kl_coef`` is the target beta.
    """
    return MethodContext(
        schedule=bundle.schedule,
        reference=bundle.reference,
        experts=tuple(bundle.expert(name, expert_kind) for name in objectives),
        sample_shape=IMAGE_SHAPE,
        rewards=tuple(bundle.rewards[name] for name in objectives),
        decode=decode,
        kl_coef=kl_coef,
    )


def _check_kl_coef(kl_coef: float | None) -> float | None:
    return None if kl_coef is None else check_positive(kl_coef, "kl_coef")


def fused_policy(
    bundle: DigitsBundle,
    prompts: Tensor,
    weights: Mapping[str, float],
    *,
    kl_coef: float | None = None,
    expert_kind: str = "fixed",
) -> StepPolicy:
    """MSDDA over the experts named in ``weights`` (e.g. ``{"legibility": 0.3, "boldness": 0.7}``).

    ``kl_coef`` is the target beta (default: the experts' common beta). When lambda_0 =
    1 - sum_i w_i beta_i / beta is not 0 the base is the reference of the product. The
    weights need not sum to 1, so this is the registry's msdda builder itself
    (:func:`msdda.methods.build_policy` asks for weights on the simplex).
    """
    check_expert_kind(expert_kind, "expert_kind")
    weights = check_reward_weights(weights)
    prompts = check_prompts(prompts)
    ctx = method_context(bundle, tuple(weights), expert_kind, kl_coef=_check_kl_coef(kl_coef))
    return registry_msdda_policy(ctx, tuple(weights.values()), prompts)


def sample_msdda(
    bundle: DigitsBundle,
    prompts: Tensor,
    weights: Mapping[str, float],
    *,
    seed: int | Sequence[int] = 0,
    kl_coef: float | None = None,
    expert_kind: str = "fixed",
    callback: Callback | None = None,
) -> Tensor:
    """MSDDA samples for ``prompts`` (B,) as images in [0, 1], (B, 1, 8, 8)."""
    _check_seed_arg(seed, check_prompts(prompts).shape[0])
    _check_callback(callback)
    policy = fused_policy(bundle, prompts, weights, kl_coef=kl_coef, expert_kind=expert_kind)
    return run_policy(policy, check_prompts(prompts).shape[0], bundle.schedule, seed, callback)


def generate(
    prompt: int,
    weights: Mapping[str, float],
    num_samples: int = 64,
    seed: int = 0,
    kl_coef: float | None = None,
    expert_kind: str = "fixed",
    *,
    bundle: DigitsBundle | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """``num_samples`` images of digit ``prompt`` under preference ``weights``: (N, 1, 8, 8) in [0, 1].

    Same arguments, same images. ``bundle`` defaults to the shipped weights.
    """
    num_samples = check_int(num_samples, "num_samples", low=1, high=MAX_SAMPLES)
    prompts = check_prompts(prompt, "prompt").expand(num_samples).clone()
    _check_seed_arg(seed, num_samples)
    _check_kl_coef(kl_coef)
    check_expert_kind(expert_kind, "expert_kind")
    check_reward_weights(weights)
    _check_callback(callback)
    if bundle is not None and not isinstance(bundle, DigitsBundle):
        raise TypeError(f"bundle must be a DigitsBundle, got {type(bundle).__name__}")
    bundle = bundle if bundle is not None else load_digits_bundle()
    return sample_msdda(
        bundle,
        prompts,
        weights,
        seed=seed,
        kl_coef=kl_coef,
        expert_kind=expert_kind,
        callback=callback,
    )


#: Old names, kept as aliases: ``check_weights`` is
#: :func:`msdda.digits.rewards.check_reward_weights` (not :func:`msdda.methods.check_weights`),
#: ``msdda_policy`` is :func:`fused_policy` (not :func:`msdda.methods.msdda_policy`).
check_weights = check_reward_weights
msdda_policy = fused_policy
