"""Tiny Stable Diffusion components with random weights, built from configs (no downloads).

For tests and benchmarks: the same shapes as diffusers' ``hf-internal-testing/tiny-*``
models, made locally. The tokenizer is a character-level CLIP BPE vocabulary (every
byte and byte + ``</w>``, no merges), enough to tokenise any prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "TinySDConfig",
    "tiny_clip_tokenizer",
    "tiny_unet",
    "tiny_sd_components",
    "tiny_sdxl_components",
    "random_lora",
]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table (256 characters)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over single characters (514 tokens), built in memory."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of a small SD-like UNet (the latent is ``sample_size`` square, 4 channels)."""

    block_out_channels: tuple[int, ...] = (8, 16)  # channels per resolution level
    layers_per_block: int = 1  # resnets per down block
    cross_attention_dim: int = 16  # text embedding width
    attention_head_dim: int = 4  # channels per head
    norm_num_groups: int = 4  # GroupNorm groups
    sample_size: int = 16  # latent side (images are 2x that with the tiny VAE)


def tiny_unet(config: TinySDConfig = TinySDConfig(), *, seed: int = 0, **overrides):
    """A UNet2DConditionModel with random weights (SD layout: cross-attention in deeper blocks)."""
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    kwargs = dict(
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        sample_size=config.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**kwargs).eval()


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    ).eval()


