"""What ``msdda generate --base PATH --expert NAME=PATH --weight NAME=W ...`` runs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputFileError, check_output_path, writing
from ..io import atomic_path
from ..validation import MAX_SEED, check_int, check_number, check_positive, check_seed

__all__ = ["IMAGE_SUFFIXES", "generate_sd", "load_pipeline", "is_sdxl", "image_grid"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

#: The largest count (samples, steps) accepted: what fits a signed 64-bit integer, the
#: bound of ``msdda.cli.common.MAX_COUNT`` and of seeds.
MAX_COUNT = MAX_SEED


def is_sdxl(base: str, *, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether pipeline folder or cached hub id ``base`` is an SDXL pipeline (model_index.json)."""
    from .loading import read_json, resolve_hub_id

    folder = Path(base).expanduser()
    if not folder.is_dir():
        folder = resolve_hub_id(base, cache_dir=cache_dir)
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputFileError(folder, "no model_index.json: not a diffusers pipeline folder")
    return "XL" in str(read_json(index, "pipeline index").get("_class_name", ""))


def image_grid(images: list, columns: int | None = None):
    """Tile PIL images of one size into a near-square grid."""
    from PIL import Image

    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _check_args(
    base, experts, weights, prompt, out, num_samples, seed, steps, guidance_scale, eta, kl_coef
) -> Path:
    """What the pipeline does not check itself (the weights' values it does, once)."""
    if not isinstance(base, (str, os.PathLike)) or not os.fspath(base):
        raise ValueError(f"base must be a pipeline folder or hub id, got {base!r}")
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError("experts must be a non-empty mapping {name: path or hub id}")
    for name, src in experts.items():
        if not isinstance(name, str) or not name or not isinstance(src, (str, os.PathLike)):
            raise ValueError(f"experts must map names to paths or hub ids, got {name!r}: {src!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping {expert name: weight}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    out = check_output_path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out must be an image file ending in one of {IMAGE_SUFFIXES}, got {out}")
    check_int(num_samples, "num_samples", low=1, high=MAX_COUNT)
    check_int(steps, "steps", low=1, high=MAX_COUNT)
    check_seed(seed)
    check_number(guidance_scale, "guidance_scale")
    check_number(eta, "eta", low=0.0)
    if kl_coef is not None:
        check_positive(kl_coef, "kl_coef")
    return out


def load_pipeline(base: str | os.PathLike, experts: Mapping[str, str | os.PathLike]):
    """The MSDDA pipeline of ``base`` (SD, SDXL, SD3 or FLUX, from its model_index.json) with
    ``experts`` ({name: path or hub id}), on CUDA in float16 (flow models: bfloat16) when
    available, else on CPU in float32."""
    from .families import FLOW_FAMILIES, detect_family
    from .flow_pipeline import MSDDAFluxPipeline, MSDDAStableDiffusion3Pipeline
    from .loading import diffusers_dtype
    from .pipeline import MSDDAStableDiffusionPipeline, MSDDAStableDiffusionXLPipeline

    cuda = torch.cuda.is_available()
    family = detect_family(os.fspath(base))  # sd, sdxl, sd3 or flux, from model_index.json
    classes = {
        "sd": MSDDAStableDiffusionPipeline,
        "sdxl": MSDDAStableDiffusionXLPipeline,
        "sd3": MSDDAStableDiffusion3Pipeline,
        "flux": MSDDAFluxPipeline,
    }
    half = torch.bfloat16 if family in FLOW_FAMILIES else torch.float16
    pipe = classes[family].from_pretrained(
        os.fspath(base),
        experts={k: os.fspath(v) for k, v in experts.items()},
        **diffusers_dtype(half if cuda else torch.float32),
    )
    if cuda:
        pipe.to("cuda")
    return pipe


def generate_sd(
    *,
    base: str,
    experts: dict[str, str],
    weights: dict[str, float],
    prompt: str,
    out: Path,
    num_samples: int = 1,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 1.0,
    kl_coef: float | None = None,
) -> Path:
    """Generate ``num_samples`` images of ``prompt`` with MSDDA and write them to ``out``.

    Args:
        base: the base pipeline (SD 1.x/2.x or SDXL): a local folder or a hub id in the
            local HF cache.
        experts: ``{name: path or hub id}``: full UNets or LoRA adapters of the base.
        weights: ``{name: w >= 0}``; experts left out get weight 0.
        out: an image file (.png, .jpg, .webp); several samples are tiled into a grid.
        seed: an integer in [0, 2**63 - 1] (the range of :func:`msdda.validation.check_seed`,
            as in every domain); seeds the CPU generator the noise is drawn from.
        steps, guidance_scale, eta: DDIM steps, classifier-free guidance, DDIM eta (> 0).
        kl_coef: target KL coefficient beta (default: the experts', i.e. lambda_i = w_i).

    Runs on CUDA in float16 when available, else on CPU in float32; the fusion is in
    float32. The file is written to a temporary name and renamed, never half-written.

    Returns:
        ``out``.
    """
    out = _check_args(
        base, experts, weights, prompt, out, num_samples, seed, steps, guidance_scale, eta, kl_coef
    )
    from .families import noise_keyword

    pipe = load_pipeline(base, experts)
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(
        prompt,
        dict(weights),
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        **{noise_keyword(pipe._family): float(eta)},  # DDIM eta, or a flow's noise level
        kl_coef=kl_coef,
        num_images_per_prompt=num_samples,
        generator=generator,
        output_type="pil",
    ).images
    picture = images[0] if len(images) == 1 else image_grid(images)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            picture.save(tmp)
    return out
