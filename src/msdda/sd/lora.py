"""LoRA experts of one base UNet: :mod:`msdda.lora`, the one LoRA implementation.

Stable Diffusion's adapters are read from peft's layers (:func:`extract_lora_factors`)
after diffusers loaded them, and run together through :class:`LoRABank`; nothing here
is specific to diffusers any more, so this module re-exports the core's names.
"""

from __future__ import annotations

from ..lora import LORA_MODES, LoRABank, LoRAFactors, extract_lora_factors, lora_delta_weight

__all__ = [
    "LORA_MODES",
    "LoRAFactors",
    "LoRABank",
    "extract_lora_factors",
    "lora_delta_weight",
]
