"""Step Gaussians: a model output turned into its reverse step N(mean, variance).

The noise tables and timesteps come from diffusers' ``DDPMScheduler`` and
``DDIMScheduler`` (their configs and ``set_timesteps``); the maths here only
reads them. Notation follows DDPM/DDIM: abar_t = alphas_cumprod[t], abar_prev
the value at the previous timestep of the sampling schedule (1 past the end).
A ``FlowMatchEulerDiscreteScheduler`` gives a :class:`FlowSchedule`, and a
:class:`~msdda.flows.FlowStepSpec` selects the flow-matching steps of :mod:`msdda.flows`.

Mean + sqrt(variance) * z equals the scheduler's ``step()`` with variance noise z.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .flows import FlowStepSpec, flow_step_gaussian
from .gaussian import Gaussian
from .validation import (
    ArgumentKindError,
    check_floating_tensor,
    check_instance,
    check_int,
    check_number,
    show_value,
)

__all__ = [
    "PredictionType",
    "VarianceType",
    "StepGaussian",
    "StepSpec",
    "AnyStepSpec",
    "Schedule",
    "FlowSchedule",
    "predicted_x0_and_epsilon",
    "ddpm_posterior_mean",
    "ddpm_variance",
    "ddim_variance",
    "ddim_mean",
    "step_gaussian",
    "MIN_VARIANCE",
]

PredictionType = Literal["epsilon", "v_prediction", "sample"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range", "learned_log"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned_log")
LEARNED_VARIANCE_TYPES = ("learned_range", "learned_log")

#: Variances are clamped here, as diffusers does before taking logs; the last step's
#: posterior variance is 0 and fusion needs a positive one (noise is not added there).
MIN_VARIANCE = 1e-20


#: Former name of :class:`msdda.Gaussian` for a reverse step (kept as an alias).
StepGaussian = Gaussian


@dataclass(frozen=True)
class StepSpec:
    """What an expert's Gaussian needs beyond its model output and the schedule."""

    prediction_type: PredictionType = "epsilon"  # what the model outputs
    variance_type: VarianceType = "fixed_small"  # DDPM only; learned_* read an extra channel
    eta: float = 1.0  # DDIM only: 0 deterministic, 1 DDPM-like

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type must be one of {VARIANCE_TYPES}, got {self.variance_type!r}"
            )
        try:
            check_number(self.eta, "eta", low=0.0)
        except TypeError:  # a bool or a string is no eta (a ValueError too, as it always was)
            raise ArgumentKindError(
                f"eta must be a finite number >= 0, got {show_value(self.eta)} "
                f"({type(self.eta).__name__})"
            ) from None
        except ValueError:
            raise ValueError(
                f"eta must be a finite number >= 0, got {show_value(self.eta)}"
            ) from None

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in LEARNED_VARIANCE_TYPES


#: What an expert's step needs beyond the schedule: a DDPM/DDIM :class:`StepSpec`, or a
#: flow-matching :class:`~msdda.flows.FlowStepSpec` (rule and noise level).
AnyStepSpec = StepSpec | FlowStepSpec


def _timestep(t, name: str) -> int:
    """One timestep as an int: an int, a numpy integer or a 0-d integer tensor (not a bool)."""
    if isinstance(t, Tensor) and t.ndim == 0 and not (t.is_floating_point() or t.is_complex()):
        if t.dtype != torch.bool:
            return int(t)
    elif isinstance(t, numbers.Integral) and not isinstance(t, bool):
        return int(t)
    raise TypeError(f"{name} must be an integer timestep, got {t!r} ({type(t).__name__})")


def _show_timesteps(ts: Sequence[int]) -> str:
    shown = ", ".join(str(t) for t in ts[:3])
    return f"{shown}, ..., {ts[-1]}" if len(ts) > 4 else ", ".join(str(t) for t in ts)


