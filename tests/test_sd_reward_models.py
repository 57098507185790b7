"""ImageReward and HPSv2 written on transformers, checked against the originals' maths.

Tiny random models of the real architectures are saved in the real checkpoint formats
(original key names, ``torch.save`` of a plain dict) by :mod:`msdda.sd.testing`, loaded
through the real loading code, and scored against a forward pass written here by hand
from the checkpoint's own tensors, following BLIP's ``vit.py``/``med.py`` and OpenCLIP's
``transformer.py`` (fused in-projections, ``x @ proj``), not through the key conversion.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from msdda.errors import InputFileError  # noqa: E402
from msdda.sd.hpsv2 import (  # noqa: E402
    HPSv2Score,
    convert_open_clip_state,
    original_open_clip_state,
)
from msdda.sd.imagereward import (  # noqa: E402
    IMAGEREWARD_KEYS,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardScore,
    convert_imagereward_state,
)
from msdda.sd.rewards import REWARDS, load_reward  # noqa: E402
from msdda.sd.testing import save_tiny_reward  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a cat on a mat", "two red cubes", "a dog"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> folder of a tiny model of every reward, in its real format."""
    return {n: save_tiny_reward(n, tmp_path_factory.mktemp(n)) for n in REWARDS}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 32, 32, generator=g)


