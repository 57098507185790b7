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

Importing it prints nothing: transformers' notice that its image processors fall back to
their PIL versions without torchvision (diffusers imports them; msdda's own rewards
need no torchvision) is dropped, and only that notice.
"""

import logging as _logging


class _DropTorchvisionFallback(_logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling
    back to `XImageProcessorPil`" notice; every other record passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("requires torchvision (not installed)" in text and "falling back" in text)


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())

# after the filter, which must be in place before diffusers imports transformers
from ..lora import LORA_MODES, LoRABank, LoRAFactors, extract_lora_factors  # noqa: E402
from ..sampling import GeneratorNoise  # noqa: E402
from .denoisers import (  # noqa: E402
    JointUNetDenoiser,
    SDConditioning,
    UNetConditioning,
    UNetDenoiser,
)
from .pipeline import MSDDAStableDiffusionPipeline, MSDDAStableDiffusionXLPipeline  # noqa: E402
from .plan import SD_METHODS  # noqa: E402

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
