"""ImageReward (Xu et al. 2023) on current transformers, without the ``image-reward`` package.

The model (THUDM/ImageReward ``ImageReward.pt`` + ``med_config.json``) is BLIP's: a ViT
(ViT-L/16 at 224 px in the release) encodes the image into patch tokens, a BERT text
encoder whose every layer cross-attends to those tokens (BLIP's "med" BERT, configured
by ``med_config.json``) reads the prompt, and the 5-Linear MLP head (768-1024-128-64-16-1)
scores the [CLS] feature; the score is ``(mlp(feature) - 0.16717362830052426) /
1.0333394966054072``. Prompts are tokenised by ``bert-base-uncased`` (with BLIP's added
``[DEC]`` and ``[ENC]`` tokens), padded/truncated to 35 tokens; images are resized to
224 px (shorter side, bicubic, centre crop) and normalised with CLIP's mean/std.

Checkpoint keys map onto transformers modules (:data:`IMAGEREWARD_KEYS`):

- ``blip.visual_encoder.*`` (BLIP's timm-style ViT) -> :class:`transformers.BlipVisionModel`:
  ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` ->
  ``embeddings.position_embedding``, ``patch_embed.proj`` -> ``embeddings.patch_embedding``,
  ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` ->
  ``encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1,
  mlp.fc2}``, ``norm`` -> ``post_layernorm`` (both: fused qkv, LayerNorm eps 1e-6, GELU);
- ``blip.text_encoder.*`` (BLIP's med.py BERT) -> :class:`transformers.BlipTextModel` (a port
  of the same file: same names, cross-attention keys/values of the vision width), called
  with ``is_decoder=False`` (bidirectional self-attention, BLIP's "multimodal" mode);
- ``mlp.layers.*`` -> the :func:`~msdda.sd.reward_base.score_mlp` head.

Unused by the score, and left out: ``blip.text_encoder.embeddings.position_ids`` (a
constant buffer) and every other ``blip.*`` key (``vision_proj``, ``text_proj``, ...).
The ViT's sizes are read from the checkpoint's shapes (heads of width 64, as BLIP's).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputFileError, reading
from .reward_base import (
    CLIP_MEAN,
    CLIP_STD,
    ImageContract,
    KeyMap,
    cached_file,
    load_weights,
    resolve_model_dir,
    score_mlp,
)

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "IMAGEREWARD_KEYS",
    "ImageRewardModel",
    "ImageRewardScore",
    "convert_imagereward_state",
    "original_imagereward_state",
]

IMAGEREWARD_MEAN = 0.16717362830052426  # the score's normalisation, from ImageReward.py
IMAGEREWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35  # ImageReward's max_length for the prompt
VIT_HEAD_WIDTH = 64  # BLIP's ViTs: base 768 / 12 heads, large 1024 / 16
HUB_REPO = "THUDM/ImageReward"
HUB_TOKENIZER = "google-bert/bert-base-uncased"

_V, _OV = "visual_encoder", "blip.visual_encoder"
#: (checkpoint key, our key) rename rules; {i} a layer index, {p} weight/bias, {s} the rest.
IMAGEREWARD_KEYS = KeyMap(
    [
        (f"{_OV}.cls_token", f"{_V}.embeddings.class_embedding"),
        (f"{_OV}.pos_embed", f"{_V}.embeddings.position_embedding"),
        (f"{_OV}.patch_embed.proj.{{p}}", f"{_V}.embeddings.patch_embedding.{{p}}"),
        (f"{_OV}.blocks.{{i}}.norm1.{{p}}", f"{_V}.encoder.layers.{{i}}.layer_norm1.{{p}}"),
        (f"{_OV}.blocks.{{i}}.attn.qkv.{{p}}", f"{_V}.encoder.layers.{{i}}.self_attn.qkv.{{p}}"),
        (
            f"{_OV}.blocks.{{i}}.attn.proj.{{p}}",
            f"{_V}.encoder.layers.{{i}}.self_attn.projection.{{p}}",
        ),
        (f"{_OV}.blocks.{{i}}.norm2.{{p}}", f"{_V}.encoder.layers.{{i}}.layer_norm2.{{p}}"),
        (f"{_OV}.blocks.{{i}}.mlp.{{s}}", f"{_V}.encoder.layers.{{i}}.mlp.{{s}}"),
        (f"{_OV}.norm.{{p}}", f"{_V}.post_layernorm.{{p}}"),
        ("blip.text_encoder.embeddings.position_ids", None),
        ("blip.text_encoder.{s}", "text_encoder.{s}"),
        ("blip.{s}", None),
        ("mlp.layers.{s}", "mlp.{s}"),
    ]
)


def blip_vision_config(state: Mapping[str, Tensor], path) -> Any:
    """The BlipVisionConfig of the ViT in an ImageReward checkpoint, from its shapes."""
    from transformers import BlipVisionConfig

    try:
        patch = state[f"{_OV}.patch_embed.proj.weight"]  # (width, 3, p, p)
        tokens = state[f"{_OV}.pos_embed"].shape[1] - 1  # (1, 1 + n, width)
        mlp = state[f"{_OV}.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise InputFileError(path, f"not an ImageReward checkpoint: no {err} in it") from err
    width, side = patch.shape[0], math.isqrt(tokens)
    if side * side != tokens or width % VIT_HEAD_WIDTH:
        raise InputFileError(path, f"not a BLIP ViT: {tokens} patches, width {width}")
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"{_OV}.blocks."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_WIDTH,
        image_size=side * patch.shape[-1],
        patch_size=patch.shape[-1],
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_dropout=0.0,
    )


def blip_text_config(med: Mapping[str, Any], encoder_width: int) -> Any:
    """The BlipTextConfig of BLIP's med BERT (``med_config.json``), cross-attending to
    tokens of ``encoder_width`` (BLIP overrides the file's ``encoder_width`` the same way)."""
    from transformers import BlipTextConfig

    vocab = int(med["vocab_size"])
    return BlipTextConfig(
        vocab_size=vocab,
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=encoder_width,
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med["max_position_embeddings"]),
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        sep_token_id=None,
        eos_token_id=None,
        is_decoder=True,  # builds the cross-attention; forward runs bidirectionally
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head: the normalised ImageReward score."""

    def __init__(self, vision_config, text_config, mlp_dims) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = score_mlp(mlp_dims)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) float32 scores of preprocessed images (B, 3, S, S) and tokenised prompts."""
        image_tokens = self.visual_encoder(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=pixels.device)
        out = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        feature = out.last_hidden_state[:, 0].float()
        raw = self.mlp.to(torch.float32)(feature).squeeze(-1)  # in float32, as the original
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def convert_imagereward_state(
    state: Mapping[str, Tensor], path: str | os.PathLike = "ImageReward.pt"
) -> dict[str, Tensor]:
    """An ImageReward checkpoint's tensors under :class:`ImageRewardModel`'s names."""
    out, unknown = {}, []
    for key, value in state.items():
        ours = IMAGEREWARD_KEYS.forward(key)
        if ours is None and not IMAGEREWARD_KEYS.dropped(key):
            unknown.append(key)
        elif ours is not None:
            out[ours] = value
    if unknown:
        raise InputFileError(path, f"not an ImageReward checkpoint: unknown keys {unknown[:5]}")
    return out


def original_imagereward_state(model: ImageRewardModel) -> dict[str, Tensor]:
    """``model``'s tensors under the checkpoint's names (what ``ImageReward.pt`` holds),
    with BLIP's ``position_ids`` buffer."""
    state = {IMAGEREWARD_KEYS.backward(k): v for k, v in model.state_dict().items()}
    n = model.text_encoder.config.max_position_embeddings
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(n).expand(1, -1)
    return state


def _checkpoint_files(path_or_id, med_config, cache_dir) -> tuple[Path, Path, Path]:
    """(weights, med_config.json, folder) of a folder, a weight file or a cached hub repo."""
    if path_or_id is None:
        weights = cached_file("imagereward", HUB_REPO, "ImageReward.pt", cache_dir)
        med = med_config or cached_file("imagereward", HUB_REPO, "med_config.json", cache_dir)
        return weights, Path(med), weights.parent
    p = Path(os.fspath(path_or_id)).expanduser()
    if not p.is_file():
        p = resolve_model_dir("imagereward", path_or_id, cache_dir)
        names = ("ImageReward.safetensors", "ImageReward.pt")
        p = next((p / n for n in names if (p / n).is_file()), p / names[-1])
    return p, Path(med_config or p.parent / "med_config.json"), p.parent


def load_imagereward_tokenizer(folder: Path, cache_dir=None):
    """BLIP's tokenizer: ``bert-base-uncased`` (from ``folder`` if it has tokenizer files,
    else the HF cache) with the added ``[DEC]`` (bos) and ``[ENC]`` tokens."""
    from transformers import BertTokenizer

    has = any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json"))
    source = folder if has else resolve_model_dir("imagereward tokenizer", HUB_TOKENIZER, cache_dir)
    with reading(source, "BERT tokenizer"):
        tok = BertTokenizer.from_pretrained(source, local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageRewardScore(nn.Module):
    """ImageReward of images in [0, 1] and their prompts; differentiable in the images."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, contract: ImageContract) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.contract = contract

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        *,
        med_config: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ) -> ImageRewardScore:
        """Load ``ImageReward.pt`` (or ``.safetensors``) and ``med_config.json``: from a folder
        holding both (and optionally the BERT tokenizer files), a weight file with the config
        beside it, or the local HF cache of ``THUDM/ImageReward`` when ``path_or_id`` is None."""
        weights, med_path, folder = _checkpoint_files(path_or_id, med_config, cache_dir)
        with reading(med_path, "ImageReward med_config.json"):
            med = json.loads(Path(med_path).read_text())
        if not isinstance(med, dict):
            raise InputFileError(med_path, "not a BERT config: not a JSON object")
        state = load_weights(weights, "ImageReward checkpoint")
        vision = blip_vision_config(state, weights)
        try:
            dims = [state["mlp.layers.0.weight"].shape[1]]
            dims += [state[f"mlp.layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
        except KeyError as err:
            raise InputFileError(weights, f"not an ImageReward checkpoint: no {err}") from err
        with reading(med_path, "ImageReward med_config.json"):
            model = ImageRewardModel(vision, blip_text_config(med, vision.hidden_size), dims)
        with reading(weights, "ImageReward checkpoint"):
            model.load_state_dict(convert_imagereward_state(state, weights))
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        model.mlp.to(torch.float32)
        size = vision.image_size
        contract = ImageContract(size, size, CLIP_MEAN, CLIP_STD, "crop", prompts=True)
        return cls(model, load_imagereward_tokenizer(folder, cache_dir), contract)

    def forward(self, images: Tensor, prompts) -> Tensor:
        prompts = self.contract.check(images, prompts)
        p = next(self.model.parameters())
        pixels = self.contract(images.to(p.device, torch.float32)).to(p.dtype)
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=PROMPT_TOKENS,
            return_tensors="pt",
        ).to(p.device)
        return self.model(pixels, tok.input_ids, tok.attention_mask)
