"""Tiny SD3 and FLUX components with random weights, built from configs (no downloads).

For tests and benchmarks: an ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` with a
handful of layers, a tiny ``AutoencoderKL`` and a ``FlowMatchEulerDiscreteScheduler``
with the real models' shift settings. The pipelines carry no tokenizer or text encoder:
prompts are given as embeddings (:func:`tiny_sd3_prompt` / :func:`tiny_flux_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import quiet_libraries

__all__ = [
    "TinySD3Config",
    "tiny_sd3_transformer",
    "tiny_flux_transformer",
    "tiny_sd3_components",
    "tiny_flux_components",
    "tiny_sd3_prompt",
    "tiny_flux_prompt",
    "save_tiny_flow_pipeline",
    "perturb",
    "save_flow_lora",
    "FLOW_LORA_TARGETS",
]

#: The layers Flow-GRPO's SD3 LoRAs adapt (``scripts/train_sd3.py``).
FLOW_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of a small SD3 transformer (latents ``sample_size`` square, 4 channels)."""

    num_layers: int = 2  # joint transformer blocks
    attention_head_dim: int = 8  # channels per head
    num_attention_heads: int = 2  # heads (inner width = heads x head_dim)
    joint_attention_dim: int = 16  # text embedding width (prompt_embeds' last axis)
    pooled_projection_dim: int = 8  # pooled text embedding width
    sample_size: int = 16  # latent side
    in_channels: int = 4  # latent channels


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_sd3_transformer(config: TinySD3Config = TinySD3Config(), *, seed: int = 0):
    """An SD3Transformer2DModel with random weights."""
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    return SD3Transformer2DModel(
        sample_size=config.sample_size,
        patch_size=2,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        caption_projection_dim=config.attention_head_dim * config.num_attention_heads,
        pooled_projection_dim=config.pooled_projection_dim,
        pos_embed_max_size=config.sample_size,
    ).eval()


def tiny_flux_transformer(*, seed: int = 0, guidance_embeds: bool = True, num_layers: int = 1):
    """A FluxTransformer2DModel with random weights (FLUX-dev style guidance embedding
    when ``guidance_embeds``); latents are packed 2x2 patches of 4 channels (16)."""
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def _tiny_vae(seed: int, *, shift_factor: float, scaling_factor: float):
    """SD's tiny AutoencoderKL with SD3/FLUX's latent shift and scale."""
    from .testing import _tiny_vae as tiny_sd_vae

    vae = tiny_sd_vae(seed)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    return vae


def _flow_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**overrides)


