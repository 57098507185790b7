"""Image rewards for Stable Diffusion experts: ``(images, prompts) -> (B,)`` scores.

Every reward takes images (B, 3, H, W) with values in [0, 1] (what the pipelines give
with ``output_type="pt"``) and B prompts (or one, for all), and returns (B,) float32
scores, differentiable in the images where the model allows (CLIP-based ones do).

- :class:`LaionAesthetic`: LAION aesthetic predictor v2 (CLIP ViT-L/14 image embedding,
  L2-normalised, through the ``sac+logos+ava1-l14-linearMSE`` MLP head); about 1-10.
- :class:`PickScore`: ``logit_scale * cos(image, text)`` of the PickScore CLIP model.
- :class:`CLIPScore`: ``100 * cos(image, text)`` of a CLIP model (not clamped at 0).
- :class:`ImageRewardScore`, :class:`HPSv2Score`: optional extras, through their own
  packages (``image-reward``, ``hpsv2``), imported only when used.

Weights load from a local folder/file or the local HF cache (never downloaded); when
they are absent the error says what to download and where.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipPreprocess",
    "LaionAesthetic",
    "PickScore",
    "CLIPScore",
    "ImageRewardScore",
    "HPSv2Score",
    "REWARDS",
    "load_reward",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CLIP_L14 = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_AESTHETIC_HEAD = (
    "camenduru/improved-aesthetic-predictor",
    "sac+logos+ava1-l14-linearMSE.pth",
)


def _resolve_model_dir(
    what: str, path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None
) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or its HF cache snapshot."""
    p = Path(os.fspath(path_or_id)).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(os.fspath(path_or_id), local_files_only=True, cache_dir=cache_dir)
        )
    except Exception as err:
        raise ValueError(
            f"{what}: weights not found: {os.fspath(path_or_id)!r} is not a local folder and not in "
            f"the local Hugging Face cache{'' if cache_dir is None else f' at {cache_dir}'}. Download "
            f"them with `hf download {os.fspath(path_or_id)}` (into ~/.cache/huggingface/hub, or "
            "set HF_HOME), or pass a local folder"
        ) from err


def _check_images(images: Tensor, prompts: Any, *, need_prompts: bool) -> list[str] | None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    if not need_prompts and prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts] * images.shape[0]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a sequence of strings")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    return list(prompts)


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing on tensors (differentiable).

    Resize the shorter side to ``size`` (bicubic, antialiased), center-crop
    ``crop`` x ``crop``, normalise with ``mean``/``std``; images in [0, 1].
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path) -> ClipPreprocess:
        """Read ``preprocessor_config.json`` (CLIPImageProcessor) if the folder has one."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        size = cfg.get("size", 224)
        size = (
            size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
        )
        crop = cfg.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        return cls(
            int(size),
            int(crop),
            tuple(cfg.get("image_mean", CLIP_MEAN)),
            tuple(cfg.get("image_std", CLIP_STD)),
        )

    def __call__(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if min(h, w) != self.size:
            s = self.size / min(h, w)
            images = F.interpolate(
                images,
                size=(max(self.crop, round(h * s)), max(self.crop, round(w * s))),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        h, w = images.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        images = images[..., top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


def _pooled(out: Any) -> Tensor:
    """The projected embedding from ``get_*_features`` (a tensor, or an output's pooler_output)."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


def _load_clip(folder: Path, what: str, device, dtype):
    from transformers import CLIPModel

    from .loading import transformers_dtype

    try:
        model = CLIPModel.from_pretrained(
            folder, **transformers_dtype(dtype), use_safetensors=True, local_files_only=True
        )
    except OSError as err:
        raise ValueError(
            f"{what}: no CLIP safetensors weights in {folder} ({err}); download the model's "
            "model.safetensors, or convert its pytorch_model.bin"
        ) from err
    return model.to(device).eval().requires_grad_(False)


class _ClipTextImage(nn.Module):
    """A CLIP model, its tokenizer and preprocessing; unit-norm embeddings of images and texts."""

    name = "clip"

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, D) unit-norm image embeddings of images in [0, 1]."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images.to(self.device, torch.float32)).to(dtype)
        return F.normalize(
            _pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1
        )

    def text_embeds(self, prompts: list[str]) -> Tensor:
        """(B, D) unit-norm text embeddings."""
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
        return F.normalize(_pooled(out).float(), dim=-1)

    @classmethod
    def _load(
        cls,
        path_or_id,
        *,
        processor: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ):
        from transformers import CLIPTokenizer

        folder = _resolve_model_dir(cls.name, path_or_id, cache_dir)
        proc = folder
        if processor is not None and not (folder / "tokenizer_config.json").is_file():
            proc = _resolve_model_dir(f"{cls.name} processor", processor, cache_dir)
        model = _load_clip(folder, cls.name, device, dtype)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{cls.name}: no CLIP tokenizer files in {proc} ({err})") from err
        return cls(model, tokenizer, ClipPreprocess.from_folder(proc))


