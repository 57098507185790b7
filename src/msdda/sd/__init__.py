"""MSDDA for Stable Diffusion through diffusers and peft (needs the ``sd`` extra).

- :class:`MSDDAStableDiffusionPipeline`, :class:`MSDDAStableDiffusionXLPipeline`: diffusers
  pipelines whose call fuses K experts (full UNets or LoRA adapters) at every step, or
  samples with another method of :mod:`msdda.methods` (``method="db"``, ``"rs"``, ...).
- :mod:`msdda.sd.denoisers`: a diffusers UNet (with its own guidance and LoRA slot) as a
  msdda denoiser, and the joint denoiser of the base UNet's LoRA experts.
- :class:`LoRABank`: K LoRA experts of one base applied in one batched forward
  (:mod:`msdda.lora`).
- :mod:`msdda.sd.rewards`: image rewards (aesthetic, PickScore, CLIP score, ...) with the
  signature ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``.
- :func:`msdda.sd.cli.generate_sd`: what ``msdda generate --base ...`` runs.
"""

from ..lora import LORA_MODES, LoRABank, LoRAFactors, extract_lora_factors
from ..sampling import GeneratorNoise
from .denoisers import JointUNetDenoiser, SDConditioning, UNetConditioning, UNetDenoiser
from .pipeline import MSDDAStableDiffusionPipeline, MSDDAStableDiffusionXLPipeline
from .plan import SD_METHODS

__all__ = [
    "LORA_MODES",
    "SD_METHODS",
    "GeneratorNoise",
    "JointUNetDenoiser",
    "LoRABank",
    "LoRAFactors",
    "MSDDAStableDiffusionPipeline",
    "MSDDAStableDiffusionXLPipeline",
    "SDConditioning",
    "UNetConditioning",
    "UNetDenoiser",
    "extract_lora_factors",
]
