"""The trainer validated where the answer is known: the core's Gaussian-mixture testbed.

The reference is the exact mixture denoiser; the policy is that reference plus a learned
per-timestep affine correction of its epsilon (and, for learned variance, a per-timestep
log-variance). Both can represent the step-level optimum exactly:

- a linear reward r(x) = c . x tilts N(mu, var) to N(mu + var c / beta, var): a mean shift
  only, the fixed-variance case;
- a quadratic reward (:class:`msdda.testbed.QuadraticReward`) tilts it to a Gaussian of
  precision 1/var + a/beta (:func:`msdda.testbed.tilted_step`): the learned-variance case.

With exact soft labels each pair's loss is minimised by the optimum itself, so DPO must
recover it to optimisation accuracy; hard labels must not (their effective beta shrinks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..experts import Expert, expert_policy
from ..fusion import Gaussian
from ..gaussians import (
    Schedule,
    StepSpec,
    ddpm_posterior_mean,
    predicted_x0_and_epsilon,
    step_gaussian,
)
from ..sampling import SeededNoise, sample_chain
from ..testbed import GaussianMixture, QuadraticReward, testbed_schedule, tilted_step
from ..validation import MAX_SEED, check_int, check_positive, check_seed
from .losses import LabelKind
from .pairs import collect_pairs, training_step_indices
from .train import TrainConfig, TrainRecord, TrainResult, train_dpo

__all__ = [
    "LinearReward",
    "TestbedPolicy",
    "TestbedValidation",
    "validate_on_testbed",
]


@dataclass(frozen=True, eq=False)
class LinearReward:
    """r(x) = c . x: tilts a Gaussian step by a mean shift var * c / beta, variance unchanged."""

    direction: Tensor  # (d,) c

    def __call__(self, x: Tensor) -> Tensor:
        return (x * self.direction).sum(-1)

    def tilt(self, reference: Gaussian, kl_coef: float) -> Gaussian:
        kl_coef = check_positive(kl_coef, "kl_coef")
        return Gaussian(
            reference.mean + reference.variance * self.direction / kl_coef, reference.variance
        )


class TestbedPolicy(nn.Module):
    """The exact mixture reference with a learned per-timestep affine map of its step mean.

    mean_theta = (1 + A_t) * mean_ref + c_t element-wise ((d,) tables per timestep, zero
    at start: the reference), returned as the epsilon that gives that DDPM mean; with
    ``learned_variance`` a second output half v = bound * tanh(V_t / bound) for the core's
    ``learned_log`` variance. Every tilt of a Gaussian step by a linear or quadratic reward
    has this form, so DPO can reach the optimum exactly.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        mixture: GaussianMixture,
        schedule: Schedule,
        *,
        learned_variance: bool = False,
        log_variance_bound: float = 4.0,
    ) -> None:
        super().__init__()
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a msdda.Schedule, got {type(schedule).__name__}")
        log_variance_bound = check_positive(log_variance_bound, "log_variance_bound")
        if schedule.sampler != "ddpm":
            raise ValueError(
                f"TestbedPolicy needs a DDPM schedule: schedule.sampler is {schedule.sampler!r}"
            )
        self.mixture = mixture
        self.alphas_cumprod = schedule.alphas_cumprod
        n, d = schedule.num_train_timesteps, mixture.dim
        # DDPM mean = x_coef * x_t - eps_coef * eps, per timestep of the schedule.
        x_coef = torch.zeros(n, dtype=torch.float64)
        eps_coef = torch.ones(n, dtype=torch.float64)
        for t in schedule.timesteps:
            abar, abar_prev = schedule.alpha_bars(t)
            one = torch.ones(1, dtype=torch.float64)
            x0, _ = predicted_x0_and_epsilon(-one, 0 * one, abar, "epsilon")
            eps_coef[t] = ddpm_posterior_mean(x0, 0 * one, abar, abar_prev)
            x0, _ = predicted_x0_and_epsilon(0 * one, one, abar, "epsilon")
            x_coef[t] = ddpm_posterior_mean(x0, one, abar, abar_prev)
        self.register_buffer("x_coef", x_coef)
        self.register_buffer("eps_coef", eps_coef)
        self.mean_scale = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
        self.mean_offset = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
        self.log_variance_bound = log_variance_bound
        self.log_variance = (
            nn.Parameter(torch.zeros(n, d, dtype=torch.float64)) if learned_variance else None
        )

    def reference_epsilon(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The exact mixture epsilon at per-sample timesteps; (B, d)."""
        out = torch.empty_like(x_t)
        for ti in t.unique().tolist():
            idx = t == ti
            out[idx] = self.mixture.epsilon(x_t[idx], float(self.alphas_cumprod[ti]))
        return out

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        eps = self.reference_epsilon(x_t, t)
        x_coef, eps_coef = self.x_coef[t, None], self.eps_coef[t, None]
        mean_ref = x_coef * x_t - eps_coef * eps
        correction = self.mean_scale[t] * mean_ref + self.mean_offset[t]
        out = eps - correction / eps_coef
        if self.log_variance is None:
            return out
        bound = self.log_variance_bound
        return torch.cat([out, bound * torch.tanh(self.log_variance[t] / bound)], dim=1)

    def variance_parameters(self) -> list[nn.Parameter]:
        return [] if self.log_variance is None else [self.log_variance]


@dataclass(frozen=True)
class TestbedValidation:
    """How close DPO got to the closed-form step optimum on held-out reference states."""

    labels: str
    learned_variance: bool
    mean_rel_err: float  # max |mu - mu*| / max |mu* - mu_ref|: error relative to the tilt
    var_rel_err: float  # max |var - var*| / var*
    tilt_ratio: float  # mean of (mu - mu_ref).(mu* - mu_ref) / |mu* - mu_ref|^2 (1 = exact)
    num_pairs: int
    seconds: float
    history: tuple[TrainRecord, ...]


def validate_on_testbed(
    *,
    labels: LabelKind = "soft",
    learned_variance: bool = False,
    kl_coef: float = 1.0,
    dim: int = 4,
    num_chains: int = 32,
    pairs_per_state: int = 4,
    num_inference_steps: int = 20,
    skip_last: int = 2,
    num_steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
) -> TestbedValidation:
    """Train a :class:`TestbedPolicy` by step-level DPO and compare it with the exact optimum.

    Fixed variance: linear reward, exact target a mean shift. Learned variance: quadratic
    reward, exact target :func:`msdda.testbed.tilted_step`. Errors are measured at every
    trained step on fresh reference chains (other seeds than training).
    """
    kl_coef, lr, seed = _check_validation_arguments(
        learned_variance, kl_coef, dim, num_chains, pairs_per_state, num_inference_steps,
        skip_last, num_steps, lr, seed,
    )  # fmt: skip
    torch.manual_seed(seed)
    mixture = GaussianMixture.random(dim=dim, seed=seed)
    schedule = testbed_schedule(num_inference_steps)
    reward, target = _reward_and_optimum(learned_variance, dim, kl_coef, seed)
    reference = Expert(
        mixture.denoiser(schedule), StepSpec("epsilon", "fixed_small"), name="reference"
    )
    steps = training_step_indices(schedule, skip_last)
    pairs = collect_pairs(
        reference, schedule, lambda x, t, c: {"r": reward(x)}, shape=(dim,), num_chains=num_chains,
        pairs_per_state=pairs_per_state, steps=steps, seed=seed, dtype=torch.float64,
    )  # fmt: skip
    policy = TestbedPolicy(mixture, schedule, learned_variance=learned_variance)
    spec = StepSpec("epsilon", "learned_log" if learned_variance else "fixed_small")
    config = TrainConfig(
        kl_coef=kl_coef, labels=labels, num_steps=num_steps, batch_size=len(pairs), lr=lr,
        max_grad_norm=None, seed=seed, log_every=max(1, num_steps // 10),
    )  # fmt: skip
    result, seconds = _timed_training(policy, pairs, schedule, spec, config)
    return TestbedValidation(
        labels=labels,
        learned_variance=learned_variance,
        **_held_out_errors(policy, reference, schedule, spec, steps, target, seed),
        num_pairs=len(pairs),
        seconds=seconds,
        history=result.history,
    )


def _timed_training(
    policy: TestbedPolicy, pairs, schedule: Schedule, spec: StepSpec, config: TrainConfig
) -> tuple[TrainResult, float]:
    """:func:`train_dpo` on the pairs' reward ``r``, and its wall-clock seconds."""
    start = time.perf_counter()
    result = train_dpo(
        policy,
        pairs,
        pairs.weighted_rewards({"r": 1.0}),
        schedule,
        spec,
        config,
        variance_parameters=policy.variance_parameters(),
    )
    return result, time.perf_counter() - start


def _check_validation_arguments(
    learned_variance,
    kl_coef,
    dim,
    num_chains,
    pairs_per_state,
    num_inference_steps,
    skip_last,
    num_steps,
    lr,
    seed,
) -> tuple[float, float, int]:
    """The arguments of :func:`validate_on_testbed` but ``labels`` (TrainConfig checks it);
    kl_coef, lr and seed as checked."""
    kl_coef = check_positive(kl_coef, "kl_coef")
    for name, value in (
        ("dim", dim),
        ("num_chains", num_chains),
        ("pairs_per_state", pairs_per_state),
        ("num_inference_steps", num_inference_steps),
        ("num_steps", num_steps),
    ):
        check_int(value, name, low=1)
    check_int(skip_last, "skip_last", low=0)
    lr = check_positive(lr, "lr")
    seed = check_seed(seed)
    if not isinstance(learned_variance, bool):
        raise TypeError(f"learned_variance must be a bool, got {type(learned_variance).__name__}")
    return kl_coef, lr, seed


def _reward_and_optimum(
    learned_variance: bool, dim: int, kl_coef: float, seed: int
) -> tuple[Callable[[Tensor], Tensor], Callable[[Gaussian], Gaussian]]:
    """The reward trained on, and its exact step optimum ``reference step -> tilted step``.

    Fixed variance: a linear reward (a mean shift). Learned variance: a quadratic reward
    (:func:`msdda.testbed.tilted_step`).
    """
    g = torch.Generator().manual_seed(seed + 17)
    if learned_variance:
        reward = QuadraticReward(
            curvature=torch.rand(dim, generator=g, dtype=torch.float64) * 2.0 + 0.5,
            goal=torch.randn(dim, generator=g, dtype=torch.float64) * 2.0,
        )
        return reward, lambda ref: tilted_step(ref, [reward], [1.0 / kl_coef])
    linear = LinearReward(torch.randn(dim, generator=g, dtype=torch.float64) * 2.0)
    return linear, lambda ref: linear.tilt(ref, kl_coef)


def _step_errors(
    got: Gaussian, want: Gaussian, ref: Gaussian
) -> tuple[float, float, float, Tensor]:
    """At one step: max |mu - mu*|, max |mu* - mu_ref|, max |var - var*| / var*, and the
    tilt ratio (mu - mu_ref).(mu* - mu_ref) / |mu* - mu_ref|^2."""
    tilt = want.mean - ref.mean
    return (
        float((got.mean - want.mean).abs().max()),
        float(tilt.abs().max()),
        float(((got.variance - want.variance).abs() / want.variance).max()),
        ((got.mean - ref.mean) * tilt).sum() / (tilt * tilt).sum(),
    )


def _held_out_errors(
    policy: TestbedPolicy,
    reference: Expert,
    schedule: Schedule,
    spec: StepSpec,
    steps: tuple[int, ...],
    target: Callable[[Gaussian], Gaussian],
    seed: int,
) -> dict[str, float]:
    """The trained policy against the optimum on fresh reference chains, every trained step:
    TestbedValidation's ``mean_rel_err``, ``var_rel_err`` and ``tilt_ratio``."""
    ref_policy = expert_policy(reference, schedule)
    trained = {schedule.timesteps[i] for i in steps}
    errs = {"mean": 0.0, "shift": 0.0, "var": 0.0, "ratio": []}

    @torch.no_grad()
    def compare(x_t: Tensor, t: int) -> Gaussian:
        ref = ref_policy(x_t, t)
        if t in trained:
            want = target(Gaussian(ref.mean, ref.variance))
            tb = torch.full((x_t.shape[0],), t, dtype=torch.long)
            got = step_gaussian(policy(x_t, tb), x_t, t, schedule, spec)
            mean, shift, var, ratio = _step_errors(got, want, ref)
            errs["mean"] = max(errs["mean"], mean)
            errs["shift"] = max(errs["shift"], shift)
            errs["var"] = max(errs["var"], var)
            errs["ratio"].append(ratio)
        return ref

    noise = SeededNoise((seed + 1000) % (MAX_SEED + 1))  # in the seed range
    x_T = noise.initial((256, policy.mixture.dim)).double()
    sample_chain(compare, x_T, schedule.timesteps, noise)
    return {
        "mean_rel_err": errs["mean"] / errs["shift"] if errs["shift"] > 0 else math.nan,
        "var_rel_err": errs["var"],
        "tilt_ratio": float(torch.stack(errs["ratio"]).mean()),
    }
