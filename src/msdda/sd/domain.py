"""Stable Diffusion as a msdda domain: experts, reference, joint denoiser, soup, policy.

:func:`method_context` turns a pipeline's experts into :class:`msdda.Expert` s for one
call's :class:`~msdda.sd.plan.SamplingPlan` (each a :class:`~msdda.sd.denoisers.UNetDenoiser`
with its own guidance, and a :class:`~msdda.StepSpec` with its prediction type, variance
type and eta), the base UNet as the reference, the joint denoiser that evaluates the
base UNet's members in one batched forward, and the weight-space average ``rs`` needs.
:func:`step_policy` then builds any method's policy through :func:`msdda.methods.build_policy`,
the registry every domain uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..experts import Denoiser, Expert, Member, expert_policy
from ..gaussians import Schedule
from ..lora import LoRAFactors, lora_delta_weight
from ..methods import MethodContext, build_policy, parameter_soup
from ..sampling import NoiseTape, StepPolicy
from .denoisers import Guidance, JointUNetDenoiser, SDConditioning, UNetDenoiser
from .plan import SamplingPlan
from .registry import REFERENCE

__all__ = ["generator_seeds", "method_context", "step_policy", "lora_soup_state"]


def generator_seeds(generator) -> int | list[int]:
    """The seed(s) of a call's generator(s) (torch's default one for None): what seeds a
    method's own randomness (db-ls's draws), never drawing from the generator itself."""
    if generator is None:
        return torch.initial_seed()
    if isinstance(generator, Sequence):
        return [g.initial_seed() for g in generator]
    return generator.initial_seed()


def _constant(module: nn.Module) -> Callable[[], nn.Module]:
    return lambda: module


def _denoisers(pipe, plan: SamplingPlan) -> dict[Member, UNetDenoiser]:
    """Every expert's denoiser, and the reference's (member None): the base UNet."""
    reg = pipe.msdda_experts
    mode = reg.execution

    def guidance(m: Member) -> Guidance:
        return Guidance(plan.guidance[m], plan.guidance_rescale)

    out = {None: UNetDenoiser(_constant(pipe.unet), None, guidance(None), reg.bank)}
    for i, name in enumerate(reg.names):
        e = reg.get(name)
        if e.kind == "unet":
            out[i] = UNetDenoiser(_constant(e.unet), i, guidance(i))
        elif mode == "merged":
            out[i] = UNetDenoiser(partial(reg.merged_unet, pipe, name), i, guidance(i))
        else:
            out[i] = UNetDenoiser(
                _constant(pipe.unet), i, guidance(i), reg.bank, reg.bank.index(name)
            )
    return out


def lora_soup_state(
    base: Mapping[str, Tensor], terms: Sequence[tuple[float, Mapping[str, LoRAFactors]]]
) -> dict[str, Tensor]:
    """The base's state dict with sum_j c_j delta_j merged into each adapted weight, for
    ``terms`` = [(c_j, LoRA factors of member j)]: the parameter average sum_j c_j theta_j
    of LoRA experts of one base (and the base, delta 0) whose coefficients sum to 1.
    Added in float32, cast to each weight's dtype."""
    out = dict(base)
    for path in sorted({p for _, fs in terms for p in fs}):
        key = f"{path}.weight"
        w = base[key]
        delta = sum(
            c * lora_delta_weight(fs[path]).to(w.device).float() for c, fs in terms if path in fs
        )
        out[key] = (w.float() + delta).to(w.dtype)
    return out


def _fresh_unet(pipe, state: Mapping[str, Tensor]) -> nn.Module:
    unet = type(pipe.unet).from_config(pipe.unet.config)
    unet.load_state_dict(state)
    return unet.to(device=pipe.unet.device, dtype=pipe.unet.dtype).eval().requires_grad_(False)


def _soup_unet(pipe, members: Sequence[Member], coefs: Sequence[float]) -> nn.Module:
    """The UNet with parameters sum_j c_j theta_j of ``members`` (None: the base)."""
    reg = pipe.msdda_experts
    entries = {m: reg.get(reg.names[m]) for m in members if m is not None}
    base = pipe.unet.state_dict()
    if all(e.kind == "lora" for e in entries.values()):  # one base: merge the weighted deltas
        terms = [
            (c, entries[m].factors) for m, c in zip(members, coefs, strict=True) if m is not None
        ]
        return _fresh_unet(pipe, lora_soup_state(base, terms))
    full, rest = [], []  # full UNets first: parameter_soup copies modules[0] (the base has hooks)
    for m, c in zip(members, coefs, strict=True):
        e = entries.get(m)
        if e is not None and e.kind == "unet":
            full.append((e.unet, c))
        elif e is not None:
            rest.append((_fresh_unet(pipe, lora_soup_state(base, [(1.0, e.factors)])), c))
        else:
            rest.append((pipe.unet, c))
    modules, weights = zip(*full, *rest, strict=True)
    return parameter_soup(list(modules), list(weights))


def _soup(
    pipe, plan: SamplingPlan, members: tuple[Member, ...], coefs: tuple[float, ...]
) -> Denoiser:
    """rs's model: the members' weight-space average, with their common guidance scale."""
    reg = pipe.msdda_experts
    text = [reg.names[m] for m in members if m is not None and reg.has_text_lora(reg.names[m])]
    if text:
        raise ValueError(f"rs averages UNets; expert(s) {text} also adapt the text encoder")
    scales = {plan.guidance[m] for m in members}
    if len(scales) != 1:
        raise ValueError(
            f"rs runs one model: its members need one guidance scale, got {sorted(scales)}"
        )
    guidance = Guidance(scales.pop(), plan.guidance_rescale)
    return UNetDenoiser(_constant(_soup_unet(pipe, members, coefs)), None, guidance)


def method_context(
    pipe, plan: SamplingPlan, schedule: Schedule, sample_shape: tuple[int, ...]
) -> MethodContext:
    """The call's problem as every method sees it: ``pipe``'s experts and base UNet."""
    reg = pipe.msdda_experts
    denoisers = _denoisers(pipe, plan)
    batched = {None} | {
        i
        for i, n in enumerate(reg.names)
        if reg.get(n).kind == "lora" and reg.execution == "batched"
    }
    joint = JointUNetDenoiser(pipe.unet, reg.bank, denoisers, frozenset(batched))
    experts = [
        Expert(denoisers[i], plan.specs[i], plan.kl_coefs[i], name)
        for i, name in enumerate(reg.names)
    ]
    reference = Expert(denoisers[None], plan.specs[None], name=REFERENCE)
    return MethodContext(
        schedule,
        reference,
        experts,
        sample_shape,
        kl_coef=plan.kl_coef,
        joint=joint,
        soup=partial(_soup, pipe, plan),
    )


def step_policy(
    plan: SamplingPlan, ctx: MethodContext, cond: SDConditioning, *, seeds, noise: NoiseTape
) -> StepPolicy:
    """The step policy of ``plan.method`` from the methods registry.

    MSDDA with one model at lambda = 1 is that model's own step: the product of one
    Gaussian is itself, and a deterministic step (DDIM, eta = 0) has no variance to fuse.
    """
    if plan.method == "msdda" and len(plan.members) == 1:
        (m,) = plan.members
        return expert_policy(ctx.reference if m is None else ctx.experts[m], ctx.schedule, cond)
    return build_policy(plan.method, ctx, plan.weights, cond, seeds=seeds, noise=noise)