def _check_num_inference_steps(n, n_max: int | None) -> int:
    """``num_inference_steps`` as a positive int (<= ``n_max`` where there is one)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ArgumentKindError(
            f"num_inference_steps must be a positive int, got {show_value(n)} ({type(n).__name__})"
        )
    if n < 1 or (n_max is not None and n > n_max):
        bound = f" <= the scheduler's num_train_timesteps ({n_max})" if n_max else ""
        raise ValueError(f"num_inference_steps must be a positive int{bound}, got {show_value(n)}")
    return int(n)


@dataclass(frozen=True, eq=False)
class Schedule:
    """The noise tables and sampling timesteps of a diffusers DDPM/DDIM scheduler.

    Build it with :meth:`from_scheduler`; experts fused together must share one. A
    flow-matching scheduler gives the subclass :class:`FlowSchedule`.
    """

    sampler: Literal["ddpm", "ddim", "flow"]  # DDPMScheduler, DDIMScheduler or flow maths
    timesteps: tuple[int, ...]  # sampling order, from noisiest
    prev_timesteps: tuple[int, ...]  # the timestep each step lands on (< 0: the end)
    alphas_cumprod: Tensor  # (num_train_timesteps,) float64
    final_alpha_cumprod: float  # abar used past the end of the chain
    clip_sample_range: float | None  # x0 clamp, or None
    num_train_timesteps: int

    @classmethod
    def from_scheduler(
        cls, scheduler, num_inference_steps: int | None = None, *, sigmas=None, mu=None
    ) -> Schedule:
        """Read a ``DDPMScheduler`` or ``DDIMScheduler`` (``set_timesteps`` is called if given).

        A ``FlowMatchEulerDiscreteScheduler`` gives a :class:`FlowSchedule` (see its
        :meth:`FlowSchedule.from_scheduler`; ``sigmas`` and ``mu`` apply to it only).
        """
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return FlowSchedule.from_scheduler(scheduler, num_inference_steps, sigmas=sigmas, mu=mu)
        if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            raise TypeError(
                "scheduler must be a diffusers DDPMScheduler or DDIMScheduler (or a "
                f"FlowMatchEulerDiscreteScheduler), got {type(scheduler).__name__}"
            )
        if sigmas is not None or mu is not None:
            raise ValueError("sigmas and mu apply to a FlowMatchEulerDiscreteScheduler only")
        if scheduler.config.thresholding:
            raise ValueError(
                "scheduler.config.thresholding is not supported: its x0 map is not affine"
            )
        if num_inference_steps is not None:
            n_max = int(scheduler.config.num_train_timesteps)
            scheduler.set_timesteps(_check_num_inference_steps(num_inference_steps, n_max))
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("the scheduler has no timesteps: pass num_inference_steps")
        ts = [int(t) for t in scheduler.timesteps]
        n_train = int(scheduler.config.num_train_timesteps)
        if isinstance(scheduler, DDIMScheduler):
            stride = n_train // scheduler.num_inference_steps
            prev = [t - stride for t in ts]
            final = float(scheduler.final_alpha_cumprod)
        else:
            prev = ts[1:] + [-1]
            final = 1.0
        clip = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
        return cls(
            sampler="ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm",
            timesteps=tuple(ts),
            prev_timesteps=tuple(prev),
            alphas_cumprod=scheduler.alphas_cumprod.detach().to(torch.float64).cpu().clone(),
            final_alpha_cumprod=final,
            clip_sample_range=clip,
            num_train_timesteps=n_train,
        )

    def alpha_bars(self, t: int) -> tuple[float, float]:
        """(abar_t, abar_prev) for timestep ``t`` of this schedule."""
        t = _timestep(t, "t")
        try:
            i = self.timesteps.index(t)
        except ValueError:
            raise ValueError(
                f"timestep {t} is not in this schedule: t must be one of its timesteps "
                f"({_show_timesteps(self.timesteps)})"
            ) from None
        prev = self.prev_timesteps[i]
        abar_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[int(t)]), abar_prev

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The model's own timesteps for the loop's timesteps ``t``: ``t`` itself here."""
        return t

    def compatible_with(self, other: Schedule) -> bool:
        return (
            type(self) is type(other)
            and self.sampler == other.sampler
            and self.timesteps == other.timesteps
            and self.prev_timesteps == other.prev_timesteps
            and self.final_alpha_cumprod == other.final_alpha_cumprod
            and self.alphas_cumprod.shape == other.alphas_cumprod.shape
            and bool(torch.allclose(self.alphas_cumprod, other.alphas_cumprod, rtol=1e-6, atol=0))
        )


