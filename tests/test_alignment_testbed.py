"""The DPO trainer recovers the closed-form step optimum where it is known (DESIGN.md §4).

Gaussian-mixture reference, exact denoiser; linear reward (fixed variance: the optimum is
a mean shift) or quadratic reward (learned variance: the optimum also narrows). Errors are
measured on held-out reference states at every trained step.
"""

from __future__ import annotations

import pytest
import torch

from msdda.alignment.testbed import LinearReward, TestbedPolicy, validate_on_testbed
from msdda.fusion import Gaussian
from msdda.testbed import GaussianMixture
from msdda.testbed import testbed_schedule as make_testbed_schedule

TOL = 1e-3  # measured: ~1.5e-5 (mean and variance) with these settings


@pytest.fixture(scope="module")
def soft_fixed():
    return validate_on_testbed(labels="soft", learned_variance=False)


@pytest.fixture(scope="module")
def soft_learned():
    return validate_on_testbed(labels="soft", learned_variance=True)


def test_soft_labels_recover_the_tilted_mean_with_fixed_variance(soft_fixed):
    assert soft_fixed.mean_rel_err < TOL
    assert soft_fixed.tilt_ratio == pytest.approx(1.0, abs=TOL)
    assert soft_fixed.var_rel_err == 0.0  # fixed_small: the variance is the reference's


def test_soft_labels_recover_the_tilted_mean_and_variance_with_learned_variance(soft_learned):
    assert soft_learned.mean_rel_err < TOL
    assert soft_learned.var_rel_err < TOL
    assert soft_learned.tilt_ratio == pytest.approx(1.0, abs=TOL)


def test_soft_labels_recover_the_optimum_at_another_beta():
    result = validate_on_testbed(labels="soft", learned_variance=True, kl_coef=2.0)
    assert result.mean_rel_err < TOL
    assert result.var_rel_err < TOL


@pytest.mark.parametrize("learned_variance", [False, True])
def test_hard_labels_over_optimise_instead_of_converging(
    learned_variance, soft_fixed, soft_learned
):
    """'Higher reward wins' labels shrink the effective beta: the policy overshoots the tilt."""
    soft = soft_learned if learned_variance else soft_fixed
    hard = validate_on_testbed(labels="hard", learned_variance=learned_variance)
    assert hard.tilt_ratio > 2.0  # moved more than twice as far as the optimum
    assert hard.mean_rel_err > 100 * soft.mean_rel_err
    assert hard.history[-1].kl > 3 * soft.history[-1].kl
    if learned_variance:
        assert hard.var_rel_err > 0.5  # the variance collapses far below the optimum's


def test_the_soft_loss_barely_moves_while_the_policy_converges(soft_fixed):
    """Watch the KL, not the loss: the loss stays far from 0 at the optimum."""
    first, last = soft_fixed.history[0], soft_fixed.history[-1]
    assert last.loss > 0.2
    assert last.kl > first.kl


def test_the_testbed_policy_starts_as_the_reference():
    mixture = GaussianMixture.random(dim=3, seed=2)
    schedule = make_testbed_schedule(10)
    for learned in (False, True):
        policy = TestbedPolicy(mixture, schedule, learned_variance=learned)
        x = torch.randn(6, 3, dtype=torch.float64)
        t = torch.tensor([schedule.timesteps[i % 10] for i in range(6)])
        out = policy(x, t)
        torch.testing.assert_close(out[:, :3], policy.reference_epsilon(x, t))
        if learned:
            assert out[:, 3:].abs().max() == 0  # v = 0: fixed_small


def test_linear_reward_tilt_shifts_the_mean_by_variance_times_direction():
    ref = Gaussian(
        torch.zeros(2, 3, dtype=torch.float64), torch.full((2, 3), 0.5, dtype=torch.float64)
    )
    r = LinearReward(torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64))
    tilted = r.tilt(ref, kl_coef=0.5)
    torch.testing.assert_close(
        tilted.mean, torch.tensor([[1.0, -2.0, 0.0]] * 2, dtype=torch.float64)
    )
    torch.testing.assert_close(tilted.variance, ref.variance)