def _tiny_text_encoder(tokenizer, hidden: int, seed: int, *, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _sd_scheduler(kind: str, **overrides):
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    if kind == "ddim":
        kwargs["set_alpha_to_one"] = False
        kwargs.update(overrides)
        return DDIMScheduler(**kwargs)
    if kind == "ddpm":
        kwargs.update(overrides)
        return DDPMScheduler(**kwargs)
    raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")


def tiny_sd_components(
    config: TinySDConfig = TinySDConfig(), *, seed: int = 0, scheduler: str = "ddim", **sched_kw
) -> dict:
    """Components of a tiny ``StableDiffusionPipeline`` (no safety checker)."""
    tok = tiny_clip_tokenizer()
    return dict(
        unet=tiny_unet(config, seed=seed),
        vae=_tiny_vae(seed + 1),
        text_encoder=_tiny_text_encoder(tok, config.cross_attention_dim, seed + 2),
        tokenizer=tok,
        scheduler=_sd_scheduler(scheduler, **sched_kw),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_components(*, seed: int = 0, scheduler: str = "ddim", **sched_kw) -> dict:
    """Components of a tiny ``StableDiffusionXLPipeline`` (two text encoders, text_time embeddings)."""
    tok = tiny_clip_tokenizer()
    te_dim = 16
    unet = tiny_unet(
        TinySDConfig(cross_attention_dim=2 * te_dim),
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + te_dim,
        use_linear_projection=True,
    )
    return dict(
        unet=unet,
        vae=_tiny_vae(seed + 1),
        text_encoder=_tiny_text_encoder(tok, te_dim, seed + 2),
        text_encoder_2=_tiny_text_encoder(tok, te_dim, seed + 3, with_projection=True),
        tokenizer=tok,
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=_sd_scheduler(scheduler, **sched_kw),
        add_watermarker=False,
    )


def random_lora(
    model,
    *,
    rank: int = 2,
    alpha: float = 4.0,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    seed: int = 0,
    std: float = 0.1,
    adapter_name: str = "default",
):
    """Inject a peft LoRA adapter with random (non-zero) A and B into ``model``; returns its LoraConfig."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules))
    inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            for w in (m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight):
                with torch.no_grad():
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return cfg


def save_random_lora(
    unet,
    path,
    *,
    fmt: str = "diffusers",
    text_encoder=None,
    **lora_kwargs,
):
    """Write a random LoRA for ``unet`` (and optionally ``text_encoder``) to ``path``.

    ``fmt="diffusers"``: ``path`` is the ``.safetensors`` file diffusers' ``save_lora_weights``
    writes (with its LoRA metadata); ``fmt="peft"``: ``path`` is a peft folder
    (``adapter_config.json`` + ``adapter_model.safetensors``). The models are left untouched.
    """
    import copy
    from pathlib import Path

    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    model = copy.deepcopy(unet)
    cfg = random_lora(model, **lora_kwargs)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    if fmt == "peft":
        path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(str(path))
        save_file(
            {f"base_model.model.{k}": v for k, v in state.items()},
            path / "adapter_model.safetensors",
        )
        return path
    if fmt != "diffusers":
        raise ValueError(f"fmt must be 'diffusers' or 'peft', got {fmt!r}")
    te_state = te_cfg = None
    if text_encoder is not None:
        te = copy.deepcopy(text_encoder)
        te_kwargs = dict(lora_kwargs, target_modules=("q_proj", "v_proj"))
        te_kwargs["seed"] = lora_kwargs.get("seed", 0) + 1000
        te_cfg = random_lora(te, **te_kwargs)
        te_state = {k: v.contiguous() for k, v in get_peft_model_state_dict(te).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=state,
        text_encoder_lora_layers=te_state,
        weight_name=path.name,
        unet_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict() if te_cfg is not None else None,
    )
    return path


def save_tiny_pipeline(
    folder,
    *,
    xl: bool = False,
    seed: int = 0,
    unet_seed: int | None = None,
    scheduler: str = "ddim",
    **sched_kw,
):
    """Save a tiny SD (or SDXL) pipeline folder; ``unet_seed`` varies only the UNet weights."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps = (tiny_sdxl_components if xl else tiny_sd_components)(
        seed=seed, scheduler=scheduler, **sched_kw
    )
    if unet_seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(unet_seed)
            for p in comps["unet"].parameters():
                with torch.no_grad():
                    p.add_(0.05 * torch.randn_like(p))
    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)(**comps)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def save_tiny_clip(folder, *, seed: int = 0, projection_dim: int = 12, image_size: int = 32):
    """Save a tiny CLIPModel with its tokenizer and image processor like a hub folder."""
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    tok = tiny_clip_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    layers = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
    text = dict(
        layers, vocab_size=len(tok), bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos
    )
    cfg = CLIPConfig(
        text_config=text,
        vision_config=dict(layers, image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def tiny_bert_vocab() -> list[str]:
    """A WordPiece vocabulary of single characters (and ``##`` continuations)."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]


def _spread(module, seed: int, std: float = 0.2) -> None:
    """Add noise to every parameter, so that a tiny random model's outputs vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def save_tiny_imagereward(folder, *, seed: int = 0, image_size: int = 32):
    """Write ``ImageReward.pt`` (original key names), ``med_config.json`` and a BERT vocab."""
    import json
    from pathlib import Path

    from transformers import BertTokenizer, BlipVisionConfig

    from .imagereward import ImageRewardModel, blip_text_config, original_imagereward_state

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    med = {
        "architectures": ["BertModel"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 40,
        "vocab_size": len(tiny_bert_vocab()) + 2,  # + BLIP's [DEC] and [ENC]
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "encoder_width": 128,
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    vision = BlipVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = ImageRewardModel(vision, blip_text_config(med, 128), [32, 1024, 128, 64, 16])
    _spread(model, seed)
    with torch.no_grad():  # a head that keeps the feature's scale: scores of order 1
        for m in model.mlp:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5)
                m.bias.zero_()
    state = original_imagereward_state(model)
    g = torch.Generator().manual_seed(seed + 1)
    for name, shape in (("vision_proj", (16, 128)), ("text_proj", (16, 32))):  # unused by score
        state[f"blip.{name}.weight"] = torch.randn(shape, generator=g)
        state[f"blip.{name}.bias"] = torch.zeros(shape[0])
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "ImageReward.pt")
    return folder


#: OpenCLIP model config of the tiny HPSv2 (``ViT-H-14.json``'s layout).
TINY_OPEN_CLIP = {
    "embed_dim": 12,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 514, "width": 16, "heads": 2, "layers": 2},
}


def save_tiny_hpsv2(folder, *, seed: int = 0, name: str = "HPS_v2.1_compressed.pt"):
    """Write an HPS checkpoint (``{"state_dict": OpenCLIP names}``), ``open_clip_config.json``
    and the CLIP tokenizer files."""
    import json
    from pathlib import Path

    from transformers import CLIPModel

    from .hpsv2 import clip_config_from_open_clip, original_open_clip_state

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_clip_tokenizer()
    tok.save_pretrained(folder)
    cfg = {
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = CLIPModel(clip_config_from_open_clip(TINY_OPEN_CLIP, tok))
    _spread(model, seed)
    state = original_open_clip_state(model.state_dict())
    torch.save(
        {"state_dict": {k: v.contiguous() for k, v in state.items()}, "epoch": 1}, folder / name
    )
    return folder


def save_tiny_reward(name: str, folder, *, seed: int = 0):
    """Write a tiny random model of reward ``name`` (any of ``msdda.sd.rewards.REWARDS``) in
    its real format into ``folder``; returns the path to give ``load_reward(name, path)``."""
    from pathlib import Path

    from .reward_base import score_mlp

    folder = Path(folder)
    if name in ("clipscore", "pickscore"):
        return save_tiny_clip(folder, seed=seed)
    if name == "aesthetic":
        save_tiny_clip(folder, seed=seed)
        torch.manual_seed(seed + 1)
        head = score_mlp([12, 32, 16, 8, 4])
        _spread(head, seed + 1, std=0.5)
        state = {f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}
        torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")
        return folder
    if name == "imagereward":
        return save_tiny_imagereward(folder, seed=seed)
    if name == "hpsv2":
        return save_tiny_hpsv2(folder, seed=seed)
    raise ValueError(f"no tiny model for reward {name!r}")
