"""HPSv2 / v2.1 (Wu et al. 2023) on transformers' CLIPModel, without ``hpsv2``/``open_clip``.

The checkpoints (xswu/HPSv2 ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) hold
``{"state_dict": ...}`` of an OpenCLIP ViT-H-14 (vision: 224 px, patch 14, width 1280,
32 layers, heads of width 80; text: width 1024, 24 layers, 16 heads, context 77;
embeddings of 1024; exact GELU). As in hpsv2's ``img_score.py``, the score is the cosine
of the unit-norm image and text embeddings, ``image_features @ text_features.T`` on the
diagonal (no logit scale, no factor 100). Images are preprocessed as OpenCLIP's
validation transform with ``resize_longest_max=True``: longer side to 224 px (bicubic),
padded with black to a square, normalised with CLIP's mean/std. Prompts are tokenised
with CLIP's BPE (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s tokenizer, OpenCLIP's
``SimpleTokenizer`` vocabulary), 77 tokens; the text is pooled at the end-of-text token.

OpenCLIP names map onto :class:`transformers.CLIPModel` by :func:`convert_open_clip_state`:
``[visual.]transformer.resblocks.i.attn.in_proj_{weight,bias}`` splits into
``{q,k,v}_proj``; ``text_projection`` and ``visual.proj`` (used as ``x @ P``) become the
transposed ``text_projection`` / ``visual_projection`` Linear weights; the rest are
renames (:data:`OPEN_CLIP_KEYS`). An optional ``open_clip_config.json`` beside the
checkpoint (OpenCLIP's hub format, ``{"model_cfg": ..., "preprocess_cfg": ...}``) gives
another architecture; without one it is ViT-H-14.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputFileError, reading
from .reward_base import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEmbedder,
    ImageContract,
    KeyMap,
    cached_file,
    load_weights,
    resolve_model_dir,
)

__all__ = [
    "VIT_H_14",
    "OPEN_CLIP_KEYS",
    "HPSv2Score",
    "clip_config_from_open_clip",
    "convert_open_clip_state",
    "original_open_clip_state",
]

#: OpenCLIP's ``ViT-H-14.json`` model config.
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "layers": 32,
        "width": 1280,
        "head_width": 80,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 1024,
        "heads": 16,
        "layers": 24,
    },
}
HUB_REPO = "xswu/HPSv2"
HUB_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CHECKPOINTS = {"v2.1": "HPS_v2.1_compressed.pt", "v2": "HPS_v2_compressed.pt"}

_BLOCK = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj")]
_BLOCK += [("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
#: (OpenCLIP name, CLIPModel name) renames; {i} a layer index, {p} weight/bias.
OPEN_CLIP_KEYS = KeyMap(
    [
        ("logit_scale", "logit_scale"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.{p}", "text_model.final_layer_norm.{p}"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.ln_pre.{p}", "vision_model.pre_layrnorm.{p}"),
        ("visual.ln_post.{p}", "vision_model.post_layernorm.{p}"),
        ("attn_mask", None),  # the causal mask buffer of older OpenCLIP versions
    ]
    + [
        (f"{o}transformer.resblocks.{{i}}.{a}.{{p}}", f"{t}.encoder.layers.{{i}}.{b}.{{p}}")
        for o, t in (("", "text_model"), ("visual.", "vision_model"))
        for a, b in _BLOCK
    ]
)
_IN_PROJ = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_QKV = re.compile(
    r"(text|vision)_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"
)
_PROJECTIONS = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}


def convert_open_clip_state(
    state: Mapping[str, Tensor], path: str | os.PathLike = "checkpoint"
) -> dict[str, Tensor]:
    """An OpenCLIP CLIP state dict under :class:`transformers.CLIPModel`'s names."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        m = _IN_PROJ.match(key)
        if m:
            tower = "vision_model" if m[1] else "text_model"
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{tower}.encoder.layers.{m[2]}.self_attn.{name}_proj.{m[3]}"] = part
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.T
        elif OPEN_CLIP_KEYS.forward(key) is not None:
            out[OPEN_CLIP_KEYS.forward(key)] = value
        elif not OPEN_CLIP_KEYS.dropped(key):
            unknown.append(key)
    if unknown:
        raise InputFileError(path, f"not an OpenCLIP CLIP state dict: unknown keys {unknown[:5]}")
    return out


def original_open_clip_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPModel state dict under OpenCLIP's names (the inverse of the conversion)."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    back = {v: k for k, v in _PROJECTIONS.items()}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            parts.setdefault((m[1], m[2], m[4]), {})[m[3]] = value
        elif key in back:
            out[back[key]] = value.T
        elif not key.endswith("position_ids"):
            out[OPEN_CLIP_KEYS.backward(key)] = value
    for (tower, i, p), qkv in parts.items():
        prefix = "visual." if tower == "vision" else ""
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
            [qkv["q"], qkv["k"], qkv["v"]]
        )
    return out


