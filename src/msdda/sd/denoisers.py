"""A diffusers UNet as a msdda denoiser: its conditioning, its guidance, its LoRA slot.

A denoiser is ``(x_t (B, C, h, w), t (B,) long, cond) -> model output (B, C', h, w)``.
Here ``cond`` is an :class:`SDConditioning`, the encoded prompt of the batch (with its
unconditional rows when classifier-free guidance is on), one per member where a
text-encoder LoRA gives an expert its own. :class:`UNetDenoiser` runs one model: a
full UNet, or the base UNet with one adapter slot of a :class:`~msdda.lora.LoRABank`,
and applies that model's own guidance scale. :class:`JointUNetDenoiser` evaluates a
group of members together (a :class:`msdda.JointDenoiser`): the base UNet's members
(LoRA experts run ``batched``, and the reference, member ``None``) in ONE forward over
a batch of one group per member; every other member by its own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor, nn

from ..experts import Member
from ..lora import LoRABank

__all__ = [
    "UNetConditioning",
    "SDConditioning",
    "Guidance",
    "apply_guidance",
    "unet_forward",
    "UNetDenoiser",
    "JointUNetDenoiser",
]


def _rows(t: Tensor, rows: Tensor, batch: int, cfg: bool) -> Tensor:
    """Rows ``rows`` of a (B, ...) tensor, or of both halves of an (unconditional; conditional)
    (2B, ...) one when ``cfg``."""
    rows = rows.to(t.device)
    return torch.cat([t[rows], t[batch + rows]]) if cfg else t[rows]


@dataclass(frozen=True)
class UNetConditioning:
    """What the UNet needs beside (x_t, t) for one model's group of the batch.

    ``encoder_hidden_states`` (G, L, D) and every ``added_cond_kwargs`` tensor (G, ...)
    hold the B unconditional rows then the B conditional rows when ``cfg``, else B rows.
    """

    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None
    cfg: bool

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0] // (2 if self.cfg else 1)

    def select(self, rows: Tensor) -> UNetConditioning:
        """The conditioning of samples ``rows`` (a (b,) long tensor) of the batch."""
        b = self.batch_size
        added = self.added_cond_kwargs
        if added is not None:
            added = {k: _rows(v, rows, b, self.cfg) for k, v in added.items()}
        return UNetConditioning(
            _rows(self.encoder_hidden_states, rows, b, self.cfg), added, self.cfg
        )

    def repeat(self, n: int) -> UNetConditioning:
        """The conditioning of ``n`` stacked copies of the batch (copy-major)."""
        return self.select(torch.arange(self.batch_size).repeat(n))

    @staticmethod
    def concat(conds: Sequence[UNetConditioning]) -> UNetConditioning:
        return concat_conditionings(conds)

    def forward(self, unet: nn.Module, x_in: Tensor, t_in: Tensor) -> Tensor:
        """The UNet's raw output for ``x_in`` (G, ...) at timesteps ``t_in`` (G,) long. (A flow
        transformer's conditioning, :mod:`msdda.sd.flow_denoisers`, calls its model its way.)"""
        return unet(
            x_in,
            t_in,
            encoder_hidden_states=self.encoder_hidden_states,
            added_cond_kwargs=self.added_cond_kwargs,
            return_dict=False,
        )[0]


def concat_conditionings(conds: Sequence[UNetConditioning]) -> UNetConditioning:
    """One conditioning for a batch of len(conds) groups, group after group."""
    ehs = torch.cat([c.encoder_hidden_states for c in conds])
    added = None
    if conds[0].added_cond_kwargs is not None:
        added = {
            k: torch.cat([c.added_cond_kwargs[k] for c in conds])
            for k in conds[0].added_cond_kwargs
        }
    return UNetConditioning(ehs, added, conds[0].cfg)


