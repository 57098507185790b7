"""``fuse_gaussians`` is the exact weighted step-level optimum (DESIGN.md §1).

p_w ∝ prod_{i=0..K} p_i^(lambda_i), lambda_i = w_i beta_i / beta, lambda_0 = 1 - sum_i lambda_i;
for Gaussians: precision P = sum_i lambda_i / var_i, mean = (sum_i lambda_i mu_i / var_i) / P.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given
from hypothesis import strategies as st

from msdda import (
    FusionCoefficients,
    Gaussian,
    Schedule,
    SeededNoise,
    StepSpec,
    fuse_gaussians,
    fuse_with_coefficients,
    fusion_coefficients,
    sample_chain,
    step_gaussian,
)
from msdda import testbed as tb
from msdda.testbed import GaussianMixture, QuadraticReward, tilted_step, weighted_optimum_step

F64 = torch.float64
BOUND = 1e-9  # float64 exactness bound for steps (relative) and whole chains (absolute)

# ------------------------------------------------------------------ exactness on the testbed

# (id, weights w_i, experts' kl_coefs beta_i, target kl_coef beta)
EXACTNESS_CASES = [
    pytest.param((0.4, 0.6), (0.5, 2.0), 1.1, id="K=2 distinct betas"),
    pytest.param((0.2, 0.3, 0.5), (0.7, 1.0, 1.6), 1.25, id="K=3 distinct betas"),
    pytest.param(
        (0.1, 0.15, 0.2, 0.25, 0.3), (0.5, 0.8, 1.0, 1.5, 3.0), 2.0, id="K=5 distinct betas"
    ),
    pytest.param((0.2, 0.3, 0.5), (1.0, 1.0, 1.0), 0.5, id="K=3 lambda0<0"),
    pytest.param((0.3, 0.1, 0.2, 0.25, 0.15), (0.6, 1.2, 1.0, 2.0, 0.9), 0.7, id="K=5 lambda0<0"),
    pytest.param((0.2, 0.3), (1.0, 1.5), 1.0, id="K=2 lambda0>0"),
]


class GaussianTestbed:
    """Gaussian-mixture data (exact denoiser) and quadratic rewards, in float64."""

    def __init__(self, dim: int = 4, seed: int = 0) -> None:
        self.dim = dim
        self.mixture = GaussianMixture.random(dim=dim, seed=seed)
        self.schedule = tb.testbed_schedule(50)
        self.denoise = self.mixture.denoiser(self.schedule)
        self.spec = StepSpec(prediction_type="epsilon", variance_type="fixed_small")

    def reference(self, x_t: torch.Tensor, t: int) -> Gaussian:
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long)
        g = step_gaussian(self.denoise(x_t, t_batch), x_t, t, self.schedule, self.spec)
        return Gaussian(g.mean, g.variance)

    def rewards(self, k: int, seed: int = 0) -> list[QuadraticReward]:
        g = torch.Generator().manual_seed(seed)
        return [
            QuadraticReward(
                curvature=torch.rand(self.dim, generator=g, dtype=F64) * 2 + 0.1,
                goal=torch.randn(self.dim, generator=g, dtype=F64) * 2,
            )
            for _ in range(k)
        ]

    def noisy_states(self, t: int, n: int = 64) -> torch.Tensor:
        """x_t ~ q(x_t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, x0 from the mixture."""
        g = torch.Generator().manual_seed(t)
        abar = float(self.schedule.alphas_cumprod[t])
        x0 = self.mixture.sample(n, generator=g)
        return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(
            x0.shape, generator=g, dtype=F64
        )


@pytest.fixture(scope="module")
def testbed() -> GaussianTestbed:
    return GaussianTestbed()


def _fused_policy(testbed, rewards, weights, kl_coefs, kl_coef):
    """MSDDA with fuse_gaussians: expert i is the reference tilted by r_i / beta_i."""

    def step(x_t, t):
        ref = testbed.reference(x_t, t)
        experts = [tilted_step(ref, [r], [1.0 / b]) for r, b in zip(rewards, kl_coefs, strict=True)]
        return fuse_gaussians(
            [e.mean for e in experts],
            [e.variance for e in experts],
            weights,
            kl_coefs=kl_coefs,
            kl_coef=kl_coef,
            reference=(ref.mean, ref.variance),
        )

    return step


def _direct_policy(testbed, rewards, weights, kl_coef):
    """The weighted optimum p_ref * exp(sum_i w_i r_i / beta), computed directly."""

    def step(x_t, t):
        return weighted_optimum_step(testbed.reference(x_t, t), rewards, weights, kl_coef)

    return step


@pytest.mark.parametrize(("weights", "kl_coefs", "kl_coef"), EXACTNESS_CASES)
def test_fused_step_equals_the_weighted_optimum_at_every_step(testbed, weights, kl_coefs, kl_coef):
    rewards = testbed.rewards(len(weights))
    fused = _fused_policy(testbed, rewards, weights, kl_coefs, kl_coef)
    direct = _direct_policy(testbed, rewards, weights, kl_coef)
    for t in testbed.schedule.timesteps:
        x_t = testbed.noisy_states(t)
        got, want = fused(x_t, t), direct(x_t, t)
        assert got.mean.dtype == F64
        mean_rel_err = float((got.mean - want.mean).abs().max() / want.mean.abs().max())
        var_rel_err = float(((got.variance - want.variance).abs() / want.variance).max())
        assert mean_rel_err <= BOUND, f"t={t}: mean relative error {mean_rel_err:.2e}"
        assert var_rel_err <= BOUND, f"t={t}: variance relative error {var_rel_err:.2e}"


@pytest.mark.parametrize(("weights", "kl_coefs", "kl_coef"), EXACTNESS_CASES)
def test_whole_fused_chain_equals_the_optimal_chain_on_shared_noise(
    testbed, weights, kl_coefs, kl_coef
):
    rewards = testbed.rewards(len(weights))
    x_T = SeededNoise(0).initial((64, testbed.dim)).double()
    ts = testbed.schedule.timesteps
    assert len(ts) == 50
    x_fused = sample_chain(
        _fused_policy(testbed, rewards, weights, kl_coefs, kl_coef), x_T, ts, SeededNoise(1)
    )
    x_direct = sample_chain(
        _direct_policy(testbed, rewards, weights, kl_coef), x_T, ts, SeededNoise(1)
    )
    assert float((x_fused - x_direct).abs().max()) <= BOUND
    assert not torch.equal(x_fused, x_T)  # the chain did move


def test_exactness_cases_cover_what_the_spec_asks_for():
    ks, lambda0s = set(), []
    for case in EXACTNESS_CASES:
        weights, kl_coefs, kl_coef = case.values
        ks.add(len(weights))
        lambda0s.append(fusion_coefficients(weights, kl_coefs, kl_coef).lambda0)
    assert {2, 3, 5} <= ks
    assert min(lambda0s) < 0 and max(lambda0s) > 0


# ------------------------------------------------------------------------ hypothesis properties

SHAPES = st.sampled_from([(3,), (2, 3), (2, 1, 4)])


@st.composite
def expert_gaussians(draw, k: int | None = None):
    """K experts' (means, variances), float64, as (K, *shape) tensors; variances in [0.05, 2]."""
    k = draw(st.integers(1, 5)) if k is None else k
    shape = draw(SHAPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    means = torch.randn((k, *shape), generator=g, dtype=F64) * 3
    variances = torch.rand((k, *shape), generator=g, dtype=F64) * 1.95 + 0.05
    return means, variances


def _weights(k: int):
    return st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k).filter(lambda w: max(w) > 1e-3)


def _kl_coefs(k: int):
    return st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k)


