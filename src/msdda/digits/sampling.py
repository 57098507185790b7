"""Sampling in the digits domain: the base, one expert, or MSDDA over the experts.

Every method runs through msdda's one loop (:func:`msdda.sample_chain`) with
:class:`msdda.SeededNoise`, so equal seeds give equal noise across methods and
preference weights. Samples come back as images in [0, 1], (N, 1, 8, 8).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..experts import Expert, expert_policy, msdda_step
from ..sampling import SeededNoise, StepPolicy, sample_chain
from .bundle import DigitsBundle, load_digits_bundle
from .data import IMAGE_SHAPE, check_prompts, decode
from .rewards import REWARDS
from .store import check_expert_kind

__all__ = [
    "torch_threads",
    "run_policy",
    "sample_expert",
    "msdda_policy",
    "sample_msdda",
    "generate",
    "check_weights",
]

Callback = Callable[[int, int, Tensor], None]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore.

    The digits models are small: one thread is as fast as several and does not slow
    down badly when the cores are shared.
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
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
    noise = SeededNoise(seed)
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
    policy = expert_policy(expert, schedule, prompts)
    return run_policy(policy, prompts.shape[0], schedule, seed, callback)


def check_weights(
    weights: Mapping[str, float], available: Sequence[str] = REWARDS
) -> dict[str, float]:
    """Validate preference weights: names in ``available``, non-negative finite numbers.

    Returns them as a new ``{name: float}`` dict, in their order.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping of reward name to weight")
    out = {}
    for name, w in weights.items():
        if name not in available:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {name!r} must be a non-negative finite number, got {w!r}")
        out[name] = float(w)
    return out


def msdda_policy(
    bundle: DigitsBundle,
    prompts: Tensor,
    weights: Mapping[str, float],
    *,
    kl_coef: float | None = None,
    expert_kind: str = "fixed",
) -> StepPolicy:
    """MSDDA over the experts named in ``weights`` (e.g. ``{"legibility": 0.3, "boldness": 0.7}``).

    ``kl_coef`` is the target beta (default: the experts' common beta). When lambda_0 =
    1 - sum_i w_i beta_i / beta is not 0 the base is the reference of the product.
    """
    check_expert_kind(expert_kind, "expert_kind")
    weights = check_weights(weights)
    prompts = check_prompts(prompts)
    experts = [bundle.expert(name, expert_kind) for name in weights]
    if kl_coef is not None and (
        isinstance(kl_coef, bool)
        or not isinstance(kl_coef, (int, float))
        or not (math.isfinite(kl_coef) and kl_coef > 0)
    ):
        raise ValueError(f"kl_coef must be a positive finite number, got {kl_coef!r}")
    return msdda_step(
        [expert_policy(e, bundle.schedule, prompts) for e in experts],
        list(weights.values()),
        kl_coefs=[e.kl_coef for e in experts],
        kl_coef=kl_coef,
        reference=expert_policy(bundle.reference, bundle.schedule, prompts),
    )


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
    policy = msdda_policy(bundle, prompts, weights, kl_coef=kl_coef, expert_kind=expert_kind)
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
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    prompts = check_prompts(prompt, "prompt").expand(num_samples).clone()
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