class CLIPScore(_ClipTextImage):
    """CLIP score: 100 * cos(image embedding, prompt embedding), per image."""

    name = "clipscore"

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike = DEFAULT_CLIP_L14, **kwargs
    ) -> CLIPScore:
        """Load a CLIP model (folder or cached hub id, default ``openai/clip-vit-large-patch14``)."""
        return cls._load(path_or_id, **kwargs)

    def forward(self, images: Tensor, prompts) -> Tensor:
        prompts = _check_images(images, prompts, need_prompts=True)
        return 100.0 * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class PickScore(_ClipTextImage):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt), per image."""

    name = "pickscore"

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = DEFAULT_PICKSCORE,
        *,
        processor: str | os.PathLike = DEFAULT_PICKSCORE_PROCESSOR,
        **kwargs,
    ) -> PickScore:
        """Load ``yuvalkirstain/PickScore_v1`` (its tokenizer/preprocessing from ``processor``
        when the model folder has none: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
        return cls._load(path_or_id, processor=processor, **kwargs)

    def forward(self, images: Tensor, prompts) -> Tensor:
        prompts = _check_images(images, prompts, need_prompts=True)
        scale = self.model.logit_scale.exp().float()
        return scale * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def aesthetic_mlp(dims: Sequence[int]) -> nn.Sequential:
    """The improved-aesthetic-predictor head: Linear/Dropout layers at indices 0, 2, 4, 6, 7.

    ``dims`` = (768, 1024, 128, 64, 16) for ViT-L/14; the output is one score.
    """
    if len(dims) != 5:
        raise ValueError(f"the aesthetic head needs 5 widths, got {list(dims)}")
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


def load_aesthetic_head(path: str | os.PathLike) -> nn.Sequential:
    """The aesthetic MLP head from ``.safetensors``, or the original ``.pth`` (read with
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic head: missing weight file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    need = ["0.weight", "2.weight", "4.weight", "6.weight", "7.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(
            f"aesthetic head {path}: not an improved-aesthetic-predictor MLP (no {missing})"
        )
    dims = [state["0.weight"].shape[1]] + [state[k].shape[0] for k in need[:4]]
    head = aesthetic_mlp(dims)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


class LaionAesthetic(nn.Module):
    """LAION aesthetic predictor v2: MLP(normalised CLIP ViT-L/14 image embedding); prompts unused."""

    name = "aesthetic"

    def __init__(self, model, head: nn.Module, preprocess: ClipPreprocess) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.preprocess = preprocess

    @classmethod
    def from_pretrained(
        cls,
        clip: str | os.PathLike = DEFAULT_CLIP_L14,
        head: str | os.PathLike | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ) -> LaionAesthetic:
        """Load the CLIP model (folder or cached hub id) and the MLP head file.

        ``head`` defaults to ``sac+logos+ava1-l14-linearMSE.pth`` of
        ``camenduru/improved-aesthetic-predictor`` in the HF cache.
        """
        folder = _resolve_model_dir(cls.name, clip, cache_dir)
        model = _load_clip(folder, cls.name, device, dtype)
        if head is None:
            head = _cached_file(cls.name, *DEFAULT_AESTHETIC_HEAD, cache_dir)
        mlp = load_aesthetic_head(head).to(device)
        width = model.config.projection_dim
        if mlp[0].in_features != width:
            raise ValueError(
                f"aesthetic head takes {mlp[0].in_features}-d embeddings but the CLIP model gives "
                f"{width}-d ones (the v2 head needs ViT-L/14)"
            )
        return cls(model, mlp, ClipPreprocess.from_folder(folder))

    def forward(self, images: Tensor, prompts=None) -> Tensor:
        _check_images(images, prompts, need_prompts=False)
        p = next(self.model.parameters())
        pixels = self.preprocess(images.to(p.device, torch.float32)).to(p.dtype)
        emb = F.normalize(
            _pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1
        )
        return self.head(emb).squeeze(-1)


def _cached_file(what: str, repo_id: str, filename: str, cache_dir) -> Path:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise ValueError(
        f"{what}: weights not found: {filename} of {repo_id} is not in the local Hugging Face "
        f"cache; download it with `hf download {repo_id} {filename}`, or pass its local path"
    )


def _import_optional(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the optional package {package!r}: install it with `pip install {package}`"
        ) from err


def _to_pil(images: Tensor) -> list:
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a.astype("uint8")) for a in arr]


class ImageRewardScore:
    """ImageReward (Xu et al. 2023) through the ``image-reward`` package (not differentiable here)."""

    name = "imagereward"

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        med_config: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
    ) -> ImageRewardScore:
        """Load ``ImageReward.pt`` (+ ``med_config.json``) from local paths or the HF cache
        (``THUDM/ImageReward``)."""
        rm = _import_optional("ImageReward", "image-reward", cls.name)
        if checkpoint is None:
            checkpoint = _cached_file(cls.name, "THUDM/ImageReward", "ImageReward.pt", cache_dir)
        if med_config is None:
            med_config = _cached_file(cls.name, "THUDM/ImageReward", "med_config.json", cache_dir)
        for p in (checkpoint, med_config):
            if not Path(p).is_file():
                raise ValueError(f"{cls.name}: missing weight file {p}")
        return cls(rm.load(str(checkpoint), device=str(device), med_config=str(med_config)))

    def __call__(self, images: Tensor, prompts) -> Tensor:
        prompts = _check_images(images, prompts, need_prompts=True)
        with torch.no_grad():
            scores = [
                float(self.model.score(p, [im]))
                for p, im in zip(prompts, _to_pil(images), strict=True)
            ]
        return torch.tensor(scores, dtype=torch.float32)


class HPSv2Score:
    """HPSv2 / v2.1 (Wu et al. 2023) through the ``hpsv2`` package (not differentiable here)."""

    name = "hpsv2"

    def __init__(self, checkpoint: Path, version: str) -> None:
        self.hpsv2 = _import_optional("hpsv2", "hpsv2", self.name)
        self.checkpoint = checkpoint
        self.version = version

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        version: str = "v2.1",
        cache_dir: str | os.PathLike | None = None,
    ) -> HPSv2Score:
        """Use a local HPS checkpoint, or ``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2`` in the HF cache."""
        _import_optional("hpsv2", "hpsv2", cls.name)
        if checkpoint is None:
            name = "HPS_v2.1_compressed.pt" if version == "v2.1" else "HPS_v2_compressed.pt"
            checkpoint = _cached_file(cls.name, "xswu/HPSv2", name, cache_dir)
        if not Path(checkpoint).is_file():
            raise ValueError(f"{cls.name}: missing weight file {checkpoint}")
        return cls(Path(checkpoint), version)

    def __call__(self, images: Tensor, prompts) -> Tensor:
        prompts = _check_images(images, prompts, need_prompts=True)
        scores = [
            float(self.hpsv2.score([im], p, cp=str(self.checkpoint), hps_version=self.version)[0])
            for p, im in zip(prompts, _to_pil(images), strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)


#: name -> loader; every loader returns a callable ``(images, prompts) -> (B,)``.
REWARDS = {
    "aesthetic": LaionAesthetic.from_pretrained,
    "pickscore": PickScore.from_pretrained,
    "clipscore": CLIPScore.from_pretrained,
    "imagereward": ImageRewardScore.from_pretrained,
    "hpsv2": HPSv2Score.from_pretrained,
}


def load_reward(name: str, *args, **kwargs):
    """Load reward ``name`` (one of :data:`REWARDS`) with its loader's arguments."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name](*args, **kwargs)