def _assert_same(a: Gaussian, b: Gaussian, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(a.variance, b.variance, rtol=rtol, atol=0)


@given(data=st.data(), experts=expert_gaussians())
def test_one_hot_weights_give_that_expert(data, experts):
    means, variances = experts
    k = means.shape[0]
    j = data.draw(st.integers(0, k - 1))
    kl_coefs = data.draw(_kl_coefs(k))
    weights = [1.0 if i == j else 0.0 for i in range(k)]
    # the target beta is expert j's own, so lambda_j = 1 and everything else is 0
    fused = fuse_gaussians(means, variances, weights, kl_coefs=kl_coefs, kl_coef=kl_coefs[j])
    _assert_same(fused, Gaussian(means[j], variances[j]), rtol=1e-13)


@given(data=st.data(), experts=expert_gaussians(k=1))
def test_identical_experts_give_that_expert(data, experts):
    mean, variance = experts[0][0], experts[1][0]
    k = data.draw(st.integers(1, 5))
    weights, kl_coefs = data.draw(_weights(k)), data.draw(_kl_coefs(k))
    # beta = sum_i w_i beta_i puts the lambdas on the simplex (lambda_0 = 0)
    kl_coef = math.fsum(w * b for w, b in zip(weights, kl_coefs, strict=True))
    fused = fuse_gaussians([mean] * k, [variance] * k, weights, kl_coefs=kl_coefs, kl_coef=kl_coef)
    _assert_same(fused, Gaussian(mean, variance))


@st.composite
def fusion_problem(draw):
    """K experts, weights, kl_coefs, a target beta with lambda_0 >= 0, and a reference."""
    means, variances = draw(expert_gaussians())
    k = means.shape[0]
    weights, kl_coefs = draw(_weights(k)), draw(_kl_coefs(k))
    stretch = draw(st.sampled_from([1.0, 1.5, 3.0]))  # lambda_0 = 1 - 1 / stretch
    kl_coef = stretch * math.fsum(w * b for w, b in zip(weights, kl_coefs, strict=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ref = (
        torch.randn(means.shape[1:], generator=g, dtype=F64),
        torch.rand(means.shape[1:], generator=g, dtype=F64) + 0.1,
    )
    return means, variances, weights, kl_coefs, kl_coef, ref


@given(problem=fusion_problem(), data=st.data())
def test_permuting_experts_with_their_weights_changes_nothing(problem, data):
    means, variances, weights, kl_coefs, kl_coef, ref = problem
    perm = data.draw(st.permutations(range(len(weights))))
    fused = fuse_gaussians(
        means, variances, weights, kl_coefs=kl_coefs, kl_coef=kl_coef, reference=ref
    )
    permuted = fuse_gaussians(
        means[list(perm)],
        variances[list(perm)],
        [weights[i] for i in perm],
        kl_coefs=[kl_coefs[i] for i in perm],
        kl_coef=kl_coef,
        reference=ref,
    )
    _assert_same(permuted, fused, rtol=1e-10)


@given(problem=fusion_problem())
def test_equal_variances_give_the_lambda_weighted_mean_of_the_means(problem):
    means, variances, weights, kl_coefs, kl_coef, (ref_mean, _) = problem
    common = variances[0]
    coefs = fusion_coefficients(weights, kl_coefs, kl_coef)
    fused = fuse_gaussians(
        means,
        [common] * len(weights),
        weights,
        kl_coefs=kl_coefs,
        kl_coef=kl_coef,
        reference=(ref_mean, common),
    )
    expected = coefs.lambda0 * ref_mean + sum(
        lam * m for lam, m in zip(coefs.lambdas, means, strict=True)
    )
    torch.testing.assert_close(fused.mean, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.variance, common, rtol=1e-10, atol=0)


@given(problem=fusion_problem(), scale=st.floats(0.01, 100.0))
def test_scaling_every_kl_coefficient_and_the_target_changes_nothing(problem, scale):
    means, variances, weights, kl_coefs, kl_coef, ref = problem
    fused = fuse_gaussians(
        means, variances, weights, kl_coefs=kl_coefs, kl_coef=kl_coef, reference=ref
    )
    scaled = fuse_gaussians(
        means,
        variances,
        weights,
        kl_coefs=[scale * b for b in kl_coefs],
        kl_coef=scale * kl_coef,
        reference=ref,
    )
    _assert_same(scaled, fused, rtol=1e-10)


@given(problem=fusion_problem())
def test_the_fused_gaussian_is_the_normalised_weighted_product_of_densities(problem):
    """log p_w = sum_i lambda_i log p_i + const: check it on two points per element."""
    means, variances, weights, kl_coefs, kl_coef, (ref_mean, ref_var) = problem
    fused = fuse_gaussians(
        means, variances, weights, kl_coefs=kl_coefs, kl_coef=kl_coef, reference=(ref_mean, ref_var)
    )
    coefs = fusion_coefficients(weights, kl_coefs, kl_coef)
    parts = [*zip(coefs.lambdas, means, variances, strict=True), (coefs.lambda0, ref_mean, ref_var)]

    def log_product(x):  # unnormalised, element-wise
        return sum(-lam * (x - m) ** 2 / (2 * v) for lam, m, v in parts)

    def log_fused(x):
        return -((x - fused.mean) ** 2) / (2 * fused.variance)

    x1, x2 = fused.mean + 0.7, fused.mean - 1.3
    torch.testing.assert_close(
        log_product(x1) - log_product(x2), log_fused(x1) - log_fused(x2), rtol=1e-8, atol=1e-8
    )


# --------------------------------------------------------------------- dtypes, shapes, lambda 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_comes_back_in_its_dtype_but_is_fused_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    means = [
        (4 + 0.1 * torch.randn(2, 8, generator=g)).to(dtype),
        (-3 + 0.1 * torch.randn(2, 8, generator=g)).to(dtype),
    ]
    # 1 / var * mean ~ 2e5 overflows float16 (max 65504): arithmetic in half would give inf
    variances = [torch.full((2, 8), 2e-5).to(dtype), torch.full((2, 8), 3e-5).to(dtype)]
    if dtype == torch.float16:
        assert torch.isinf(means[0] / variances[0]).all()

    fused = fuse_gaussians(means, variances, [0.5, 0.5])
    in_float32 = fuse_gaussians(
        [m.float() for m in means], [v.float() for v in variances], [0.5, 0.5]
    )

    assert fused.mean.dtype == fused.variance.dtype == dtype
    assert torch.equal(fused.mean, in_float32.mean.to(dtype))
    assert torch.equal(fused.variance, in_float32.variance.to(dtype))
    assert torch.isfinite(fused.mean).all()


def test_float32_inputs_are_fused_in_float32_and_float64_in_float64():
    m, v = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    assert fuse_gaussians([m, m], [v, v], [0.5, 0.5]).mean.dtype == torch.float32
    assert fuse_gaussians([m.double(), m.double()], [v, v], [0.5, 0.5]).mean.dtype == F64


def test_an_expert_with_lambda_zero_is_skipped_entirely_even_if_its_values_are_invalid():
    """Decision: lambda_i = 0 means p_i^0 = 1, so expert i's Gaussian is never read."""
    m, v = torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.1
    nan = torch.full_like(m, float("nan"))
    fused = fuse_gaussians([m, nan], [v, -torch.ones_like(v)], [1.0, 0.0])
    _assert_same(fused, Gaussian(m, v), rtol=1e-14)
    # likewise the reference is not read when lambda_0 = 0
    fused = fuse_gaussians([m, m], [v, v], [0.5, 0.5], reference=(nan, nan))
    _assert_same(fused, Gaussian(m, v), rtol=1e-14)


def test_all_weights_zero_with_a_reference_give_the_reference():
    """Zero weights: the optimum of a zero reward is the reference itself (lambda_0 = 1)."""
    m, v = torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.1
    ref = (torch.randn(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.1)
    fused = fuse_gaussians([m, m], [v, v], [0.0, 0.0], reference=ref)
    _assert_same(fused, Gaussian(*ref), rtol=1e-14)


def test_means_and_variances_may_be_one_tensor_with_a_leading_k_axis():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 4, generator=g, dtype=F64)
    variances = torch.rand(3, 2, 4, generator=g, dtype=F64) + 0.1
    weights = [0.2, 0.3, 0.5]
    as_lists = fuse_gaussians(list(means), list(variances), weights)
    assert torch.equal(fuse_gaussians(means, variances, weights).mean, as_lists.mean)
    assert torch.equal(fuse_gaussians(means, list(variances), weights).variance, as_lists.variance)


def test_per_element_means_broadcast_against_one_variance_per_batch_element():
    g = torch.Generator().manual_seed(0)
    means = [torch.randn(2, 3, 4, 4, generator=g, dtype=F64) for _ in range(2)]
    variances = [torch.rand(2, 1, 1, 1, generator=g, dtype=F64) + 0.1 for _ in range(2)]
    fused = fuse_gaussians(means, variances, [0.3, 0.7])
    expanded = fuse_gaussians(means, [v.expand(2, 3, 4, 4) for v in variances], [0.3, 0.7])
    assert fused.mean.shape == fused.variance.shape == (2, 3, 4, 4)
    torch.testing.assert_close(fused.mean, expanded.mean, rtol=0, atol=0)
    torch.testing.assert_close(fused.variance, expanded.variance, rtol=0, atol=0)


def test_fuse_with_coefficients_equals_fuse_gaussians():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 5, generator=g, dtype=F64)
    variances = torch.rand(2, 5, generator=g, dtype=F64) + 0.1
    ref = (torch.zeros(5, dtype=F64), torch.full((5,), 3.0, dtype=F64))
    kw = {"kl_coefs": [1.0, 2.0], "kl_coef": 0.8}
    coefs = fusion_coefficients([0.5, 0.5], **kw)
    assert coefs.lambdas == (0.625, 1.25) and math.isclose(coefs.lambda0, -0.875)
    a = fuse_with_coefficients(list(means), list(variances), coefs, reference=ref)
    b = fuse_gaussians(means, variances, [0.5, 0.5], reference=ref, **kw)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)


