"""The exactness testbed: an analytic problem where the MSDDA answer is known.

Data is a Gaussian mixture, so the optimal denoiser is known in closed form at
every noise level. Step rewards are quadratic, r_i(x) = -1/2 sum_j a_ij (x_j - g_ij)^2,
so each single-objective step optimum p_ref * exp(r_i / beta_i) is again Gaussian,
with precision 1/var_ref + a_i/beta_i (distinct, per-element variances), and the
weighted optimum p_ref * exp(sum_i w_i r_i / beta) can be computed directly.
MSDDA's fused step must equal it to float64 round-off (docs/design.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .experts import msdda_step
from .fusion import Gaussian, fusion_coefficients
from .gaussians import Schedule, StepSpec, step_gaussian
from .sampling import SeededNoise, sample_chain
from .validation import (
    MAX_SEED,
    check_instance,
    check_int,
    check_number,
    check_positive,
    check_seed,
    check_sequence,
)

__all__ = [
    "GaussianMixture",
    "QuadraticReward",
    "tilted_step",
    "weighted_optimum_step",
    "testbed_schedule",
    "random_rewards",
    "max_relative_error",
    "max_elementwise_relative_error",
    "CheckCase",
    "CheckResult",
    "DEFAULT_CASES",
    "run_check",
]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """p(x0) = sum_k pi_k N(m_k, s_k^2 I) in d dimensions (float64)."""

    weights: Tensor  # (M,) mixture weights pi_k, summing to 1
    means: Tensor  # (M, d) component means m_k
    stds: Tensor  # (M,) component standard deviations s_k

    @classmethod
    def random(cls, dim: int = 4, components: int = 3, seed: int = 0) -> GaussianMixture:
        dim = check_int(dim, "dim", low=1)
        components = check_int(components, "components", low=1)
        g = torch.Generator().manual_seed(check_seed(seed))
        w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        return cls(
            weights=w / w.sum(),
            means=torch.randn(components, dim, generator=g, dtype=torch.float64) * 1.5,
            stds=torch.rand(components, generator=g, dtype=torch.float64) * 0.4 + 0.2,
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0, (n, d)."""
        n = check_int(n, "n", low=0)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def epsilon(self, x_t: Tensor, abar_t: float) -> Tensor:
        """The exact epsilon prediction E[eps | x_t] = -sqrt(1 - abar_t) * score(x_t)."""
        abar_t = check_number(abar_t, "abar_t", low=0.0, high=1.0, low_inclusive=False)
        x = x_t.to(torch.float64)
        a = math.sqrt(abar_t)
        var = abar_t * self.stds**2 + (1 - abar_t)  # (M,) marginal variance per component
        diff = x[:, None, :] - a * self.means[None]  # (B, M, d)
        logp = (
            torch.log(self.weights)
            - 0.5 * self.dim * torch.log(var)
            - 0.5 * (diff**2).sum(-1) / var
        )
        resp = torch.softmax(logp, dim=1)  # (B, M)
        score = -(resp[:, :, None] * diff / var[None, :, None]).sum(1)
        return (-math.sqrt(1 - abar_t) * score).to(x_t.dtype)

    def denoiser(self, schedule: Schedule):
        """An epsilon-prediction denoiser ``(x_t, t, cond) -> eps`` exact under ``schedule``."""
        table = schedule.alphas_cumprod

        def denoise(x_t: Tensor, t: Tensor, cond=None) -> Tensor:
            ts = t.reshape(-1).tolist()
            if len(set(ts)) != 1:
                return torch.cat(
                    [self.epsilon(x_t[i : i + 1], float(table[ti])) for i, ti in enumerate(ts)]
                )
            return self.epsilon(x_t, float(table[ts[0]]))

        return denoise


@dataclass(frozen=True, eq=False)
class QuadraticReward:
    """r(x) = -1/2 sum_j a_j (x_j - g_j)^2, a per-dimension curvature a > 0 and goal g."""

    curvature: Tensor  # (d,) a
    goal: Tensor  # (d,) g

    def __call__(self, x: Tensor) -> Tensor:
        return -0.5 * (self.curvature * (x - self.goal) ** 2).sum(-1)


