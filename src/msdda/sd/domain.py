"""Stable Diffusion as a msdda domain: experts, reference, joint denoiser, soup, policy.

:func:`method_context` turns a pipeline's experts into :class:`msdda.Expert` s for one
call's :class:`~msdda.sd.plan.SamplingPlan` (each a :class:`~msdda.sd.denoisers.UNetDenoiser`
with its own guidance, and a :class:`~msdda.StepSpec` with its prediction type, variance
type and eta), the base UNet as the reference, the joint denoiser that evaluates the
base UNet's members in one batched forward, the weight-space average ``rs`` needs, the
objective rewards (reading the prompts the conditioning carries) through the VAE decode
(:mod:`msdda.sd.vae`) and the oracles. :func:`step_policy` then builds any method's policy
through :func:`msdda.methods.build_policy`, the registry every domain uses.

:func:`sd_method_context` builds one problem for every method and weight vector (a
sweep's): an :class:`SDProblem` whose ``context`` is what :func:`msdda.methods.run_method`
takes, so a method's KL to the base, NFE, time and peak memory are measured on SD as on
every domain (:func:`run_sd_method`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import Denoiser, Expert, Member, expert_policy
from ..flows import FLOW_RULES, FlowStepSpec
from ..gaussians import Schedule
from ..lora import LoRAFactors, lora_delta_weight
from ..methods import (
    MethodContext,
    MethodRun,
    MethodSettings,
    build_policy,
    parameter_soup,
    run_method,
)
from ..rewards import Reward
from ..sampling import NoiseTape, StepPolicy
from ..validation import check_int, check_simplex_weights
from .denoisers import Guidance, JointUNetDenoiser, SDConditioning, UNetDenoiser
from .plan import SamplingPlan, SamplingRequest, check_rewards, plan_context
from .registry import REFERENCE
from .vae import DecodeOptions, vae_decoder

__all__ = [
    "generator_seeds",
    "method_context",
    "method_names",
    "prompt_reward",
    "step_policy",
    "lora_soup_state",
    "SDProblem",
    "sd_method_context",
    "with_step_rules",
    "run_sd_method",
]


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


def _guidance(plan: SamplingPlan, m: Member) -> Guidance:
    return Guidance(plan.guidance[m], plan.guidance_rescale)


def _denoisers(pipe, plan: SamplingPlan, names: Sequence[str]) -> dict[Member, UNetDenoiser]:
    """Every expert's denoiser (member i: ``names[i]``), and the reference's (member None):
    the base UNet."""
    reg = pipe.msdda_experts
    mode = reg.execution
    out = {
        None: UNetDenoiser(_constant(pipe.msdda_backbone), None, _guidance(plan, None), reg.bank)
    }
    for i, name in enumerate(names):
        e = reg.get(name)
        if e.kind == "unet":
            out[i] = UNetDenoiser(_constant(e.unet), i, _guidance(plan, i))
        elif mode == "merged":
            out[i] = UNetDenoiser(partial(reg.merged_unet, pipe, name), i, _guidance(plan, i))
        else:
            out[i] = UNetDenoiser(
                _constant(pipe.msdda_backbone),
                i,
                _guidance(plan, i),
                reg.bank,
                reg.bank.index(name),
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
    unet = type(pipe.msdda_backbone).from_config(pipe.msdda_backbone.config)
    unet.load_state_dict(state)
    return (
        unet.to(device=pipe.msdda_backbone.device, dtype=pipe.msdda_backbone.dtype)
        .eval()
        .requires_grad_(False)
    )


def _soup_unet(pipe, names, members: Sequence[Member], coefs: Sequence[float]) -> nn.Module:
    """The UNet with parameters sum_j c_j theta_j of ``members`` (None: the base)."""
    reg = pipe.msdda_experts
    entries = {m: reg.get(names[m]) for m in members if m is not None}
    base = pipe.msdda_backbone.state_dict()
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
            rest.append((pipe.msdda_backbone, c))
    modules, weights = zip(*full, *rest, strict=True)
    return parameter_soup(list(modules), list(weights))


def _soup(
    pipe,
    plan: SamplingPlan,
    names: Sequence[str],
    members: tuple[Member, ...],
    coefs: tuple[float, ...],
) -> Denoiser:
    """rs's model: the members' weight-space average, with their common guidance scale."""
    reg = pipe.msdda_experts
    text = [names[m] for m in members if m is not None and reg.has_text_lora(names[m])]
    if text:
        raise ValueError(f"rs averages UNets; expert(s) {text} also adapt the text encoder")
    scales = {plan.guidance[m] for m in members}
    if len(scales) != 1:
        raise ValueError(
            f"rs runs one model: its members need one guidance scale, got {sorted(scales)}"
        )
    guidance = Guidance(scales.pop(), plan.guidance_rescale)
    return UNetDenoiser(_constant(_soup_unet(pipe, names, members, coefs)), None, guidance)


def prompt_reward(reward: Callable[[Tensor, Any], Tensor]) -> Reward:
    """An image reward ``(images, prompts) -> (B,)`` as the methods call it: ``(images, cond)``,
    reading the per-sample prompts the :class:`SDConditioning` carries (None without them)."""
    if not callable(reward):
        raise TypeError(f"reward must be callable (images, prompts) -> (B,), got {reward!r}")

    def scored(images: Tensor, cond: Any) -> Tensor:
        prompts = cond.prompts if isinstance(cond, SDConditioning) else cond
        return reward(images, None if prompts is None else list(prompts))

    scored.reward = reward
    return scored


def method_names(
    pipe, oracles: Sequence[Any] = (), experts: Sequence[str] | None = None
) -> list[str]:
    """The experts the methods see, in order: ``experts``, or every loaded expert that is
    not one of the ``oracles`` given by name (an oracle is sampled, never fused)."""
    reg = pipe.msdda_experts
    for o in oracles:
        if not isinstance(o, (str, nn.Module)):
            raise TypeError(
                "an oracle must be the name of a loaded expert or a diffusers UNet, got "
                f"{type(o).__name__}"
            )
    named = [o for o in oracles if isinstance(o, str)]
    for o in named:
        if o not in reg.names:
            raise ValueError(
                f"oracle {o!r} is not a loaded expert; load it with load_experts({{{o!r}: path}}) "
                f"or pass a UNet (the experts are {reg.names})"
            )
    if experts is None:
        return [n for n in reg.names if n not in named]
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence) or not experts:
        raise TypeError("experts must be a non-empty sequence of loaded expert names")
    for n in experts:
        reg.get(n)  # a ValueError naming the experts for an unknown one
    clash = sorted(set(experts) & set(named))
    if clash or len(set(experts)) != len(experts):
        raise ValueError(f"experts must be distinct and not oracles, got {list(experts)}")
    return list(experts)


def _oracle_denoiser(pipe, oracle: Any, guidance: Guidance) -> tuple[UNetDenoiser, str | None]:
    """The oracle's denoiser and prediction type (None: the base's)."""
    reg = pipe.msdda_experts
    if isinstance(oracle, str):
        e = reg.get(oracle)
        if e.kind == "unet":
            return UNetDenoiser(_constant(e.unet), None, guidance), e.prediction_type
        if reg.has_text_lora(oracle):
            raise ValueError(f"oracle {oracle!r} adapts the text encoder: not supported")
        if reg.execution == "merged":
            return UNetDenoiser(partial(reg.merged_unet, pipe, oracle), None, guidance), None
        return UNetDenoiser(
            _constant(pipe.msdda_backbone), None, guidance, reg.bank, reg.bank.index(oracle)
        ), None
    if not isinstance(oracle, nn.Module) or not hasattr(oracle, "config"):
        raise TypeError(
            "an oracle must be the name of a loaded expert or a diffusers UNet, got "
            f"{type(oracle).__name__}"
        )
    from .loading import check_unet_architecture

    check_unet_architecture("oracle", oracle.config, pipe.msdda_backbone.config)
    return UNetDenoiser(_constant(oracle), None, guidance), None


def _oracles(
    pipe, plan: SamplingPlan, oracles: Mapping[Sequence[float], Any], num_experts: int
) -> dict[tuple[float, ...], Expert]:
    """``{weights: Expert}``: each oracle with the base's guidance scale and step rule."""
    if not isinstance(oracles, Mapping):
        raise TypeError(f"oracles must be a mapping {{weights: oracle}}, got {oracles!r}")
    out = {}
    for weights, oracle in oracles.items():
        key = check_simplex_weights(weights, num_experts)
        denoiser, pred = _oracle_denoiser(pipe, oracle, _guidance(plan, None))
        spec = plan.specs[None] if pred is None else replace(plan.specs[None], prediction_type=pred)
        label = oracle if isinstance(oracle, str) else f"oracle {list(key)}"
        out[tuple(key)] = Expert(denoiser, spec, plan.kl_coef or 1.0, label)
    return out


