"""What every image reward shares: its input contract, tensor preprocessing, weight files.

A reward is a module ``(images, prompts) -> (B,) float32``. Its :class:`ImageContract`
says what it takes and checks it: images a floating tensor (B, 3, H, W) with values in
[0, 1] (what the SD pipelines and the VAE decoder give), any H and W, resized on the
tensor to the model's side (bicubic, antialiased) and normalised with the model's
mean/std, so that the score is differentiable in the images (the ``rgg`` method
backpropagates it through the VAE decoder). Weight files are read here, through
:func:`msdda.errors.reading`, safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputFileError, reading

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageContract",
    "ClipEmbedder",
    "KeyMap",
    "score_mlp",
    "mlp_from_state",
    "load_weights",
    "resolve_model_dir",
    "cached_file",
]

#: OpenAI CLIP's normalisation (also BLIP's and OpenCLIP's ``OPENAI_DATASET_MEAN/STD``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Out-of-range slack allowed on the images (float rounding of a clamped decoder output).
RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class ImageContract:
    """A reward's input contract, and the tensor preprocessing that fulfils it.

    Images: floating (B, 3, H, W) in [0, 1], any H and W. ``resize="crop"``: shorter side
    to ``size`` then a centred ``crop`` x ``crop`` (CLIP's, BLIP's); ``resize="pad"``:
    longer side to ``size`` then padded with black to a square, image centred (OpenCLIP's
    ``ResizeMaxSize``, HPSv2's). Resizing is bicubic with antialias; then
    ``(x - mean) / std`` per channel. ``prompts``: whether the reward reads prompts.
    """

    size: int = 224  # the side the model's input is resized to
    crop: int = 224  # the side of the square the model sees
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean, images in [0, 1]
    std: tuple[float, float, float] = CLIP_STD  # per-channel std
    resize: Literal["crop", "pad"] = "crop"
    prompts: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> ImageContract:
        """Read ``preprocessor_config.json`` (a CLIPImageProcessor's) if the folder has one."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return cls(**kwargs)
        with reading(path, "image processor config"):
            cfg = json.loads(path.read_text())
        size = cfg.get("size", 224)
        size = (
            size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
        )
        crop = cfg.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        mean = tuple(cfg.get("image_mean", CLIP_MEAN))
        std = tuple(cfg.get("image_std", CLIP_STD))
        return cls(int(size), int(crop), mean, std, **kwargs)

    def describe(self) -> str:
        """The contract in one line, for errors and reports."""
        how = "shorter side, centre crop" if self.resize == "crop" else "longer side, black pad"
        return (
            f"images (B, 3, H, W) floating in [0, 1], resized to {self.crop} px ({how}, "
            f"bicubic antialiased), normalised with mean {self.mean} std {self.std}"
            + (", one prompt per image (or one for all)" if self.prompts else ", prompts unused")
        )

    def check(self, images: Any, prompts: Any) -> list[str] | None:
        """Refuse images or prompts outside the contract; the prompts as a list of B."""
        if not isinstance(images, Tensor):
            raise TypeError(
                f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}"
            )
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(
                f"images must have shape (B, 3, H, W), B > 0, got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
        lo, hi = self.value_range
        with torch.no_grad():
            inside = ((images >= lo - RANGE_SLACK) & (images <= hi + RANGE_SLACK)).all()
        if not bool(inside):
            raise ValueError(
                f"images must have values in [{lo:g}, {hi:g}] (finite), got min "
                f"{images.detach().min().item():.4g} max {images.detach().max().item():.4g}: "
                "pass (x / 2 + 0.5).clamp(0, 1) of a VAE decoder's output"
            )
        if not self.prompts and prompts is None:
            return None
        if isinstance(prompts, str):
            return [prompts] * images.shape[0]
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a sequence of strings")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        return list(prompts)

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, crop, crop) model input of images in [0, 1] (differentiable)."""
        if self.resize == "crop":
            images = _resize_crop(images, self.size, self.crop)
        else:
            images = _resize_pad(images, self.size)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


def _bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def _resize_crop(images: Tensor, size: int, crop: int) -> Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), then the centred crop x crop."""
    h, w = images.shape[-2:]
    s = size / min(h, w)
    images = _bicubic(images, (max(crop, round(h * s)), max(crop, round(w * s))))
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top : top + crop, left : left + crop]


