"""Stable Diffusion as a sweep domain: everything a sweep needs, built from plain options.

:func:`sd_sweep` loads the base pipeline, its experts and oracles (paths or hub ids of the
local cache, full UNets or LoRAs, as ``msdda generate`` takes them) and the reward models
by name (:func:`msdda.sd.rewards.load_reward`), and returns an :class:`SDSweep`: the
problem every method runs on (:func:`msdda.sd.domain.sd_method_context`), the objectives
and held-out judges as ``(images, cond)`` rewards, the prompts and how they become the
denoisers' condition, and how final images are rendered and saved. Its options are plain
data (strings, numbers, lists, tables), those of ``msdda sweep --config`` (checked there,
key by key, before anything loads; see :mod:`msdda.evaluation.config`), so a worker can
rebuild the same domain from the results header alone.

Final images are quantised to 8 bits before they are scored: the scores are those of
the PNG files written beside the results, so ``msdda rescore`` reads what was scored.

Prompts: a text file holds one prompt per line (blank lines and lines starting with
``#`` skipped); a JSON-lines file (``.jsonl``) one JSON string, or one object with a
``"prompt"`` string, per line. :func:`shipped_prompts` is the project's own set of 64
prompts in 8 categories (``src/msdda/sd/prompts/smoke.txt``), the default.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import InputFileError, reading
from ..methods import MethodContext

__all__ = [
    "DTYPES",
    "PROMPT_SUFFIXES",
    "SDSweep",
    "check_prompt",
    "parse_prompts",
    "read_prompts",
    "shipped_prompts",
    "resolve_device",
    "resolve_dtype",
    "quantise",
    "to_picture",
    "read_picture",
    "oracle_name",
    "sweep_family",
    "pipeline_class",
    "sd_sweep",
]

#: dtype names a config may give (``auto``: float16 on CUDA, float32 on a CPU).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: What a prompts file may end with: one prompt per line, or JSON lines.
PROMPT_SUFFIXES = (".txt", ".jsonl")
#: The most characters a prompt may have (the text encoders truncate long prompts anyway).
MAX_PROMPT = 2000


def check_prompt(prompt: Any) -> str:
    """A prompt: a non-empty string of at most :data:`MAX_PROMPT` characters."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"a prompt must be a non-empty string, got {prompt!r}")
    if len(prompt) > MAX_PROMPT:
        raise ValueError(f"a prompt has {len(prompt)} characters; at most {MAX_PROMPT}")
    return prompt


def _json_prompt(line: str) -> str:
    obj = json.loads(line)
    if isinstance(obj, dict):
        obj = obj.get("prompt")
    if not isinstance(obj, str):
        raise ValueError('each line must be a JSON string or an object with a "prompt" string')
    return obj


def parse_prompts(text: str, *, json_lines: bool = False) -> tuple[str, ...]:
    """The prompts of a file's ``text`` (see the module docstring); ValueError naming the
    line (1-based) that is not a prompt, or repeats one."""
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or (not json_lines and stripped.startswith("#")):
            continue
        try:
            prompt = check_prompt(_json_prompt(stripped) if json_lines else stripped)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"line {n}: {err}") from None
        if prompt in out:
            raise ValueError(f"line {n}: repeats the prompt {prompt!r}")
        out.append(prompt)
    if not out:
        raise ValueError("holds no prompt")
    return tuple(out)


def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """The prompts of a ``.txt`` or ``.jsonl`` file; :class:`InputFileError` naming it."""
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise InputFileError(path, f"a prompts file must end in {' or '.join(PROMPT_SUFFIXES)}")
    with reading(path, "prompts file"):
        text = path.read_bytes().decode("utf-8")
    try:
        return parse_prompts(text, json_lines=path.suffix == ".jsonl")
    except ValueError as err:
        raise InputFileError(path, str(err)) from None