def _read_flow_scheduler(scheduler, num_inference_steps, sigmas, mu) -> tuple[Tensor, Tensor]:
    """(sigmas (N+1,) float64, timesteps (N,) float32) of a FlowMatchEulerDiscreteScheduler."""
    config = scheduler.config
    if config.get("invert_sigmas", False):
        raise ValueError("scheduler.config.invert_sigmas (Mochi's convention) is not supported")
    asks = sigmas is not None or num_inference_steps is not None
    if config.get("use_dynamic_shifting", False) and mu is None and asks:
        raise ValueError(
            "mu is required: the scheduler uses dynamic shifting (use_dynamic_shifting=True); "
            "pass the pipeline's mu (diffusers' calculate_shift of the image sequence length)"
        )
    if mu is not None:
        mu = check_number(mu, "mu")
        if num_inference_steps is None and sigmas is None:
            raise ValueError("mu needs num_inference_steps or sigmas: the schedule to shift")
    if num_inference_steps is not None:
        num_inference_steps = _check_num_inference_steps(num_inference_steps, None)
    if sigmas is not None or mu is not None or num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
    elif getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no timesteps: pass num_inference_steps")
    table = scheduler.sigmas.detach().cpu().to(torch.float64).clone()
    timesteps = scheduler.timesteps.detach().cpu().to(torch.float32).clone()
    if len(table) != len(timesteps) + 1 or float(table[-1]) != 0.0:
        raise ValueError("the scheduler's sigmas must be its timesteps' sigmas and a final 0")
    if not (bool((table[1:] < table[:-1]).all()) and 0 < float(table[0]) <= 1):
        raise ValueError(
            f"the scheduler's sigmas must decrease strictly from (0, 1] to 0, got "
            f"{[round(float(v), 6) for v in table[:4]]}..."
        )
    return table, timesteps


@dataclass(frozen=True, eq=False)
class FlowSchedule(Schedule):
    """The sigmas and timesteps of a diffusers ``FlowMatchEulerDiscreteScheduler``.

    The loop's timesteps are integer keys, noisiest first: step i of N has key N - 1 - i and
    lands on key N - 2 - i (-1: the end, sigma = 0). A denoiser receives these keys;
    :meth:`model_timesteps` maps them to the model's own (``scheduler.timesteps``).
    """

    sigmas: Tensor  # (N + 1,) float64, diffusers' scheduler.sigmas (terminal 0 included)
    scheduler_timesteps: Tensor  # (N,) float32, diffusers' scheduler.timesteps (sigma * T)

    @classmethod
    def from_scheduler(
        cls, scheduler, num_inference_steps: int | None = None, *, sigmas=None, mu=None
    ) -> FlowSchedule:
        """Read a ``FlowMatchEulerDiscreteScheduler``, never re-deriving its sigmas.

        ``set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)`` is called as diffusers'
        pipelines call it (static shift: ``num_inference_steps``; dynamic shift: also ``mu``,
        FLUX's pipeline also passes ``sigmas``) when any of them is given; otherwise the
        scheduler's current timesteps are read.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(
                "scheduler must be a diffusers FlowMatchEulerDiscreteScheduler, "
                f"got {type(scheduler).__name__}"
            )
        table, timesteps = _read_flow_scheduler(scheduler, num_inference_steps, sigmas, mu)
        n = len(timesteps)
        return cls(
            sampler="flow",
            timesteps=tuple(range(n - 1, -1, -1)),
            prev_timesteps=tuple(range(n - 2, -2, -1)),
            alphas_cumprod=torch.empty(0, dtype=torch.float64),
            final_alpha_cumprod=1.0,
            clip_sample_range=None,
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
            sigmas=table,
            scheduler_timesteps=timesteps,
        )

    def sigma_at(self, t: int) -> float:
        """The sigma of the state at key ``t`` (-1: the end, 0.0)."""
        t = _timestep(t, "t")
        if not -1 <= t < len(self.timesteps):
            raise ValueError(
                f"key {t} is not in this flow schedule: t must be in [-1, {len(self.timesteps) - 1}]"
            )
        return float(self.sigmas[len(self.timesteps) - 1 - t])

    def sigma_pair(self, t: int) -> tuple[float, float]:
        """(sigma, sigma_next) of the step at key ``t`` (one of :attr:`timesteps`)."""
        t = _timestep(t, "t")
        if t not in self.timesteps:
            raise ValueError(
                f"timestep {t} is not in this schedule: t must be one of its timesteps "
                f"({_show_timesteps(self.timesteps)})"
            )
        return self.sigma_at(t), self.sigma_at(t - 1)

    def alpha_bars(self, t: int) -> tuple[float, float]:
        raise ValueError("a flow schedule has no alpha bars: use sigma_pair(t)")

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The scheduler's float32 timesteps (sigma * T) at the keys ``t`` (-1: 0.0)."""
        if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor of keys, got {t!r}")
        n = len(self.timesteps)
        if bool(((t < -1) | (t >= n)).any()):
            raise ValueError(f"t must hold keys in [-1, {n - 1}] of this flow schedule")
        table = torch.cat([self.scheduler_timesteps, torch.zeros(1)]).to(t.device)
        return table[n - 1 - t.long()]

    def compatible_with(self, other: Schedule) -> bool:
        return (
            isinstance(other, FlowSchedule)
            and self.timesteps == other.timesteps
            and self.sigmas.shape == other.sigmas.shape
            and bool(torch.allclose(self.sigmas, other.sigmas, rtol=1e-6, atol=0))
        )