def _resize_pad(images: Tensor, size: int) -> Tensor:
    """Longer side to ``size`` (bicubic, antialiased), then zero padding to size x size."""
    h, w = images.shape[-2:]
    s = size / max(h, w)
    nh, nw = round(h * s), round(w * s)
    images = _bicubic(images, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def pooled(out: Any) -> Tensor:
    """The projected embedding from ``get_*_features`` (a tensor, or an output's pooler_output)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipEmbedder(nn.Module):
    """A transformers CLIPModel with its tokenizer and contract: unit-norm embeddings."""

    def __init__(self, model, tokenizer, contract: ImageContract) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.contract = contract

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, D) unit-norm float32 image embeddings of images in [0, 1]."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.contract(images.to(self.device, torch.float32)).to(dtype)
        out = self.model.get_image_features(pixel_values=pixels)
        return F.normalize(pooled(out).float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> Tensor:
        """(B, D) unit-norm float32 text embeddings (padded to the tokenizer's max length)."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.get_text_features(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask
        )
        return F.normalize(pooled(out).float(), dim=-1)


_SLOTS = {"i": r"\d+", "p": r"weight|bias", "s": r".+"}


def _key_pattern(template: str) -> re.Pattern:
    pieces = re.split(r"\{([ips])\}", template)
    body = "".join(
        f"(?P<{piece}>{_SLOTS[piece]})" if n % 2 else re.escape(piece)
        for n, piece in enumerate(pieces)
    )
    return re.compile(body + "$")


class KeyMap:
    """Renames between a checkpoint's parameter names and a module's, both ways.

    ``rules``: (checkpoint name, module name) templates, the first match wins; slots
    ``{i}`` (a layer index), ``{p}`` (``weight`` or ``bias``) and ``{s}`` (any rest) carry
    over. A rule whose module name is None drops the checkpoint tensors it matches (ones
    the model does not use).
    """

    def __init__(self, rules: Sequence[tuple[str, str | None]]) -> None:
        self.rules = list(rules)
        self._forward = [(_key_pattern(a), b) for a, b in self.rules]
        self._backward = [(_key_pattern(b), a) for a, b in self.rules if b is not None]

    @staticmethod
    def _apply(table, key: str) -> tuple[bool, str | None]:
        for pattern, target in table:
            m = pattern.match(key)
            if m:
                return True, None if target is None else target.format(**m.groupdict())
        return False, None

    def forward(self, key: str) -> str | None:
        """The module name of checkpoint name ``key`` (None if dropped or unknown)."""
        return self._apply(self._forward, key)[1]

    def dropped(self, key: str) -> bool:
        """Whether checkpoint name ``key`` matches a rule that drops it."""
        found, target = self._apply(self._forward, key)
        return found and target is None

    def backward(self, key: str) -> str:
        """The checkpoint name of module name ``key``."""
        found, target = self._apply(self._backward, key)
        if not found:
            raise KeyError(f"no checkpoint name for {key!r}")
        return target


def score_mlp(dims: Sequence[int]) -> nn.Sequential:
    """The 5-Linear score head of the improved aesthetic predictor and of ImageReward.

    Linear layers at indices 0, 2, 4, 6, 7 (dropouts between, no activations), widths
    ``dims`` = (in, 1024, 128, 64, 16) in both originals; the output is one score.
    """
    if len(dims) != 5:
        raise ValueError(f"the score head needs 5 widths, got {list(dims)}")
    d = list(dims)
    return nn.Sequential(
        nn.Linear(d[0], d[1]),
        nn.Dropout(0.2),
        nn.Linear(d[1], d[2]),
        nn.Dropout(0.2),
        nn.Linear(d[2], d[3]),
        nn.Dropout(0.1),
        nn.Linear(d[3], d[4]),
        nn.Linear(d[4], 1),
    )


#: The parameter names of :func:`score_mlp`.
SCORE_MLP_KEYS = tuple(f"{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def mlp_from_state(
    state: Mapping[str, Tensor], path: str | os.PathLike, what: str
) -> nn.Sequential:
    """A :func:`score_mlp` holding ``state`` (keys ``0.weight`` ... ``7.bias``)."""
    missing = [k for k in SCORE_MLP_KEYS if k not in state]
    if missing:
        raise InputFileError(path, f"not a {what}: no {missing} in it")
    dims = [state["0.weight"].shape[1]] + [state[f"{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
    head = score_mlp(dims)
    with reading(path, what):
        head.load_state_dict({k: state[k] for k in SCORE_MLP_KEYS})
    return head.eval().requires_grad_(False)


def load_weights(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth``/``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only)."""
    path = Path(path)
    with reading(path, what):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise InputFileError(
                path,
                f"not readable as {what}: it is not a plain state dict (it pickles objects, "
                "or is not a torch file); give the weights as safetensors",
            ) from err
    if not isinstance(state, dict):
        raise InputFileError(path, f"not a {what}: it holds a {type(state).__name__}, not a dict")
    return state


def _looks_local(text: str) -> bool:
    """Whether ``text`` is a path rather than a hub id (``owner/name``)."""
    p = Path(text)
    weights = {".pt", ".pth", ".bin", ".safetensors", ".json"}
    return (
        p.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or p.suffix in weights
    )


def resolve_model_dir(
    what: str, path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None
) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or its HF cache snapshot."""
    text = os.fspath(path_or_id)
    p = Path(text).expanduser()
    if p.is_dir():
        return p
    if _looks_local(text):
        raise InputFileError(p, f"no such {what} file or folder")
    from .loading import resolve_hub_id

    try:
        return resolve_hub_id(text, cache_dir=cache_dir)
    except ValueError as err:
        raise InputFileError(path_or_id, f"{what} weights not found: {err}") from None


def cached_file(what: str, repo_id: str, filename: str, cache_dir) -> Path:
    """``filename`` of hub repo ``repo_id`` in the local HF cache (never downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise InputFileError(
        f"{repo_id}/{filename}",
        f"{what} weights not found in the local Hugging Face cache; download them with "
        f"`hf download {repo_id} {filename}`, or pass their local path",
    )