def shipped_prompts(name: str = "smoke") -> tuple[str, ...]:
    """The prompt set ``name`` shipped with msdda (``smoke``: 64 prompts, 8 categories)."""
    if name != "smoke":
        raise ValueError(f"unknown prompt set {name!r}; shipped: smoke")
    text = resources.files("msdda.sd").joinpath("prompts", f"{name}.txt").read_text("utf-8")
    return parse_prompts(text)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A name of :data:`DTYPES`, or ``auto``: float16 on CUDA, float32 on a CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def quantise(images: Tensor) -> Tensor:
    """Images in [0, 1] rounded to the 256 levels of an 8-bit PNG (float32)."""
    return (images.detach().float().clamp(0, 1) * 255).round() / 255


def to_picture(image: Tensor):
    """One image (3, H, W) in [0, 1] as an RGB PIL image (8 bits per channel)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    array = (quantise(image) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def read_picture(path: str | os.PathLike) -> Tensor:
    """A PNG written by :func:`to_picture` as (3, H, W) float32 in [0, 1]; InputFileError
    naming the file when it is missing or not an image."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    with reading(path, "PNG image"), Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def oracle_name(index: int) -> str:
    """The expert name under which the oracle ``index`` of the options is loaded."""
    return f"oracle-{index}"


class SDSweep(NamedTuple):
    """What :class:`msdda.evaluation.domains.SweepDomain` needs, for Stable Diffusion."""

    context: MethodContext  # every method's problem (rewards, decode, oracles included)
    objectives: tuple[str, ...]  # reward names, in expert (weight) order
    eval_rewards: Mapping[str, Callable]  # (images, cond) -> (B,); objectives, then judges
    judges: tuple[str, ...]
    prompts: tuple[str, ...]  # the default prompts (the shipped set)
    condition: Callable[[Sequence[str]], Any]  # per-sample prompts -> SDConditioning
    render: Callable[[Tensor], Tensor]  # latents -> final images (quantised), scored
    identity: dict[str, Any]  # device, dtype, libraries, default prompts' digest
    pipe: Any  # the loaded pipeline


def sweep_family(options: Mapping[str, Any]) -> str:
    """The model family of the options' base (read from its model_index.json); a
    ``family`` the options give must agree."""
    from .families import detect_family

    found = detect_family(options["base"], cache_dir=options.get("cache_dir"))
    given = options.get("family")
    if given is not None and given != found:
        raise ValueError(f"family is {given!r}, but the base is a {found} pipeline")
    return found


def pipeline_class(family: str) -> type:
    """The MSDDA pipeline class that runs ``family`` (one of msdda.sd.families.FAMILIES)."""
    from .flow_pipeline import MSDDAFluxPipeline, MSDDAStableDiffusion3Pipeline
    from .pipeline import MSDDAStableDiffusionPipeline, MSDDAStableDiffusionXLPipeline

    classes = {
        "sd": MSDDAStableDiffusionPipeline,
        "sdxl": MSDDAStableDiffusionXLPipeline,
        "sd3": MSDDAStableDiffusion3Pipeline,
        "flux": MSDDAFluxPipeline,
    }
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(classes)}, got {family!r}")
    return classes[family]


