"""A pipeline call's sampling arguments, checked once, as the core methods need them.

:class:`SamplingRequest` holds the ``__call__`` keywords that choose the sampling as
given; :func:`plan_sampling` checks them once and works out who is evaluated, with which
step and guidance: a :class:`SamplingPlan`. Weights given by name are turned into the
expert-order list here and checked by the core (:func:`msdda.fusion_coefficients`).

``rgg``, ``code`` and ``target`` read the objective rewards (``rewards=``, one per expert)
and ``oracle`` samples a model trained on the weighted reward (``oracle=``); their
hyperparameters come as a :class:`msdda.methods.MethodSettings`.

The pipelines take any weights w_i >= 0, with the experts' KL coefficients beta_i and a
target beta: lambda_i = w_i beta_i / beta, lambda_0 = 1 - sum lambda_i. The methods
registry takes weights on the simplex; the same exponents are the simplex weights
w / sum(w) with the target beta / sum(w), which is what the plan hands it. All weights
0 is lambda_0 = 1: every method is then the reference alone (method ``base``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..experts import Member
from ..flows import FlowStepSpec
from ..fusion import fusion_coefficients, simplex_form
from ..gaussians import StepSpec
from ..methods import METHODS, MethodSettings, check_method
from ..validation import check_int, check_number
from .registry import REFERENCE

__all__ = [
    "SD_METHODS",
    "SamplingRequest",
    "SamplingPlan",
    "plan_sampling",
    "plan_context",
    "expert_weights",
    "simplex_form",
]

#: The methods of :data:`msdda.methods.METHODS` the pipelines run: all of them (``rgg``,
#: ``code`` and ``target`` with ``rewards=``, ``oracle`` with ``oracle=``).
SD_METHODS = tuple(METHODS)

#: diffusers' DDPM variance types as the core names them.
_DDPM_VARIANCE = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


@dataclass(frozen=True, kw_only=True)
class SamplingRequest:
    """The ``__call__`` arguments that choose the sampling, as given by the caller (the
    pipelines' signatures hold the defaults)."""

    weights: Any
    method: str
    num_inference_steps: int
    guidance_scale: float
    eta: float
    kl_coefs: Any
    kl_coef: float | None
    reference: str | None
    expert_etas: Mapping[str, float] | None
    expert_guidance_scales: Mapping[str, float] | None
    guidance_rescale: float
    rewards: Sequence | None = None  # objectives, one per expert: (images, prompts) -> (B,)
    oracle: Any = None  # the oracle model (an expert name or a UNet), for method "oracle"
    method_settings: MethodSettings | None = None  # rgg / code / target hyperparameters
    step_rule: str | None = None  # flow models: the stochastic sampler (eta: its noise level)


@dataclass(frozen=True)
class SamplingPlan:
    """A call's checked sampling: the method, its core arguments, who is evaluated, how."""

    method: str  # the method run (``base`` when every weight is 0)
    weights: tuple[float, ...] | None  # on the simplex, expert order (None for base)
    kl_coefs: tuple[float, ...]  # beta_i per expert
    kl_coef: float | None  # the target beta handed to the core (see simplex_form)
    members: tuple[Member, ...]  # evaluated: experts with lambda_i != 0, then None (lambda_0 != 0)
    specs: Mapping[Member, StepSpec]  # every expert's (and the reference's) step
    guidance: Mapping[Member, float]  # classifier-free guidance scale per model
    guidance_rescale: float
    num_inference_steps: int
    settings: MethodSettings | None = None  # the methods' hyperparameters (None: defaults)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on when an evaluated model's scale exceeds 1."""
        return max(self.guidance[m] for m in self.members) > 1.0


def expert_weights(weights, names: Sequence[str]) -> list:
    """``weights`` ({name: w} or one per expert) as the expert-order list (values unchecked)."""
    if weights is None:
        if len(names) == 1:
            return [1.0]
        raise ValueError(
            f"weights is required with {len(names)} experts: give {{name: weight}} for {names}"
        )
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"weights names unknown expert(s) {unknown}; the experts are {names}")
        return [weights.get(n, 0.0) for n in names]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a mapping {{name: weight}} or a sequence, got {type(weights).__name__}"
        )
    if len(weights) != len(names):
        raise ValueError(
            f"weights has {len(weights)} entries for {len(names)} experts {names}; give one per "
            "expert, or a mapping {name: weight}"
        )
    return list(weights)


