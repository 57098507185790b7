"""The README's Python example runs as written (on tiny random UNets)."""

import re
from pathlib import Path

import torch

from msdda.sd.testing import TinySDConfig, tiny_unet

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("num_inference_steps=50", "num_inference_steps=3")  # keep it quick
    latent = TinySDConfig(sample_size=64)
    scope = {
        "unet_a": tiny_unet(latent, seed=0),
        "unet_b": tiny_unet(latent, seed=1),
        "cond": torch.randn(16, 3, latent.cross_attention_dim),
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
