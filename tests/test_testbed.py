"""The exactness testbed is itself right: exact denoiser, exact tilted steps, tight bounds."""

from __future__ import annotations

import math

import pytest
import torch

from msdda import Gaussian, SeededNoise, StepSpec, fusion_coefficients, sample_chain, step_gaussian
from msdda import testbed as tb
from msdda.testbed import (
    DEFAULT_CASES,
    GaussianMixture,
    QuadraticReward,
    run_check,
    tilted_step,
    weighted_optimum_step,
)

F64 = torch.float64


def _log_marginal(mixture: GaussianMixture, x_t: torch.Tensor, abar: float) -> torch.Tensor:
    """log q_t(x_t) = log sum_k pi_k N(x_t; sqrt(abar) m_k, (abar s_k^2 + 1 - abar) I), per row."""
    var = abar * mixture.stds**2 + (1 - abar)
    sq = ((x_t[:, None, :] - math.sqrt(abar) * mixture.means[None]) ** 2).sum(-1)
    log_n = -0.5 * sq / var - 0.5 * mixture.dim * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(mixture.weights) + log_n, dim=1)


@pytest.mark.parametrize("abar", [0.999, 0.5, 0.01])
def test_mixture_epsilon_is_minus_sigma_times_the_score(abar):
    mixture = GaussianMixture.random(dim=3, seed=1)
    x_t = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2
    x = x_t.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(_log_marginal(mixture, x, abar).sum(), x)
    torch.testing.assert_close(
        mixture.epsilon(x_t, abar), -math.sqrt(1 - abar) * score, rtol=1e-10, atol=1e-12
    )


def test_mixture_denoiser_handles_one_timestep_per_sample():
    mixture = GaussianMixture.random(dim=2, seed=0)
    schedule = tb.testbed_schedule(10)
    denoise = mixture.denoiser(schedule)
    x_t = torch.randn(3, 2, dtype=F64)
    ts = torch.tensor([900, 500, 0])
    rows = [denoise(x_t[i : i + 1], ts[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(denoise(x_t, ts), torch.cat(rows), rtol=0, atol=0)


def test_testbed_schedule_is_an_unclipped_strided_ddpm_table():
    schedule = tb.testbed_schedule(50)
    assert schedule.sampler == "ddpm"
    assert schedule.clip_sample_range is None
    assert len(schedule.timesteps) == 50 and schedule.timesteps[0] == 980
    assert schedule.alphas_cumprod.dtype == F64


def test_tilted_step_matches_numerical_integration_in_one_dimension():
    """N(mu, var) * exp(c r(x)) normalised on a fine grid has the closed-form moments."""
    ref = Gaussian(torch.tensor([0.4], dtype=F64), torch.tensor([0.8], dtype=F64))
    rewards = [
        QuadraticReward(torch.tensor([1.5], dtype=F64), torch.tensor([2.0], dtype=F64)),
        QuadraticReward(torch.tensor([0.5], dtype=F64), torch.tensor([-1.0], dtype=F64)),
    ]
    coefs = [0.7, 1.9]
    x = torch.linspace(-12, 12, 200_001, dtype=F64)[:, None]
    log_density = -0.5 * (x - ref.mean) ** 2 / ref.variance + sum(
        c * r(x)[:, None] for r, c in zip(rewards, coefs, strict=True)
    )
    p = torch.softmax(log_density[:, 0], dim=0)
    mean = (p * x[:, 0]).sum()
    var = (p * (x[:, 0] - mean) ** 2).sum()
    got = tilted_step(ref, rewards, coefs)
    assert math.isclose(float(got.mean), float(mean), rel_tol=1e-8)
    assert math.isclose(float(got.variance), float(var), rel_tol=1e-8)


def test_an_aligned_expert_is_sharper_than_the_reference():
    """Tilting by r_i / beta_i adds a_i / beta_i to the precision, per element."""
    g = torch.Generator().manual_seed(0)
    ref = Gaussian(
        torch.randn(5, 4, generator=g, dtype=F64), torch.rand(5, 4, generator=g, dtype=F64) + 0.1
    )
    r = QuadraticReward(
        torch.rand(4, generator=g, dtype=F64) + 0.1, torch.randn(4, generator=g, dtype=F64)
    )
    beta = 0.7
    expert = tilted_step(ref, [r], [1.0 / beta])
    torch.testing.assert_close(1 / expert.variance, 1 / ref.variance + r.curvature / beta)
    assert bool((expert.variance < ref.variance).all())


def test_weighted_optimum_tilts_by_the_weighted_reward_over_beta():
    g = torch.Generator().manual_seed(1)
    ref = Gaussian(
        torch.randn(3, 2, generator=g, dtype=F64), torch.rand(3, 2, generator=g, dtype=F64) + 0.1
    )
    rewards = [
        QuadraticReward(
            torch.rand(2, generator=g, dtype=F64) + 0.1, torch.randn(2, generator=g, dtype=F64)
        )
        for _ in range(2)
    ]
    got = weighted_optimum_step(ref, rewards, [0.3, 0.6], kl_coef=1.5)
    want = tilted_step(ref, rewards, [0.2, 0.4])
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(got.variance, want.variance, rtol=1e-14, atol=0)


def test_the_reference_chain_samples_the_mixture():
    """The exact denoiser + step Gaussians + the loop reproduce the data's moments."""
    mixture = GaussianMixture.random(dim=2, seed=0)
    schedule = tb.testbed_schedule(50)
    denoise = mixture.denoiser(schedule)
    spec = StepSpec()

    def reference(x_t, t):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long)
        return step_gaussian(denoise(x_t, t_batch), x_t, t, schedule, spec)

    n = 4000
    x_T = SeededNoise(0).initial((n, 2)).double()
    x0 = sample_chain(reference, x_T, schedule.timesteps, SeededNoise(1))
    data = mixture.sample(200_000, generator=torch.Generator().manual_seed(2))
    std = data.std(0)
    # 4000 samples: standard error of the mean is std / 63; allow ~4 standard errors
    assert bool(((x0.mean(0) - data.mean(0)).abs() < 4 * std / math.sqrt(n)).all())
    # a 50-step strided chain shrinks the spread by a few percent (discretisation)
    assert bool(((x0.std(0) / std - 1).abs() < 0.08).all())


def test_default_cases_cover_k_2_3_5_distinct_betas_and_lambda0_below_zero():
    ks = {len(c.weights) for c in DEFAULT_CASES}
    assert {2, 3, 5} <= ks
    assert any(len(set(c.kl_coefs)) > 1 for c in DEFAULT_CASES)
    assert any(
        fusion_coefficients(c.weights, c.kl_coefs, c.kl_coef).lambda0 < 0 for c in DEFAULT_CASES
    )


def test_run_check_meets_the_float64_bound_for_every_default_case():
    results = run_check(num_samples=32, num_inference_steps=50)
    assert [r.case for r in results] == list(DEFAULT_CASES)
    for r in results:
        expected_lambda0 = fusion_coefficients(
            r.case.weights, r.case.kl_coefs, r.case.kl_coef
        ).lambda0
        assert r.lambda0 == expected_lambda0
        assert r.step_rel_err <= 1e-9, r
        assert r.chain_max_abs_diff <= 1e-9, r