def _expert_kl_coefs(kl_coefs, weights: Sequence, names: Sequence[str]) -> list | None:
    """``kl_coefs`` ({name: beta_i} or one per expert) as the expert-order list, or None."""
    if kl_coefs is None:
        return None
    if not isinstance(kl_coefs, Mapping):
        if isinstance(kl_coefs, Sequence) and not isinstance(kl_coefs, (str, bytes)):
            if len(kl_coefs) != len(names):
                raise ValueError(f"kl_coefs has {len(kl_coefs)} entries for {len(names)} experts")
            return list(kl_coefs)
        raise TypeError(f"kl_coefs must be a mapping {{name: beta}}, got {type(kl_coefs).__name__}")
    unknown = [k for k in kl_coefs if k not in names]
    if unknown:
        raise ValueError(f"kl_coefs names unknown expert(s) {unknown}; the experts are {names}")
    out = []
    for n, w in zip(names, weights, strict=True):
        if n not in kl_coefs and w != 0:
            raise ValueError(f"kl_coefs has no entry for expert {n!r} (weight {w})")
        out.append(kl_coefs.get(n, 1.0))
    return out


def _member_values(
    values, default: float, what: str, names: Sequence[str], low: float | None = None
) -> dict[Member, float]:
    """``{expert name or "base": value}`` per member (index, None for the reference), each
    given value a number >= ``low``; the others ``default``."""
    out: dict[Member, float] = {m: default for m in [*range(len(names)), None]}
    if values is None:
        return out
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what} must be a mapping {{expert name: value}}, got {type(values).__name__}"
        )
    for k, v in values.items():
        if k != REFERENCE and k not in names:
            raise ValueError(f"{what} names unknown expert {k!r}; the experts are {list(names)}")
        out[None if k == REFERENCE else names.index(k)] = check_number(v, f"{what}[{k!r}]", low=low)
    return out


def _step_spec(
    scheduler, prediction_type: str, eta: float, rule: str | None
) -> StepSpec | FlowStepSpec:
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # eta: the noise level
        return FlowStepSpec(rule or "sde", eta)
    if isinstance(scheduler, DDPMScheduler):
        vt = scheduler.config.variance_type
        if vt not in _DDPM_VARIANCE:
            raise ValueError(f"DDPMScheduler variance_type {vt!r} is not supported")
        return StepSpec(prediction_type, _DDPM_VARIANCE[vt], eta)
    return StepSpec(prediction_type, "fixed_small", eta)


def check_rewards(rewards, num_experts: int) -> tuple:
    """``rewards`` as a tuple of callables, one per expert (the objectives, expert order)."""
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise TypeError(
            "rewards must be a sequence of reward callables (images, prompts) -> (B,), one per "
            f"expert, got {type(rewards).__name__}"
        )
    if len(rewards) != num_experts:
        raise ValueError(
            f"rewards has {len(rewards)} entries for {num_experts} experts: give one objective "
            "per expert, in expert order"
        )
    for i, r in enumerate(rewards):
        if not callable(r):
            raise TypeError(f"rewards[{i}] must be callable (images, prompts) -> (B,)")
    return tuple(rewards)


