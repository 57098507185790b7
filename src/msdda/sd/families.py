"""Which model family a diffusers pipeline folder holds: sd, sdxl, sd3 or flux.

Read from the folder's ``model_index.json`` (its ``_class_name``, the diffusers pipeline
class), so ``msdda generate --base`` picks the MSDDA pipeline that fits, and a pipeline
refuses a base of another family before loading any weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFileError

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "FLOW_DEFAULTS",
    "SWEEP_DEFAULTS",
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
#: Flow-GRPO's sampler for SD3.5-Medium (its ``config/grpo.py``): the SDE at noise level 0.7.
FLOW_DEFAULTS = {"step_rule": "sde", "noise_level": 0.7}
#: What a sweep samples with when its config does not say: steps and guidance of each
#: family (SD3: Flow-GRPO's 40 steps, CFG 4.5; FLUX-dev: 28 steps, distilled guidance
#: 3.5, diffusers' defaults), DDIM's eta 1 for SD/SDXL, the flow sampler for SD3/FLUX.
SWEEP_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "sd": {"steps": 50, "guidance": 7.5, "eta": 1.0},
    "sdxl": {"steps": 50, "guidance": 7.5, "eta": 1.0},
    "sd3": {"steps": 40, "guidance": 4.5, **FLOW_DEFAULTS},
    "flux": {"steps": 28, "guidance": 3.5, **FLOW_DEFAULTS},
}


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
        ValueError: ``base`` has no model_index.json, or holds a pipeline of no known family
            (:class:`~msdda.errors.InputFileError`, a ValueError, naming the file when its
            model_index.json is not a JSON object).
    """
    folder = pipeline_folder(base, cache_dir=cache_dir)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"base {os.fspath(base)!r}: {folder} has no model_index.json (not a diffusers pipeline)"
        )
    from .loading import read_json

    name = read_json(index, "pipeline index (model_index.json)").get("_class_name", "")
    if not isinstance(name, str):
        raise InputFileError(index, f"_class_name must be a string, got {name!r}")
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
