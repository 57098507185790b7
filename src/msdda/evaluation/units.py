"""The unit of work of sweeps and tuning: one method at one weight for one seed, all prompts.

Every unit samples all prompts in one batch, from per-sample seeds that depend only on
(seed, prompt, image index): every method sees the same x_T and the same step noise.
It returns one :class:`~msdda.evaluation.results.ResultRow` per prompt. For a domain with
pictures (Stable Diffusion) and an :class:`ImageSink`, each image is also written as a PNG
(atomically, before its row exists) and the row lists the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import writing
from ..io import atomic_path
from ..methods import MethodRun, MethodSettings, derive_seed, run_method
from ..validation import check_int, check_seed
from .domains import SweepDomain
from .results import Key, ResultRow, result_key
from .variants import method_of

__all__ = [
    "SweepUnit",
    "ImageSink",
    "sample_seeds",
    "unit_keys",
    "score_images",
    "score_samples",
    "drift",
    "run_unit",
]


@dataclass(frozen=True)
class SweepUnit:
    """One batch of the sweep: a method at one weight (None: weight-free) for one seed."""

    method: str  # a sweep method name ("rgg-matched" samples with rgg)
    weights: tuple[float, ...] | None
    seed: int


@dataclass(frozen=True)
class ImageSink:
    """Where a sweep's pictures go: PNG files in the folder ``root / folder``, named in rows
    relative to ``root`` (the results file's folder). A file's name is a function of its
    row's key and the image's index alone (the prompt by its index in ``prompts``), so a
    unit sampled again after a kill writes the same files."""

    folder: str  # a folder name, beside the results file
    root: Path  # the results file's folder
    prompts: tuple[Any, ...]  # the sweep's prompts, in order

    def relative(self, unit: SweepUnit, prompt: Any, index: int) -> str:
        """The path (POSIX, relative to ``root``) of image ``index`` of a row."""
        weights = "none" if unit.weights is None else "-".join(f"{w:.9g}" for w in unit.weights)
        p = [repr(q) for q in self.prompts].index(repr(prompt))
        name = f"{unit.method}/w{weights}/p{p:04d}-s{unit.seed}-{index}.png"
        return f"{self.folder}/{name}"

    def save(self, picture, unit: SweepUnit, prompt: Any, index: int) -> str:
        """Write ``picture`` (a PIL image) atomically; returns its relative path."""
        rel = self.relative(unit, prompt, index)
        path = self.root / rel
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                picture.save(tmp, format="PNG")
        return rel


def sample_seeds(seed: int, prompt: Any, images: int) -> list[int]:
    """Per-sample seeds of a (seed, prompt) row: a function of (seed, prompt, index) alone."""
    seed = check_seed(seed)
    images = check_int(images, "images", low=1)
    return [derive_seed("sample", seed, repr(prompt), j) for j in range(images)]


def unit_keys(unit: SweepUnit, prompts: Sequence[Any]) -> set[Key]:
    """The row keys a unit writes, one per prompt."""
    return {result_key(unit.method, unit.weights, p, unit.seed) for p in prompts}


@torch.no_grad()
def score_images(domain: SweepDomain, images: torch.Tensor, cond: Any) -> dict[str, torch.Tensor]:
    """Every reported reward of decoded images (B, ...): name -> (B,) float64 on the CPU."""
    return {n: r(images, cond).detach().double().cpu() for n, r in domain.eval_rewards.items()}


@torch.no_grad()
def score_samples(domain: SweepDomain, x0: torch.Tensor, cond: Any) -> dict[str, torch.Tensor]:
    """Every reported reward of final samples x0 (B, ...) in model space: name -> (B,) float64."""
    return score_images(domain, domain.final_images(x0), cond)


def drift(images: torch.Tensor, base_images: torch.Tensor) -> torch.Tensor:
    """(B,) RMS difference per image from the base's image of the same noise (image units)."""
    return (images - base_images).double().pow(2).flatten(1).mean(1).sqrt().cpu()


def _row(
    unit: SweepUnit,
    prompt: Any,
    rewards: Mapping[str, torch.Tensor],
    run: MethodRun,
    companion: Mapping[str, float],
    files: tuple[str, ...] | None = None,
) -> ResultRow:
    """The row of one prompt from its slice of the rewards, (n,) each."""
    n = len(next(iter(rewards.values())))
    return ResultRow(
        method=unit.method,
        weights=unit.weights,
        prompt=prompt,
        seed=unit.seed,
        images=n,
        rewards={k: float(v.mean()) for k, v in rewards.items()},
        rewards_std={k: float(v.std()) if n > 1 else 0.0 for k, v in rewards.items()},
        per_image={k: tuple(round(float(x), 7) for x in v) for k, v in rewards.items()},
        seconds_per_image=run.seconds_per_image,
        nfe_per_image=run.nfe_per_image,
        reward_evals_per_image=run.reward_rows / run.images,
        peak_memory_bytes=getattr(run, "peak_memory_bytes", None),
        peak_memory_kind=getattr(run, "peak_memory_kind", None) or None,
        image_files=files,
        **companion,
    )


def _companion(run: MethodRun, base: MethodRun, drifts: torch.Tensor, sl: slice) -> dict:
    """Mean drift from the base, path KL to it and the base's time, over the images ``sl``."""
    return {
        "drift_from_base": float(drifts[sl].mean()),
        "kl_from_base": float(run.kl[sl].mean()),
        "base_seconds_per_image": base.seconds_per_image,
    }


def _pictures(
    domain: SweepDomain,
    images: torch.Tensor,
    unit: SweepUnit,
    prompts: Sequence[Any],
    per_prompt: int,
    sink: ImageSink | None,
) -> list[tuple[str, ...] | None]:
    """Each prompt's image files, written now (None per prompt without a sink or pictures)."""
    if sink is None or domain.picture is None:
        return [None] * len(prompts)
    out = []
    for p, prompt in enumerate(prompts):
        files = []
        for j in range(per_prompt):
            files.append(sink.save(domain.picture(images[p * per_prompt + j]), unit, prompt, j))
        out.append(tuple(files))
    return out


def run_unit(
    unit: SweepUnit,
    domain: SweepDomain,
    prompts: Sequence[Any],
    images_per_prompt: int,
    settings: MethodSettings,
    *,
    companion: bool = False,
    images: ImageSink | None = None,
) -> list[ResultRow]:
    """Sample one unit (all prompts in one batch) and return its rows, one per prompt.

    With ``companion``, the base is sampled on the same batch just before the method: the
    rows then record the mean drift of the images from the base images of the same
    noise, their mean path KL to the base (nats, see :func:`msdda.methods.run_method`)
    and the base's time per image measured under the same machine load. With ``images``
    (and a domain with pictures) every image is written as a PNG before the rows are
    returned, and each row lists its files.
    """
    images_per_prompt = check_int(images_per_prompt, "images_per_prompt", low=1)
    per_sample_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [s for p in prompts for s in sample_seeds(unit.seed, p, images_per_prompt)]
    cond = domain.condition(per_sample_prompts)
    method = method_of(unit.method)
    base = None
    if companion and method != "base":
        base = run_method("base", domain.context, None, cond, seeds, settings=settings)
    run = run_method(
        method, domain.context, unit.weights, cond, seeds, settings=settings, measure_kl=companion
    )
    decoded = domain.final_images(run.samples)
    rewards = score_images(domain, decoded, cond)
    if companion:
        base_images = decoded if base is None else domain.final_images(base.samples)
        drifts = drift(decoded, base_images)
        if base is None:
            base = run
    files = _pictures(domain, decoded, unit, prompts, images_per_prompt, images)
    rows = []
    for p, prompt in enumerate(prompts):
        sl = slice(p * images_per_prompt, (p + 1) * images_per_prompt)
        extra = {} if base is None else _companion(run, base, drifts, sl)
        rows.append(
            _row(unit, prompt, {k: v[sl] for k, v in rewards.items()}, run, extra, files[p])
        )
    return rows