def tiny_sd3_components(
    config: TinySD3Config = TinySD3Config(), *, seed: int = 0, text_encoders: bool = False
) -> dict:
    """Components of a tiny ``StableDiffusion3Pipeline`` (SD3's static shift 3.0). Without
    ``text_encoders`` there are no text encoders or tokenizers (pass prompt embeddings);
    with them, two tiny CLIP encoders read text prompts and T5 is left out, as SD3 allows
    (its embeddings are then zeros)."""
    comps = dict(
        transformer=tiny_sd3_transformer(config, seed=seed),
        vae=_tiny_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5305),
        scheduler=_flow_scheduler(shift=3.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if text_encoders:
        from .testing import _tiny_text_encoder, tiny_clip_tokenizer

        hidden = config.pooled_projection_dim // 2  # the two pooled outputs are concatenated
        for i, key in enumerate(("", "_2")):
            tok = tiny_clip_tokenizer()
            comps[f"tokenizer{key}"] = tok
            comps[f"text_encoder{key}"] = _tiny_text_encoder(
                tok, hidden, seed + 2 + i, with_projection=True
            )
    return comps


def _tiny_flux_text_encoders(seed: int) -> dict:
    """A tiny CLIP (pooled, width 8) and a tiny T5 encoder (width 16), both reading the tiny
    character-level CLIP tokenizer (no sentencepiece model needed)."""
    from transformers import T5Config, T5EncoderModel

    from .testing import _tiny_text_encoder, tiny_clip_tokenizer

    tok, tok_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(model_max_length=512)
    pad = tok_2.convert_tokens_to_ids("<|endoftext|>")
    t5 = T5Config(vocab_size=len(tok_2), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                  num_heads=2, relative_attention_num_buckets=8, pad_token_id=pad,
                  eos_token_id=pad, decoder_start_token_id=pad)  # fmt: skip
    torch.manual_seed(seed + 1)
    return dict(
        tokenizer=tok,
        text_encoder=_tiny_text_encoder(tok, 8, seed),
        tokenizer_2=tok_2,
        text_encoder_2=T5EncoderModel(t5).eval(),
    )


def tiny_flux_components(
    *, seed: int = 0, guidance_embeds: bool = True, text_encoders: bool = False
) -> dict:
    """Components of a tiny ``FluxPipeline`` (FLUX's dynamic shift). Without
    ``text_encoders`` there are none (pass prompt embeddings); with them, a tiny CLIP and
    a tiny T5 encoder read text prompts."""
    comps = dict(
        transformer=tiny_flux_transformer(seed=seed, guidance_embeds=guidance_embeds),
        vae=_tiny_vae(seed + 1, shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=_flow_scheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        ),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    if text_encoders:
        comps.update(_tiny_flux_text_encoders(seed + 2))
    return comps


def tiny_sd3_prompt(
    batch: int = 1, *, seed: int = 0, tokens: int = 6, config: TinySD3Config = TinySD3Config()
) -> dict:
    """Random SD3 prompt embeddings (prompt and negative) as the pipeline call takes them."""
    g = torch.Generator().manual_seed(seed)
    d, p = config.joint_attention_dim, config.pooled_projection_dim
    return dict(
        prompt_embeds=torch.randn(batch, tokens, d, generator=g),
        negative_prompt_embeds=torch.randn(batch, tokens, d, generator=g),
        pooled_prompt_embeds=torch.randn(batch, p, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, p, generator=g),
    )


def tiny_flux_prompt(batch: int = 1, *, seed: int = 0, tokens: int = 6) -> dict:
    """Random FLUX prompt embeddings (T5 sequence and CLIP pooled)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, tokens, 16, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
    )


def perturb(model, seed: int, scale: float = 0.05):
    """``model`` with every parameter moved by ``scale`` N(0, 1) noise (a distinct expert)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in model.parameters():
            with torch.no_grad():
                p.add_(scale * torch.randn_like(p))
    return model


def save_tiny_flow_pipeline(
    folder,
    *,
    family: str = "sd3",
    seed: int = 0,
    transformer_seed: int | None = None,
    text_encoders: bool = False,
    **scheduler_overrides,
) -> Path:
    """Save a tiny SD3 (``family="sd3"``) or FLUX (``"flux"``) pipeline folder as diffusers
    does; ``transformer_seed`` perturbs only the transformer (a full-model expert),
    ``scheduler_overrides`` change the scheduler's config (e.g. another ``shift``)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "sd3":
        cls = StableDiffusion3Pipeline
        comps = tiny_sd3_components(seed=seed, text_encoders=text_encoders)
    elif family == "flux":
        cls, comps = FluxPipeline, tiny_flux_components(seed=seed, text_encoders=text_encoders)
    else:
        raise ValueError(f"family must be 'sd3' or 'flux', got {family!r}")
    if transformer_seed is not None:
        perturb(comps["transformer"], transformer_seed)
    if scheduler_overrides:
        config = {**comps["scheduler"].config, **scheduler_overrides}
        comps["scheduler"] = type(comps["scheduler"]).from_config(config)
    with quiet_libraries():  # diffusers warns for every component saved as None
        cls(**comps).save_pretrained(str(folder))
    return Path(folder)


def save_flow_lora(transformer, path, *, fmt: str = "peft", family: str = "sd3", **lora_kwargs):
    """Write a random LoRA of ``transformer`` on Flow-GRPO's layers to ``path``: a peft
    folder (``fmt="peft"``, as Flow-GRPO publishes its LoRAs: adapter_config.json +
    adapter_model.safetensors) or the ``.safetensors`` file diffusers' ``save_lora_weights``
    writes (``fmt="diffusers"``). ``transformer`` is left untouched."""
    import copy

    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    from .testing import random_lora, save_random_lora

    lora_kwargs.setdefault("target_modules", FLOW_LORA_TARGETS)
    if fmt == "peft":
        return save_random_lora(transformer, path, fmt="peft", **lora_kwargs)
    if fmt != "diffusers":
        raise ValueError(f"fmt must be 'peft' or 'diffusers', got {fmt!r}")
    path = Path(path)
    model = copy.deepcopy(transformer)
    cfg = random_lora(model, **lora_kwargs)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    path.parent.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(
        str(path.parent),
        transformer_lora_layers=state,
        weight_name=path.name,
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )
    return path
