"""``Expert``, ``expert_policy`` and the MSDDA step policy ``msdda_step``."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers import DDPMScheduler

from msdda import (
    Expert,
    Gaussian,
    Schedule,
    StepSpec,
    expert_policy,
    fuse_gaussians,
    msdda_step,
    step_gaussian,
)

SHAPE = (2, 3, 4, 4)


class CountingPolicy:
    """A step policy N(x_t * scale + shift, variance) that counts its calls."""

    def __init__(self, scale: float, shift: float, variance: float, calls: Counter, name: str):
        self.scale, self.shift, self.variance = scale, shift, variance
        self.calls, self.name = calls, name

    def __call__(self, x_t: torch.Tensor, t: int) -> Gaussian:
        self.calls[self.name] += 1
        return Gaussian(x_t * self.scale + self.shift, torch.full_like(x_t, self.variance))


def _policies(calls: Counter, k: int = 3) -> list[CountingPolicy]:
    return [CountingPolicy(1 + 0.1 * i, 0.5 * i, 0.2 + 0.1 * i, calls, f"e{i}") for i in range(k)]


def _reference(calls: Counter) -> CountingPolicy:
    return CountingPolicy(0.9, -0.3, 0.6, calls, "ref")


def test_msdda_step_is_fuse_gaussians_of_the_experts_steps():
    calls = Counter()
    experts, ref = _policies(calls), _reference(calls)
    kw = {"kl_coefs": [0.5, 1.0, 2.0], "kl_coef": 0.8}
    weights = [0.2, 0.3, 0.5]
    x = torch.randn(SHAPE)
    got = msdda_step(experts, weights, reference=ref, **kw)(x, 500)
    gs = [e(x, 500) for e in experts]
    r = ref(x, 500)
    want = fuse_gaussians(
        [g.mean for g in gs],
        [g.variance for g in gs],
        weights,
        reference=(r.mean, r.variance),
        **kw,
    )
    assert torch.equal(got.mean, want.mean) and torch.equal(got.variance, want.variance)


def test_experts_with_lambda_zero_are_never_called():
    calls = Counter()
    policy = msdda_step(_policies(calls), [0.5, 0.0, 0.5], reference=_reference(calls))
    x = torch.randn(SHAPE)
    for t in (900, 500, 0):
        policy(x, t)
    assert calls == Counter({"e0": 3, "e2": 3})


def test_reference_is_called_only_when_lambda0_is_not_zero():
    calls = Counter()
    x = torch.randn(SHAPE)
    on_simplex = msdda_step(_policies(calls), [0.2, 0.3, 0.5], reference=_reference(calls))
    on_simplex(x, 900)
    assert calls["ref"] == 0
    stronger = msdda_step(
        _policies(calls),
        [0.2, 0.3, 0.5],
        kl_coefs=[1.0] * 3,
        kl_coef=0.5,
        reference=_reference(calls),
    )  # lambda_0 = 1 - 1 / 0.5 = -1
    stronger(x, 900)
    stronger(x, 800)
    assert calls["ref"] == 2


def test_a_missing_reference_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"reference is required: lambda_0 = -1"):
        msdda_step(_policies(Counter()), [0.2, 0.3, 0.5], kl_coefs=[1.0] * 3, kl_coef=0.5)
    with pytest.raises(ValueError, match=r"reference is required: lambda_0 = 1"):
        msdda_step(_policies(Counter()), [0.0, 0.0, 0.0])


def test_a_joint_policy_gives_the_same_step_as_the_list_of_experts():
    calls = Counter()
    experts = _policies(calls)
    asked = []

    def joint(x_t, t, active):
        asked.append(list(active))
        return [experts[i](x_t, t) for i in active]

    kw = {"kl_coefs": [0.5, 1.0, 2.0], "kl_coef": 0.6, "reference": _reference(calls)}
    weights = [0.4, 0.0, 0.6]
    x = torch.randn(SHAPE)
    from_list = msdda_step(experts, weights, **kw)(x, 300)
    from_joint = msdda_step(joint, weights, num_experts=3, **kw)(x, 300)
    assert asked == [[0, 2]]  # only the experts with lambda != 0 are asked for
    assert torch.equal(from_list.mean, from_joint.mean)
    assert torch.equal(from_list.variance, from_joint.variance)


def test_msdda_step_refuses_bad_experts():
    with pytest.raises(ValueError, match="num_experts is required with a joint expert policy"):
        msdda_step(lambda x, t, active: [], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"experts is empty \(K = 0\)"):
        msdda_step([], [])
    with pytest.raises(TypeError, match=r"experts\[1\] must be a step policy"):
        msdda_step([_reference(Counter()), "not a policy"], [0.5, 0.5])
    with pytest.raises(
        ValueError, match=r"weights has 3 entries, expected one per expert \(K = 2\)"
    ):
        msdda_step(_policies(Counter(), 2), [0.2, 0.3, 0.5])


# --------------------------------------------------------------------------- Expert objects


def _affine_denoiser(seen: list):
    """A tiny epsilon model: eps = 0.1 * x_t + t / 1000 + cond, recording its inputs."""

    def denoise(x_t, t, cond):
        seen.append((t.clone(), cond))
        return 0.1 * x_t + t.view(-1, 1, 1, 1).to(x_t.dtype) / 1000 + cond

    return denoise


def test_expert_policy_is_step_gaussian_of_the_denoiser_output():
    schedule = Schedule.from_scheduler(DDPMScheduler(), 10)
    seen = []
    spec = StepSpec(prediction_type="epsilon", variance_type="fixed_large")
    expert = Expert(_affine_denoiser(seen), spec, kl_coef=0.5, name="affine")
    x = torch.randn(SHAPE)
    t = schedule.timesteps[3]

    g = expert_policy(expert, schedule, cond=0.25)(x, t)

    ((t_batch, cond),) = seen
    assert t_batch.dtype == torch.long and t_batch.tolist() == [t, t]  # (B,) long
    assert cond == 0.25
    want = step_gaussian(0.1 * x + t / 1000 + 0.25, x, t, schedule, spec)
    for got, expected in zip(g, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_equal_variances_make_fusion_epsilon_mixing():
    """DDPM means are affine in epsilon: with a shared variance, fusing = mixing epsilons."""
    schedule = Schedule.from_scheduler(DDPMScheduler(clip_sample=False), 20)
    eps_a, eps_b = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    experts = [Expert(lambda x, t, c, e=e: e.to(x.dtype)) for e in (eps_a, eps_b)]
    policy = msdda_step([expert_policy(e, schedule) for e in experts], [0.3, 0.7])
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = schedule.timesteps[4]
    fused = policy(x, t)
    mixed = step_gaussian(0.3 * eps_a + 0.7 * eps_b, x, t, schedule, StepSpec())
    torch.testing.assert_close(fused.mean, mixed.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.variance, mixed.variance, rtol=1e-12, atol=0)


def test_expert_refuses_bad_fields():
    with pytest.raises(TypeError, match="denoiser of expert 'x' must be callable"):
        Expert("unet", name="x")
    with pytest.raises(TypeError, match="spec of expert 'x' must be a StepSpec"):
        Expert(lambda x, t, c: x, spec="epsilon", name="x")
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="kl_coef of expert 'x' must be positive"):
            Expert(lambda x, t, c: x, kl_coef=bad, name="x")