class _LazyDecoder:
    """:func:`vae_decoder`, built at its first call: a call whose method reads no reward never
    pays for it (with ``force_upcast`` it makes a float32 copy of a half-precision VAE)."""

    def __init__(self, vae, options) -> None:
        self.vae, self.options, self.decoder = vae, options, None

    def __call__(self, latents: Tensor) -> Tensor:
        if self.decoder is None:
            self.decoder = vae_decoder(self.vae, self.options)
        return self.decoder(latents)


def method_context(
    pipe,
    plan: SamplingPlan,
    schedule: Schedule,
    sample_shape: tuple[int, ...],
    *,
    names: Sequence[str] | None = None,
    rewards: Sequence[Callable[[Tensor, Any], Tensor]] = (),
    oracles: Mapping[Sequence[float], Any] | None = None,
    decode: DecodeOptions | None = None,
) -> MethodContext:
    """The call's problem as every method sees it: ``pipe``'s experts ``names`` (default all)
    and base UNet; ``rewards`` (``(images in [0, 1], prompts) -> (B,)``, one per expert) read
    the prompts the conditioning carries, through the VAE decode of :func:`vae_decoder`
    (``decode`` options); ``oracles`` maps weights to an oracle model (see :func:`_oracles`).
    """
    reg = pipe.msdda_experts
    names = list(reg.names if names is None else names)
    denoisers = _denoisers(pipe, plan, names)
    batched = {None} | {
        i for i, n in enumerate(names) if reg.get(n).kind == "lora" and reg.execution == "batched"
    }
    joint = JointUNetDenoiser(pipe.msdda_backbone, reg.bank, denoisers, frozenset(batched))
    experts = [
        Expert(denoisers[i], plan.specs[i], plan.kl_coefs[i], name) for i, name in enumerate(names)
    ]
    reference = Expert(denoisers[None], plan.specs[None], name=REFERENCE)
    return MethodContext(
        schedule,
        reference,
        experts,
        sample_shape,
        rewards=tuple(prompt_reward(r) for r in rewards),
        decode=_LazyDecoder(pipe.vae, decode),
        oracles=_oracles(pipe, plan, oracles or {}, len(names)),
        kl_coef=plan.kl_coef,
        joint=joint,
        soup=partial(_soup, pipe, plan, names),
        device=pipe._execution_device,
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
    return build_policy(
        plan.method, ctx, plan.weights, cond, seeds=seeds, noise=noise, settings=plan.settings
    )


@dataclass(frozen=True, eq=False)
class SDProblem:
    """A Stable Diffusion pipeline's experts, rewards and oracles as one problem every
    method and weight vector is run on (a sweep's): built by :func:`sd_method_context`."""

    context: MethodContext  # what msdda.methods.run_method / build_policy take
    expert_names: tuple[str, ...]  # the experts, in objective (weight) order
    plan: SamplingPlan  # the checked models' steps and guidance (every expert a member)
    height: int  # image size in pixels
    width: int
    encode: Callable[[Sequence[str]], SDConditioning]  # per-sample prompts -> conditioning
    full_decode: Callable[[Tensor], Tensor]  # latents -> full-size images (no options)

    def condition(self, prompts: Sequence[str]) -> SDConditioning:
        """The conditioning of a batch with these per-sample prompts (one row each)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty sequence of strings, one per sample")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        with torch.no_grad():
            return self.encode(list(prompts))

    def decode(self, latents: Tensor) -> Tensor:
        """What the rewards read: latents -> images in [0, 1] with the decode options."""
        return self.context.decode(latents)

    def images(self, latents: Tensor) -> Tensor:
        """Full-size float32 images in [0, 1] (B, 3, H, W), no gradient: what to save."""
        with torch.no_grad():
            return self.full_decode(latents)


def sd_method_context(
    pipe,
    rewards: Sequence[Callable[[Tensor, Any], Tensor]] = (),
    oracles: Mapping[Sequence[float], Any] | None = None,
    *,
    experts: Sequence[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    kl_coefs: Mapping[str, float] | Sequence[float] | None = None,
    kl_coef: float | None = None,
    expert_etas: Mapping[str, float] | None = None,
    expert_guidance_scales: Mapping[str, float] | None = None,
    guidance_rescale: float = 0.0,
    decode: DecodeOptions | None = None,
    step_rule: str | None = None,
    expert_step_rules: Mapping[str, str] | None = None,
) -> SDProblem:
    """``pipe``'s experts as one problem for every method (see :class:`SDProblem`).

    Args:
        pipe: an MSDDA SD or SDXL pipeline with its experts (and any oracles) loaded.
        rewards: the objectives, ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``, one
            per expert in ``experts`` order (needed by rgg, code, target); empty: none.
        oracles: ``{weights (one per expert, on the simplex): oracle}``, an oracle being the
            name of a loaded expert (full UNet or LoRA; it is then not one of the experts)
            or a diffusers UNet of the base's architecture; sampled with the base's guidance.
        experts: expert names in objective order; default every loaded non-oracle expert.
        num_inference_steps, guidance_scale, eta, kl_coefs, kl_coef, expert_etas,
        expert_guidance_scales, guidance_rescale: as in the pipelines' ``__call__``.
        height, width: image size (default the pipeline's).
        decode: how the rewards' images are decoded (:class:`msdda.sd.vae.DecodeOptions`).
        step_rule, expert_step_rules: flow pipelines (SD3, FLUX) only: the stochastic
            sampler of every model (``"sde"``, the default, ``"cps"`` or ``"dance"``) and
            per expert (``{name or "base": rule}``); ``eta`` and ``expert_etas`` are then
            the noise levels.
    """
    oracles = {} if oracles is None else oracles
    if not isinstance(oracles, Mapping):
        raise TypeError(f"oracles must be a mapping {{weights: oracle}}, got {oracles!r}")
    names = method_names(pipe, list(oracles.values()), experts)
    request = SamplingRequest(
        weights=None, method="msdda", num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, eta=eta, kl_coefs=kl_coefs, kl_coef=kl_coef,
        reference=REFERENCE, expert_etas=expert_etas,
        expert_guidance_scales=expert_guidance_scales, guidance_rescale=guidance_rescale,
        step_rule=_flow_rule(pipe, step_rule, expert_step_rules),
    )  # fmt: skip
    preds = [pipe.msdda_experts.get(n).prediction_type for n in names]
    plan = plan_context(request, names, preds, pipe.scheduler)
    plan = with_step_rules(plan, names, expert_step_rules)
    rewards = check_rewards(rewards, len(names)) if rewards else ()
    height = check_int(height or pipe._default_size(), "height", low=8)
    width = check_int(width or pipe._default_size(), "width", low=8)
    shape = _latent_shape(pipe, height, width)
    schedule = pipe._schedule(plan, torch.zeros((1, *shape)))
    ctx = method_context(
        pipe, plan, schedule, shape, names=names, rewards=rewards, oracles=oracles, decode=decode
    )
    return SDProblem(
        ctx,
        tuple(names),
        plan,
        height,
        width,
        partial(
            pipe.encode_conditioning,
            plan=plan,
            names=names,
            height=height,
            width=width,
            schedule=schedule,
        ),
        ctx.decode if decode is None or decode.scale == 1.0 else _full_size(pipe, decode),
    )


def _flow_rule(pipe, rule: str | None, expert_rules: Mapping | None) -> str | None:
    """The flow step rule every model takes (``"sde"`` by default on a flow pipeline); a
    rule given for a DDPM/DDIM pipeline is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return FLOW_RULES[0] if rule is None else rule
    if rule is not None or expert_rules:
        raise ValueError(
            "step_rule and expert_step_rules apply to flow models (SD3, FLUX) only; "
            f"this pipeline samples with {type(pipe.scheduler).__name__} (use eta)"
        )
    return None


def with_step_rules(
    plan: SamplingPlan, names: Sequence[str], rules: Mapping[str, str] | None
) -> SamplingPlan:
    """``plan`` with some models' own flow step rule (``{expert name or "base": rule}``),
    each at its own noise level: experts trained with other samplers have other variances."""
    if not rules:
        return plan
    if not isinstance(rules, Mapping):
        raise TypeError(f"expert_step_rules must be a mapping {{name: rule}}, got {rules!r}")
    specs = dict(plan.specs)
    for name, rule in rules.items():
        if name != REFERENCE and name not in names:
            raise ValueError(
                f"expert_step_rules names unknown expert {name!r}; the experts are {list(names)}"
            )
        m = None if name == REFERENCE else list(names).index(name)
        try:
            specs[m] = FlowStepSpec(rule, specs[m].noise_level)
        except (TypeError, ValueError) as err:
            raise ValueError(f"expert_step_rules[{name!r}]: {err}") from None
    return replace(plan, specs=specs)


def _latent_shape(pipe, height: int, width: int) -> tuple[int, ...]:
    """The (C, h, w) of the chain's latents: a flow pipeline's own (FLUX's are unpacked)."""
    shape_of = getattr(pipe, "_latent_shape", None)
    if shape_of is not None:
        return tuple(shape_of(height, width))
    f = pipe.vae_scale_factor
    return pipe.msdda_backbone.config.in_channels, height // f, width // f


def _full_size(pipe, decode: DecodeOptions) -> Callable[[Tensor], Tensor]:
    return vae_decoder(pipe.vae, replace(decode, scale=1.0))


def run_sd_method(
    problem: SDProblem,
    method: str,
    weights,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    settings: MethodSettings | None = None,
    measure_kl: bool = False,
) -> MethodRun:
    """:func:`msdda.methods.run_method` on ``problem``: ``len(seeds)`` images, sample b with
    prompt ``prompts[b]`` and noise from ``seeds[b]`` (identical for every method)."""
    if not isinstance(problem, SDProblem):
        raise TypeError(f"problem must be an SDProblem, got {type(problem).__name__}")
    cond = problem.condition(prompts)
    return run_method(
        method, problem.context, weights, cond, seeds, settings=settings, measure_kl=measure_kl
    )