def tilted_step(
    reference: Gaussian, rewards: Sequence[QuadraticReward], coefs: Sequence[float]
) -> Gaussian:
    """N(mu, var) * exp(sum_i c_i r_i): precision 1/var + sum c_i a_i, mean by precision."""
    rewards, coefs = check_sequence(rewards, "rewards"), check_sequence(coefs, "coefs")
    if len(rewards) != len(coefs):
        raise ValueError(f"coefs has {len(coefs)} entries for {len(rewards)} rewards")
    coefs = [check_number(c, f"coefs[{i}]") for i, c in enumerate(coefs)]
    precision = 1.0 / reference.variance
    natural = reference.mean / reference.variance
    for r, c in zip(rewards, coefs, strict=True):
        precision = precision + c * r.curvature
        natural = natural + c * r.curvature * r.goal
    return Gaussian(natural / precision, (1.0 / precision).expand_as(natural))


def weighted_optimum_step(
    reference: Gaussian,
    rewards: Sequence[QuadraticReward],
    weights: Sequence[float],
    kl_coef: float,
) -> Gaussian:
    """The step-level optimum of sum_i w_i r_i at KL coefficient beta, computed directly."""
    kl_coef = check_positive(kl_coef, "kl_coef")
    weights = [
        check_number(w, f"weights[{i}]") for i, w in enumerate(check_sequence(weights, "weights"))
    ]
    return tilted_step(reference, rewards, [w / kl_coef for w in weights])


def testbed_schedule(num_inference_steps: int = 50) -> Schedule:
    """1000-step linear DDPM table (diffusers), strided to ``num_inference_steps``, no clipping."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    return Schedule.from_scheduler(sched, num_inference_steps)


@dataclass(frozen=True)
class CheckCase:
    """One fusion problem: K experts with their kl_coefs, the weights and the target beta."""

    name: str
    weights: tuple[float, ...]
    kl_coefs: tuple[float, ...]
    kl_coef: float

    def __post_init__(self) -> None:
        if len(self.weights) < 1:
            raise ValueError(f"case {self.name!r}: weights must hold K >= 1 weights")
        fusion_coefficients(self.weights, self.kl_coefs, self.kl_coef)  # checks every number


@dataclass(frozen=True)
class CheckResult:
    case: CheckCase
    lambda0: float
    step_mean_rel_err: float  # max over steps of max|mu - mu*| / max|mu*|
    step_var_rel_err: float  # max over steps and elements of |var - var*| / var*
    chain_max_abs_diff: float  # max |x0_msdda - x0_direct| over samples and dimensions

    @property
    def step_rel_err(self) -> float:
        return max(self.step_mean_rel_err, self.step_var_rel_err)


DEFAULT_CASES: tuple[CheckCase, ...] = (
    CheckCase("K=2 equal betas", (0.3, 0.7), (1.0, 1.0), 1.0),
    CheckCase("K=2 distinct betas", (0.4, 0.6), (0.5, 2.0), 1.1),
    CheckCase("K=3 distinct betas", (0.2, 0.3, 0.5), (0.7, 1.0, 1.6), 1.25),
    CheckCase("K=5 distinct betas", (0.1, 0.15, 0.2, 0.25, 0.3), (0.5, 0.8, 1.0, 1.5, 3.0), 2.0),
    CheckCase("K=3 lambda0<0 (stronger)", (0.2, 0.3, 0.5), (1.0, 1.0, 1.0), 0.5),
    CheckCase("K=5 lambda0<0", (0.3, 0.1, 0.2, 0.25, 0.15), (0.6, 1.2, 1.0, 2.0, 0.9), 0.7),
)


def random_rewards(k: int, dim: int, seed: int) -> list[QuadraticReward]:
    """K quadratic rewards with random curvatures in [0.1, 2.1) and goals, from ``seed``."""
    g = torch.Generator().manual_seed(1000 + seed)
    return [
        QuadraticReward(
            curvature=torch.rand(dim, generator=g, dtype=torch.float64) * 2.0 + 0.1,
            goal=torch.randn(dim, generator=g, dtype=torch.float64) * 2.0,
        )
        for _ in range(k)
    ]


def max_relative_error(a: Tensor, b: Tensor) -> float:
    """max|a - b| / max|b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def max_elementwise_relative_error(a: Tensor, b: Tensor) -> float:
    """max over elements of |a - b| / b (b > 0)."""
    return float(((a - b).abs() / b).max())


