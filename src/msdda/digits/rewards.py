"""Rewards of the digits domain, in tension with one another.

Every reward maps ``(images (B, 1, 8, 8) in [0, 1], prompts (B,) long) -> (B,)`` and
is differentiable in the images:

- ``legibility``: log-probability of the prompted digit under the digit classifier,
  with logits divided by a temperature so that it is not saturated on base samples;
- ``boldness``: mean pixel intensity (ink coverage), 0 for a blank image, 1 for a full one;
- ``symmetry``: left-right mirror similarity, ``-mean((image - mirror)^2)``, 0 (its
  maximum) for a mirror-symmetric image.

Raw rewards live in :data:`REWARDS` (a registry of factories by name); the
standardised versions ``(r - mean) / std``, with mean and std measured on base
samples and recorded in the weights' manifest, put them on comparable scales.
Preference weights over them are ``{reward name: w}`` (:func:`check_reward_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..rewards import Reward
from ..validation import check_number, check_positive
from .data import IMAGE_SHAPE, check_prompts

__all__ = [
    "REWARDS",
    "REWARD_NAMES",
    "RewardNormalisation",
    "Legibility",
    "StandardisedReward",
    "boldness",
    "symmetry",
    "make_reward",
    "make_rewards",
    "check_reward_weights",
    "standardise",
    "fit_normalisation",
]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or tuple(images.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 1, 8, 8) tensor in [0, 1], got {shape}")


def boldness(images: Tensor, prompts: Tensor | None = None) -> Tensor:
    """Ink coverage: the mean pixel intensity of each image, in [0, 1]. (B,)"""
    _check_images(images)
    return images.mean(dim=(1, 2, 3))


def symmetry(images: Tensor, prompts: Tensor | None = None) -> Tensor:
    """Left-right mirror similarity: -mean((image - flip_lr(image))^2), in [-1, 0]. (B,)"""
    _check_images(images)
    return -((images - images.flip(-1)) ** 2).mean(dim=(1, 2, 3))


class Legibility:
    """log softmax(classifier(images) / temperature)[prompt]: (B,), at most 0."""

    def __init__(self, classifier: nn.Module, temperature: float) -> None:
        if not isinstance(classifier, nn.Module):
            raise TypeError(
                f"classifier must be a torch.nn.Module, got {type(classifier).__name__}"
            )
        self.temperature = check_positive(temperature, "temperature")
        self.classifier = classifier.eval()

    def __call__(self, images: Tensor, prompts: Tensor) -> Tensor:
        _check_images(images)
        prompts = check_prompts(prompts).to(images.device)
        if prompts.shape[0] != images.shape[0]:
            raise ValueError(f"prompts has {prompts.shape[0]} entries for {images.shape[0]} images")
        logp = torch.log_softmax(self.classifier(images) / self.temperature, dim=1)
        return logp.gather(1, prompts[:, None]).squeeze(1)


def _legibility(*, classifier: nn.Module | None = None, temperature: float = 1.0, **_) -> Reward:
    if classifier is None:
        raise ValueError("the legibility reward needs a classifier")
    return Legibility(classifier, temperature)


#: Raw rewards by name: factories called with keyword arguments ``classifier`` and
#: ``temperature`` (used by the rewards that need them).
REWARDS: dict[str, Callable[..., Reward]] = {
    "legibility": _legibility,
    "boldness": lambda **_: boldness,
    "symmetry": lambda **_: symmetry,
}
REWARD_NAMES = tuple(REWARDS)


def make_reward(name: str, **kwargs) -> Reward:
    """The raw reward called ``name`` (see :data:`REWARDS`)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
    return REWARDS[name](**kwargs)


def make_rewards(classifier: nn.Module, temperature: float) -> dict[str, Reward]:
    """Every raw reward of :data:`REWARDS`, by name."""
    return {
        name: make_reward(name, classifier=classifier, temperature=temperature) for name in REWARDS
    }


def check_reward_weights(
    weights: Mapping[str, float], available: Sequence[str] = REWARD_NAMES
) -> dict[str, float]:
    """Preference weights ``{reward name: w}``: names in ``available``, each w >= 0 and finite.

    Returns them as a new ``{name: float}`` dict, in their order. They need not sum to 1
    (MSDDA puts lambda_0 = 1 - sum_i w_i beta_i / beta on the base).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping of reward name to weight")
    out = {}
    for name, w in weights.items():
        if name not in available:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available)}")
        try:
            out[name] = check_number(w, f"weight of {name!r}", low=0.0)
        except (TypeError, ValueError) as err:  # a TypeError for a bool or a string
            raise type(err)(
                f"weight of {name!r} must be a non-negative finite number, got {w!r}"
            ) from None
    return out


@dataclass(frozen=True)
class RewardNormalisation:
    """Affine standardisation of a reward: (r - mean) / std, measured on base samples."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", check_number(self.mean, "RewardNormalisation.mean"))
        object.__setattr__(self, "std", check_positive(self.std, "RewardNormalisation.std"))


class StandardisedReward:
    """``(reward(images, prompts) - mean) / std``: a reward on the common scale."""

    def __init__(self, reward: Reward, normalisation: RewardNormalisation, name: str = "") -> None:
        self.reward = reward
        self.normalisation = normalisation
        self.name = name

    def __call__(self, images: Tensor, prompts: Tensor) -> Tensor:
        r = self.reward(images, prompts)
        return (r - self.normalisation.mean) / self.normalisation.std


def standardise(
    rewards: Mapping[str, Reward], stats: Mapping[str, RewardNormalisation]
) -> dict[str, StandardisedReward]:
    """Standardised versions of ``rewards``; every reward needs its statistics."""
    missing = [name for name in rewards if name not in stats]
    if missing:
        raise ValueError(f"no normalisation recorded for reward(s) {missing}")
    return {name: StandardisedReward(r, stats[name], name) for name, r in rewards.items()}


@torch.no_grad()
def fit_normalisation(
    rewards: Mapping[str, Reward], images: Tensor, prompts: Tensor
) -> dict[str, RewardNormalisation]:
    """Mean and standard deviation of each reward on ``images`` (base samples in [0, 1])."""
    out = {}
    for name, reward in rewards.items():
        r = reward(images, prompts).double()
        out[name] = RewardNormalisation(float(r.mean()), float(r.std()))
    return out
