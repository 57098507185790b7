"""A flow-matching transformer (SD3, FLUX) as a msdda denoiser: its conditioning and guidance.

The denoisers, the joint denoiser and the batched LoRA forward are Stable Diffusion's
(:mod:`msdda.sd.denoisers`): :func:`~msdda.sd.denoisers.unet_forward` runs one forward of
the base model over one group of the batch per member, each group with its LoRA slot,
and asks the groups' conditioning how to call the model. A
:class:`TransformerConditioning` is that conditioning for a diffusers transformer:

- SD3 (``SD3Transformer2DModel``): ``encoder_hidden_states`` (B, L, D) and
  ``pooled_projections`` (B, P), with the B unconditional rows first when classifier-free
  guidance is on (each member's own guidance scale, as for SD); ``timestep`` is the
  scheduler's t = 1000 sigma.
- FLUX (``FluxTransformer2DModel``): the same, no unconditional rows, plus ``txt_ids`` /
  ``img_ids`` (shared by every sample) and, for guidance-distilled models (FLUX-dev), a
  ``guidance`` value per row: each member's own distilled guidance, so LoRA experts
  with different guidance values still run in one forward; ``timestep`` is t / 1000.

The model output is the velocity v = eps - x0 of diffusers' rectified flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from diffusers import FluxPipeline
from torch import Tensor, nn

from .denoisers import SDConditioning, _rows

__all__ = ["TransformerConditioning", "with_member_guidance"]


@dataclass(frozen=True)
class TransformerConditioning:
    """What a flow transformer needs beside (x, t) for one model's group of the batch.

    ``batched``: keyword -> (G, ...) tensor, one row per sample (the B unconditional rows
    then the B conditional rows when ``cfg``); ``shared``: keyword -> tensor common to every
    sample (FLUX's ``txt_ids``, ``img_ids``); ``model_timesteps``: the call's
    :meth:`msdda.gaussians.FlowSchedule.model_timesteps`, the loop's (G,) long step keys ->
    the scheduler's timesteps t = 1000 sigma, which are divided by ``timestep_divisor``
    (1 for SD3, 1000 for FLUX, as diffusers' pipelines do) before the model reads them;
    ``packed``: the model reads (G, C, h, w) latents as (G, hw/4, 4C) 2x2 patches (FLUX).
    """

    batched: Mapping[str, Tensor]
    cfg: bool
    model_timesteps: Callable[[Tensor], Tensor]
    shared: Mapping[str, Tensor] = field(default_factory=dict)
    timestep_divisor: float = 1.0
    packed: bool = False

    @property
    def batch_size(self) -> int:
        rows = next(iter(self.batched.values())).shape[0]
        return rows // (2 if self.cfg else 1)

    def select(self, rows: Tensor) -> TransformerConditioning:
        """The conditioning of samples ``rows`` (a (b,) long tensor) of the batch."""
        b = self.batch_size
        return replace(
            self, batched={k: _rows(v, rows, b, self.cfg) for k, v in self.batched.items()}
        )

    def repeat(self, n: int) -> TransformerConditioning:
        """The conditioning of ``n`` stacked copies of the batch (copy-major)."""
        return self.select(torch.arange(self.batch_size).repeat(n))

    @staticmethod
    def concat(conds: Sequence[TransformerConditioning]) -> TransformerConditioning:
        """One conditioning for a batch of len(conds) groups, group after group."""
        first = conds[0]
        batched = {k: torch.cat([c.batched[k] for c in conds]) for k in first.batched}
        return replace(first, batched=batched)

    def forward(self, model: nn.Module, x_in: Tensor, t_in: Tensor) -> Tensor:
        """The transformer's raw output for ``x_in`` (G, ...) at the loop's step keys ``t_in`` (G,)."""
        timestep = self.model_timesteps(t_in) / self.timestep_divisor
        if self.packed:  # FLUX's pipeline casts the timestep to the latents' dtype; SD3's does not
            timestep = timestep.to(x_in.dtype)
        g, c, h, w = x_in.shape
        x = FluxPipeline._pack_latents(x_in, g, c, h, w) if self.packed else x_in
        out = model(
            hidden_states=x, timestep=timestep, **self.batched, **self.shared, return_dict=False
        )[0]
        return FluxPipeline._unpack_latents(out, h, w, 1) if self.packed else out

    def with_guidance(self, value: float) -> TransformerConditioning:
        """The conditioning with FLUX-dev's distilled guidance ``value`` on every row."""
        rows = next(iter(self.batched.values()))
        g = torch.full((rows.shape[0],), float(value), device=rows.device, dtype=torch.float32)
        return replace(self, batched={**self.batched, "guidance": g})


def with_member_guidance(
    cond: SDConditioning, guidance: Mapping, members: Sequence
) -> SDConditioning:
    """``cond`` with each member's distilled guidance value (``guidance[m]``; member None is
    the reference, whose conditioning is the shared one) in its own conditioning."""
    own = {m: cond.of(m).with_guidance(guidance[m]) for m in members if m is not None}
    return replace(cond, shared=cond.shared.with_guidance(guidance[None]), own=own)
