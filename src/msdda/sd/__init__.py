"""MSDDA for Stable Diffusion through diffusers and peft (needs the ``sd`` extra).

- :class:`MSDDAStableDiffusionPipeline`, :class:`MSDDAStableDiffusionXLPipeline`: diffusers
  pipelines whose call fuses K experts (full UNets or LoRA adapters) at every step.
- :class:`LoRABank`: K LoRA experts of one base applied in one batched forward.
- :mod:`msdda.sd.rewards`: image rewards (aesthetic, PickScore, CLIP score, ...) with the
  signature ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``.
- :func:`msdda.sd.cli.generate_sd`: what ``msdda generate --base ...`` runs.
"""

from .lora import LORA_MODES, LoRABank, LoRAFactors, extract_lora_factors
from .pipeline import (
    GeneratorNoise,
    MSDDAStableDiffusionPipeline,
    MSDDAStableDiffusionXLPipeline,
    UNetConditioning,
)

__all__ = [
    "LORA_MODES",
    "GeneratorNoise",
    "LoRABank",
    "LoRAFactors",
    "MSDDAStableDiffusionPipeline",
    "MSDDAStableDiffusionXLPipeline",
    "UNetConditioning",
    "extract_lora_factors",
]
