"""Find and load Stable Diffusion experts: full UNets and LoRA adapters, offline.

An expert is given as a path or a Hugging Face hub id:

- a full model: a pipeline folder with a ``unet`` subfolder, or a bare UNet folder
  (``config.json`` + ``diffusion_pytorch_model.safetensors``);
- a LoRA adapter: a ``.safetensors`` file (diffusers or kohya format), a folder holding
  ``pytorch_lora_weights.safetensors`` (or one ``.safetensors`` file), or a peft folder
  (``adapter_config.json`` + ``adapter_model.safetensors``);
- a hub id (``org/name``) is looked up in the local HF cache only (``local_files_only``).

Weights are read from safetensors only (never pickle).

Every file is checked before any model is built (:func:`check_pipeline_folder`,
:func:`check_expert_files`): JSON configs, safetensors headers (``safetensors.safe_open``),
the classes configs name, and tensor shapes against the base UNet's (and text encoders');
a bad file is one :class:`msdda.errors.InputFileError` naming it. Errors the libraries
raise later, while loading, are re-raised the same way (:func:`msdda.errors.reading`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InputFileError, reading
from ..lora import LoRAFactors, extract_lora_factors

__all__ = [
    "diffusers_dtype",
    "transformers_dtype",
    "ARCHITECTURE_KEYS",
    "NOISE_TABLE_KEYS",
    "ExpertSource",
    "BaseView",
    "PreparedExpert",
    "read_json",
    "read_header_shapes",
    "check_pipeline_folder",
    "check_expert_files",
    "check_lora_fits",
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

#: The networks experts share, by model class (a full-model expert holds one of them).
BACKBONE_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")

#: FlowMatchEulerDiscreteScheduler entries that define the sigmas: flow experts must share them.
FLOW_SIGMA_KEYS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "time_shift_type",
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
    raise InputFileError(
        folder, f"expert {name!r}: missing weight file {_UNET_WEIGHTS}.safetensors{hint}"
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
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            hint = f"; found only pickle weights {pickles}, which are not loaded" if pickles else ""
            raise InputFileError(
                folder,
                f"expert {name!r}: a peft folder with adapter_config.json but no "
                f"adapter_model.safetensors (missing weight file{hint})",
            )
        return ExpertSource(name, "lora", folder, given, lora_format="peft")
    for sub in ("unet", "transformer"):  # a pipeline folder: SD's UNet, a flow transformer
        if (folder / sub / "config.json").is_file():
            return _unet_source(name, folder / sub, given)
    config = folder / "config.json"
    if config.is_file():
        _check_unet_class(name, config, read_json(config, "UNet config"))
        return _unet_source(name, folder, given)
    lora = folder / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return ExpertSource(name, "lora", lora, given, lora_format="diffusers")
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return ExpertSource(name, "lora", candidates[0], given, lora_format="diffusers")
    found = ", ".join(p.name for p in candidates) or "no .safetensors file"
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles and not candidates:
        found += (
            f" (only pickle files {pickles}, which are not loaded; convert them to safetensors)"
        )
    raise InputFileError(
        folder,
        f"expert {name!r}: holds neither a UNet (unet/config.json or config.json) nor one LoRA "
        f"weight file (pytorch_lora_weights.safetensors, adapter_config.json); found {found}",
    )


def _check_unet_class(
    name: str, path: Path, config: Mapping[str, Any], expected: str | None = None
) -> None:
    """The config names a network experts can share (``expected``: the base's class)."""
    cls = config.get("_class_name", "")
    wanted = (expected,) if expected is not None else BACKBONE_CLASSES
    if cls not in wanted:
        raise InputFileError(
            path,
            f"expert {name!r}: holds a {cls or 'non-diffusers'} model, not a {' or '.join(wanted)}"
            + (" (a model of another family than the base's)" if cls in BACKBONE_CLASSES else ""),
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
            raise InputFileError(
                path,
                f"expert {name!r}: a pickle checkpoint, which is not loaded; convert it to "
                ".safetensors",
            )
        raise InputFileError(
            path,
            f"expert {name!r}: not a .safetensors LoRA file, a UNet folder or a pipeline folder",
        )
    if path.is_dir():
        return _classify_folder(name, path, given)
    if _looks_like_hub_id(given):
        try:
            folder = resolve_hub_id(given, cache_dir=cache_dir)
        except ValueError as err:
            raise ValueError(f"expert {name!r}: {err}") from err.__cause__
        return _classify_folder(name, folder, given)
    raise InputFileError(given, f"expert {name!r}: does not exist (missing weight file or folder)")


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    v = config.get(key)
    return list(v) if isinstance(v, tuple) else v


def check_unet_architecture(
    name: str, expert_config: Mapping[str, Any], base_config: Mapping[str, Any]
) -> None:
    """ValueError naming the first architecture entries where the expert's UNet differs
    (a flow transformer's: every entry of its config)."""
    keys = ARCHITECTURE_KEYS
    if "down_block_types" not in base_config:  # a transformer: its whole config is its shape
        keys = tuple(k for k in base_config if not k.startswith("_"))
    diffs = [
        f"{k}: {_config_value(expert_config, k)!r} (expert) vs {_config_value(base_config, k)!r} (base)"
        for k in keys
        if _config_value(expert_config, k) != _config_value(base_config, k)
    ]
    if diffs:
        raise ValueError(
            f"expert {name!r}: its network's architecture differs from the base's: "
            + "; ".join(diffs)
        )


def check_noise_tables(
    name: str, expert_config: Mapping[str, Any], base_config: Mapping[str, Any]
) -> None:
    """ValueError if the expert was trained with other noise tables than the base's scheduler
    (a flow scheduler's: other sigmas, :data:`FLOW_SIGMA_KEYS`)."""
    diffs = []
    for k in FLOW_SIGMA_KEYS if "shift" in base_config else NOISE_TABLE_KEYS:
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


# --------------------------------------------------------------------------- files, checked first

#: Tensor name -> shape, as a safetensors header or a state dict gives them.
Shapes = dict[str, tuple[int, ...]]

#: The models of a pipeline whose shapes LoRA experts are checked against.
_ADAPTED = ("unet", "text_encoder", "text_encoder_2")


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a config), or InputFileError naming the file."""
    with reading(path, what):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InputFileError(path, f"not a {what}: the JSON holds a {type(data).__name__}")
    return data


def read_header_shapes(path: str | os.PathLike, what: str) -> Shapes:
    """Tensor name -> shape from the safetensors header of ``path``; no tensor is read.

    ``safe_open`` checks the header and that the file holds all the bytes it announces,
    so a garbage, truncated or pickle file is refused here, naming it.
    """
    from safetensors import safe_open

    with reading(path, what), safe_open(os.fspath(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _variant_of(file_name: str) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` (or a shard of it), None for ``model.safetensors``."""
    parts = file_name.split(".")
    return parts[1].split("-")[0] if len(parts) == 3 else None


def _weight_shapes(folder: Path, what: str, variant: str | None) -> Shapes:
    """Shapes of a model folder's safetensors weights (of ``variant``, or any if none has
    it), every file's header checked; InputFileError for a folder with pickles only."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise InputFileError(
                folder,
                f"the {what} has only pickle weights ({', '.join(pickles)}), which are never "
                "loaded; convert them to .safetensors",
            )
        raise InputFileError(folder, f"the {what} has no weight file (.safetensors)")
    headers = {p: read_header_shapes(p, f"safetensors weights of the {what}") for p in files}
    shapes: Shapes = {}
    for p in [p for p in files if _variant_of(p.name) == variant] or files:
        shapes.update(headers[p])
    return shapes


def _shape_misfits(found: Shapes, expected: Shapes, found_as: str, expected_as: str) -> str | None:
    """What is wrong with weights of shapes ``found`` where ``expected`` are wanted, or None:
    tensors of another shape, or no tensor in common."""
    common = found.keys() & expected.keys()
    if found and expected and not common:
        return f"none of its {len(found)} tensors is one of {expected_as}"
    diffs = sorted(k for k in common if found[k] != expected[k])
    if not diffs:
        return None
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    k = diffs[0]
    return f"{k} is {list(found[k])} in {found_as} but {list(expected[k])} in {expected_as}{more}"


def _skeleton_shapes(library: str, class_name: str, config: dict, path: Path) -> Shapes | None:
    """State-dict shapes of ``class_name`` built from ``config`` on the meta device (no
    memory, no weights); None for a class of another library. A config the class
    refuses is an InputFileError naming ``path``."""
    import importlib

    if library not in ("diffusers", "transformers"):
        return None
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None
    try:
        with reading(path, f"{class_name} config"), torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(config)
            else:
                model = cls(cls.config_class.from_dict(config))
    except TypeError as err:
        raise InputFileError(path, f"not a {class_name} config: {err}") from err
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_component(spec: Any) -> bool:
    return isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, str) for x in spec)


def _check_component(
    folder: Path, name: str, spec: list[str], variant: str | None
) -> tuple[dict[str, Any], Shapes | None]:
    """(config, weight shapes or None) of pipeline component ``name`` in ``folder``: its
    JSON files parsed, its config's class and its weights' shapes checked."""
    library, class_name = spec
    jsons = {p.name: read_json(p, f"{name} {p.name}") for p in sorted(folder.glob("*.json"))}
    config_path = folder / "config.json"
    if "config.json" not in jsons:  # a scheduler, tokenizer or feature extractor
        return jsons.get("scheduler_config.json", {}), None
    config = jsons["config.json"]
    named = config.get("_class_name")
    if library == "diffusers" and isinstance(named, str) and named != class_name:
        raise InputFileError(
            config_path, f"names a {named}, but model_index.json says the {name} is a {class_name}"
        )
    found = _weight_shapes(folder, name, variant)
    expected = _skeleton_shapes(library, class_name, config, config_path)
    problem = expected and _shape_misfits(found, expected, "the weights", "its config.json")
    if problem:
        raise InputFileError(folder, f"the {name} weights do not fit its config.json: {problem}")
    return config, found


@dataclass(frozen=True)
class BaseView:
    """What experts are checked against: the base UNet's config, the scheduler's, and the
    tensor shapes of the base's UNet and text encoders (by attribute name)."""

    unet_config: Mapping[str, Any]  # the backbone's config (a flow model's transformer's)
    scheduler_config: Mapping[str, Any]
    shapes: Mapping[str, Shapes]
    backbone: str = "unet"  # the pipeline attribute of the network experts share
    backbone_class: str = "UNet2DConditionModel"

    @classmethod
    def of_pipeline(cls, pipe) -> BaseView:
        """The view of a pipeline already built."""
        backbone = pipe.msdda_backbone
        models = {a: getattr(pipe, a, None) for a in (*_ADAPTED, pipe._backbone_name)}
        shapes = {
            a: {k: tuple(v.shape) for k, v in m.state_dict().items()}
            for a, m in models.items()
            if m is not None
        }
        return cls(
            dict(backbone.config),
            dict(pipe.scheduler.config),
            shapes,
            pipe._backbone_name,
            type(backbone).__name__,
        )


def check_pipeline_folder(
    folder: str | os.PathLike,
    *,
    variant: str | None = None,
    given: Mapping[str, Any] | None = None,
    backbone: str = "unet",
) -> BaseView:
    """Check a diffusers pipeline folder's files before anything is built.

    ``model_index.json`` and every component's JSON files must parse; a model's config
    must name the class the index gives, its safetensors headers must read and their
    shapes fit its config (through a weightless meta-device skeleton). Components in
    ``given`` (passed to ``from_pretrained`` as objects) are taken from there;
    ``backbone`` names the network experts adapt (the UNet, or a flow transformer). Raises InputFileError naming the file.
    """
    folder, given = Path(folder), given or {}
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputFileError(folder, "no model_index.json: not a diffusers pipeline folder")
    index = read_json(index_path, "pipeline index")
    configs: dict[str, Any] = {}
    shapes: dict[str, Shapes] = {}
    for name, spec in index.items():
        if name.startswith("_") or not _is_component(spec) or name in given:
            continue
        if not (folder / name).is_dir():
            raise InputFileError(folder / name, f"missing: model_index.json lists the {name}")
        configs[name], found = _check_component(folder / name, name, spec, variant)
        if found is not None and name in (*_ADAPTED, backbone):
            shapes[name] = found
    for name in {backbone, *_ADAPTED, "scheduler"}:
        model = given.get(name)
        if model is not None:
            configs[name] = dict(model.config)
            if name != "scheduler":
                shapes[name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if backbone not in configs or "scheduler" not in configs:
        raise InputFileError(index_path, f"the pipeline has no {backbone} or no scheduler")
    backbone_class = (
        type(given[backbone]).__name__ if given.get(backbone) is not None else index[backbone][1]
    )
    return BaseView(configs[backbone], configs["scheduler"], shapes, backbone, backbone_class)


@dataclass(frozen=True)
class PreparedExpert:
    """An expert whose files were checked: where they are, the prediction type of its
    steps, and for a LoRA its state already read (state, network alphas, metadata, prefix)."""

    source: ExpertSource
    prediction_type: str
    lora: tuple | None = None


def check_expert_files(source: ExpertSource, base: BaseView, pipeline_cls) -> PreparedExpert:
    """Check an expert's files against the base before any model is built (InputFileError)."""
    if source.kind == "unet":
        return _check_unet_expert(source, base)
    state = _read_lora_state(source, pipeline_cls, base.unet_config)
    check_lora_fits(source, state[0], state[3], base)
    return PreparedExpert(source, base.scheduler_config.get("prediction_type", "epsilon"), state)


def _check_unet_expert(source: ExpertSource, base: BaseView) -> PreparedExpert:
    """Config, class and architecture, the scheduler's noise tables, the weights' shapes."""
    config_path = source.path / "config.json"
    config = read_json(config_path, "UNet config")
    _check_unet_class(source.name, config_path, config, base.backbone_class)
    try:
        check_unet_architecture(source.name, config, base.unet_config)
    except ValueError as err:
        raise InputFileError(config_path, str(err)) from None
    prediction_type = base.scheduler_config.get("prediction_type", "epsilon")
    if source.scheduler_config is not None:
        sched = read_json(source.scheduler_config, "scheduler config")
        try:
            check_noise_tables(source.name, sched, base.scheduler_config)
        except ValueError as err:
            raise InputFileError(source.scheduler_config, str(err)) from None
        prediction_type = sched.get("prediction_type", prediction_type)
    found = _weight_shapes(source.path, f"UNet of expert {source.name!r}", source.variant)
    problem = base.shapes.get(base.backbone) and _shape_misfits(
        found, base.shapes[base.backbone], "the expert", f"the base {base.backbone}"
    )
    if problem:
        raise InputFileError(
            source.path, f"expert {source.name!r}: its weights do not fit the base UNet: {problem}"
        )
    return PreparedExpert(source, prediction_type)


def load_expert_unet(prepared: PreparedExpert, base_unet) -> Any:
    """Load a checked full-UNet expert like the base (dtype, device)."""
    source = prepared.source
    with reading(source.path, f"UNet of expert {source.name!r}"):
        unet = type(base_unet).from_pretrained(  # the base's class: a UNet or a transformer
            source.path,
            **diffusers_dtype(base_unet.dtype),
            use_safetensors=True,
            local_files_only=True,
            variant=source.variant,
        )
    unet.to(base_unet.device)
    unet.eval().requires_grad_(False)
    return unet


# --------------------------------------------------------------------------- LoRA


def _read_lora_state(source: ExpertSource, pipeline_cls, unet_config: Mapping[str, Any]):
    """(state dict, network alphas, metadata, prefix) of a LoRA source, as diffusers reads
    it, after its safetensors header (and peft config) checked."""
    what = f"LoRA weights of expert {source.name!r}"
    if source.lora_format == "peft":
        from safetensors.torch import load_file

        metadata = read_json(source.path / "adapter_config.json", "peft adapter config")
        weights = source.path / "adapter_model.safetensors"
        read_header_shapes(weights, what)
        with reading(weights, what):
            state = load_file(weights)
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        return state, None, metadata, None
    from diffusers.configuration_utils import FrozenDict

    read_header_shapes(source.path, what)
    kwargs: dict[str, Any] = {"use_safetensors": True, "return_lora_metadata": True}
    if "unet_config" in _lora_state_dict_params(pipeline_cls):
        kwargs["unet_config"] = FrozenDict(unet_config)
    with reading(source.path, what):
        read = pipeline_cls.lora_state_dict(
            str(source.path.parent), weight_name=source.path.name, local_files_only=True, **kwargs
        )
    # (state, network alphas, metadata); transformer pipelines (SD3) return no alphas
    state, alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    if not state or not all("lora" in k for k in state):
        raise InputFileError(
            source.path,
            f"expert {source.name!r}: not a LoRA checkpoint (its keys do not name lora layers)",
        )
    return state, alphas, metadata, _lora_prefix(pipeline_cls)


def _lora_prefix(pipeline_cls) -> str:
    """The key prefix of the network in a pipeline's LoRA files: ``unet``, or ``transformer``."""
    return getattr(pipeline_cls, "unet_name", None) or getattr(
        pipeline_cls, "transformer_name", "unet"
    )


def _lora_state_dict_params(pipeline_cls) -> set[str]:
    import inspect

    return set(inspect.signature(pipeline_cls.lora_state_dict).parameters)


def _peft_parts(
    state: Mapping[str, torch.Tensor], prefix: str | None, backbone: str = "unet"
) -> dict[str, dict]:
    """A LoRA state split by the model it adapts (``unet``, ``text_encoder``, ...), keys
    converted to peft's ``<layer>.lora_A.weight`` form as diffusers converts them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if prefix is None:  # a peft folder: the backbone's layers
        return {backbone: dict(state)}
    parts: dict[str, dict] = {}
    for k, v in state.items():
        model, _, rest = k.partition(".")
        parts.setdefault(model, {})[rest] = v
    out = {}
    for model, sub in parts.items():
        if all(".lora_A." not in k and ".lora_B." not in k for k in sub):
            if model == "unet":
                sub = convert_unet_state_dict_to_peft(sub)
            else:
                sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
        out[model] = sub
    return out


def _layer_misfits(sub: Mapping[str, torch.Tensor], base: Shapes, model: str) -> list[str]:
    """What keeps each LoRA layer of ``sub`` (peft keys) off the base layers of ``base``:
    a layer it lacks, a factor missing, ranks or sizes that disagree."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for k, v in sub.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in k and k.endswith(".weight"):
                layers.setdefault(k.split(f".{part}.")[0], {})[part] = tuple(v.shape)
    problems = []
    for layer, f in sorted(layers.items()):
        weight = base.get(f"{layer}.weight")
        if weight is None:
            problems.append(f"layer {layer} is not in the base {model}")
        elif len(f) < 2:
            problems.append(f"layer {layer} has {next(iter(f))} but not its other factor")
        elif len(f["lora_A"]) < 2 or len(f["lora_B"]) < 2 or f["lora_A"][0] != f["lora_B"][1]:
            problems.append(
                f"layer {layer}: lora_A {list(f['lora_A'])} and lora_B {list(f['lora_B'])} "
                "disagree on the rank"
            )
        elif len(weight) < 2 or (f["lora_B"][0], f["lora_A"][1]) != weight[:2]:
            problems.append(
                f"layer {layer}: factors {list(f['lora_B'])} x {list(f['lora_A'])} do not fit "
                f"its weight {list(weight)}"
            )
    return problems


def check_lora_fits(
    source: ExpertSource, state: Mapping[str, torch.Tensor], prefix: str | None, base: BaseView
) -> None:
    """InputFileError unless every layer of the LoRA ``state`` is a layer of the base's UNet
    (or of a text encoder the base has) with factors of matching shapes and rank."""
    with reading(source.path, f"LoRA weights of expert {source.name!r}"):
        parts = _peft_parts(state, prefix, base.backbone)
    problems = []
    for model, sub in parts.items():
        if model in base.shapes:
            problems += _layer_misfits(sub, base.shapes[model], model.replace("_", " "))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputFileError(
            source.path,
            f"expert {source.name!r}: the LoRA does not fit the base (is it for another "
            f"architecture?): {problems[0]}{more}",
        )


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
    prepared: PreparedExpert, unet, pipeline_cls, *, text_encoders: Mapping[str, Any] | None = None
) -> tuple[dict[str, LoRAFactors], dict[str, dict[str, LoRAFactors]]]:
    """Read a checked LoRA expert's factors for the UNet (and its text encoders) through
    diffusers/peft.

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
    source = prepared.source
    state, alphas, metadata, prefix = prepared.lora
    tmp = f"msdda_{source.name}"
    te_factors: dict[str, dict[str, LoRAFactors]] = {}
    te_keys = text_encoder_keys(state) if prefix is not None else []
    if te_keys and text_encoders is not None:
        te_factors = _load_text_encoder_factors(
            source, state, alphas, metadata, pipeline_cls, text_encoders, tmp
        )
    expected = _count_lora_modules(state, prefix)
    try:
        with reading(source.path, f"LoRA of expert {source.name!r} for the base UNet"):
            unet.load_lora_adapter(
                state,
                prefix=prefix,
                network_alphas=alphas if prefix is not None else None,
                metadata=metadata if not alphas else None,
                adapter_name=tmp,
            )
            factors = extract_lora_factors(unet, tmp)
    finally:
        _remove_peft(unet, recurse_remove_peft_layers)
    if not factors and not te_factors:
        raise InputFileError(
            source.path,
            f"expert {source.name!r}: the LoRA matches no layer of the base UNet (is it for "
            "another architecture?)",
        )
    if expected and len(factors) < expected:
        raise InputFileError(
            source.path,
            f"expert {source.name!r}: only {len(factors)} of the LoRA's {expected} layers exist "
            "in the base UNet (is it for another architecture?)",
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
            with reading(source.path, f"LoRA of expert {source.name!r} for the {attr}"):
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
