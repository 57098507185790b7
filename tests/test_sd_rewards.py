"""Image rewards on tiny random CLIP models saved to disk and loaded back offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPImageProcessor, CLIPModel  # noqa: E402

from msdda.errors import InputFileError  # noqa: E402
from msdda.sd.rewards import (  # noqa: E402
    CLIPScore,
    ImageContract,
    LaionAesthetic,
    PickScore,
    load_aesthetic_head,
    load_reward,
    score_mlp,
)
from msdda.sd.testing import save_tiny_clip, tiny_clip_tokenizer  # noqa: E402

torch.set_num_threads(1)
PROJ = 12


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP model, its tokenizer and image processor (32 px), saved like a hub repo."""
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder, projection_dim=PROJ)
    return folder


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (3, 3, 32, 32), generator=g) / 255.0).float()  # 8-bit images


PROMPTS = ["a cat", "a dog", "a red cube"]


def _reference_embeddings(folder, images, prompts):
    """CLIP embeddings the plain transformers way (processor + model)."""
    model = CLIPModel.from_pretrained(folder)
    proc = CLIPImageProcessor.from_pretrained(folder)
    tok = tiny_clip_tokenizer()
    pixels = proc(
        images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt", do_rescale=False
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels.pixel_values)
        ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")
        txt = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return model, F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_preprocessing_matches_clips_image_processor(clip_dir, images):
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    ref = proc(
        images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt", do_rescale=False
    )
    ours = ImageContract.from_folder(clip_dir)(images)
    torch.testing.assert_close(ours, ref.pixel_values, atol=1e-4, rtol=1e-4)


def test_preprocessing_resizes_and_center_crops():
    pre = ImageContract(size=8, crop=8)
    out = pre(torch.rand(2, 3, 16, 32))
    assert out.shape == (2, 3, 8, 8)


def test_clip_score_is_100_times_the_cosine(clip_dir, images):
    reward = CLIPScore.from_pretrained(clip_dir)
    _, img, txt = _reference_embeddings(clip_dir, images, PROMPTS)
    with torch.no_grad():
        got = reward(images, PROMPTS)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, 100 * (img * txt).sum(-1), atol=1e-3, rtol=1e-4)


def test_pickscore_is_the_logit_scaled_cosine(clip_dir, images):
    reward = PickScore.from_pretrained(clip_dir, processor=clip_dir)
    model, img, txt = _reference_embeddings(clip_dir, images, PROMPTS)
    with torch.no_grad():
        got = reward(images, PROMPTS)
    torch.testing.assert_close(
        got, model.logit_scale.exp() * (img * txt).sum(-1), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_score_is_the_mlp_of_the_normalised_embedding(clip_dir, images, tmp_path, suffix):
    torch.manual_seed(1)
    head = score_mlp([PROJ, 32, 16, 8, 4])
    state = {f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}
    path = tmp_path / f"head{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    reward = LaionAesthetic.from_pretrained(clip_dir, head=path)
    _, img, _ = _reference_embeddings(clip_dir, images, PROMPTS)
    with torch.no_grad():
        got = reward(images, None)
        expected = head.eval()(img).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rewards_are_differentiable_in_the_images(clip_dir, images):
    reward = CLIPScore.from_pretrained(clip_dir)
    x = images.clone().requires_grad_(True)
    reward(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_inputs_are_checked(clip_dir, images):
    reward = CLIPScore.from_pretrained(clip_dir)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(images[:, :1], PROMPTS)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        reward(images, PROMPTS[:2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        reward(images.numpy(), PROMPTS)
    assert reward(images, "one prompt for all").shape == (3,)


def test_absent_weights_say_what_to_download(tmp_path):
    with pytest.raises(ValueError, match=r"hf download openai/clip-vit-large-patch14"):
        CLIPScore.from_pretrained(cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"hf download yuvalkirstain/PickScore_v1"):
        PickScore.from_pretrained(cache_dir=tmp_path)
    with pytest.raises(InputFileError, match="no such aesthetic head"):
        load_aesthetic_head(tmp_path / "head.safetensors")
    (tmp_path / "head.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputFileError, match="head.pth"):
        load_aesthetic_head(tmp_path / "head.pth")


def test_aesthetic_head_must_fit_the_clip_model(clip_dir, tmp_path):
    head = score_mlp([PROJ + 1, 8, 8, 8, 4])
    save_file({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="embeddings"):
        LaionAesthetic.from_pretrained(clip_dir, head=tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="score head needs 5 widths"):
        score_mlp([1, 2])


def test_reward_registry(clip_dir):
    assert isinstance(load_reward("clipscore", clip_dir), CLIPScore)
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("beauty")
