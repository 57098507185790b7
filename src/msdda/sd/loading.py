"""Find and load Stable Diffusion experts: full UNets and LoRA adapters, offline.

An expert is given as a path or a Hugging Face hub id:

- a full model: a pipeline folder with a ``unet`` subfolder, or a bare UNet folder
  (``config.json`` + ``diffusion_pytorch_model.safetensors``);
- a LoRA adapter: a ``.safetensors`` file (diffusers or kohya format), a folder holding
  ``pytorch_lora_weights.safetensors`` (or one ``.safetensors`` file), or a peft folder
  (``adapter_config.json`` + ``adapter_model.safetensors``);
- a hub id (``org/name``) is looked up in the local HF cache only (``local_files_only``).

Weights are read from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..lora import LoRAFactors, extract_lora_factors

__all__ = [
    "diffusers_dtype",
    "transformers_dtype",
    "ARCHITECTURE_KEYS",
    "NOISE_TABLE_KEYS",
    "ExpertSource",
    "resolve_expert_source",
    "resolve_hub_id",
    "check_unet_architecture",
    "check_noise_tables",
    "load_expert_unet",
    "load_lora_factors",
]

#: UNet config entries that must agree for two UNets to be interchangeable experts.
ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "class_embed_type",
    "time_cond_proj_dim",
    "encoder_hid_dim",
)

#: Scheduler config entries that define the noise tables (alphas_cumprod): experts must share them.
NOISE_TABLE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_UNET_WEIGHTS = "diffusion_pytorch_model"


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a dtype: ``dtype`` in new diffusers, else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a dtype: ``dtype`` from transformers 4.56 on."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": dtype}


@dataclass(frozen=True)
class ExpertSource:
    """Where an expert's files are, once resolved to the local disk."""

    name: str  # the expert's name
    kind: Literal["unet", "lora"]
    path: Path  # the UNet folder, the LoRA file, or the peft folder
    given: str  # what the caller passed (path or hub id)
    lora_format: Literal["diffusers", "peft"] | None = None  # for kind == "lora"
    scheduler_config: Path | None = None  # the expert's own scheduler_config.json, if any
    variant: str | None = None  # weight variant of a UNet folder ("fp16"), if only that exists


