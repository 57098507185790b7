"""A weight-conditioned LoRA student of a diffusers UNet, distilled from MSDDA.

:class:`UNetStudent` is the base UNet with a peft LoRA adapter on its attention
projections and a :class:`msdda.student.WeightEmbedding` of the preference weights added
to the timestep embedding (``unet.time_embedding``'s output, the vector every resnet
reads), its last layer zero, so the untrained student is the base bit for bit.
:func:`unet_distillation_problem` poses the distillation for
:func:`msdda.student.distill`: MSDDA over expert UNets (one step spec, their own betas)
teaches the student at states visited by both, conditions being text-encoder hidden
states (B, L, D) drawn from a given set. Runs on any device (``device=``); the recipe is
in ``docs/student.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..experts import Expert, expert_policy, msdda_step
from ..gaussians import Schedule, StepSpec, step_gaussian
from ..student import DistillationProblem, WeightEmbedding
from ..validation import check_int

__all__ = ["UNetStudent", "unet_denoiser", "unet_distillation_problem", "ATTENTION_TARGETS"]

#: The attention projections the LoRA adapts (diffusers' names).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class _PlusWeights(nn.Module):
    """``time_embedding`` followed by + the current weight embedding (set per forward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.extra: Tensor | None = None

    def forward(self, *args, **kwargs) -> Tensor:
        emb = self.inner(*args, **kwargs)
        return emb if self.extra is None else emb + self.extra.to(emb.dtype)


class UNetStudent(nn.Module):
    """``(x_t, t (B,), encoder_hidden_states, weights (B, K)) -> epsilon``: a LoRA student."""

    def __init__(
        self,
        unet: nn.Module,
        num_objectives: int,
        *,
        rank: int = 4,
        alpha: float = 4.0,
        embed_hidden: int = 64,
        targets: Sequence[str] = ATTENTION_TARGETS,
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__()
        check_int(rank, "rank", low=1)
        unet.requires_grad_(False)
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), unet
        )
        dim = unet.time_embedding.linear_2.out_features
        self.plus = _PlusWeights(unet.time_embedding)
        unet.time_embedding = self.plus
        self.unet = unet
        self.weight_embedding = WeightEmbedding(num_objectives, dim, embed_hidden)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, weights: Tensor) -> Tensor:
        self.plus.extra = self.weight_embedding(weights.to(x_t.device))
        try:
            return self.unet(x_t, t, encoder_hidden_states=cond).sample
        finally:
            self.plus.extra = None


def unet_denoiser(unet: nn.Module):
    """A UNet as a msdda denoiser ``(x_t, t, encoder_hidden_states) -> epsilon``."""
    return lambda x_t, t, cond: unet(x_t, t, encoder_hidden_states=cond).sample


def unet_distillation_problem(
    student: UNetStudent,
    experts: Sequence[Expert],
    schedule: Schedule,
    sample_shape: Sequence[int],
    prompts: Tensor,
    *,
    spec: StepSpec | None = None,
    device: torch.device | str = "cpu",
) -> DistillationProblem:
    """MSDDA over ``experts`` teaching ``student``; ``prompts`` (P, L, D) are the text
    encoder's hidden states, drawn uniformly per chain."""
    spec = spec or experts[0].spec
    betas = [e.kl_coef for e in experts]

    def teacher(w, cond):
        policies = [expert_policy(e, schedule, cond) for e in experts]
        return msdda_step(policies, w, kl_coefs=betas)

    def student_step(x_t, t, cond, weights):
        return step_gaussian(student(x_t, t, cond, weights), x_t, t, schedule, spec)

    def draw_cond(n, g):
        return prompts[torch.randint(0, prompts.shape[0], (n,), generator=g)].to(device)

    return DistillationProblem(
        schedule=schedule,
        num_objectives=len(experts),
        sample_shape=tuple(sample_shape),
        teacher=teacher,
        student=student_step,
        draw_cond=draw_cond,
        parameters=[p for p in student.parameters() if p.requires_grad],
        device=device,
    )
