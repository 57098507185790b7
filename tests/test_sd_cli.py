"""``msdda.sd.cli.generate_sd``: what ``msdda generate --base ...`` runs, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from msdda.sd import MSDDAStableDiffusionPipeline  # noqa: E402
from msdda.sd.cli import generate_sd, is_sdxl  # noqa: E402
from msdda.sd.testing import save_random_lora, save_tiny_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_pipeline(root / "base")
    unet = StableDiffusionPipeline.from_pretrained(base).unet
    return {
        "base": base,
        "dpo": save_tiny_pipeline(root / "dpo", unet_seed=1),
        "style": save_random_lora(unet, root / "style.safetensors", seed=3),
        "xl": save_tiny_pipeline(root / "xl", xl=True),
    }


def _args(disk, out, **kw):
    args = dict(
        base=str(disk["base"]),
        experts={"dpo": str(disk["dpo"]), "style": str(disk["style"])},
        weights={"dpo": 0.5, "style": 0.5},
        prompt="a red cube",
        out=out,
        steps=2,
    )
    args.update(kw)
    return args


def test_generate_writes_the_pipelines_image(disk, tmp_path):
    out = generate_sd(**_args(disk, tmp_path / "img.png", seed=3))
    assert out == tmp_path / "img.png"
    written = np.asarray(Image.open(out))
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(
        disk["base"], experts={"dpo": disk["dpo"], "style": disk["style"]}
    )
    expected = pipe(
        "a red cube",
        {"dpo": 0.5, "style": 0.5},
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    np.testing.assert_array_equal(written, np.asarray(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no temporary file left


def test_several_samples_are_tiled_into_a_grid(disk, tmp_path):
    out = generate_sd(**_args(disk, tmp_path / "grid.png", num_samples=4))
    assert Image.open(out).size == (64, 64)  # 2 x 2 images of 32 x 32


def test_sdxl_bases_are_recognised(disk, tmp_path):
    assert is_sdxl(str(disk["xl"])) and not is_sdxl(str(disk["base"]))
    lora = save_random_lora(
        StableDiffusionPipeline.from_pretrained(disk["base"]).unet, tmp_path / "x.safetensors"
    )
    with pytest.raises(ValueError, match="another architecture|matches no layer"):
        generate_sd(
            **_args(
                disk,
                tmp_path / "x.png",
                base=str(disk["xl"]),
                experts={"s": str(lora)},
                weights={"s": 1.0},
            )
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"dpo": 0.5, "aesthetic": 0.5}}, "unknown expert"),
        ({"weights": {"dpo": -1.0}}, "non-negative"),
        ({"experts": {}}, "non-empty mapping"),
        ({"prompt": " "}, "prompt"),
        ({"steps": 0}, "steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"eta": -1.0}, "eta"),
        ({"kl_coef": 0.0}, "kl_coef"),
        ({"out": "image.gif"}, "image file"),
        ({"eta": 0.0}, "eta = 0"),
        ({"experts": {"dpo": "/no/such/folder", "style": "x"}}, "does not exist"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(disk, tmp_path, change, message):
    args = _args(disk, tmp_path / "img.png")
    args.update(change)
    if isinstance(args["out"], str):
        args["out"] = tmp_path / args["out"]
    with pytest.raises(ValueError, match=message):
        generate_sd(**args)
    assert not any(tmp_path.iterdir())  # nothing written