@dataclass(frozen=True)
class SDConditioning:
    """The encoded prompt of a batch, as each member sees it.

    ``shared``: through the text encoders as they stand (the reference's and every
    expert's without a text-encoder LoRA); ``own[i]``: expert i's, encoded with its
    text-encoder adapters. ``prompts``: the prompt string of each sample (what the
    rewards read), kept aligned with the rows by :meth:`select` and :meth:`repeat`; None
    when the batch was given as embeddings.
    """

    shared: UNetConditioning
    own: Mapping[int, UNetConditioning] = field(default_factory=dict)
    prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompts is None:
            return
        prompts = tuple(self.prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings, one per sample")
        if len(prompts) != self.shared.batch_size:
            raise ValueError(
                f"{len(prompts)} prompts for a batch of {self.shared.batch_size} samples"
            )
        object.__setattr__(self, "prompts", prompts)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on: every conditioning holds unconditional rows too."""
        return self.shared.cfg

    def of(self, member: Member) -> UNetConditioning:
        return self.own.get(member, self.shared) if member is not None else self.shared

    def select(self, rows: Tensor) -> SDConditioning:
        """The conditioning of samples ``rows`` (a (b,) long tensor) of the batch."""
        prompts = None
        if self.prompts is not None:
            prompts = tuple(self.prompts[i] for i in rows.tolist())
        return SDConditioning(
            self.shared.select(rows), {i: c.select(rows) for i, c in self.own.items()}, prompts
        )

    def repeat(self, n: int) -> SDConditioning:
        """The conditioning of ``n`` stacked copies of the batch (copy-major)."""
        return SDConditioning(
            self.shared.repeat(n),
            {i: c.repeat(n) for i, c in self.own.items()},
            None if self.prompts is None else self.prompts * n,
        )


@dataclass(frozen=True)
class Guidance:
    """A model's classifier-free guidance: scale, and diffusers' ``guidance_rescale``."""

    scale: float
    rescale: float = 0.0


def apply_guidance(raw: Tensor, cfg: bool, guidance: Guidance) -> Tensor:
    """The guided output from a UNet output (2B, ...) of (unconditional; conditional) rows,
    as diffusers' pipelines compute it; ``raw`` itself (B, ...) when ``cfg`` is off."""
    if not cfg:
        return raw
    uncond, cond = raw.chunk(2)
    out = uncond + guidance.scale * (cond - uncond)
    if guidance.rescale > 0:
        out = rescale_noise_cfg(out, cond, guidance_rescale=guidance.rescale)
    return out


def unet_forward(
    unet: nn.Module,
    x_t: Tensor,
    t: Tensor,
    conds: Sequence[UNetConditioning],
    bank: LoRABank | None = None,
    slots: Sequence[int | None] | None = None,
) -> list[Tensor]:
    """One UNet forward over len(conds) groups of ``x_t`` (B, ...) at ``t`` (B,); group j
    gets adapter ``slots[j]`` of ``bank`` (None: none). Returns each group's raw output
    ((2B, ...) with guidance rows, else (B, ...))."""
    cond = conds[0].concat(conds)
    reps = len(conds) * (2 if cond.cfg else 1)
    x_in = torch.cat([x_t.to(unet.dtype)] * reps)
    t_in = t.to(device=x_t.device, dtype=torch.long).repeat(reps)
    route = bank.route(list(slots)) if bank is not None and slots is not None else nullcontext()
    with route:
        out = cond.forward(unet, x_in, t_in)
    return list(out.chunk(len(conds)))


@dataclass(frozen=True, eq=False)
class UNetDenoiser:
    """One model as a msdda denoiser: ``model()``'s UNet with adapter ``slot`` of ``bank``
    (none when ``bank`` is None), reading ``cond.of(member)``, with its own guidance."""

    model: Callable[[], nn.Module]  # the UNet to run (a merged LoRA UNet is built on first use)
    member: Member
    guidance: Guidance
    bank: LoRABank | None = None
    slot: int | None = None

    def guide(self, raw: Tensor, cond: SDConditioning) -> Tensor:
        return apply_guidance(raw, cond.cfg, self.guidance)

    def __call__(self, x_t: Tensor, t: Tensor, cond: SDConditioning) -> Tensor:
        conds = [cond.of(self.member)]
        raw = unet_forward(self.model(), x_t, t, conds, self.bank, [self.slot])[0]
        return self.guide(raw, cond)


@dataclass(frozen=True, eq=False)
class JointUNetDenoiser:
    """Members evaluated together: those in ``batched`` (the base UNet's) in one forward of
    ``base`` with one group each, every other member by its own denoiser.

    ``denoisers[m]`` is member m's :class:`UNetDenoiser` (``None``: the reference); a member
    of ``batched`` must run on ``base`` with ``bank`` (its ``slot``, or no adapter).
    """

    base: nn.Module
    bank: LoRABank | None
    denoisers: Mapping[Member, UNetDenoiser]
    batched: frozenset[Member]

    def __call__(
        self, x_t: Tensor, t: Tensor, cond: SDConditioning, members: Sequence[Member]
    ) -> list[Tensor]:
        together = [m for m in members if m in self.batched]
        out: dict[Member, Tensor] = {}
        if together:
            ds = [self.denoisers[m] for m in together]
            conds = [cond.of(m) for m in together]
            raws = unet_forward(self.base, x_t, t, conds, self.bank, [d.slot for d in ds])
            out.update({m: d.guide(r, cond) for m, d, r in zip(together, ds, raws, strict=True)})
        for m in members:
            if m not in out:
                out[m] = self.denoisers[m](x_t, t, cond)
        return [out[m] for m in members]
