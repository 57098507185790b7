"""Tiny random digits weights folders for tests (seconds to build, nothing trained).

:func:`make_tiny_weights` writes a complete folder in the shipped layout: a small
random classifier and base, made-up reward normalisation, and experts that are the
base with seeded perturbations (so experts differ from the base and from each other).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .models import ClassifierConfig, DenoiserConfig, DigitClassifier, DigitDenoiser
from .pipeline import write_domain_folder
from .rewards import RewardNormalisation
from .store import add_expert, add_oracle

__all__ = ["TINY_DENOISER", "TINY_CLASSIFIER", "make_tiny_weights", "perturbed"]

TINY_DENOISER = DenoiserConfig(hidden=16, num_blocks=1, time_dim=8)
TINY_CLASSIFIER = ClassifierConfig(hidden=8)
TINY_NORMALISATION = {
    "legibility": RewardNormalisation(-2.3, 0.1),
    "boldness": RewardNormalisation(0.3, 0.03),
    "symmetry": RewardNormalisation(-0.1, 0.05),
}


def perturbed(model: DigitDenoiser, scale: float, seed: int) -> DigitDenoiser:
    """A copy of ``model`` with every parameter moved by ``scale`` * N(0, 1) noise."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out.eval()


def make_tiny_weights(
    folder: str | Path,
    *,
    experts: tuple[str, ...] = ("legibility", "boldness"),
    kinds: tuple[str, ...] = ("fixed", "learned"),
    kl_coef: float = 1.0,
    oracle_weights: tuple[dict[str, float], ...] = ({"legibility": 0.5, "boldness": 0.5},),
    seed: int = 0,
) -> Path:
    """Write a tiny random weights folder at ``folder`` (created) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    classifier = DigitClassifier(TINY_CLASSIFIER).eval()
    base = DigitDenoiser(TINY_DENOISER).eval()
    write_domain_folder(folder, classifier, base, TINY_NORMALISATION, legibility_temperature=8.0)
    for i, name in enumerate(experts):
        for j, kind in enumerate(kinds):
            model = perturbed(base, 0.05, seed + 10 * i + j + 1)
            if kind == "learned":
                model = model.with_variance_head()
                with torch.no_grad():  # a variance head that moves the variance a little
                    model.var_out.bias.fill_(0.1 * (i + 1))
            add_expert(folder, model, reward=name, kind=kind, kl_coef=kl_coef)
    for k, weights in enumerate(oracle_weights):
        add_oracle(
            folder,
            perturbed(base, 0.05, seed + 100 + k),
            weights=weights,
            kind="fixed",
            kl_coef=kl_coef,
        )
    return folder
