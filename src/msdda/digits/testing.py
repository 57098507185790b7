"""Tiny random digits weights folders for tests (seconds to build, nothing trained).

:func:`make_tiny_weights` writes a complete folder in the shipped layout: a small
random classifier and base, made-up reward normalisation, and experts and oracles that
are seeded random LoRA adapters of the base (or, with ``storage="full"``, seeded
perturbations of it stored in full), so they differ from the base and from each other.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .catalog import add_expert, add_oracle
from .lora import LoraAdapter, LoraSettings, adapter_keys, base_fingerprint, merged_denoiser
from .models import ClassifierConfig, DenoiserConfig, DigitClassifier, DigitDenoiser
from .pipeline import write_domain_folder
from .rewards import RewardNormalisation

__all__ = [
    "TINY_DENOISER",
    "TINY_CLASSIFIER",
    "TINY_LORA",
    "make_tiny_weights",
    "perturbed",
    "random_adapter",
]

TINY_DENOISER = DenoiserConfig(hidden=16, num_blocks=1, time_dim=8)
TINY_CLASSIFIER = ClassifierConfig(hidden=8)
TINY_LORA = LoraSettings(rank=2, alpha=2.0)
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


def random_adapter(
    base: DigitDenoiser,
    kind: str,
    seed: int,
    lora: LoraSettings = TINY_LORA,
    scale: float = 0.2,
) -> LoraAdapter:
    """A LoRA adapter of ``base`` with seeded N(0, scale^2) factors (and variance head)."""
    start = base.with_variance_head() if kind == "learned" else base
    g = torch.Generator().manual_seed(seed)
    tensors = {
        key: scale * torch.randn(shape, generator=g)
        for key, shape in adapter_keys(start, lora, kind).items()
    }
    return LoraAdapter(tensors, lora, base_fingerprint(base))


def make_tiny_weights(
    folder: str | Path,
    *,
    experts: tuple[str, ...] = ("legibility", "boldness"),
    kinds: tuple[str, ...] = ("fixed", "learned"),
    kl_coef: float = 1.0,
    oracle_weights: tuple[dict[str, float], ...] = ({"legibility": 0.5, "boldness": 0.5},),
    oracle_kinds: tuple[str, ...] = ("fixed",),
    seeds: tuple[int, ...] = (0,),
    storage: str = "lora",
    seed: int = 0,
) -> Path:
    """Write a tiny random weights folder at ``folder`` (created) and return its path.

    Every expert (``experts`` x ``kinds``) and oracle (``oracle_weights`` x
    ``oracle_kinds``) exists for each training seed in ``seeds``; ``storage`` is
    ``"lora"`` (adapters, as shipped) or ``"full"``; ``seed`` seeds everything random.
    """
    if storage not in ("lora", "full"):
        raise ValueError(f"storage must be 'lora' or 'full', got {storage!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    classifier = DigitClassifier(TINY_CLASSIFIER).eval()
    base = DigitDenoiser(TINY_DENOISER).eval()
    write_domain_folder(folder, classifier, base, TINY_NORMALISATION, legibility_temperature=8.0)

    def model_and_adapter(kind: str, key: int) -> tuple[DigitDenoiser, LoraAdapter | None]:
        if storage == "lora":
            adapter = random_adapter(base, kind, key)
            return merged_denoiser(base, adapter.tensors, adapter.lora, kind), adapter
        model = perturbed(base, 0.05, key)
        if kind == "learned":
            model = model.with_variance_head()
            with torch.no_grad():  # a variance head that moves the variance a little
                model.var_out.bias.fill_(0.1 * (key % 7 + 1))
        return model, None

    for s in seeds:
        for i, name in enumerate(experts):
            for j, kind in enumerate(kinds):
                model, adapter = model_and_adapter(kind, seed + 1000 * s + 10 * i + j + 1)
                add_expert(
                    folder, model, reward=name, kind=kind, kl_coef=kl_coef, seed=s, adapter=adapter
                )
        for k, weights in enumerate(oracle_weights):
            for j, kind in enumerate(oracle_kinds):
                model, adapter = model_and_adapter(kind, seed + 1000 * s + 100 + 10 * k + j)
                add_oracle(
                    folder,
                    model,
                    weights=weights,
                    kind=kind,
                    kl_coef=kl_coef,
                    seed=s,
                    adapter=adapter,
                )
    return folder
