"""Write the tiny random models that examples/tiny-sd.toml names (seconds, no download).

    python examples/make_tiny_sd.py [FOLDER]     # default: examples/tiny

FOLDER then holds: ``base/`` (a tiny SD 1.x pipeline: 8-16 channel UNet, 32 x 32 images),
two random LoRA experts of it (``expert-aesthetic.safetensors``, ``expert-alignment.safetensors``),
a random LoRA standing for the oracle trained at weights (0.5, 0.5) (``oracle-0.5.safetensors``),
and tiny random reward models in their real formats (``reward-aesthetic/``,
``reward-clipscore/``, ``judge-pickscore/``). The images and scores mean nothing: the
models exist to run the whole sweep, its report and ``msdda rescore`` in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_tiny_sd(folder: str | Path) -> Path:
    """Write the tiny models into ``folder`` (created); returns it."""
    from msdda.sd.testing import (
        save_random_lora,
        save_tiny_pipeline,
        save_tiny_reward,
        tiny_sd_components,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_pipeline(folder / "base", seed=0)
    unet = tiny_sd_components(seed=0)["unet"]
    for name, seed in (("expert-aesthetic", 1), ("expert-alignment", 2), ("oracle-0.5", 3)):
        save_random_lora(unet, folder / f"{name}.safetensors", seed=seed, std=0.05)
    save_tiny_reward("aesthetic", folder / "reward-aesthetic", seed=4)
    save_tiny_reward("clipscore", folder / "reward-clipscore", seed=5)
    save_tiny_reward("pickscore", folder / "judge-pickscore", seed=6)
    return folder


if __name__ == "__main__":
    out = make_tiny_sd(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "tiny")
    print(f"wrote the tiny models to {out}")