def run_check(
    cases: Sequence[CheckCase] = DEFAULT_CASES,
    *,
    dim: int = 4,
    num_samples: int = 256,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> list[CheckResult]:
    """Fused step vs direct optimum at every step, and whole chains on shared noise."""
    cases, dim, num_samples, num_inference_steps, seed = _check_run_arguments(
        cases, dim, num_samples, num_inference_steps, seed
    )
    mixture = GaussianMixture.random(dim=dim, seed=seed)
    schedule = testbed_schedule(num_inference_steps)
    reference = _reference_policy(mixture, schedule)
    shape = (num_samples, dim)
    return [_check_case(case, reference, schedule, shape, seed) for case in cases]


def _check_run_arguments(cases, dim, num_samples, num_inference_steps, seed):
    cases = check_sequence(cases, "cases")
    for i, case in enumerate(cases):
        check_instance(case, CheckCase, f"cases[{i}]", "a CheckCase")
    dim = check_int(dim, "dim", low=1)
    num_samples = check_int(num_samples, "num_samples", low=1)
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps", low=1, high=1000)
    return cases, dim, num_samples, num_inference_steps, check_seed(seed)


def _reference_policy(mixture: GaussianMixture, schedule: Schedule):
    """The exact mixture's reverse step ``(x_t, t) -> Gaussian`` (fixed-small DDPM)."""
    denoise = mixture.denoiser(schedule)
    spec = StepSpec(prediction_type="epsilon", variance_type="fixed_small")

    def reference(x_t: Tensor, t: int) -> Gaussian:
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long)
        g = step_gaussian(denoise(x_t, tb), x_t, t, schedule, spec)
        return Gaussian(g.mean, g.variance)

    return reference


def _check_case(
    case: CheckCase, reference, schedule: Schedule, shape: tuple[int, int], seed: int
) -> CheckResult:
    """One case: MSDDA of the tilted experts against the direct optimum, on shared noise."""
    rewards = random_rewards(len(case.weights), shape[1], seed)
    experts = [
        (lambda x_t, t, r=r, b=b: tilted_step(reference(x_t, t), [r], [1.0 / b]))
        for r, b in zip(rewards, case.kl_coefs, strict=True)
    ]
    fused = msdda_step(
        experts, case.weights, kl_coefs=case.kl_coefs, kl_coef=case.kl_coef, reference=reference
    )

    def direct(x_t: Tensor, t: int) -> Gaussian:
        return weighted_optimum_step(reference(x_t, t), rewards, case.weights, case.kl_coef)

    errs = {"mean": 0.0, "var": 0.0}

    def compare(x_t: Tensor, t: int) -> Gaussian:
        a, b = fused(x_t, t), direct(x_t, t)
        errs["mean"] = max(errs["mean"], max_relative_error(a.mean, b.mean))
        errs["var"] = max(errs["var"], max_elementwise_relative_error(a.variance, b.variance))
        return a

    noise_seed = (seed + 1) % (MAX_SEED + 1)  # seed + 1, kept in the seed range
    x_T = SeededNoise(seed).initial(shape).double()
    x_fused = sample_chain(compare, x_T, schedule.timesteps, SeededNoise(noise_seed))
    x_direct = sample_chain(direct, x_T, schedule.timesteps, SeededNoise(noise_seed))
    return CheckResult(
        case=case,
        lambda0=fusion_coefficients(case.weights, case.kl_coefs, case.kl_coef).lambda0,
        step_mean_rel_err=errs["mean"],
        step_var_rel_err=errs["var"],
        chain_max_abs_diff=float((x_fused - x_direct).abs().max()),
    )
