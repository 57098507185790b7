"""``msdda.Gaussian``: the one step value: sample, log-density, KL, point mass, dtype."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

import msdda
from msdda.alignment import gaussian_kl as differentiable_kl
from msdda.gaussian import Gaussian, kl_divergence
from msdda.gaussians import StepGaussian
from msdda.methods import gaussian_kl as meter_kl
from msdda.methods import point_mass

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4)
    p = Gaussian(torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.1)
    q = Gaussian(torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.2)
    return p.to(dtype), q.to(dtype)


def test_one_class_under_every_name():
    assert msdda.Gaussian is Gaussian is StepGaussian is msdda.fusion.Gaussian


def test_sample_is_mean_plus_std_times_noise():
    p, _ = _pair()
    z = torch.randn_like(p.mean)
    assert torch.equal(p.sample(z), p.mean + p.variance.sqrt() * z)
    assert torch.equal(p.sample(0.0), p.mean)
    rounded = Gaussian(p.mean, torch.full_like(p.mean, -1e-30))  # negative round-off is 0
    assert torch.equal(rounded.sample(z), p.mean)


def test_log_prob_is_torch_normals_summed_per_sample():
    p, _ = _pair()
    x = torch.randn_like(p.mean)
    want = Normal(p.mean, p.variance.sqrt()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(p.log_prob(x), want, rtol=1e-12, atol=1e-12)
    scalar_var = Gaussian(p.mean, torch.tensor(0.5, dtype=torch.float64))
    want = Normal(p.mean, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(scalar_var.log_prob(x), want, rtol=1e-12, atol=1e-12)


def test_kl_is_torch_distributions_kl_summed_per_sample():
    p, q = _pair()
    want = torch_kl(Normal(p.mean, p.std), Normal(q.mean, q.std)).flatten(1).sum(1)
    for got in (p.kl(q), kl_divergence(p, q), meter_kl(p, q), differentiable_kl(p, q)):
        assert got.shape == (3,)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(p.kl(p), torch.zeros(3, dtype=torch.float64))


def test_kl_agrees_with_monte_carlo():
    p, q = (g.to(torch.float64) for g in _pair())
    p1 = Gaussian(p.mean[:1], p.variance[:1])
    q1 = Gaussian(q.mean[:1], q.variance[:1])
    x = p1.sample(torch.randn((200_000, 2, 4), generator=torch.Generator().manual_seed(1)))
    big_p = Gaussian(p1.mean.expand_as(x), p1.variance.expand_as(x))
    big_q = Gaussian(q1.mean.expand_as(x), q1.variance.expand_as(x))
    mc = (big_p.log_prob(x) - big_q.log_prob(x)).mean()
    assert float(mc) == pytest.approx(float(p1.kl(q1)[0]), rel=2e-2)


def test_meter_kl_is_float64_and_the_trainers_kl_keeps_dtype_and_gradients():
    p, q = _pair(torch.float32)
    assert meter_kl(p, q).dtype == torch.float64
    mean = p.mean.clone().requires_grad_(True)
    kl = differentiable_kl(Gaussian(mean, p.variance), q)
    assert kl.dtype == torch.float32
    kl.sum().backward()
    torch.testing.assert_close(mean.grad, (mean - q.mean).detach() / q.variance)


def test_point_mass_lands_on_x():
    x = torch.randn(2, 3)
    for g in (Gaussian.point_mass(x), point_mass(x)):
        assert torch.equal(g.mean, x) and torch.equal(g.variance, torch.zeros_like(x))
        assert g.pred_x0 is None
        assert torch.equal(g.sample(torch.randn_like(x)), x)


def test_to_and_detach_keep_every_field():
    mean = torch.randn(2, 3, requires_grad=True)
    g = Gaussian(mean * 2, torch.ones(2, 3), mean + 1)
    d = g.detach()
    assert not any(t.requires_grad for t in d)
    assert all(torch.equal(a, b) for a, b in zip(d, g, strict=True))
    h = g.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in h)
    assert Gaussian(mean, torch.ones(2, 3)).to(torch.float64).pred_x0 is None