def _check_method(request: SamplingRequest, names: Sequence[str]) -> None:
    """The method is known, and what it reads is given: rewards, an oracle."""
    info = check_method(request.method)
    if info.needs_oracle and request.oracle is None:
        raise ValueError(
            f"method {request.method!r} needs an oracle model trained on the weighted reward: "
            "pass oracle= (the name of an expert loaded with load_experts, or a UNet)"
        )
    if request.oracle is not None and not info.needs_oracle:
        raise ValueError(f"oracle= is read by method 'oracle' only, not {request.method!r}")
    if info.needs_rewards and request.rewards is None:
        raise ValueError(
            f"method {request.method!r} needs reward models: pass rewards=[...], one reward "
            f"callable (images in [0, 1], prompts) -> (B,) per expert {list(names)}"
        )
    if request.rewards is not None:
        check_rewards(request.rewards, len(names))
    settings = request.method_settings
    if settings is not None and not isinstance(settings, MethodSettings):
        raise TypeError(
            f"method_settings must be a msdda.methods.MethodSettings or None, got "
            f"{type(settings).__name__}"
        )


def _check_reference(fusion: _Fusion, reference) -> None:
    if reference not in (REFERENCE, None):
        raise ValueError(
            f"reference must be {REFERENCE!r} (the base UNet) or None, got {reference!r}"
        )
    if reference is not None or None not in fusion.members:
        return
    if fusion.method == "base":
        raise ValueError(
            "method 'base' samples the reference model (also what weights all 0 ask for): "
            "pass reference='base'"
        )
    raise ValueError(
        f"lambda_0 = {fusion.lambda0:.6g} != 0 (weights off the simplex or kl_coef differing "
        "from the experts'), which needs the reference model: pass reference='base'"
    )


def _check_fusable(scheduler, method: str, members: Sequence[Member], etas, names) -> None:
    """MSDDA fuses variances: a deterministic DDIM or flow step (eta or noise level 0) has
    none to fuse."""
    stochastic = (DDIMScheduler, FlowMatchEulerDiscreteScheduler)
    if method != "msdda" or len(members) < 2 or not isinstance(scheduler, stochastic):
        return
    label = [REFERENCE if m is None else names[m] for m in members]
    zero = [n for m, n in zip(members, label, strict=True) if etas[m] == 0]
    if zero and isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"noise_level = 0 (for {zero}) makes every flow step the deterministic Euler step "
            f"(variance 0), so the steps of {label} cannot be fused; use noise_level > 0 "
            "(Flow-GRPO samples with 0.7)"
        )
    if zero:
        raise ValueError(
            f"eta = 0 (for {zero}) makes every DDIM step deterministic (variance 0), so the "
            f"steps of {label} cannot be fused; use eta > 0 (eta = 1 is DDPM-like)"
        )


class _Fusion(NamedTuple):
    method: str
    weights: tuple[float, ...] | None
    kl_coefs: list[float]
    kl_coef: float | None
    members: tuple[Member, ...]
    lambda0: float


def _fusion(request: SamplingRequest, names: Sequence[str]) -> _Fusion:
    """The request's weights and KL coefficients in the core's form, and who contributes."""
    if request.method == "base":
        return _Fusion("base", None, [1.0] * len(names), None, (None,), 1.0)
    w = expert_weights(request.weights, names)
    betas = _expert_kl_coefs(request.kl_coefs, w, names)
    coefs = fusion_coefficients(w, betas, request.kl_coef, num_experts=len(names))
    betas = betas or [request.kl_coef if request.kl_coef is not None else 1.0] * len(names)
    members = [i for i, lam in enumerate(coefs.lambdas) if lam != 0.0]
    members += [None] if coefs.lambda0 != 0.0 else []
    if members == [None]:  # every weight 0: lambda_0 = 1, the reference alone
        return _Fusion("base", None, betas, None, (None,), coefs.lambda0)
    target = request.kl_coef if request.kl_coef is not None else float(betas[0])
    weights, kl_coef = simplex_form(w, target)
    return _Fusion(request.method, weights, betas, kl_coef, tuple(members), coefs.lambda0)


