"""Latents to reward inputs: the pipeline's VAE decode, differentiable, with memory options.

The methods that read rewards at sampling time score decoded images: ``code`` and
``target`` the predicted x0 of their candidates (no gradient), ``rgg`` the predicted x0 of
the state, with the gradient of the weighted reward taken through the decoder back to the
latents. :func:`vae_decoder` builds that decode once per problem:

    images = (vae.decode(latents / scaling_factor + shift_factor) + 1) / 2, clamped to [0, 1]

(shift_factor 0 where the VAE's config has none, as SD's; SD3's and FLUX's have one; with
SDXL's ``latents_mean``/``latents_std`` where the VAE's config has them), as
diffusers' pipelines decode, returned as float32 (B, 3, H, W). The clamp has zero gradient
where a pixel is saturated, as in the pipelines' postprocessing.

Memory-saving options (:class:`DecodeOptions`), which matter most for ``rgg`` (the
decoder's activations are kept for the backward pass):

- ``dtype``: decode in this dtype (e.g. ``torch.float16`` on a GPU: about half the
  activation memory); a copy of the VAE in that dtype is made once when it differs from
  the VAE's own. Default: the VAE's dtype, but float32 where a float16 VAE's config asks
  for ``force_upcast`` (SDXL's VAE overflows in float16).
- ``slicing``: decode one image at a time (peak memory of one image's decode instead of
  the batch's; same images).
- ``tiling``: decode overlapping tiles (``AutoencoderKL.tiled_decode``) and blend them:
  bounded memory for large images; the images differ slightly at the seams.
- ``checkpointing``: when a gradient is taken, keep no decoder activations and recompute
  them in the backward pass (``torch.utils.checkpoint``): decoder activation memory of
  about one layer instead of all, for one more decoder forward; same values and gradient.
- ``scale``: resize the latents by this factor (bilinear) before decoding, so the reward
  sees an image ``scale`` times the full size on each side: the decode costs about
  ``scale**2`` of the full one. An approximation (a decoded downscaled latent is not the
  downscaled image); most reward models resize their input to 224 px anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..validation import check_number

__all__ = ["DecodeOptions", "vae_decoder"]


@dataclass(frozen=True)
class DecodeOptions:
    """How latents are decoded for the rewards (see the module docstring)."""

    dtype: torch.dtype | None = None  # decode dtype; None: the VAE's (float32 if force_upcast)
    slicing: bool = False  # one image at a time
    tiling: bool = False  # overlapping tiles, blended (large images)
    checkpointing: bool = False  # recompute decoder activations in the backward pass
    scale: float = 1.0  # latents resized by this factor before decoding (0 < scale <= 1)

    def __post_init__(self) -> None:
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        for name in ("slicing", "tiling", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_number(self.scale, "scale", low=0.0, high=1.0)
        if self.scale == 0:
            raise ValueError("scale must be in (0, 1], got 0")


def _decode_dtype(vae, options: DecodeOptions) -> torch.dtype:
    if options.dtype is not None:
        return options.dtype
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return vae.dtype


def _unscale(vae, z: Tensor) -> Tensor:
    """Latents in the VAE's own scale: z / scaling_factor (+ shift_factor: SD3, FLUX;
    SDXL: z std / sf + mean)."""
    cfg = vae.config
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
        return z * std / cfg.scaling_factor + mean
    return z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)  # SD3, FLUX


def vae_decoder(vae, options: DecodeOptions | None = None) -> Callable[[Tensor], Tensor]:
    """``latents (B, C, h, w) -> images (B, 3, H, W)`` float32 in [0, 1] through ``vae``,
    differentiable in the latents, with ``options`` (default :class:`DecodeOptions`)."""
    options = options or DecodeOptions()
    if not isinstance(options, DecodeOptions):
        raise TypeError(f"options must be a DecodeOptions, got {type(options).__name__}")
    if vae is None or not hasattr(vae, "decode"):
        raise ValueError("the pipeline has no VAE to decode latents for the rewards")
    dtype = _decode_dtype(vae, options)
    if dtype != vae.dtype:
        vae = copy.deepcopy(vae).to(dtype=dtype).eval().requires_grad_(False)

    def run(z: Tensor) -> Tensor:
        if options.tiling:
            return vae.tiled_decode(z, return_dict=False)[0]
        return vae.decode(z, return_dict=False)[0]

    def one(z: Tensor) -> Tensor:
        if options.checkpointing and torch.is_grad_enabled() and z.requires_grad:
            return checkpoint(run, z, use_reentrant=False)
        return run(z)

    def decode(latents: Tensor) -> Tensor:
        z = latents.to(dtype)
        if options.scale != 1.0:
            z = F.interpolate(z, scale_factor=options.scale, mode="bilinear", align_corners=False)
        z = _unscale(vae, z)
        parts = z.split(1) if options.slicing else (z,)
        images = torch.cat([one(p) for p in parts])
        return (images.float() / 2 + 0.5).clamp(0, 1)

    return decode
