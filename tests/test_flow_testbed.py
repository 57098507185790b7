"""The flow testbed is itself right (exact velocity, direct optimum), and MSDDA meets it."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from msdda import Gaussian
from msdda import flow_testbed as ftb
from msdda.cli import app
from msdda.flow_testbed import (
    FLOW_BASE_CASES,
    FLOW_DEFAULT_CASES,
    FlowCheckCase,
    flow_mixture_denoiser,
    flow_testbed_schedule,
    flow_weighted_optimum_step,
    mixture_velocity,
    product_of_steps,
    run_flow_check,
)
from msdda.flows import FLOW_RULES
from msdda.fusion import fuse_gaussians
from msdda.testbed import GaussianMixture, random_rewards, weighted_optimum_step

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def log_marginal(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_sigma(x) for x = (1 - sigma) x0 + sigma eps, x0 from the mixture, per row."""
    c = 1 - sigma
    var = c**2 * mixture.stds**2 + sigma**2
    sq = ((x[:, None, :] - c * mixture.means[None]) ** 2).sum(-1)
    log_n = -0.5 * sq / var - 0.5 * mixture.dim * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(mixture.weights) + log_n, dim=1)


@pytest.mark.parametrize("sigma", [1.0, 0.7, 0.2, 0.01])
def test_the_mixture_velocity_is_tweedies_from_the_score(sigma):
    """E[x0 | x] = (x + sigma^2 score) / (1 - sigma), so v = (x - E[x0 | x]) / sigma."""
    mixture = GaussianMixture.random(dim=3, seed=2)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 1.5
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_marginal(mixture, xg, sigma).sum(), xg)
    if sigma == 1.0:  # x is pure noise: E[x0 | x] is the data mean
        x0 = (mixture.weights[:, None] * mixture.means).sum(0).expand_as(x)
    else:
        x0 = (x + sigma**2 * score) / (1 - sigma)
    torch.testing.assert_close(mixture_velocity(mixture, x, sigma), (x - x0) / sigma)


