"""The README's Python example runs as written (on tiny random UNets)."""

import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

README = Path(__file__).resolve().parents[1] / "README.md"


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def test_the_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("num_inference_steps=50", "num_inference_steps=3")  # keep it quick
    torch.manual_seed(0)
    scope = {
        "unet_a": _tiny_unet(),
        "unet_b": _tiny_unet(),
        "cond": torch.randn(16, 3, 8),
        "means": [torch.randn(5), torch.randn(5)],
        "variances": [torch.rand(5) + 0.5, torch.rand(5) + 0.5],
        "weights": [0.5, 0.5],
        "ref_mean": torch.randn(5),
        "ref_var": torch.ones(5),
    }
    with torch.no_grad():
        exec(compile(code, str(README), "exec"), scope)
    assert scope["x0"].shape == (16, 4, 64, 64)
    assert torch.isfinite(scope["x0"]).all()
    assert scope["g"].mean.shape == (5,) and bool((scope["g"].variance > 0).all())
