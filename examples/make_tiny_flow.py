"""Write the tiny random models that examples/tiny-flow.toml names (seconds, no download).

    python examples/make_tiny_flow.py [FOLDER]     # default: examples/tiny-flow

FOLDER then holds, for each flow family (``sd3/`` and ``flux/``): ``base/`` (a tiny SD3 or
FLUX pipeline with tiny text encoders, so that prompts are text: SD3 two CLIPs and no T5,
FLUX a CLIP and a T5; 32 x 32 images), and two random LoRA experts of its transformer on
Flow-GRPO's layers, one a peft folder as Flow-GRPO publishes its LoRAs
(``expert-aesthetic/``), one a diffusers ``.safetensors`` file
(``expert-alignment.safetensors``). Beside them, tiny random reward models in their real
formats (``reward-aesthetic/``, ``reward-clipscore/``, ``judge-pickscore/``). The images
and scores mean nothing: the models exist to run the whole sweep and its report in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The families written, each in its own subfolder.
FAMILIES = ("sd3", "flux")


def make_tiny_flow(folder: str | Path) -> Path:
    """Write the tiny models into ``folder`` (created); returns it."""
    from msdda.sd.flow_testing import (
        save_flow_lora,
        save_tiny_flow_pipeline,
        tiny_flux_transformer,
        tiny_sd3_transformer,
    )
    from msdda.sd.testing import save_tiny_reward

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformers = {"sd3": tiny_sd3_transformer, "flux": tiny_flux_transformer}
    for family in FAMILIES:
        root = folder / family
        save_tiny_flow_pipeline(root / "base", family=family, seed=0, text_encoders=True)
        transformer = transformers[family](seed=0)  # the base's architecture (LoRA shapes)
        save_flow_lora(transformer, root / "expert-aesthetic", seed=1, std=0.05)
        save_flow_lora(
            transformer, root / "expert-alignment.safetensors", fmt="diffusers", family=family,
            seed=2, std=0.05,
        )  # fmt: skip
    save_tiny_reward("aesthetic", folder / "reward-aesthetic", seed=4)
    save_tiny_reward("clipscore", folder / "reward-clipscore", seed=5)
    save_tiny_reward("pickscore", folder / "judge-pickscore", seed=6)
    return folder


if __name__ == "__main__":
    default = Path(__file__).parent / "tiny-flow"
    out = make_tiny_flow(sys.argv[1] if len(sys.argv) > 1 else default)
    print(f"wrote the tiny models to {out}")
