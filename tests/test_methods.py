"""Every peer method is a step strategy on the one sampling loop; each reduces to a known case."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from msdda import Expert, Gaussian, StepSpec
from msdda.gaussians import step_gaussian
from msdda.methods import (
    EvalCounter,
    MethodContext,
    MethodSettings,
    NoiseTape,
    SampleGenerators,
    Search,
    best_of_n_kl,
    build_policy,
    gaussian_kl,
    parameter_soup,
    run_method,
    target_policy,
)
from msdda.testbed import GaussianMixture, QuadraticReward
from msdda.testbed import testbed_schedule as make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 4
STEPS = 20
SCHEDULE = make_schedule(STEPS)
SEEDS = list(range(100, 112))
W = (0.3, 0.7)


def quadratic(curvature: float, goal: float):
    r = QuadraticReward(
        curvature=torch.full((DIM,), curvature, dtype=torch.float64),
        goal=torch.full((DIM,), goal, dtype=torch.float64),
    )
    return lambda images, cond=None: r(images)


def problem(denoiser_of, rewards, spec: StepSpec = StepSpec()) -> MethodContext:
    """Reference ``denoiser_of(0)``, experts ``denoiser_of(1)`` and ``denoiser_of(2)``, float64."""
    ref, *experts = (Expert(denoiser_of(seed), spec, name=f"model{seed}") for seed in (0, 1, 2))
    return MethodContext(
        SCHEDULE, ref, tuple(experts), (DIM,), rewards=rewards, dtype=torch.float64
    )


@pytest.fixture(scope="module")
def testbed() -> MethodContext:
    """Exact mixture denoisers in float64; experts are other mixtures (equal step variances)."""
    return problem(
        lambda seed: GaussianMixture.random(DIM, seed=seed).denoiser(SCHEDULE),
        (quadratic(1.0, 1.5), quadratic(0.5, -1.0)),
    )


class TinyDenoiser(nn.Module):
    """A small random MLP ``(x (B, d), t (B,), cond) -> (B, out)``; out = 2d with a variance head."""

    def __init__(self, seed: int, variance_head: bool = False, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        out = 2 * DIM if variance_head else DIM
        self.net = nn.Sequential(nn.Linear(DIM + 1, hidden), nn.Tanh(), nn.Linear(hidden, out))
        self.variance_head = variance_head
        self.double()

    def forward(self, x, t, cond=None):
        h = self.net(torch.cat([x, t[:, None].to(x) / 1000.0], dim=1))
        eps = 0.9 * x + 0.1 * h[:, :DIM]  # near the N(0, I)-data denoiser, so chains stay bounded
        if self.variance_head:
            return torch.cat([eps, torch.tanh(h[:, DIM:])], dim=1)
        return eps


def tiny_context(variance_head: bool = False) -> MethodContext:
    return problem(
        lambda seed: TinyDenoiser(seed, variance_head),
        (quadratic(1.0, 1.0), quadratic(1.0, -1.0)),
        StepSpec(variance_type="learned_log" if variance_head else "fixed_small"),
    )


def alone(ctx: MethodContext, expert: Expert) -> MethodContext:
    """The same problem with ``expert`` as the reference: its ``base`` run is that expert alone."""
    return MethodContext(ctx.schedule, expert, ctx.experts, ctx.sample_shape, dtype=ctx.dtype)


def samples(method, ctx, weights=W, settings=None, seeds=SEEDS):
    return run_method(method, ctx, weights, None, seeds, settings=settings).samples


# --- reductions to a known method, exactly, on identical noise ---------------------------


def test_code_with_one_candidate_is_base(testbed):
    base = samples("base", testbed, None)
    for block in (1, 3, STEPS):
        code = samples(
            "code", testbed, settings=MethodSettings(code_candidates=1, code_block=block)
        )
        assert torch.equal(code, base), block


def test_target_with_one_candidate_is_base(testbed):
    base = samples("base", testbed, None)
    target = samples("target", testbed, settings=MethodSettings(target_candidates=1))
    assert torch.equal(target, base)


def test_rgg_with_zero_scale_is_base(testbed):
    base = samples("base", testbed, None)
    for schedule in ("constant", "increasing", "decreasing"):
        rgg = samples("rgg", testbed, settings=MethodSettings(rgg_scale=0.0, rgg_schedule=schedule))
        assert torch.equal(rgg, base)


def test_db_equals_msdda_when_variances_are_equal(testbed):
    for weights in (W, (0.5, 0.5), (0.9, 0.1)):
        db, fused = samples("db", testbed, weights), samples("msdda", testbed, weights)
        assert torch.allclose(db, fused, rtol=0, atol=1e-10)


def test_db_differs_from_msdda_when_variances_differ():
    ctx = tiny_context(variance_head=True)
    db, fused = samples("db", ctx), samples("msdda", ctx)
    assert (db - fused).abs().max() > 1e-3


@pytest.mark.parametrize("k", [0, 1])
def test_one_hot_weights_give_that_expert(k):
    ctx = tiny_context(variance_head=True)
    weights = (1.0, 0.0) if k == 0 else (0.0, 1.0)
    expert = samples("base", alone(ctx, ctx.experts[k]), None)
    for method in ("rs", "db-ls"):
        assert torch.equal(samples(method, ctx, weights), expert), method
    fused = samples("msdda", ctx, weights)  # (mu / var) / (1 / var): equal up to round-off
    assert torch.allclose(fused, expert, rtol=1e-12, atol=1e-12)


def test_db_with_one_hot_weights_is_that_experts_epsilon_with_fixed_variance():
    ctx = tiny_context(variance_head=False)
    expert = samples("base", alone(ctx, ctx.experts[1]), None)
    assert torch.allclose(samples("db", ctx, (0.0, 1.0)), expert, rtol=0, atol=1e-12)


def test_methods_see_identical_noise_whatever_the_batch(testbed):
    full = samples("msdda", testbed)
    one = samples("msdda", testbed, seeds=[SEEDS[3]])
    assert torch.allclose(full[3:4], one, rtol=0, atol=1e-12)
    assert not torch.allclose(full[2:3], one)


# --- what each method does --------------------------------------------------------------


def test_parameter_soup_is_the_weighted_sum_of_parameters():
    a, b, c = (TinyDenoiser(s) for s in (1, 2, 3))
    soup = parameter_soup([a, b, c], [0.2, 0.3, 0.5])
    for name, p in soup.state_dict().items():
        want = 0.2 * a.state_dict()[name] + 0.3 * b.state_dict()[name] + 0.5 * c.state_dict()[name]
        assert torch.allclose(p, want, rtol=0, atol=1e-14)
    assert torch.equal(a.net[0].weight, TinyDenoiser(1).net[0].weight)  # inputs untouched


def test_parameter_soup_refuses_mismatched_architectures():
    with pytest.raises(ValueError, match="one architecture"):
        parameter_soup([TinyDenoiser(1), TinyDenoiser(2, variance_head=True)], [0.5, 0.5])
    with pytest.raises(ValueError, match="one architecture"):
        parameter_soup([nn.Linear(3, 3), nn.Conv1d(3, 3, 1)], [0.5, 0.5])
    with pytest.raises(ValueError, match="weights has 1 entries"):
        parameter_soup([nn.Linear(3, 3), nn.Linear(3, 3)], [1.0])


def test_rs_needs_network_modules(testbed):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        samples("rs", testbed)


def test_rgg_shifts_the_mean_by_scale_times_variance_times_reward_gradient(testbed):
    scale, t = 0.7, testbed.schedule.timesteps[5]
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tape = NoiseTape.seeded([0, 1, 2])
    settings = MethodSettings(rgg_scale=scale)
    rgg = build_policy("rgg", testbed, W, None, seeds=[0, 1, 2], noise=tape, settings=settings)
    base = build_policy("base", testbed, None, None, seeds=[0, 1, 2], noise=tape)
    shift = rgg(x, t).mean - base(x, t).mean

    def weighted_reward_of_x0(x_t):  # sum_i w_i r_i(x0_hat(x_t)) by Tweedie, per sample
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long)
        eps = testbed.reference.denoiser(x_t, tb)
        x0 = step_gaussian(eps, x_t, t, testbed.schedule, StepSpec()).pred_x0
        return sum(w * r(x0) for w, r in zip(W, testbed.rewards, strict=True))

    h, grad = 1e-6, torch.zeros_like(x)
    for j in range(DIM):
        e = torch.zeros_like(x)
        e[:, j] = h
        grad[:, j] = (weighted_reward_of_x0(x + e) - weighted_reward_of_x0(x - e)) / (2 * h)
    variance = base(x, t).variance
    assert torch.allclose(shift, scale * variance * grad, rtol=1e-5, atol=1e-9)


def weighted_reward(ctx, x, weights=W):
    return sum(w * r(x) for w, r in zip(weights, ctx.rewards, strict=True))


def test_search_methods_raise_the_weighted_reward(testbed):
    seeds = list(range(64))
    base = weighted_reward(testbed, samples("base", testbed, None, seeds=seeds)).mean()
    code = samples(
        "code", testbed, settings=MethodSettings(code_candidates=6, code_block=4), seeds=seeds
    )
    sharp = dataclasses.replace(testbed, kl_coef=0.25)  # target: a strongly tilted optimum
    target = samples("target", sharp, settings=MethodSettings(target_candidates=6), seeds=seeds)
    rgg = samples("rgg", testbed, settings=MethodSettings(rgg_scale=1.0), seeds=seeds)
    for name, x in (("code", code), ("target", target), ("rgg", rgg)):
        assert weighted_reward(testbed, x).mean() > base + 0.3, name


def test_target_samples_the_tilted_reference_step():
    """A zero-epsilon reference makes x0_hat(x) = x / sqrt(abar) linear; a linear reward c.y then
    tilts the reference step N(mu, var) to N(mu + var c / (sqrt(abar_prev) beta), var)."""
    schedule = make_schedule(STEPS)
    ref = Expert(lambda x, t, cond=None: torch.zeros_like(x), kl_coef=2.0)
    c = torch.tensor([1.0, -0.5, 0.0, 0.25], dtype=torch.float64)
    ctx = MethodContext(
        schedule, ref, (ref,), (DIM,), rewards=(lambda y, cond=None: y @ c,), dtype=torch.float64
    )
    i = 10
    t, t_prev = schedule.timesteps[i], schedule.prev_timesteps[i]
    n = 4000
    x = torch.full((n, DIM), 0.3, dtype=torch.float64)
    seeds = list(range(n))
    tape = NoiseTape.seeded(seeds)
    for j in range(i):  # bring the tape to step i
        tape(j, x)
    step = target_policy(ctx, (1.0,), None, search=Search(tape, SampleGenerators(seeds, "t"), 64))
    g = build_policy("base", ctx, None, None, seeds=seeds, noise=tape)(x, t)
    got = step(x, t).mean.mean(0)
    abar_prev = float(schedule.alphas_cumprod[t_prev])
    want = g.mean[0] + g.variance[0] * c / (math.sqrt(abar_prev) * 2.0)
    std_err = (g.variance[0] / n).sqrt()
    assert ((got - want).abs() < 5 * std_err + 0.02 * (want - g.mean[0]).abs()).all()
    assert ((got - g.mean[0]).abs() > 5 * std_err)[c != 0].all()  # it did move


def test_db_ls_draws_one_expert_per_sample_and_step():
    ctx = tiny_context()
    run = run_method("db-ls", ctx, (0.5, 0.5), None, SEEDS)
    assert run.nfe_per_image == STEPS
    a = samples("base", alone(ctx, ctx.experts[0]), None)
    b = samples("base", alone(ctx, ctx.experts[1]), None)
    mix = run.samples
    assert not torch.allclose(mix, a) and not torch.allclose(mix, b)
    assert torch.equal(samples("db-ls", ctx, (0.5, 0.5)), mix)  # its own seeded generator


# --- costs -------------------------------------------------------------------------------


def code_evaluations(t: int, n: int, b: int) -> int:
    """Per block of b steps: the reference once at the block's start state, N candidates at each
    further step, and N Tweedie scorings unless the block ends the chain (a clean sample is
    scored as it is); a block of the last step alone has nothing to choose."""
    blocks = [(s, min(s + b, t)) for s in range(0, t, b)]
    return sum(1 + n * (end - s - 1) + (n if end < t else 0) for s, end in blocks)


def test_network_evaluations_per_image(testbed):
    t = STEPS
    n, b, m = 3, 4, 5
    settings = MethodSettings(code_candidates=n, code_block=b, target_candidates=m, rgg_scale=0.5)
    expected = {
        "base": t,
        "db": 2 * t,
        "db-ls": t,
        "msdda": 2 * t,
        "rgg": t,
        "code": code_evaluations(t, n, b),
        "target": t + m * (t - 1),  # reference step + candidates' Tweedie x0, no choice at the end
    }
    for method, nfe in expected.items():
        w = None if method == "base" else W
        run = run_method(method, testbed, w, None, SEEDS[:4], settings=settings)
        assert run.nfe_per_image == nfe, method
        assert run.seconds > 0


@pytest.mark.parametrize("block", [1, 3, 4, STEPS - 1, STEPS])
def test_code_evaluations_per_block(testbed, block):
    settings = MethodSettings(code_candidates=3, code_block=block)
    run = run_method("code", testbed, W, None, SEEDS[:2], settings=settings)
    assert run.nfe_per_image == code_evaluations(STEPS, 3, block)
    assert code_evaluations(STEPS, 3, 1) == STEPS + 3 * (STEPS - 1)  # like target's M = 3


def test_counter_counts_rows():
    counter = EvalCounter()
    f = counter.wrap_denoiser(lambda x, t, c=None: x)
    f(torch.zeros(5, 2), torch.zeros(5))
    f(torch.zeros(3, 2), torch.zeros(3))
    assert counter.denoiser_rows == 8


# --- KL to the base --------------------------------------------------------------------------


def test_gaussian_kl_of_hand_checkable_gaussians():
    p = Gaussian(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]]))
    q = Gaussian(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 2.0]]))
    # dim 0: 1/2 (log 2 + (1 + 1) / 2 - 1) = log(2) / 2; dim 1: equal Gaussians, 0
    assert gaussian_kl(p, q).tolist() == pytest.approx([math.log(2) / 2])
    assert gaussian_kl(q, q).tolist() == [0.0]
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)


def test_measuring_kl_changes_neither_samples_nor_costs(testbed):
    settings = MethodSettings(code_candidates=3, code_block=4, target_candidates=3, rgg_scale=0.5)
    for method in ("db-ls", "rgg", "code", "target", "msdda"):
        plain = run_method(method, testbed, W, None, SEEDS[:4], settings=settings)
        kl = run_method(method, testbed, W, None, SEEDS[:4], settings=settings, measure_kl=True)
        assert torch.equal(plain.samples, kl.samples), method
        assert (plain.denoiser_rows, plain.reward_rows) == (kl.denoiser_rows, kl.reward_rows)
        assert plain.kl is None and kl.kl.shape == (4,) and (kl.kl >= 0).all(), method


def kl_of(method, ctx, weights=W, **settings):
    run = run_method(
        method, ctx, weights, None, SEEDS[:4], settings=MethodSettings(**settings), measure_kl=True
    )
    return run.kl


def test_kl_to_the_base_is_zero_for_the_base_and_for_what_reduces_to_it(testbed):
    assert torch.equal(kl_of("base", testbed, None), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(kl_of("rgg", testbed, rgg_scale=0.0), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(
        kl_of("code", testbed, code_candidates=1), torch.zeros(4, dtype=torch.float64)
    )
    expert = alone(testbed, testbed.experts[0])  # the first expert is the base here
    assert torch.allclose(kl_of("msdda", expert, (1.0, 0.0)), torch.zeros(4, dtype=torch.float64))
    assert (kl_of("msdda", expert, (0.0, 1.0)) > 0.1).all()
    assert (kl_of("rgg", testbed, rgg_scale=0.5) > 0).all()


@pytest.mark.parametrize("block", [1, 4, STEPS - 1])
def test_code_kl_is_best_of_n_per_choice(testbed, block):
    """Each block that has noise to choose over adds log N - (N - 1) / N (best of N draws)."""
    choices = len([s for s in range(0, STEPS, block) if s < STEPS - 1])
    kl = kl_of("code", testbed, code_candidates=3, code_block=block)
    assert torch.allclose(kl, torch.full((4,), choices * best_of_n_kl(3), dtype=torch.float64))


def test_target_kl_is_at_most_log_m_per_noisy_step(testbed):
    kl = kl_of("target", testbed, target_candidates=4)
    assert (kl > 0).all() and (kl <= (STEPS - 1) * math.log(4)).all()


# --- bad input ---------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(testbed):
    with pytest.raises(ValueError, match="unknown method 'dpo'"):
        samples("dpo", testbed)
    with pytest.raises(ValueError, match="simplex"):
        samples("msdda", testbed, (0.5, 0.6))
    with pytest.raises(ValueError, match="one weight per objective"):
        samples("msdda", testbed, (1.0,))
    with pytest.raises(ValueError, match=">= 0"):
        samples("db", testbed, (1.5, -0.5))
    with pytest.raises(ValueError, match="no oracle for weights"):
        samples("oracle", testbed)
    with pytest.raises(ValueError, match="code_candidates"):
        MethodSettings(code_candidates=0)
    with pytest.raises(ValueError, match="guidance schedule"):
        MethodSettings(rgg_schedule="cubic")
    no_rewards = MethodContext(testbed.schedule, testbed.reference, testbed.experts, (DIM,))
    with pytest.raises(ValueError, match="needs the objective rewards"):
        samples("rgg", no_rewards)


def test_oracle_is_used_at_its_weights(testbed):
    ctx = MethodContext(
        testbed.schedule,
        testbed.reference,
        testbed.experts,
        (DIM,),
        oracles={(0.3, 0.7): testbed.experts[0]},
        dtype=torch.float64,
    )
    assert torch.equal(samples("oracle", ctx), samples("base", alone(ctx, ctx.experts[0]), None))
