"""The exactness testbed for flow-matching experts: the MSDDA answer known in closed form.

The data is the Gaussian mixture of :mod:`msdda.testbed`, so the exact velocity
E[v | x_sigma] is known at every sigma; the reference and the experts are stochastic flow
samplers (:class:`~msdda.flows.FlowStepSpec`) of that velocity, each at its own noise level,
so their steps have distinct variances before any reward. Step rewards are quadratic, so
expert i's single-objective optimum p_ref(a_i) exp(r_i / beta_i) is again Gaussian. The
product of the experts with exponents lambda_i (docs/design.md §1) is then computed
directly: the geometric mixture of the references prod_i p_ref(a_i)^lambda_i (natural
parameters summed), tilted once by exp(sum_i w_i r_i / beta); with equal noise levels it
is p_ref exp(sum_i w_i r_i / beta), the weighted optimum itself. MSDDA's fused step and
whole chains must equal it to float64 round-off, for every rule (docs/flow-models.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .experts import Expert, expert_policy, msdda_step
from .flows import FLOW_RULES, FlowStepSpec
from .fusion import Gaussian, fusion_coefficients
from .gaussians import FlowSchedule, Schedule
from .sampling import SeededNoise, sample_chain
from .testbed import (
    CheckCase,
    CheckResult,
    GaussianMixture,
    QuadraticReward,
    max_elementwise_relative_error,
    max_relative_error,
    random_rewards,
    tilted_step,
    weighted_optimum_step,
)
from .validation import (
    MAX_SEED,
    check_instance,
    check_int,
    check_number,
    check_seed,
    check_sequence,
)

__all__ = [
    "mixture_velocity",
    "flow_mixture_denoiser",
    "flow_testbed_schedule",
    "product_of_steps",
    "flow_weighted_optimum_step",
    "FlowCheckCase",
    "FLOW_BASE_CASES",
    "FLOW_DEFAULT_CASES",
    "run_flow_check",
]


def mixture_velocity(mixture: GaussianMixture, x: Tensor, sigma: float) -> Tensor:
    """The exact velocity E[eps - x0 | x_sigma] = (x - E[x0 | x_sigma]) / sigma, 0 < sigma <= 1.

    x_sigma = (1 - sigma) x0 + sigma eps; component k gives x_sigma ~ N((1 - sigma) m_k,
    V_k I) with V_k = (1 - sigma)^2 s_k^2 + sigma^2, and E[x0 | x, k] =
    m_k + (1 - sigma) s_k^2 / V_k (x - (1 - sigma) m_k).
    """
    sigma = check_number(sigma, "sigma", low=0.0, high=1.0, low_inclusive=False)
    xd = x.to(torch.float64)
    c = 1.0 - sigma
    var = c**2 * mixture.stds**2 + sigma**2  # (M,)
    diff = xd[:, None, :] - c * mixture.means[None]  # (B, M, d)
    logp = torch.log(mixture.weights) - 0.5 * mixture.dim * torch.log(var)
    resp = torch.softmax(logp - 0.5 * (diff**2).sum(-1) / var, dim=1)  # (B, M)
    x0_k = mixture.means[None] + (c * mixture.stds**2 / var)[None, :, None] * diff
    x0 = (resp[:, :, None] * x0_k).sum(1)
    return ((xd - x0) / sigma).to(x.dtype)


def flow_mixture_denoiser(mixture: GaussianMixture, schedule: FlowSchedule):
    """A velocity denoiser ``(x, t keys, cond) -> v`` exact under the flow ``schedule``."""
    check_instance(schedule, FlowSchedule, "schedule", "a msdda.gaussians.FlowSchedule")

    def denoise(x: Tensor, t: Tensor, cond=None) -> Tensor:
        keys = t.reshape(-1).tolist()
        if len(set(keys)) != 1:
            return torch.cat(
                [
                    mixture_velocity(mixture, x[i : i + 1], schedule.sigma_at(k))
                    for i, k in enumerate(keys)
                ]
            )
        return mixture_velocity(mixture, x, schedule.sigma_at(keys[0]))

    return denoise


def flow_testbed_schedule(num_inference_steps: int = 50, shift: float = 3.0) -> FlowSchedule:
    """diffusers' FlowMatchEulerDiscreteScheduler (SD3's static shift 3) in ``num_inference_steps``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = check_number(shift, "shift", low=0.0, low_inclusive=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return Schedule.from_scheduler(scheduler, num_inference_steps)


def product_of_steps(steps: Sequence[Gaussian], exponents: Sequence[float]) -> Gaussian:
    """prod_i N(mu_i, var_i)^(c_i), normalised: precision sum_i c_i / var_i, natural mean summed."""
    steps, exponents = check_sequence(steps, "steps"), check_sequence(exponents, "exponents")
    if not steps or len(steps) != len(exponents):
        raise ValueError(f"exponents has {len(exponents)} entries for {len(steps)} steps")
    precision = sum(c / g.variance for g, c in zip(steps, exponents, strict=True))
    natural = sum(c * g.mean / g.variance for g, c in zip(steps, exponents, strict=True))
    return Gaussian(natural / precision, 1.0 / precision)


def flow_weighted_optimum_step(
    references: Sequence[Gaussian],
    lambdas: Sequence[float],
    rewards: Sequence[QuadraticReward],
    weights: Sequence[float],
    kl_coef: float,
) -> Gaussian:
    """prod_i p_ref(a_i)^lambda_i (i = 0..K, the reference first) tilted by exp(sum w_i r_i / beta)."""
    return weighted_optimum_step(product_of_steps(references, lambdas), rewards, weights, kl_coef)


@dataclass(frozen=True)
class FlowCheckCase(CheckCase):
    """A :class:`~msdda.testbed.CheckCase` of flow experts: a rule and K + 1 noise levels."""

    noise_levels: tuple[float, ...] = ()  # the reference's first, then one per expert
    rule: str = "sde"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.noise_levels) != len(self.weights) + 1:
            raise ValueError(
                f"case {self.name!r}: noise_levels must hold K + 1 = {len(self.weights) + 1} "
                f"levels (the reference's first), got {len(self.noise_levels)}"
            )
        for a in self.noise_levels:
            FlowStepSpec(self.rule, a)  # checks the rule and each level
            if a == 0:
                raise ValueError(f"case {self.name!r}: a noise level of 0 cannot be fused")