class _Models(NamedTuple):
    steps: int
    specs: dict[Member, StepSpec]
    guidance: dict[Member, float]
    rescale: float
    etas: dict[Member, float]


def _models(
    request: SamplingRequest, names: Sequence[str], prediction_types: Sequence[str], scheduler
) -> _Models:
    """Every model's step (prediction type, variance, eta) and guidance, checked."""
    if not names:
        raise ValueError("the pipeline has no experts: load some with from_pretrained(experts=...)")
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler)):
        raise TypeError(
            "the scheduler must be a DDIMScheduler, DDPMScheduler or (flow models) "
            f"FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
        )
    steps = check_int(request.num_inference_steps, "num_inference_steps", low=1)
    eta_name = "eta" if request.step_rule is None else "noise_level"
    eta = check_number(request.eta, eta_name, low=0.0)
    scale = check_number(request.guidance_scale, "guidance_scale")
    rescale = check_number(request.guidance_rescale, "guidance_rescale", low=0.0)
    etas = _member_values(request.expert_etas, eta, f"expert_{eta_name}s", names, low=0.0)
    guidance = _member_values(
        request.expert_guidance_scales, scale, "expert_guidance_scales", names
    )
    base_pred = scheduler.config.get("prediction_type", "epsilon")
    preds = {**dict(enumerate(prediction_types)), None: base_pred}
    specs = {m: _step_spec(scheduler, preds[m], etas[m], request.step_rule) for m in preds}
    return _Models(steps, specs, guidance, rescale, etas)


def plan_sampling(
    request: SamplingRequest, names: Sequence[str], prediction_types: Sequence[str], scheduler
) -> SamplingPlan:
    """Check ``request`` once for experts ``names`` (with these prediction types) and the
    pipeline's ``scheduler`` (the base's prediction type is the reference's)."""
    models = _models(request, names, prediction_types, scheduler)
    _check_method(request, names)
    fusion = _fusion(request, names)
    _check_reference(fusion, request.reference)
    _check_fusable(scheduler, fusion.method, fusion.members, models.etas, names)
    return SamplingPlan(
        method=fusion.method,
        weights=fusion.weights,
        kl_coefs=tuple(float(b) for b in fusion.kl_coefs),
        kl_coef=fusion.kl_coef,
        members=fusion.members,
        specs=models.specs,
        guidance=models.guidance,
        guidance_rescale=models.rescale,
        num_inference_steps=models.steps,
        settings=request.method_settings,
    )


def plan_context(
    request: SamplingRequest, names: Sequence[str], prediction_types: Sequence[str], scheduler
) -> SamplingPlan:
    """The plan of a problem every method and weight vector is run on (a sweep's): every
    expert and the reference are members (so all are encoded for), ``weights`` is None,
    ``kl_coef`` is the request's target beta (None: the experts' common beta), and
    ``request.method``/``weights``/``reference`` are not read."""
    models = _models(request, names, prediction_types, scheduler)
    betas = _expert_kl_coefs(request.kl_coefs, [1.0] * len(names), names)
    betas = betas or [request.kl_coef if request.kl_coef is not None else 1.0] * len(names)
    kl_coefs = tuple(check_number(b, f"kl_coefs[{i}]", low=0.0) for i, b in enumerate(betas))
    if min(kl_coefs) <= 0:
        raise ValueError(f"kl_coefs must be positive, got {list(kl_coefs)}")
    kl_coef = None if request.kl_coef is None else check_number(request.kl_coef, "kl_coef")
    if kl_coef is not None and kl_coef <= 0:
        raise ValueError(f"kl_coef must be positive, got {kl_coef}")
    return SamplingPlan(
        method="msdda",
        weights=None,
        kl_coefs=kl_coefs,
        kl_coef=kl_coef,
        members=(*range(len(names)), None),
        specs=models.specs,
        guidance=models.guidance,
        guidance_rescale=models.rescale,
        num_inference_steps=models.steps,
        settings=request.method_settings,
    )