def _load_pipeline(options: Mapping[str, Any], device: torch.device, dtype: torch.dtype):
    from .loading import diffusers_dtype

    base, cache_dir = options["base"], options.get("cache_dir")
    experts = {e["name"]: e["path"] for e in options["experts"]}
    experts.update({oracle_name(i): o["path"] for i, o in enumerate(options.get("oracles", ()))})
    cls = pipeline_class(sweep_family(options))
    pipe = cls.from_pretrained(
        base,
        experts=experts,
        lora_mode=options.get("lora_mode", "auto"),
        cache_dir=cache_dir,
        **diffusers_dtype(dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_rewards(tables: Mapping[str, Mapping], device, cache_dir) -> dict[str, Callable]:
    """Reward models by column name: ``{name: {"model": ..., "path": ...}}``."""
    from .rewards import load_reward

    return {
        name: load_reward(t["model"], t.get("path"), device=device, cache_dir=cache_dir)
        for name, t in tables.items()
    }


def _per_expert(options: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    values = {e["name"]: e[key] for e in options["experts"] if e.get(key) is not None}
    return values or None


def _decode_options(table: Mapping[str, Any]):
    """:class:`msdda.sd.vae.DecodeOptions` of a config's ``[sd.decode]`` (dtype by name)."""
    from .vae import DecodeOptions

    table = dict(table)
    if "dtype" in table:
        table["dtype"] = resolve_dtype(table["dtype"], torch.device("cpu"))
    return DecodeOptions(**table)


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def sd_sweep(**options: Any) -> SDSweep:
    """Load the Stable Diffusion sweep domain described by ``options`` (see the module
    docstring and ``examples/sd15-paper.toml``: ``base``, ``family``, ``experts`` (a list of
    ``{"name", "path", "reward"}`` tables, optional ``kl_coef``, ``eta``, ``guidance``;
    flow models: ``noise_level``, ``step_rule``), ``rewards`` and ``judges``
    (``{name: {"model", "path"}}``), ``oracles`` (a list of ``{"weights", "path"}``),
    ``steps``, ``guidance``, ``eta`` (flow models: ``noise_level``, ``step_rule``),
    ``height``, ``width``, ``dtype``, ``device``, ``lora_mode``, ``kl_coef``,
    ``guidance_rescale``, ``decode``, ``cache_dir``).

    SD3 and FLUX bases (see ``examples/tiny-flow.toml``) run on their flow pipelines
    (:mod:`msdda.sd.flow_pipeline`): every model's step is its stochastic flow sampler's,
    ``noise_level`` playing DDIM's ``eta``."""
    from .domain import prompt_reward, sd_method_context
    from .families import FLOW_FAMILIES, SWEEP_DEFAULTS

    for key in ("base", "experts", "rewards"):
        if not options.get(key):
            raise ValueError(f"the Stable Diffusion sweep needs {key!r}")
    device = resolve_device(options.get("device", "auto"))
    dtype = resolve_dtype(options.get("dtype", "auto"), device)
    pipe = _load_pipeline(options, device, dtype)
    flow = pipe._family in FLOW_FAMILIES
    noise = "noise_level" if flow else "eta"
    defaults = SWEEP_DEFAULTS[pipe._family]
    rewards = _load_rewards(options["rewards"], device, options.get("cache_dir"))
    judges = _load_rewards(options.get("judges") or {}, device, options.get("cache_dir"))
    objectives = tuple(e["reward"] for e in options["experts"])
    oracles = {
        tuple(float(w) for w in o["weights"]): oracle_name(i)
        for i, o in enumerate(options.get("oracles", ()))
    }
    problem = sd_method_context(
        pipe,
        rewards=tuple(rewards[n] for n in objectives),
        oracles=oracles,
        experts=[e["name"] for e in options["experts"]],
        num_inference_steps=options.get("steps", defaults["steps"]),
        guidance_scale=options.get("guidance", defaults["guidance"]),
        eta=options.get(noise, defaults[noise]),
        height=options.get("height"),
        width=options.get("width"),
        kl_coefs=_per_expert(options, "kl_coef"),
        kl_coef=options.get("kl_coef"),
        expert_etas=_per_expert(options, noise),
        expert_guidance_scales=_per_expert(options, "guidance"),
        guidance_rescale=options.get("guidance_rescale", 0.0),
        decode=_decode_options(options.get("decode") or {}),
        step_rule=options.get("step_rule"),
        expert_step_rules=_per_expert(options, "step_rule"),
    )
    scorers = {n: prompt_reward(rewards[n]) for n in objectives}
    scorers.update({n: prompt_reward(r) for n, r in judges.items()})
    prompts = shipped_prompts()
    import diffusers

    identity = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "diffusers": diffusers.__version__,
        "shipped_prompts_sha256": _digest(prompts),
    }
    return SDSweep(
        context=problem.context,
        objectives=objectives,
        eval_rewards=scorers,
        judges=tuple(judges),
        prompts=prompts,
        condition=problem.condition,
        render=lambda x0: quantise(problem.images(x0)),
        identity=identity,
        pipe=pipe,
    )
