"""Which model family a diffusers pipeline folder holds: sd, sdxl, sd3 or flux.

Read from the folder's ``model_index.json`` (its ``_class_name``, the diffusers pipeline
class), so ``msdda generate --base`` picks the MSDDA pipeline that fits, and a pipeline
refuses a base of another family before loading any weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import reading

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "FAMILY_PIPELINES",
    "family_of_class",
    "pipeline_folder",
    "detect_family",
    "noise_keyword",
]

#: The families msdda runs, and the diffusers pipeline class names of each.
FAMILY_PIPELINES: dict[str, tuple[str, ...]] = {
    "sd": ("StableDiffusionPipeline",),
    "sdxl": ("StableDiffusionXLPipeline",),
    "sd3": ("StableDiffusion3Pipeline",),
    "flux": ("FluxPipeline",),
}
FAMILIES = tuple(FAMILY_PIPELINES)
#: The flow-matching families (velocity models on FlowMatchEulerDiscreteScheduler sigmas).
FLOW_FAMILIES = ("sd3", "flux")


def family_of_class(class_name: str) -> str | None:
    """The family of diffusers pipeline class ``class_name`` (None if msdda runs none)."""
    for family, names in FAMILY_PIPELINES.items():
        if class_name in names:
            return family
    return None


def pipeline_folder(base: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of pipeline ``base``: a folder, or a hub id in the local HF cache."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder
    from .loading import resolve_hub_id

    return resolve_hub_id(os.fspath(base), cache_dir=cache_dir)


def detect_family(base: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The family (one of :data:`FAMILIES`) of pipeline folder or cached hub id ``base``.

    Raises:
        ValueError: ``base`` has no model_index.json, or holds a pipeline of no known family.
    """
    folder = pipeline_folder(base, cache_dir=cache_dir)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"base {os.fspath(base)!r}: {folder} has no model_index.json (not a diffusers pipeline)"
        )
    with reading(index, "the pipeline's model_index.json"):
        name = json.loads(index.read_text()).get("_class_name", "")
    family = family_of_class(name)
    if family is None:
        known = ", ".join(n for names in FAMILY_PIPELINES.values() for n in names)
        raise ValueError(
            f"base {os.fspath(base)!r} is a {name or 'unnamed'} pipeline; msdda runs {known}"
        )
    return family


def noise_keyword(family: str) -> str:
    """The call keyword of the sampler's noise: DDIM's ``eta``, or a flow sampler's ``noise_level``."""
    return "noise_level" if family in FLOW_FAMILIES else "eta"