#: The problems of the check, each run with every rule; the reference's noise level is the
#: largest, so that lambda_0 < 0 keeps the fused precision positive.
FLOW_BASE_CASES: tuple[tuple[str, tuple, tuple, float, tuple], ...] = (
    ("K=2 equal levels", (0.3, 0.7), (1.0, 1.0), 1.0, (0.7, 0.7, 0.7)),
    ("K=2 distinct levels", (0.4, 0.6), (0.5, 2.0), 1.1, (0.8, 0.5, 0.7)),
    ("K=3 distinct", (0.2, 0.3, 0.5), (0.7, 1.0, 1.6), 1.25, (0.9, 0.4, 0.6, 0.8)),
    (
        "K=5 distinct",
        (0.1, 0.15, 0.2, 0.25, 0.3),
        (0.5, 0.8, 1.0, 1.5, 3.0),
        2.0,
        (0.9, 0.3, 0.5, 0.6, 0.7, 0.8),
    ),
    ("K=3 lambda0<0", (0.2, 0.3, 0.5), (1.0, 1.0, 1.0), 0.5, (0.9, 0.5, 0.7, 0.8)),
    (
        "K=5 lambda0<0",
        (0.3, 0.1, 0.2, 0.25, 0.15),
        (0.6, 1.2, 1.0, 2.0, 0.9),
        0.7,
        (0.95, 0.4, 0.5, 0.6, 0.7, 0.9),
    ),
)

FLOW_DEFAULT_CASES: tuple[FlowCheckCase, ...] = tuple(
    FlowCheckCase(f"{rule}: {name}", w, b, beta, levels, rule)
    for rule in FLOW_RULES
    for name, w, b, beta, levels in FLOW_BASE_CASES
)


def run_flow_check(
    cases: Sequence[FlowCheckCase] = FLOW_DEFAULT_CASES,
    *,
    dim: int = 4,
    num_samples: int = 256,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> list[CheckResult]:
    """Fused step vs the direct optimum at every step, and whole chains on shared noise."""
    cases = check_sequence(cases, "cases")
    for i, case in enumerate(cases):
        check_instance(case, FlowCheckCase, f"cases[{i}]", "a FlowCheckCase")
    dim = check_int(dim, "dim", low=1)
    num_samples = check_int(num_samples, "num_samples", low=1)
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps", low=1, high=1000)
    seed = check_seed(seed)
    mixture = GaussianMixture.random(dim=dim, seed=seed)
    schedule = flow_testbed_schedule(num_inference_steps)
    denoiser = flow_mixture_denoiser(mixture, schedule)
    shape = (num_samples, dim)
    return [_check_case(case, denoiser, schedule, shape, seed) for case in cases]


def _reference_steps(case: FlowCheckCase, denoiser, schedule: FlowSchedule) -> list:
    """The mixture's step policy at each of the case's noise levels (the reference's first)."""
    return [
        expert_policy(Expert(denoiser, FlowStepSpec(case.rule, a), name=f"a={a}"), schedule)
        for a in case.noise_levels
    ]


def _check_case(
    case: FlowCheckCase, denoiser, schedule: FlowSchedule, shape: tuple[int, int], seed: int
) -> CheckResult:
    """One case: MSDDA of the tilted flow experts against the direct optimum, on shared noise."""
    rewards = random_rewards(len(case.weights), shape[1], seed)
    reference, *own = _reference_steps(case, denoiser, schedule)
    experts = [
        (lambda x, t, p=p, r=r, b=b: tilted_step(p(x, t), [r], [1.0 / b]))
        for p, r, b in zip(own, rewards, case.kl_coefs, strict=True)
    ]
    fused = msdda_step(
        experts, case.weights, kl_coefs=case.kl_coefs, kl_coef=case.kl_coef, reference=reference
    )
    coefs = fusion_coefficients(case.weights, case.kl_coefs, case.kl_coef)
    lambdas = [coefs.lambda0, *coefs.lambdas]

    def direct(x: Tensor, t: int) -> Gaussian:
        steps = [reference(x, t), *(p(x, t) for p in own)]
        return flow_weighted_optimum_step(steps, lambdas, rewards, case.weights, case.kl_coef)

    errs = {"mean": 0.0, "var": 0.0}

    def compare(x: Tensor, t: int) -> Gaussian:
        a, b = fused(x, t), direct(x, t)
        errs["mean"] = max(errs["mean"], max_relative_error(a.mean, b.mean))
        errs["var"] = max(errs["var"], max_elementwise_relative_error(a.variance, b.variance))
        return a

    noise_seed = (seed + 1) % (MAX_SEED + 1)
    x_T = SeededNoise(seed).initial(shape).double()
    x_fused = sample_chain(compare, x_T, schedule.timesteps, SeededNoise(noise_seed))
    x_direct = sample_chain(direct, x_T, schedule.timesteps, SeededNoise(noise_seed))
    return CheckResult(
        case=case,
        lambda0=coefs.lambda0,
        step_mean_rel_err=errs["mean"],
        step_var_rel_err=errs["var"],
        chain_max_abs_diff=float((x_fused - x_direct).abs().max()),
    )