def resolve_hub_id(repo_id: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot folder of hub model ``repo_id`` in the HF cache (no download)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as err:  # huggingface_hub raises several kinds here
        where = f" under {cache_dir}" if cache_dir is not None else ""
        raise ValueError(
            f"{repo_id!r} is neither a local file or folder nor a model in the local Hugging Face "
            f"cache{where}; download it first with `hf download {repo_id}` (or "
            f"`huggingface-cli download {repo_id}`), or pass a local path"
        ) from err


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and "\\" not in s


def _unet_weights_variant(folder: Path, name: str) -> str | None:
    """The variant to load a UNet folder's safetensors weights with; ValueError if none."""
    files = {p.name for p in folder.iterdir() if p.is_file()}
    for variant in (None, "fp16", "bf16"):
        stem = _UNET_WEIGHTS if variant is None else f"{_UNET_WEIGHTS}.{variant}"
        if f"{stem}.safetensors" in files or f"{stem}.safetensors.index.json" in files:
            return variant
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    hint = (
        f" (found only pickle weights {pickles}, which are not loaded; convert them to safetensors)"
        if pickles
        else ""
    )
    raise ValueError(
        f"expert {name!r}: missing weight file {_UNET_WEIGHTS}.safetensors in {folder}{hint}"
    )


def _unet_source(name: str, unet: Path, given: str) -> ExpertSource:
    """A full-UNet expert in folder ``unet``, with the scheduler config of its pipeline
    folder (``unet/../scheduler/scheduler_config.json``) when there is one."""
    sched = unet.parent / "scheduler" / "scheduler_config.json"
    return ExpertSource(
        name,
        "unet",
        unet,
        given,
        scheduler_config=sched if sched.is_file() else None,
        variant=_unet_weights_variant(unet, name),
    )


def _classify_folder(name: str, folder: Path, given: str) -> ExpertSource:
    if (folder / "adapter_config.json").is_file():
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise ValueError(
                f"expert {name!r}: peft folder {folder} has adapter_config.json but no "
                "adapter_model.safetensors (missing weight file)"
            )
        return ExpertSource(name, "lora", folder, given, lora_format="peft")
    if (folder / "unet" / "config.json").is_file():
        return _unet_source(name, folder / "unet", given)
    config = folder / "config.json"
    if config.is_file():
        cls = json.loads(config.read_text()).get("_class_name", "")
        if cls != "UNet2DConditionModel":
            raise ValueError(
                f"expert {name!r}: {folder} holds a {cls or 'non-diffusers'} model, not a "
                "UNet2DConditionModel"
            )
        return _unet_source(name, folder, given)
    lora = folder / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return ExpertSource(name, "lora", lora, given, lora_format="diffusers")
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return ExpertSource(name, "lora", candidates[0], given, lora_format="diffusers")
    found = ", ".join(p.name for p in candidates) or "no .safetensors file"
    raise ValueError(
        f"expert {name!r}: {folder} holds neither a UNet (unet/config.json or config.json) nor "
        f"one LoRA weight file (pytorch_lora_weights.safetensors, adapter_config.json); found {found}"
    )


def resolve_expert_source(
    name: str, source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> ExpertSource:
    """Resolve what the user gave for expert ``name`` to local files and their kind."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"expert names must be non-empty strings, got {name!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"expert {name!r}: the source must be a path or hub id (str), got {type(source).__name__}"
        )
    given = os.fspath(source)
    path = Path(given).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            return ExpertSource(name, "lora", path, given, lora_format="diffusers")
        if path.suffix in _PICKLE_SUFFIXES:
            raise ValueError(
                f"expert {name!r}: {path} is a pickle checkpoint, which is not loaded; convert it "
                "to .safetensors"
            )
        raise ValueError(
            f"expert {name!r}: {path} is not a .safetensors LoRA file, a UNet folder or a "
            "pipeline folder"
        )
    if path.is_dir():
        return _classify_folder(name, path, given)
    if _looks_like_hub_id(given):
        try:
            folder = resolve_hub_id(given, cache_dir=cache_dir)
        except ValueError as err:
            raise ValueError(f"expert {name!r}: {err}") from err.__cause__
        return _classify_folder(name, folder, given)
    raise ValueError(f"expert {name!r}: {given!r} does not exist (missing weight file or folder)")


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    v = config.get(key)
    return list(v) if isinstance(v, tuple) else v


def check_unet_architecture(
    name: str, expert_config: Mapping[str, Any], base_config: Mapping[str, Any]
) -> None:
    """ValueError naming the first architecture entries where the expert's UNet differs."""
    diffs = [
        f"{k}: {_config_value(expert_config, k)!r} (expert) vs {_config_value(base_config, k)!r} (base)"
        for k in ARCHITECTURE_KEYS
        if _config_value(expert_config, k) != _config_value(base_config, k)
    ]
    if diffs:
        raise ValueError(
            f"expert {name!r}: its UNet architecture differs from the base's: " + "; ".join(diffs)
        )


def check_noise_tables(
    name: str, expert_config: Mapping[str, Any], base_config: Mapping[str, Any]
) -> None:
    """ValueError if the expert was trained with other noise tables than the base's scheduler."""
    diffs = []
    for k in NOISE_TABLE_KEYS:
        a, b = _config_value(expert_config, k), _config_value(base_config, k)
        if isinstance(a, float) and isinstance(b, float):
            same = abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
        else:
            same = a == b or (a in (None, False) and b in (None, False))
        if not same:
            diffs.append(f"{k}: {a!r} (expert) vs {b!r} (base)")
    if diffs:
        raise ValueError(
            f"expert {name!r}: its scheduler's noise tables differ from the base's, so its steps "
            "cannot be fused with the base's: " + "; ".join(diffs)
        )


def load_expert_unet(
    source: ExpertSource, base_unet, base_scheduler_config: Mapping[str, Any]
) -> tuple[Any, str]:
    """Load a full-UNet expert like the base (dtype, device); returns (unet, prediction_type).

    Checks its architecture against ``base_unet`` and its scheduler (when it comes with
    one) against the base's noise tables; the prediction type is the expert's own.
    """
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(source.path)
    check_unet_architecture(source.name, config, base_unet.config)
    prediction_type = base_scheduler_config.get("prediction_type", "epsilon")
    if source.scheduler_config is not None:
        sched = json.loads(source.scheduler_config.read_text())
        check_noise_tables(source.name, sched, base_scheduler_config)
        prediction_type = sched.get("prediction_type", prediction_type)
    unet = UNet2DConditionModel.from_pretrained(
        source.path,
        **diffusers_dtype(base_unet.dtype),
        use_safetensors=True,
        local_files_only=True,
        variant=source.variant,
    )
    unet.to(base_unet.device)
    unet.eval().requires_grad_(False)
    return unet, prediction_type


def _read_lora_state(source: ExpertSource, pipeline_cls, unet_config):
    """(state dict, network alphas, metadata, prefix) of a LoRA source, as diffusers reads it."""
    if source.lora_format == "peft":
        from safetensors.torch import load_file

        metadata = json.loads((source.path / "adapter_config.json").read_text())
        state = load_file(source.path / "adapter_model.safetensors")
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        return state, None, metadata, None
    kwargs: dict[str, Any] = {"use_safetensors": True, "return_lora_metadata": True}
    if "unet_config" in _lora_state_dict_params(pipeline_cls):
        kwargs["unet_config"] = unet_config
    state, alphas, metadata = pipeline_cls.lora_state_dict(
        str(source.path.parent),
        weight_name=source.path.name,
        local_files_only=True,
        **kwargs,
    )
    if not state or not all("lora" in k for k in state):
        raise ValueError(
            f"expert {source.name!r}: {source.path} is not a LoRA checkpoint (its keys do not "
            "name lora layers)"
        )
    return state, alphas, metadata, "unet"


def _lora_state_dict_params(pipeline_cls) -> set[str]:
    import inspect

    return set(inspect.signature(pipeline_cls.lora_state_dict).parameters)


def _count_lora_modules(state: Mapping[str, torch.Tensor], prefix: str | None) -> int:
    mods = set()
    for k in state:
        if prefix is not None:
            if not k.startswith(f"{prefix}."):
                continue
            k = k[len(prefix) + 1 :]
        for marker in (
            ".lora_A.",
            ".lora_B.",
            ".lora.down.",
            ".lora.up.",
            ".lora_down.",
            ".lora_up.",
        ):
            if marker in k:
                mods.add(k.split(marker)[0])
                break
    return len(mods)


def text_encoder_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.startswith(("text_encoder.", "text_encoder_2.", "lora_te"))]


def load_lora_factors(
    source: ExpertSource, unet, pipeline_cls, *, text_encoders: Mapping[str, Any] | None = None
) -> tuple[dict[str, LoRAFactors], dict[str, dict[str, LoRAFactors]]]:
    """Read a LoRA expert's factors for the UNet (and its text encoders) through diffusers/peft.

    diffusers converts the file's format and injects peft layers into ``unet``; the
    factors are read off those layers and the UNet is restored to its plain modules.

    Returns:
        ``(unet factors, {text encoder attribute: factors})``, paths relative to each model.
    """
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    if getattr(unet, "peft_config", None):
        raise ValueError(
            "the base UNet already holds peft adapters; load LoRA experts through `experts=` "
            "only, on a plain base"
        )
    state, alphas, metadata, prefix = _read_lora_state(source, pipeline_cls, unet.config)
    tmp = f"msdda_{source.name}"
    te_factors: dict[str, dict[str, LoRAFactors]] = {}
    te_keys = text_encoder_keys(state) if prefix is not None else []
    if te_keys and text_encoders is not None:
        te_factors = _load_text_encoder_factors(
            source, state, alphas, metadata, pipeline_cls, text_encoders, tmp
        )
    expected = _count_lora_modules(state, prefix)
    try:
        unet.load_lora_adapter(
            state,
            prefix=prefix,
            network_alphas=alphas if prefix is not None else None,
            metadata=metadata if not alphas else None,
            adapter_name=tmp,
        )
        factors = extract_lora_factors(unet, tmp)
    except ValueError:
        raise
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"expert {source.name!r}: the LoRA at {source.path} does not fit the base UNet "
            f"(is it for another architecture?): {err}"
        ) from err
    finally:
        _remove_peft(unet, recurse_remove_peft_layers)
    if not factors and not te_factors:
        raise ValueError(
            f"expert {source.name!r}: the LoRA at {source.path} matches no layer of the base UNet "
            "(is it for another architecture?)"
        )
    if expected and len(factors) < expected:
        raise ValueError(
            f"expert {source.name!r}: only {len(factors)} of the {expected} layers of the LoRA at "
            f"{source.path} exist in the base UNet (is it for another architecture?)"
        )
    return factors, te_factors


def _load_text_encoder_factors(
    source, state, alphas, metadata, pipeline_cls, text_encoders, tmp
) -> dict[str, dict[str, LoRAFactors]]:
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    out = {}
    for attr, te in text_encoders.items():
        if te is None or not any(k.startswith(f"{attr}.") for k in state):
            continue
        try:
            pipeline_cls.load_lora_into_text_encoder(
                state, alphas, te, prefix=attr, adapter_name=tmp, metadata=metadata
            )
            fs = extract_lora_factors(te, tmp)
        finally:
            _remove_peft(te, recurse_remove_peft_layers)
        if fs:
            out[attr] = fs
    return out


def _remove_peft(model, recurse_remove_peft_layers) -> None:
    """Restore ``model``'s plain modules and forget its peft configs."""
    recurse_remove_peft_layers(model)
    for attr in ("peft_config",):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