# ----------------------------------------------------------------------------------- refusals


def _experts(k: int = 2, shape=(2, 3)):
    g = torch.Generator().manual_seed(k)
    return (
        [torch.randn(shape, generator=g) for _ in range(k)],
        [torch.rand(shape, generator=g) + 0.1 for _ in range(k)],
    )


def test_no_experts_is_refused():
    with pytest.raises(ValueError, match=r"at least one expert .*K = 0"):
        fuse_gaussians([], [], [])
    with pytest.raises(ValueError, match=r"K = 0"):
        fusion_coefficients([])


def test_one_weight_per_expert_is_required():
    means, variances = _experts(2)
    with pytest.raises(
        ValueError, match=r"weights has 3 entries, expected one per expert \(K = 2\)"
    ):
        fuse_gaussians(means, variances, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"variances has 1 entries, expected K = 2"):
        fuse_gaussians(means, variances[:1], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"kl_coefs has 3 entries"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coefs=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_weights_must_be_non_negative_and_finite(bad):
    means, variances = _experts(2)
    with pytest.raises(ValueError, match=r"weights\[1\] = .* must be a non-negative finite number"):
        fuse_gaussians(means, variances, [0.5, bad])


def test_all_weights_zero_without_a_reference_are_refused():
    means, variances = _experts(2)
    with pytest.raises(ValueError, match=r"reference is required: the lambdas sum to 0"):
        fuse_gaussians(means, variances, [0.0, 0.0])
    zero = FusionCoefficients((0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match=r"weights are all 0"):
        fuse_with_coefficients(means, variances, zero)


def test_lambdas_off_the_simplex_need_the_reference():
    means, variances = _experts(2)
    # beta smaller than the experts' (stronger than any expert): lambda_0 = 1 - 2 = -1
    with pytest.raises(ValueError, match=r"reference is required.*lambda_0 = -1"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coefs=[1.0, 1.0], kl_coef=0.5)
    # weights off the simplex: lambda_0 = 0.5
    with pytest.raises(ValueError, match=r"reference is required.*lambda_0 = 0.5"):
        fuse_gaussians(means, variances, [0.25, 0.25])


def test_distinct_kl_coefs_need_the_target_kl_coef():
    means, variances = _experts(2)
    with pytest.raises(ValueError, match=r"kl_coef \(the target beta\) is required"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coefs=[1.0, 2.0])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_kl_coefficients_must_be_positive_and_finite(bad):
    means, variances = _experts(2)
    with pytest.raises(ValueError, match=r"kl_coef = .* must be a positive finite number"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coef=bad)
    with pytest.raises(ValueError, match=r"kl_coefs\[1\] = .* must be a positive finite number"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coefs=[1.0, bad], kl_coef=1.0)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_variances_must_be_positive_and_finite(bad):
    means, variances = _experts(2)
    variances[1] = variances[1].clone()
    variances[1][0, 1] = bad
    with pytest.raises(ValueError, match=r"variances \(expert 1\) must be positive and finite"):
        fuse_gaussians(means, variances, [0.5, 0.5])


def test_a_deterministic_ddim_step_cannot_be_fused():
    """DDIM with eta = 0 has variance 0: there is no Gaussian to fuse."""
    schedule = Schedule.from_scheduler(DDIMScheduler(clip_sample=False), 50)
    t = schedule.timesteps[10]
    x_t = torch.randn(2, 3, 4, 4)
    steps = [
        step_gaussian(torch.randn(2, 3, 4, 4), x_t, t, schedule, StepSpec(eta=eta))
        for eta in (0.0, 1.0)
    ]
    assert bool((steps[0].variance == 0).all())
    with pytest.raises(ValueError, match=r"variances \(expert 0\).*deterministic step.*eta = 0"):
        fuse_gaussians([s.mean for s in steps], [s.variance for s in steps], [0.5, 0.5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_means_must_be_finite(bad):
    means, variances = _experts(2)
    means[0] = means[0].clone()
    means[0][1, 2] = bad
    with pytest.raises(ValueError, match=r"means \(expert 0\) must be finite"):
        fuse_gaussians(means, variances, [0.5, 0.5])
    ref = (means[0], variances[0])
    with pytest.raises(ValueError, match=r"means \(reference\) must be finite"):
        fuse_gaussians(_experts(2)[0], variances, [0.25, 0.25], reference=ref)


def test_shapes_that_do_not_broadcast_are_refused():
    means, variances = _experts(2, shape=(2, 3))
    with pytest.raises(ValueError, match=r"means and variances must broadcast to one shape"):
        fuse_gaussians(means, [variances[0], torch.rand(4) + 0.1], [0.5, 0.5])


def test_a_fused_precision_that_is_not_positive_is_refused():
    """lambda_0 = -3 with a reference 10x sharper than the expert: P = 4/1 - 3/0.1 < 0."""
    mean, ref_mean = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"fused precision is not positive everywhere"):
        fuse_gaussians(
            [mean],
            [torch.ones(2, 3)],
            [1.0],
            kl_coefs=[1.0],
            kl_coef=0.25,
            reference=(ref_mean, torch.full((2, 3), 0.1)),
        )


def test_wrong_types_are_refused():
    means, variances = _experts(2)
    with pytest.raises(TypeError, match=r"weights must be a sequence of numbers, got str"):
        fuse_gaussians(means, variances, "0.5,0.5")
    with pytest.raises(TypeError, match=r"weights must be a sequence of numbers, got float"):
        fuse_gaussians(means, variances, 0.5)
    with pytest.raises(TypeError, match=r"weights must hold numbers"):
        fuse_gaussians(means, variances, [True, False])
    with pytest.raises(ValueError, match=r"weights must be a 1-D sequence"):
        fuse_gaussians(means, variances, torch.ones(1, 2))
    with pytest.raises(TypeError, match=r"kl_coefs must be a sequence of numbers"):
        fuse_gaussians(means, variances, [0.5, 0.5], kl_coefs="11")
    with pytest.raises(TypeError, match=r"means\[0\] must be a torch.Tensor, got list"):
        fuse_gaussians([[0.0, 1.0], [1.0, 2.0]], variances, [0.5, 0.5])
    with pytest.raises(TypeError, match=r"variances\[1\] must be a floating-point tensor"):
        fuse_gaussians(means, [variances[0], torch.ones(2, 3, dtype=torch.long)], [0.5, 0.5])
    with pytest.raises(TypeError, match=r"means must be a sequence of tensors"):
        fuse_gaussians(3.0, variances, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"means as one tensor needs a leading K axis"):
        fuse_gaussians(torch.tensor(1.0), variances, [0.5, 0.5])
    with pytest.raises(TypeError, match=r"reference must be a \(mean, variance\) pair"):
        fuse_gaussians(means, variances, [0.25, 0.25], reference=means[0])


def test_coefficients_must_match_the_experts():
    means, variances = _experts(2)
    with pytest.raises(ValueError, match=r"coefficients has 3 lambdas for 2 experts"):
        fuse_with_coefficients(means, variances, FusionCoefficients((0.2, 0.3, 0.5), 0.0))


def test_weights_may_be_numpy_arrays_or_numpy_scalars():
    import numpy as np

    from msdda import fusion_coefficients

    assert fusion_coefficients(np.array([0.25, 0.75])).lambdas == (0.25, 0.75)
    assert fusion_coefficients([np.float32(0.5), np.float32(0.5)]).lambda0 == 0.0
    with pytest.raises(TypeError, match="weights must hold numbers"):
        fusion_coefficients(np.array([[0.5], [0.5]]))