def test_the_mixture_denoiser_reads_sigmas_from_keys_one_per_sample():
    mixture = GaussianMixture.random(dim=2, seed=0)
    schedule = flow_testbed_schedule(6)
    denoise = flow_mixture_denoiser(mixture, schedule)
    x = torch.randn(3, 2, dtype=F64)
    keys = torch.tensor([5, 3, 0])
    rows = [denoise(x[i : i + 1], keys[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(denoise(x, keys), torch.cat(rows), rtol=0, atol=0)
    want = mixture_velocity(mixture, x[1:2], schedule.sigma_at(3))
    torch.testing.assert_close(rows[1], want, rtol=0, atol=0)


def test_the_testbed_schedule_is_diffusers_sd3_shift():
    schedule = flow_testbed_schedule(50)
    assert schedule.sampler == "flow" and len(schedule.timesteps) == 50
    assert float(schedule.sigmas[0]) == 1.0 and float(schedule.sigmas[-1]) == 0.0
    t = 0.5  # shift 3: sigma = 3 t / (1 + 2 t) of the unshifted linear sigma t
    assert 3 * t / (1 + 2 * t) == pytest.approx(0.75)
    assert all(
        float(a) > float(b) for a, b in zip(schedule.sigmas, schedule.sigmas[1:], strict=False)
    )


def test_product_of_steps_is_the_normalised_product_of_densities():
    g = torch.Generator().manual_seed(1)
    steps = [
        Gaussian(
            torch.randn(1, 3, generator=g, dtype=F64),
            torch.rand(1, 3, generator=g, dtype=F64) + 0.2,
        )
        for _ in range(3)
    ]
    c = [0.7, 0.8, -0.3]
    prod = product_of_steps(steps, c)
    xs = [torch.randn(1, 3, generator=g, dtype=F64) for _ in range(4)]
    # log prod - sum c_i log N_i is the same constant at every point
    gaps = [
        prod.log_prob(x) - sum(ci * s.log_prob(x) for ci, s in zip(c, steps, strict=False))
        for x in xs
    ]
    for gap in gaps[1:]:
        torch.testing.assert_close(gap, gaps[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="exponents"):
        product_of_steps(steps, c[:2])


def test_with_equal_noise_levels_the_direct_optimum_is_the_weighted_optimum():
    g = torch.Generator().manual_seed(3)
    ref = Gaussian(
        torch.randn(5, 4, generator=g, dtype=F64), torch.rand(5, 4, generator=g, dtype=F64) + 0.1
    )
    rewards = random_rewards(3, 4, seed=0)
    w, betas, beta = (0.2, 0.3, 0.5), (1.0, 1.0, 1.0), 0.5
    lambdas = [
        1 - sum(wi * bi / beta for wi, bi in zip(w, betas, strict=False)),
        *(wi * bi / beta for wi, bi in zip(w, betas, strict=False)),
    ]
    direct = flow_weighted_optimum_step([ref] * 4, lambdas, rewards, w, beta)
    want = weighted_optimum_step(ref, rewards, w, beta)
    torch.testing.assert_close(direct.mean, want.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(direct.variance, want.variance, rtol=1e-12, atol=0)


def test_the_default_cases_cover_k_2_3_5_every_rule_and_lambda0_below_zero():
    assert {len(c.weights) for c in FLOW_DEFAULT_CASES} == {2, 3, 5}
    assert {c.rule for c in FLOW_DEFAULT_CASES} == set(FLOW_RULES)
    assert len(FLOW_DEFAULT_CASES) == len(FLOW_BASE_CASES) * len(FLOW_RULES)
    results = run_flow_check(num_samples=24, num_inference_steps=12)
    assert any(r.lambda0 < -0.5 for r in results)
    assert any(len(set(r.case.noise_levels)) > 2 for r in results)
    for r in results:
        assert r.step_rel_err < 1e-12, r.case.name
        assert r.chain_max_abs_diff < 1e-9, r.case.name


def test_the_check_tells_velocity_mixing_from_msdda_at_distinct_noise_levels(monkeypatch):
    """Replace the fusion by mixing the experts' means: the check must then fail."""

    def mixing(experts, weights, *, kl_coefs, kl_coef, reference):
        def step(x, t):
            gs = [e(x, t) for e in experts]
            return Gaussian(
                sum(w * g.mean for w, g in zip(weights, gs, strict=False)), gs[0].variance
            )

        return step

    monkeypatch.setattr(ftb, "msdda_step", mixing)
    case = next(c for c in FLOW_DEFAULT_CASES if c.name == "sde: K=3 distinct")
    (r,) = run_flow_check([case], num_samples=16, num_inference_steps=8)
    assert r.step_rel_err > 1e-3


def test_the_fused_variance_of_distinct_noise_levels_is_the_precision_sum():
    """The testbed's experts do have distinct variances: fusion there is not mixing."""
    mixture = GaussianMixture.random(dim=2, seed=0)
    schedule = flow_testbed_schedule(5)
    case = next(c for c in FLOW_DEFAULT_CASES if c.name == "cps: K=2 distinct levels")
    steps = ftb._reference_steps(case, flow_mixture_denoiser(mixture, schedule), schedule)
    x = torch.randn(4, 2, dtype=F64)
    ref, e1, e2 = (p(x, 2) for p in steps)
    assert float((e1.variance - e2.variance).abs().min()) > 1e-3
    fused = fuse_gaussians([e1.mean, e2.mean], [e1.variance, e2.variance], [0.5, 0.5])
    torch.testing.assert_close(fused.variance, 1 / (0.5 / e1.variance + 0.5 / e2.variance))


def test_bad_cases_and_arguments_are_refused():
    with pytest.raises(ValueError, match="K \\+ 1"):
        FlowCheckCase("x", (0.5, 0.5), (1.0, 1.0), 1.0, (0.7, 0.7))
    with pytest.raises(ValueError, match="noise level of 0"):
        FlowCheckCase("x", (0.5, 0.5), (1.0, 1.0), 1.0, (0.7, 0.0, 0.7))
    with pytest.raises(ValueError, match="noise_level"):
        FlowCheckCase("x", (0.5, 0.5), (1.0, 1.0), 1.0, (0.7, 1.2, 0.7), "cps")
    with pytest.raises(TypeError, match="FlowCheckCase"):
        run_flow_check(["case"])
    with pytest.raises(ValueError, match="num_samples"):
        run_flow_check(num_samples=0)
    with pytest.raises(ValueError, match="sigma"):
        mixture_velocity(GaussianMixture.random(dim=2), torch.zeros(1, 2), 0.0)


def test_msdda_check_reports_the_flow_testbed_within_the_bound():
    result = CliRunner().invoke(app, ["check", "--samples", "8", "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert "Flow-matching testbed" in result.output
    for case in FLOW_DEFAULT_CASES:
        assert case.name in result.output
    assert "(bound 1e-09): ok" in result.output
