"""The 8x8 handwritten digits of ``sklearn.datasets.load_digits`` (offline, 1797 images).

Model space is [-1, 1]; image space is [0, 1]. ``load_digits`` pixels are 0..16, so
``x = pixels / 8 - 1``. Images are (N, 1, 8, 8) float32, labels (N,) long in 0..9.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NUM_CLASSES",
    "IMAGE_SHAPE",
    "DigitData",
    "load_digit_data",
    "decode",
    "encode",
    "check_prompts",
]

NUM_CLASSES = 10  # the digits 0..9; the denoiser's null class is index 10
IMAGE_SHAPE = (1, 8, 8)
HELDOUT_FRACTION = 0.2


class DigitData(NamedTuple):
    """Digits in model space: ``images`` (N, 1, 8, 8) in [-1, 1], ``labels`` (N,) long."""

    images: Tensor
    labels: Tensor


def load_digit_data(split: str = "train", *, seed: int = 0) -> DigitData:
    """The digits in model space, split 80/20 into ``"train"`` and ``"heldout"`` by ``seed``.

    ``split="all"`` returns every image. The split is stratified by a seeded permutation
    per class, so both parts hold every digit.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE) / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return DigitData(images, labels)
    g = torch.Generator().manual_seed(seed)
    train_idx, held_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = round(HELDOUT_FRACTION * len(idx))
        held_idx.append(idx[:n_held])
        train_idx.append(idx[n_held:])
    idx = torch.cat(train_idx if split == "train" else held_idx).sort().values
    return DigitData(images[idx], labels[idx])


def decode(x: Tensor) -> Tensor:
    """Model space [-1, 1] to images [0, 1], clamped; differentiable inside the range."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def encode(images: Tensor) -> Tensor:
    """Images [0, 1] to model space [-1, 1]."""
    return images * 2.0 - 1.0


def check_prompts(prompts, name: str = "prompts") -> Tensor:
    """Validate digit prompts: an int or a (B,) integer tensor with values in 0..9."""
    if isinstance(prompts, bool):
        raise TypeError(f"{name} must be a digit 0-9 or a tensor of digits, got a bool")
    if isinstance(prompts, numbers.Integral):
        if not 0 <= prompts < NUM_CLASSES:
            raise ValueError(f"{name} must be a digit 0-9, got {prompts}")
        return torch.tensor([int(prompts)], dtype=torch.long)
    if not isinstance(prompts, Tensor):
        raise TypeError(
            f"{name} must be a digit 0-9 or a tensor of digits, got {type(prompts).__name__}"
        )
    if prompts.dtype.is_floating_point or prompts.dtype == torch.bool or prompts.ndim != 1:
        raise TypeError(
            f"{name} must be a (B,) integer tensor, got {prompts.dtype} {tuple(prompts.shape)}"
        )
    if prompts.numel() and (int(prompts.min()) < 0 or int(prompts.max()) >= NUM_CLASSES):
        raise ValueError(
            f"{name} must hold digits 0-9, got values in [{int(prompts.min())}, {int(prompts.max())}]"
        )
    return prompts.long()