_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def clip_config_from_open_clip(model_cfg: Mapping[str, Any], tokenizer) -> Any:
    """The CLIPConfig of an OpenCLIP model config (``ViT-H-14.json``'s layout), with the
    tokenizer's special tokens (the text is pooled at its end-of-text token)."""
    from transformers import CLIPConfig

    v, t = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    odd = sorted((set(v) - _VISION_KEYS) | {f"text_cfg.{k}" for k in set(t) - _TEXT_KEYS})
    if odd or set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}:
        raise ValueError(f"OpenCLIP model config: unsupported options {odd or sorted(model_cfg)}")
    size = v["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    common = dict(hidden_act=act, layer_norm_eps=1e-5, projection_dim=model_cfg["embed_dim"])
    vision = dict(
        common,
        hidden_size=v["width"],
        intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v.get("head_width", 64),
        image_size=int(size),
        patch_size=v["patch_size"],
    )
    text = dict(
        common,
        hidden_size=t["width"],
        intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"],
        num_attention_heads=t.get("heads", 8),
        vocab_size=t.get("vocab_size", 49408),
        max_position_embeddings=t.get("context_length", 77),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


def _checkpoint_file(path_or_id, version: str, cache_dir) -> Path:
    if version not in CHECKPOINTS:
        raise ValueError(f"version must be one of {sorted(CHECKPOINTS)}, got {version!r}")
    if path_or_id is None:
        return cached_file("hpsv2", HUB_REPO, CHECKPOINTS[version], cache_dir)
    p = Path(os.fspath(path_or_id)).expanduser()
    if p.is_file():
        return p
    folder = resolve_model_dir("hpsv2", path_or_id, cache_dir)
    names = [CHECKPOINTS[version]] + [n for n in CHECKPOINTS.values() if n != CHECKPOINTS[version]]
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def _open_clip_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    """(path, content) of ``open_clip_config.json`` in ``folder``; ViT-H-14 without one."""
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return path, {"model_cfg": VIT_H_14, "preprocess_cfg": {}}
    with reading(path, "OpenCLIP config"):
        cfg = json.loads(path.read_text())
    model_cfg = cfg.get("model_cfg") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(model_cfg):
        raise InputFileError(path, "not an OpenCLIP config: no model_cfg.vision_cfg/text_cfg")
    return path, cfg


def _tokenizer(folder: Path, context: int, cache_dir):
    from transformers import CLIPTokenizer

    has = any((folder / n).is_file() for n in ("vocab.json", "tokenizer.json"))
    source = folder if has else resolve_model_dir("hpsv2 tokenizer", HUB_TOKENIZER, cache_dir)
    with reading(source, "CLIP tokenizer"):
        tok = CLIPTokenizer.from_pretrained(source, local_files_only=True)
    tok.model_max_length = context
    return tok


class HPSv2Score(ClipEmbedder):
    """HPSv2 / v2.1: cos(image embedding, prompt embedding) of the HPS-tuned ViT-H-14."""

    name = "hpsv2"

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        *,
        version: str = "v2.1",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ) -> HPSv2Score:
        """Load an HPS checkpoint: a ``.pt`` file, a folder holding one (and optionally
        ``open_clip_config.json`` and CLIP tokenizer files), or ``HPS_v2.1_compressed.pt``
        (``version="v2"``: ``HPS_v2_compressed.pt``) of ``xswu/HPSv2`` in the HF cache."""
        from transformers import CLIPModel

        weights = _checkpoint_file(path_or_id, version, cache_dir)
        state = load_weights(weights, "HPSv2 checkpoint")
        state = state.get("state_dict", state)
        cfg_path, cfg = _open_clip_config(weights.parent)
        model_cfg = cfg["model_cfg"]
        tokenizer = _tokenizer(
            weights.parent, model_cfg["text_cfg"].get("context_length", 77), cache_dir
        )
        with reading(cfg_path, "OpenCLIP config"):
            clip_config = clip_config_from_open_clip(model_cfg, tokenizer)
        with reading(weights, "HPSv2 checkpoint"):
            model = CLIPModel(clip_config)
            model.load_state_dict(convert_open_clip_state(state, weights), strict=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        pre = cfg.get("preprocess_cfg", {})
        size = model.config.vision_config.image_size
        mean, std = tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))
        return cls(model, tokenizer, ImageContract(size, size, mean, std, "pad", prompts=True))

    def forward(self, images: Tensor, prompts) -> Tensor:
        prompts = self.contract.check(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
