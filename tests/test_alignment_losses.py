"""Step-level DPO losses: the pure functions, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda import Gaussian
from msdda.alignment import (
    dpo_logits,
    gaussian_kl,
    gaussian_log_likelihood_difference,
    implicit_accuracy,
    pair_log_ratio_difference,
    preference_labels,
    soft_dpo_loss,
)


def _normal_log_prob(x, mean, var):
    return torch.distributions.Normal(mean, var.sqrt()).log_prob(x).reshape(x.shape[0], -1).sum(1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), log_scale=st.floats(-8, 2))
def test_log_likelihood_difference_is_the_difference_of_gaussian_log_densities(seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 1, 3, 3)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    var = torch.rand(shape, generator=g, dtype=torch.float64) * math.exp(log_scale) + 1e-6
    a = mean + var.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64)
    b = mean + var.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64)
    want = _normal_log_prob(a, mean, var) - _normal_log_prob(b, mean, var)
    got = gaussian_log_likelihood_difference(a, b, mean, var)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_pair_log_ratio_difference_subtracts_the_reference():
    g = torch.Generator().manual_seed(0)
    shape = (7, 4)
    pol = Gaussian(
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.rand(shape, generator=g, dtype=torch.float64) + 0.1,
    )
    ref = Gaussian(
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.rand(shape, generator=g, dtype=torch.float64) + 0.1,
    )
    a, b = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    want = (_normal_log_prob(a, *pol[:2]) - _normal_log_prob(a, *ref[:2])) - (
        _normal_log_prob(b, *pol[:2]) - _normal_log_prob(b, *ref[:2])
    )
    torch.testing.assert_close(pair_log_ratio_difference(a, b, pol, ref), want)
    # the policy equal to the reference has no implicit preference
    assert pair_log_ratio_difference(a, b, ref, ref).abs().max() == 0


def test_dpo_logits_scale_with_beta():
    d = torch.tensor([0.5, -2.0])
    torch.testing.assert_close(dpo_logits(d, 3.0), torch.tensor([1.5, -6.0]))


def test_soft_labels_are_the_bradley_terry_probability():
    r_a, r_b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(preference_labels(r_a, r_b, "soft"), torch.sigmoid(r_a - r_b))


def test_hard_labels_pick_the_higher_reward_and_split_ties():
    r_a, r_b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(preference_labels(r_a, r_b, "hard"), torch.tensor([1.0, 0.5, 0.0]))


def test_sampled_labels_are_bernoulli_draws_of_the_probability():
    r_a = torch.full((20_000,), 0.8)
    r_b = torch.zeros(20_000)
    y = preference_labels(r_a, r_b, "sampled", generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(y.mean()) - float(torch.sigmoid(torch.tensor(0.8)))) < 0.015


def test_labels_refuse_unknown_kinds_and_mismatched_shapes():
    with pytest.raises(ValueError, match="kind"):
        preference_labels(torch.zeros(2), torch.zeros(2), "greedy")
    with pytest.raises(ValueError, match="reward_a and reward_b"):
        preference_labels(torch.zeros(2), torch.zeros(3))


@settings(max_examples=30, deadline=None)
@given(margin=st.floats(-6, 6))
def test_soft_loss_is_minimised_where_the_implicit_margin_equals_the_reward_margin(margin):
    """The pointwise optimum z = r(a) - r(b): that is why soft labels converge to the tilt."""
    p = torch.sigmoid(torch.tensor([margin], dtype=torch.float64))
    z = torch.tensor([margin], dtype=torch.float64, requires_grad=True)
    soft_dpo_loss(z, p).backward()
    assert abs(float(z.grad)) < 1e-12
    for dz in (-0.3, 0.3):
        assert soft_dpo_loss(z.detach() + dz, p) > soft_dpo_loss(z.detach(), p)


def test_soft_loss_is_the_cross_entropy_with_soft_targets():
    z = torch.tensor([0.3, -1.2, 2.0])
    p = torch.tensor([0.6, 0.1, 0.5])
    want = -(
        p * torch.nn.functional.logsigmoid(z) + (1 - p) * torch.nn.functional.logsigmoid(-z)
    ).mean()
    torch.testing.assert_close(soft_dpo_loss(z, p), want)


def test_hard_labels_have_no_finite_optimum():
    """With p = 1 the loss keeps decreasing as z grows: the policy is pushed without end."""
    p = torch.ones(1)
    losses = [float(soft_dpo_loss(torch.tensor([z]), p)) for z in (1.0, 5.0, 20.0)]
    assert losses[0] > losses[1] > losses[2] > 0


def test_implicit_accuracy_counts_sign_agreement_and_ignores_ties():
    z = torch.tensor([1.0, -1.0, 2.0, 0.5])
    p = torch.tensor([0.7, 0.2, 0.4, 0.5])
    assert float(implicit_accuracy(z, p)) == pytest.approx(2 / 3)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    shape = (6, 1, 2, 2)
    p = Gaussian(torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.05)
    q = Gaussian(torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.05)
    want = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(p.mean, p.variance.sqrt()),
            torch.distributions.Normal(q.mean, q.variance.sqrt()),
        )
        .reshape(6, -1)
        .sum(1)
    )
    torch.testing.assert_close(gaussian_kl(p, q), want)
    assert gaussian_kl(q, q).abs().max() < 1e-6
