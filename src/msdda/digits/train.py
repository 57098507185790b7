"""Training the digits domain from scratch on a CPU: classifier, base denoiser, reward scales.

All seeded; each function takes a frozen config and an optional progress callback
``progress(step, total, loss)``. :func:`msdda.digits.pipeline.train_all` runs them in
order and writes the weights folder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gaussians import Schedule
from ..validation import check_int, check_number, check_positive, check_seed
from .data import NUM_CLASSES, decode, load_digit_data
from .models import (
    NULL_CLASS,
    ClassifierConfig,
    DenoiserConfig,
    DigitClassifier,
    DigitDenoiser,
)

__all__ = [
    "ClassifierTraining",
    "BaseTraining",
    "train_classifier",
    "classifier_accuracy",
    "train_base",
    "denoising_loss",
    "per_class_accuracy",
]

Progress = Callable[[int, int, float], None]

#: The largest number of optimiser steps and the largest batch a training config accepts.
MAX_STEPS = 10_000_000
MAX_BATCH = 1_000_000


@dataclass(frozen=True)
class ClassifierTraining:
    """How the digit classifier is trained (on the "train" split, images in [0, 1])."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    steps: int = 3000  # optimiser steps
    batch_size: int = 128
    lr: float = 2e-3  # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    noise_std: float = 0.08  # Gaussian pixel noise added during training (robustness)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, ClassifierConfig):
            raise TypeError(
                f"ClassifierTraining.model must be a ClassifierConfig, got {self.model!r}"
            )
        check_int(self.steps, "ClassifierTraining.steps", low=1, high=MAX_STEPS)
        check_int(self.batch_size, "ClassifierTraining.batch_size", low=1, high=MAX_BATCH)
        check_positive(self.lr, "ClassifierTraining.lr")
        check_number(self.weight_decay, "ClassifierTraining.weight_decay", low=0.0)
        check_number(self.noise_std, "ClassifierTraining.noise_std", low=0.0)
        check_seed(self.seed, "ClassifierTraining.seed")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BaseTraining:
    """How the base denoiser is trained (epsilon MSE, uniform timesteps, class dropout)."""

    model: DenoiserConfig = field(default_factory=DenoiserConfig)
    steps: int = 4000  # optimiser steps
    batch_size: int = 256
    lr: float = 2e-3  # AdamW, linear warm-up then cosine decay to 0
    warmup: int = 200
    weight_decay: float = 0.0
    class_dropout: float = 0.1  # fraction of labels replaced by the null class
    ema_decay: float = 0.999  # the shipped model is the EMA of the weights
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, DenoiserConfig):
            raise TypeError(f"BaseTraining.model must be a DenoiserConfig, got {self.model!r}")
        check_int(self.steps, "BaseTraining.steps", low=1, high=MAX_STEPS)
        check_int(self.batch_size, "BaseTraining.batch_size", low=1, high=MAX_BATCH)
        check_positive(self.lr, "BaseTraining.lr")
        check_int(self.warmup, "BaseTraining.warmup", low=0, high=MAX_STEPS)
        check_number(self.weight_decay, "BaseTraining.weight_decay", low=0.0)
        check_number(self.class_dropout, "BaseTraining.class_dropout", low=0.0, high=1.0)
        check_number(self.ema_decay, "BaseTraining.ema_decay", low=0.0, high=1.0)
        check_seed(self.seed, "BaseTraining.seed")

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _augment(images: Tensor, noise_std: float, g: torch.Generator) -> Tensor:
    """Images plus Gaussian pixel noise, clamped to [0, 1]."""
    if noise_std:
        images = images + noise_std * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` ([0, 1]) classified as ``labels``."""
    classifier.eval()
    return float((classifier(images).argmax(1) == labels).float().mean())


def train_classifier(
    cfg: ClassifierTraining = ClassifierTraining(), progress: Progress | None = None
) -> tuple[DigitClassifier, dict]:
    """Train the classifier; returns it (eval mode) and ``{"heldout_accuracy", "train_accuracy"}``."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    train, held = load_digit_data("train"), load_digit_data("heldout")
    x, y = decode(train.images), train.labels
    model = DigitClassifier(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, 0))
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)
        loss = F.cross_entropy(model(_augment(x[idx], cfg.noise_std, g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, cfg.steps, loss.item())
    model.eval()
    metrics = {
        "heldout_accuracy": classifier_accuracy(model, decode(held.images), held.labels),
        "train_accuracy": classifier_accuracy(model, x, y),
        "num_train": int(x.shape[0]),
        "num_heldout": int(held.images.shape[0]),
    }
    return model, metrics


def denoising_loss(
    model: nn.Module,
    x0: Tensor,
    labels: Tensor,
    alphas_cumprod: Tensor,
    g: torch.Generator,
    class_dropout: float = 0.0,
) -> Tensor:
    """E_t,eps ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2 (mean)."""
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = alphas_cumprod[t].float().view(b, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    if class_dropout:
        drop = torch.rand(b, generator=g) < class_dropout
        labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    return F.mse_loss(model(x_t, t, labels)[:, :1], eps)


def train_base(
    schedule: Schedule, cfg: BaseTraining = BaseTraining(), progress: Progress | None = None
) -> tuple[DigitDenoiser, dict]:
    """Train the base denoiser on the "train" split; returns its EMA (eval mode) and metrics."""
    if cfg.model.variance_head:
        raise ValueError(
            "the base denoiser has no variance head (BaseTraining.model.variance_head)"
        )
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    train, held = load_digit_data("train"), load_digit_data("heldout")
    abar = schedule.alphas_cumprod
    model = DigitDenoiser(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, cfg.warmup))
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, train.images.shape[0], (cfg.batch_size,), generator=g)
        loss = denoising_loss(
            model, train.images[idx], train.labels[idx], abar, g, cfg.class_dropout
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        if progress is not None:
            progress(step + 1, cfg.steps, loss.item())
    ema.eval()
    with torch.no_grad():
        g_eval = torch.Generator().manual_seed(12345)
        x = held.images.repeat(8, 1, 1, 1)
        heldout = float(denoising_loss(ema, x, held.labels.repeat(8), abar, g_eval))
    metrics = {
        "heldout_denoising_mse": heldout,
        "num_parameters": sum(p.numel() for p in ema.parameters()),
    }
    return ema, metrics


def per_class_accuracy(classifier: nn.Module, images: Tensor, prompts: Tensor) -> list[float]:
    """Accuracy of the prompted digit for each class 0..9."""
    with torch.no_grad():
        pred = classifier(images).argmax(1)
    return [float((pred[prompts == c] == c).float().mean()) for c in range(NUM_CLASSES)]