def _ln(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _lin(x, state, prefix):
    return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def _attend(q, k, v, heads, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v over ``heads`` heads; (B, N, D) in and out."""
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def _blip_vit(state, pixels):
    """BLIP's VisionTransformer (timm layout) from ``blip.visual_encoder.*``."""
    s = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items()}
    w = s["patch_embed.proj.weight"]
    x = (
        F.conv2d(pixels, w, s["patch_embed.proj.bias"], stride=w.shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["pos_embed"]
    heads = w.shape[0] // 64
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        h = _ln(x, s, f"blocks.{i}.norm1", 1e-6)
        q, k, v = _lin(h, s, f"blocks.{i}.attn.qkv").chunk(3, -1)
        x = x + _lin(_attend(q, k, v, heads), s, f"blocks.{i}.attn.proj")
        h = F.gelu(_lin(_ln(x, s, f"blocks.{i}.norm2", 1e-6), s, f"blocks.{i}.mlp.fc1"))
        x = x + _lin(h, s, f"blocks.{i}.mlp.fc2")
    return _ln(x, s, "norm", 1e-6)


def _med_bert(state, med, ids, mask, image_tokens):
    """BLIP's med.py BertModel in "multimodal" mode from ``blip.text_encoder.*``."""
    s = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()}
    eps, heads = med["layer_norm_eps"], med["num_attention_heads"]
    x = s["embeddings.word_embeddings.weight"][ids]
    x = _ln(
        x + s["embeddings.position_embeddings.weight"][: ids.shape[1]],
        s,
        "embeddings.LayerNorm",
        eps,
    )
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        for part, kv, m in (("attention", x, pad), ("crossattention", image_tokens, None)):
            p = f"encoder.layer.{i}.{part}"
            q, k, v = (
                _lin(t, s, f"{p}.self.{n}") for t, n in ((x, "query"), (kv, "key"), (kv, "value"))
            )
            x = _ln(
                _lin(_attend(q, k, v, heads, m), s, f"{p}.output.dense") + x,
                s,
                f"{p}.output.LayerNorm",
                eps,
            )
        h = F.gelu(_lin(x, s, f"encoder.layer.{i}.intermediate.dense"))
        x = _ln(
            _lin(h, s, f"encoder.layer.{i}.output.dense") + x,
            s,
            f"encoder.layer.{i}.output.LayerNorm",
            eps,
        )
    return x


def _imagereward_by_hand(folder, images, prompts, tokenizer):
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tok = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    tokens = _blip_vit(state, (images - mean) / std)
    feature = _med_bert(state, med, tok.input_ids, tok.attention_mask, tokens)[:, 0]
    for i in (0, 2, 4, 6, 7):
        feature = _lin(feature, state, f"mlp.layers.{i}")
    return (feature.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_matches_blip_written_by_hand(saved, images):
    reward = load_reward("imagereward", saved["imagereward"])
    assert isinstance(reward, ImageRewardScore) and reward.contract.crop == 32
    with torch.no_grad():
        got = reward(images, PROMPTS)
        expected = _imagereward_by_hand(saved["imagereward"], images, PROMPTS, reward.tokenizer)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert expected.std() > 0.05  # the tiny model tells the inputs apart
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (IMAGEREWARD_MEAN, IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_imagereward_key_conversion_round_trips_every_key(saved):
    state = torch.load(saved["imagereward"] / "ImageReward.pt", weights_only=True)
    ours = convert_imagereward_state(state)
    reward = load_reward("imagereward", saved["imagereward"])
    assert set(ours) == set(reward.model.state_dict())
    dropped = {k for k in state if IMAGEREWARD_KEYS.dropped(k)}
    assert dropped == {
        "blip.text_encoder.embeddings.position_ids",
        *(f"blip.{n}.{p}" for n in ("vision_proj", "text_proj") for p in ("weight", "bias")),
    }
    assert {IMAGEREWARD_KEYS.backward(k) for k in ours} == set(state) - dropped
    for key in set(state) - dropped:
        assert torch.equal(ours[IMAGEREWARD_KEYS.forward(key)], state[key])


def _open_clip_tower(s, x, prefix, heads, mask=None):
    depth = len(
        {
            k.split(".")[len(prefix.split(".")) + 1]
            for k in s
            if k.startswith(f"{prefix}transformer.")
        }
    )
    for i in range(depth):
        p = f"{prefix}transformer.resblocks.{i}"
        h = _ln(x, s, f"{p}.ln_1", 1e-5).transpose(0, 1)  # (N, B, D), as nn.MultiheadAttention
        a, _ = F.multi_head_attention_forward(
            h, h, h, h.shape[-1], heads, s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"],
            None, None, False, 0.0, s[f"{p}.attn.out_proj.weight"], s[f"{p}.attn.out_proj.bias"],
            need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + a.transpose(0, 1)
        x = x + _lin(
            F.gelu(_lin(_ln(x, s, f"{p}.ln_2", 1e-5), s, f"{p}.mlp.c_fc")), s, f"{p}.mlp.c_proj"
        )
    return x


def _hps_by_hand(folder, images, ids):
    """OpenCLIP's CLIP.forward (normalised features) and hpsv2's diagonal of their products."""
    s = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    w = s["visual.conv1.weight"]
    x = F.conv2d((images - mean) / std, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
        + s["visual.positional_embedding"]
    )
    x = _open_clip_tower(
        s, _ln(x, s, "visual.ln_pre", 1e-5), "visual.", v["width"] // v["head_width"]
    )
    img = _ln(x[:, 0], s, "visual.ln_post", 1e-5) @ s["visual.proj"]
    n = ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    x = _ln(_open_clip_tower(s, x, "", t["heads"], causal), s, "ln_final", 1e-5)
    txt = x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ s["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def test_hpsv2_matches_open_clip_written_by_hand(saved, images):
    reward = load_reward("hpsv2", saved["hpsv2"])
    assert isinstance(reward, HPSv2Score) and reward.contract.resize == "pad"
    tok = reward.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    ids = tok.input_ids * tok.attention_mask  # OpenCLIP pads with 0
    with torch.no_grad():
        got = reward(images, PROMPTS)
        expected = _hps_by_hand(saved["hpsv2"], images, ids)
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got.abs().max() <= 1.0  # a cosine: no logit scale, no factor 100


def test_open_clip_key_conversion_round_trips_every_key(saved):
    state = torch.load(saved["hpsv2"] / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    ours = convert_open_clip_state(state)
    assert set(ours) == set(load_reward("hpsv2", saved["hpsv2"]).model.state_dict())
    back = original_open_clip_state(ours)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    assert (
        convert_open_clip_state({f"module.{k}": v for k, v in state.items()}).keys() == ours.keys()
    )


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_scores_batches_and_is_differentiable(saved, name):
    reward = load_reward(name, saved[name])
    assert reward.name == name and not any(p.requires_grad for p in reward.parameters())
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.isfinite().all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():  # each image is scored on its own
        alone = torch.stack([reward(x[i : i + 1], PROMPTS[i]) for i in range(3)]).squeeze(-1)
    torch.testing.assert_close(alone, scores.detach(), atol=1e-4, rtol=1e-4)
    assert str(reward.contract.crop) in reward.contract.describe()


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_checks_its_contract(saved, name):
    reward = load_reward(name, saved[name])
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        reward(x * 2 - 1, ["a", "b"])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        reward(torch.full_like(x, float("nan")), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(x[:, :1], ["a", "b"])
    with pytest.raises(TypeError, match="floating point"):
        reward((x * 255).to(torch.uint8), ["a", "b"])
    if reward.contract.prompts:
        with pytest.raises(ValueError, match="1 prompts for 2 images"):
            reward(x, ["a"])


def test_pad_preprocessing_is_open_clips_resize_max_size():
    from msdda.sd.reward_base import ImageContract

    pre = ImageContract(8, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "pad")
    x = torch.rand(1, 3, 4, 16)  # longer side 16 -> 8: 2 x 8, padded 3 rows above and below
    out = pre(x)
    assert out.shape == (1, 3, 8, 8)
    assert out[..., :3, :].abs().max() == 0 and out[..., 5:, :].abs().max() == 0
    expected = F.interpolate(x, size=(2, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(out[..., 3:5, :], expected)


def test_bad_checkpoints_are_one_input_file_error(saved, tmp_path):
    import shutil

    folder = tmp_path / "ir"
    shutil.copytree(saved["imagereward"], folder)
    pt = folder / "ImageReward.pt"
    pt.write_bytes(pt.read_bytes()[:1000])  # truncated
    with pytest.raises(InputFileError, match="ImageReward.pt"):
        load_reward("imagereward", folder)
    torch.save({"model": torch.nn.Linear(2, 2)}, pt)  # pickles an object
    with pytest.raises(InputFileError, match="not a plain state dict"):
        load_reward("imagereward", folder)
    torch.save({"blip.unknown": torch.zeros(1), "something.else": torch.zeros(1)}, pt)
    with pytest.raises(InputFileError, match="ImageReward.pt"):
        load_reward("imagereward", folder)
    (folder / "med_config.json").write_text("{not json")
    shutil.copy(saved["imagereward"] / "ImageReward.pt", pt)
    with pytest.raises(InputFileError, match="med_config.json"):
        load_reward("imagereward", folder)
    with pytest.raises(InputFileError, match="no such hpsv2 file or folder"):
        load_reward("hpsv2", tmp_path / "nothing.pt")
    bad = tmp_path / "hps"
    shutil.copytree(saved["hpsv2"], bad)
    torch.save({"state_dict": {"visual.what": torch.zeros(1)}}, bad / "HPS_v2.1_compressed.pt")
    with pytest.raises(InputFileError, match="unknown keys"):
        load_reward("hpsv2", bad)


def test_absent_hub_weights_say_what_to_download(tmp_path):
    with pytest.raises(InputFileError, match=r"hf download THUDM/ImageReward ImageReward.pt"):
        load_reward("imagereward", cache_dir=tmp_path)
    with pytest.raises(InputFileError, match=r"hf download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        load_reward("hpsv2", cache_dir=tmp_path)
    with pytest.raises(InputFileError, match=r"hf download camenduru/improved-aesthetic-predictor"):
        load_reward("aesthetic", tmp_path, cache_dir=tmp_path)


def test_registry_refuses_unknown_names_and_dtypes(saved):
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        load_reward("beauty")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_reward("clipscore", saved["clipscore"], dtype=torch.int8)
    for name in ("hpsv2", "imagereward"):
        half = load_reward(name, saved[name], dtype=torch.bfloat16)
        assert half(torch.rand(1, 3, 32, 32), "a cat").dtype == torch.float32


def test_the_released_architectures_have_their_published_sizes():
    from transformers import CLIPModel

    from msdda.sd.hpsv2 import VIT_H_14, clip_config_from_open_clip
    from msdda.sd.imagereward import blip_vision_config

    class ClipTokens:  # OpenCLIP's special tokens
        bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 0

    with torch.device("meta"):
        clip = CLIPModel(clip_config_from_open_clip(VIT_H_14, ClipTokens))
    # open_clip's docs/model_profile.csv: ViT-H-14, 986.11 M parameters
    assert round(sum(p.numel() for p in clip.parameters()) / 1e6, 2) == 986.11
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    state = {"blip.visual_encoder.patch_embed.proj.weight": meta(1024, 3, 16, 16)}
    state["blip.visual_encoder.pos_embed"] = meta(1, 197, 1024)
    state.update(
        {f"blip.visual_encoder.blocks.{i}.mlp.fc1.weight": meta(4096, 1024) for i in range(24)}
    )
    vit = blip_vision_config(state, "ImageReward.pt")  # BLIP's ViT-L/16 at 224 px
    assert (vit.image_size, vit.patch_size, vit.num_hidden_layers, vit.num_attention_heads) == (
        224,
        16,
        24,
        16,
    )


def test_a_bad_open_clip_config_names_its_file(saved, tmp_path):
    import shutil

    folder = tmp_path / "hps"
    shutil.copytree(saved["hpsv2"], folder)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_huge"
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFileError, match=r"open_clip_config.json.*unsupported options"):
        load_reward("hpsv2", folder)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(InputFileError, match="not an OpenCLIP config"):
        load_reward("hpsv2", folder)