def predicted_x0_and_epsilon(
    model_output: Tensor, x_t: Tensor, abar_t: float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Tweedie's x0_hat and eps_hat from an epsilon, v or x0 prediction.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
    """
    a, s = abar_t**0.5, (1 - abar_t) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output, a * model_output + s * x_t
    if prediction_type == "sample":
        return model_output, (x_t - a * model_output) / s
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddpm_posterior_mean(x0: Tensor, x_t: Tensor, abar_t: float, abar_prev: float) -> Tensor:
    """Mean of q(x_{t-1} | x_t, x0): c0 x0 + ct x_t (DDPM eq. 7, strided)."""
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    c0 = abar_prev**0.5 * beta_t / (1 - abar_t)
    ct = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    return c0 * x0 + ct * x_t


def ddpm_variance(
    abar_t: float, abar_prev: float, variance_type: str, v: Tensor | None = None
) -> Tensor | float:
    """DDPM step variance: beta_tilde (fixed_small), beta (fixed_large) or learned.

    ``learned_range``: exp(f log beta + (1 - f) log beta_tilde), f = (v + 1) / 2.
    ``learned_log``: beta_tilde * exp(v), a free log-variance offset from fixed_small.
    """
    beta_t = 1 - abar_t / abar_prev
    beta_tilde = max((1 - abar_prev) / (1 - abar_t) * beta_t, MIN_VARIANCE)
    if variance_type == "fixed_small":
        return beta_tilde
    if variance_type == "fixed_large":
        return beta_t
    if v is None:
        raise ValueError(f"variance_type={variance_type!r} needs the model's variance channel")
    log_small = torch.log(torch.tensor(beta_tilde, dtype=torch.float64)).item()
    if variance_type == "learned_range":
        log_large = torch.log(torch.tensor(beta_t, dtype=torch.float64)).item()
        f = (v + 1) / 2
        return torch.exp(f * log_large + (1 - f) * log_small)
    if variance_type == "learned_log":
        return torch.exp(v + log_small)
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def ddim_variance(abar_t: float, abar_prev: float, eta: float) -> float:
    """DDIM sigma_t^2(eta) = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)."""
    return eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)


def ddim_mean(x0: Tensor, eps: Tensor, abar_prev: float, variance: float) -> Tensor:
    """sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps (DDIM eq. 12)."""
    return abar_prev**0.5 * x0 + max(1 - abar_prev - variance, 0.0) ** 0.5 * eps


def _per_sample_timesteps(t, batch: int) -> Tensor | None:
    """``t`` as a (B,) long CPU tensor when it gives one timestep per sample, else None."""
    if isinstance(t, Tensor):
        if t.ndim == 0:
            return None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got a {t.dtype} tensor")
        per = t.detach().cpu().long()
    elif isinstance(t, (list, tuple)):
        per = torch.tensor([check_int(v, f"t[{i}]") for i, v in enumerate(t)], dtype=torch.long)
    else:
        return None
    if per.shape != (batch,):
        raise ValueError(
            f"t must be one timestep or one per sample, shape ({batch},), got {tuple(per.shape)}"
        )
    return per


def step_gaussian(
    model_output: Tensor,
    x_t: Tensor,
    t: int | Tensor | Sequence[int],
    schedule: Schedule,
    spec: AnyStepSpec,
) -> Gaussian:
    """The reverse step N(mean, variance) implied by one model output at timestep(s) ``t``.

    Args:
        model_output: (B, C, ...) prediction, or (B, 2C, ...) with a variance channel
            for a learned variance type; the velocity for a :class:`FlowStepSpec`, whose
            step is :func:`msdda.flows.flow_step_gaussian` on a :class:`FlowSchedule`.
        x_t: (B, C, ...) current sample.
        t: one timestep of the schedule for the batch, or one per sample (a (B,) integer
            tensor or sequence); row b is then exactly the step of row b alone at ``t[b]``
            (each sample's alpha bars apply to all of its elements).

    Half-precision inputs are upcast: the Gaussian comes back in float32.
    The variance is floored at :data:`MIN_VARIANCE` times eta^2 where the scheduler's is
    0 (the last step), so a stochastic step stays fusable; eta = 0 gives variance 0. A flow
    step's floor is :data:`MIN_VARIANCE` times its noise factor (a^2, or sin^2(a pi / 2)).
    """
    check_floating_tensor(model_output, "model_output")
    check_floating_tensor(x_t, "x_t")
    check_instance(schedule, Schedule, "schedule", "a msdda.Schedule")
    check_instance(spec, (StepSpec, FlowStepSpec), "spec", "a msdda.StepSpec or FlowStepSpec")
    _check_spec_fits(spec, schedule)
    if x_t.ndim == 0:
        raise ValueError("x_t must have a leading batch axis (B, ...), got a scalar")
    per_sample = _per_sample_timesteps(t, x_t.shape[0])
    if per_sample is None:
        return _step_gaussian_at(model_output, x_t, _timestep(t, "t"), schedule, spec)
    parts, order = [], []
    for value in per_sample.unique().tolist():
        idx = (per_sample == value).nonzero().squeeze(1).to(x_t.device)
        parts.append(_step_gaussian_at(model_output[idx], x_t[idx], value, schedule, spec))
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return Gaussian(*(torch.cat(fields)[inverse] for fields in zip(*parts, strict=True)))


def _check_spec_fits(spec: AnyStepSpec, schedule: Schedule) -> None:
    """A flow spec needs a flow schedule and a DDPM/DDIM spec a DDPM/DDIM one."""
    flow_spec, flow_schedule = isinstance(spec, FlowStepSpec), isinstance(schedule, FlowSchedule)
    if flow_spec != flow_schedule:
        raise ValueError(
            f"spec {spec!r} does not fit a {schedule.sampler!r} schedule: a FlowStepSpec needs a "
            "FlowSchedule (FlowMatchEulerDiscreteScheduler), a StepSpec a DDPM/DDIM Schedule"
        )


def _flow_step_gaussian_at(
    velocity: Tensor, x_t: Tensor, t: int, schedule: FlowSchedule, spec: FlowStepSpec
) -> Gaussian:
    """The flow step at key ``t``: sigma -> sigma_next of ``schedule``."""
    sigma, sigma_next = schedule.sigma_pair(t)
    if velocity.shape != x_t.shape:
        raise ValueError(
            f"model_output shape {tuple(velocity.shape)} must equal x_t's {tuple(x_t.shape)}"
        )
    sigma_max = float(schedule.sigmas[1])  # Flow-GRPO's stand-in for sigma = 1
    return flow_step_gaussian(
        velocity, x_t, sigma, sigma_next, spec, sigma_max=sigma_max, min_variance=MIN_VARIANCE
    )


def _step_gaussian_at(
    model_output: Tensor, x_t: Tensor, t: int, schedule: Schedule, spec: AnyStepSpec
) -> Gaussian:
    """:func:`step_gaussian` for one timestep ``t`` shared by the batch."""
    if isinstance(spec, FlowStepSpec):
        return _flow_step_gaussian_at(model_output, x_t, t, schedule, spec)
    abar_t, abar_prev = schedule.alpha_bars(t)
    if schedule.sampler == "ddim" and spec.learned_variance:
        raise ValueError(
            f"variance_type={spec.variance_type!r} needs a DDPM schedule; DDIM's variance is set by eta"
        )
    if model_output.dtype in (torch.float16, torch.bfloat16):  # step maths in float32
        model_output, x_t = model_output.float(), x_t.float()
    if spec.learned_variance:
        if model_output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(
                f"variance_type={spec.variance_type!r} needs 2C = {2 * x_t.shape[1]} output "
                f"channels, got {model_output.shape[1]}"
            )
        model_output, v = model_output.split(x_t.shape[1], dim=1)
    else:
        v = None
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} must equal x_t's {tuple(x_t.shape)}"
            )
    x0, eps = predicted_x0_and_epsilon(model_output, x_t, abar_t, spec.prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    if schedule.sampler == "ddpm":
        mean = ddpm_posterior_mean(x0, x_t, abar_t, abar_prev)
        var = ddpm_variance(abar_t, abar_prev, spec.variance_type, v)
    else:
        raw = ddim_variance(abar_t, abar_prev, spec.eta)
        mean = ddim_mean(x0, eps, abar_prev, raw)
        var = max(raw, spec.eta**2 * MIN_VARIANCE)
    variance = var if isinstance(var, Tensor) else torch.full_like(mean, var)
    return Gaussian(mean, variance.to(mean.dtype), x0)
