"""Image rewards for Stable Diffusion: ``(images, prompts) -> (B,)`` scores, by name.

Every reward takes images (B, 3, H, W) with values in [0, 1] (what the pipelines give
with ``output_type="pt"``, or ``(x / 2 + 0.5).clamp(0, 1)`` of the VAE decoder) and B
prompts (or one, for all), and returns (B,) float32 scores, differentiable in the
images (preprocessing is done on tensors). Each states and checks its input contract,
``reward.contract`` (:class:`~msdda.sd.reward_base.ImageContract`).

- ``aesthetic`` :class:`LaionAesthetic`: LAION aesthetic predictor v2 (CLIP ViT-L/14
  image embedding, L2-normalised, through the ``sac+logos+ava1-l14-linearMSE`` MLP
  head); about 1-10.
- ``pickscore`` :class:`PickScore`: ``logit_scale * cos(image, text)`` of PickScore's CLIP.
- ``clipscore`` :class:`CLIPScore`: ``100 * cos(image, text)`` of a CLIP model (not clamped).
- ``imagereward`` :class:`~msdda.sd.imagereward.ImageRewardScore`: ImageReward (BLIP), about
  -2..2, written on transformers (no ``image-reward`` package).
- ``hpsv2`` :class:`~msdda.sd.hpsv2.HPSv2Score`: HPS v2.1 (or v2), cos(image, text) of an
  OpenCLIP ViT-H-14 loaded into transformers' CLIPModel (no ``hpsv2``/``open_clip``).

:func:`load_reward` loads one by name from a local folder/file or the local HF cache
(never downloaded); when the weights are absent the error says what to download.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputFileError, reading
from .hpsv2 import HPSv2Score
from .imagereward import ImageRewardScore
from .reward_base import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEmbedder,
    ImageContract,
    cached_file,
    load_weights,
    mlp_from_state,
    resolve_model_dir,
    score_mlp,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageContract",
    "LaionAesthetic",
    "PickScore",
    "CLIPScore",
    "ImageRewardScore",
    "HPSv2Score",
    "REWARDS",
    "load_reward",
    "load_aesthetic_head",
    "score_mlp",
]

DEFAULT_CLIP_L14 = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_AESTHETIC_HEAD = (
    "camenduru/improved-aesthetic-predictor",
    "sac+logos+ava1-l14-linearMSE.pth",
)
#: Head files looked for in an aesthetic model folder, in this order.
AESTHETIC_HEAD_FILES = ("aesthetic_head.safetensors", DEFAULT_AESTHETIC_HEAD[1])


def _load_clip(folder: Path, what: str, device, dtype):
    from transformers import CLIPModel

    from .loading import transformers_dtype

    if not any(
        (folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise InputFileError(
            folder,
            f"{what}: no CLIP safetensors weights (model.safetensors) in it; download them, "
            "or convert its pytorch_model.bin",
        )
    with reading(folder, f"{what} CLIP model"):
        model = CLIPModel.from_pretrained(
            folder, **transformers_dtype(dtype), use_safetensors=True, local_files_only=True
        )
    return model.to(device).eval().requires_grad_(False)


class _ClipReward(ClipEmbedder):
    """A CLIP model loaded from a folder or cached hub id, with its tokenizer."""

    name = "clip"

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

        folder = resolve_model_dir(cls.name, path_or_id, cache_dir)
        proc = folder
        if processor is not None and not (folder / "tokenizer_config.json").is_file():
            proc = resolve_model_dir(f"{cls.name} processor", processor, cache_dir)
        model = _load_clip(folder, cls.name, device, dtype)
        with reading(proc, f"{cls.name} CLIP tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
        return cls(model, tokenizer, ImageContract.from_folder(proc))


class CLIPScore(_ClipReward):
    """CLIP score: 100 * cos(image embedding, prompt embedding), per image."""

    name = "clipscore"

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike = DEFAULT_CLIP_L14, **kwargs
    ) -> CLIPScore:
        """Load a CLIP model (folder or cached hub id, default ``openai/clip-vit-large-patch14``)."""
        return cls._load(path_or_id, **kwargs)

    def forward(self, images: Tensor, prompts) -> Tensor:
        prompts = self.contract.check(images, prompts)
        return 100.0 * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class PickScore(_ClipReward):
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
        prompts = self.contract.check(images, prompts)
        scale = self.model.logit_scale.exp().float()
        return scale * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def load_aesthetic_head(path: str | os.PathLike) -> nn.Sequential:
    """The aesthetic MLP head from ``.safetensors``, or the original ``.pth`` (read with
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects)."""
    state = load_weights(path, "aesthetic head")
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    return mlp_from_state(state, path, "improved-aesthetic-predictor MLP head")


class LaionAesthetic(ClipEmbedder):
    """LAION aesthetic predictor v2: MLP(normalised CLIP ViT-L/14 image embedding); prompts unused."""

    name = "aesthetic"

    def __init__(self, model, head: nn.Module, contract: ImageContract) -> None:
        super().__init__(model, None, contract)
        self.head = head

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

        ``head`` defaults to the first of :data:`AESTHETIC_HEAD_FILES` in the CLIP folder,
        else ``sac+logos+ava1-l14-linearMSE.pth`` of ``camenduru/improved-aesthetic-predictor``
        in the HF cache.
        """
        folder = resolve_model_dir(cls.name, clip, cache_dir)
        if head is None:
            head = next((folder / n for n in AESTHETIC_HEAD_FILES if (folder / n).is_file()), None)
        if head is None:
            head = cached_file(cls.name, *DEFAULT_AESTHETIC_HEAD, cache_dir)
        mlp = load_aesthetic_head(head).to(device)
        model = _load_clip(folder, cls.name, device, dtype)
        width = model.config.projection_dim
        if mlp[0].in_features != width:
            raise InputFileError(
                head,
                f"the aesthetic head takes {mlp[0].in_features}-d embeddings but the CLIP model "
                f"gives {width}-d ones (the v2 head needs ViT-L/14)",
            )
        return cls(model, mlp, ImageContract.from_folder(folder, prompts=False))

    def forward(self, images: Tensor, prompts=None) -> Tensor:
        self.contract.check(images, prompts)
        return self.head(self.image_embeds(images)).squeeze(-1)


#: name -> loader ``(path_or_id=None, *, device, dtype, cache_dir) -> reward``.
REWARDS: dict[str, Callable[..., nn.Module]] = {
    "aesthetic": LaionAesthetic.from_pretrained,
    "pickscore": PickScore.from_pretrained,
    "clipscore": CLIPScore.from_pretrained,
    "imagereward": ImageRewardScore.from_pretrained,
    "hpsv2": HPSv2Score.from_pretrained,
}


def load_reward(
    name: str,
    path_or_id: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Reward ``name`` (one of :data:`REWARDS`): ``(images, prompts) -> (B,) float32``, with
    ``.name`` and ``.contract``; frozen, in eval mode, differentiable in the images.

    ``path_or_id``: a local folder or file in the reward's own format (see each loader), a
    hub id in the local HF cache, or None for the reward's default weights in the cache.
    ``aesthetic``: a CLIP ViT-L/14 folder, with its head file inside it or in the cache.
    """
    if not isinstance(name, str) or name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    kwargs = dict(device=device, dtype=dtype, cache_dir=cache_dir)
    return REWARDS[name](*(() if path_or_id is None else (path_or_id,)), **kwargs)
