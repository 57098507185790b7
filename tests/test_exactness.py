"""The ``target`` method converges over M to the exact step-level optimum (issue 15).

On the Gaussian testbed with one Gaussian component the exact denoiser is affine, so the
reference's Tweedie estimate x0_hat(x_{t-1}) is affine in x_{t-1} and a quadratic reward of
it is a quadratic reward of x_{t-1}: the step-level optimum p_ref exp(w r / beta) is a
Gaussian known in closed form (:func:`msdda.testbed.tilted_step`). Per-step importance
resampling from M reference candidates samples it as M grows; at M = 1 it is the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from msdda import Expert, StepSpec, testbed
from msdda.gaussians import step_gaussian
from msdda.methods import MethodContext, MethodSettings, build_policy
from msdda.sampling import NoiseTape
from msdda.testbed import GaussianMixture, QuadraticReward, tilted_step

DIM, SAMPLES, STEP, BETA = 2, 4000, 30, 0.1
DATA = GaussianMixture(
    weights=torch.ones(1, dtype=torch.float64),
    means=torch.tensor([[0.3, -0.2]], dtype=torch.float64),
    stds=torch.tensor([0.5], dtype=torch.float64),
)
REWARD = QuadraticReward(
    curvature=torch.tensor([4.0, 1.0], dtype=torch.float64),
    goal=torch.tensor([1.0, -1.0], dtype=torch.float64),
)


def _problem():
    schedule = testbed.testbed_schedule(50)
    reference = Expert(DATA.denoiser(schedule), StepSpec("epsilon", "fixed_small"), BETA, "ref")
    ctx = MethodContext(
        schedule=schedule,
        reference=reference,
        experts=(reference,),
        sample_shape=(DIM,),
        rewards=(lambda x, cond: REWARD(x),),
        kl_coef=BETA,
        dtype=torch.float64,
    )
    return ctx, schedule


def _exact_optimum(ctx, schedule, x_t):
    """p_ref(.|x_t) * exp(r(x0_hat(x_{t-1})) / beta), r of an affine map: a Gaussian."""
    t, prev = schedule.timesteps[STEP], schedule.prev_timesteps[STEP]
    tb = torch.full((1,), t, dtype=torch.long)
    ref = step_gaussian(ctx.reference.denoiser(x_t, tb), x_t, t, schedule, ctx.reference.spec)
    abar = float(schedule.alphas_cumprod[prev])
    s2 = float(DATA.stds[0]) ** 2
    k = math.sqrt(abar) * s2 / (abar * s2 + 1 - abar)  # x0_hat = m + k (x - sqrt(abar) m)
    offset = DATA.means[0] * (1 - k * math.sqrt(abar))
    in_x = QuadraticReward(REWARD.curvature * k**2, (REWARD.goal - offset) / k)
    return ref, tilted_step(ref, [in_x], [1.0 / BETA])


def _target_step(ctx, schedule, x_t, m):
    """SAMPLES draws of the target's step from the state x_t with M candidates."""
    seeds = list(range(SAMPLES))
    tape = NoiseTape.seeded(seeds)
    policy = build_policy(
        "target",
        ctx,
        (1.0,),
        None,
        seeds=seeds,
        noise=tape,
        settings=MethodSettings(target_candidates=m),
    )
    return policy(x_t.expand(SAMPLES, DIM).clone(), schedule.timesteps[STEP]).mean


@pytest.fixture(scope="module")
def curve():
    ctx, schedule = _problem()
    x_t = torch.tensor([[0.4, 0.1]], dtype=torch.float64)
    ref, exact = _exact_optimum(ctx, schedule, x_t)
    draws = {m: _target_step(ctx, schedule, x_t, m) for m in (1, 4, 32, 512)}
    return ref, exact, draws


def _mean_error(draws, exact):
    """|empirical mean - exact mean| per dimension, in units of the exact std."""
    return ((draws.mean(0) - exact.mean[0]).abs() / exact.variance[0].sqrt()).max().item()


def test_the_exact_optimum_is_far_from_the_reference_here(curve):
    ref, exact, _ = curve
    shift = ((exact.mean - ref.mean).abs() / exact.variance.sqrt()).max().item()
    assert shift > 1.0  # the tilt moves the mean by more than one std
    ratio = exact.variance / ref.variance
    assert bool((ratio < 1).all()) and ratio.min().item() < 0.9  # and shrinks the variance


def test_one_candidate_is_the_reference_step(curve):
    ref, _, draws = curve
    err = ((draws[1].mean(0) - ref.mean[0]).abs() / ref.variance[0].sqrt()).max().item()
    assert err < 4 / math.sqrt(SAMPLES)
    torch.testing.assert_close(draws[1].var(0), ref.variance[0], rtol=0.1, atol=0.0)


def test_the_target_converges_over_m_to_the_exact_optimum(curve):
    _, exact, draws = curve
    errors = [_mean_error(draws[m], exact) for m in (1, 4, 32, 512)]
    assert errors[0] > errors[1] > errors[2]  # self-normalised IS: bias O(1/M)
    assert errors[3] < 5 / math.sqrt(SAMPLES) + 0.01  # converged: sampling error only
    torch.testing.assert_close(draws[512].var(0), exact.variance[0], rtol=0.06, atol=0.0)
    var_error = {m: (draws[m].var(0) - exact.variance[0]).abs()[0].item() for m in (1, 512)}
    assert var_error[512] < var_error[1] / 2


def test_few_candidates_fall_short_of_the_optimum(curve):
    _, exact, draws = curve
    assert _mean_error(draws[4], exact) > 10 / math.sqrt(SAMPLES)


# ``msdda demo --preset``: the shipped beta = 0.25 experts, msdda against db, rs, oracle.


def test_the_preset_replaces_the_experts_and_oracles_with_its_own():
    from msdda.digits import load_digits_bundle
    from msdda.digits.demo import load_preset

    shipped = load_digits_bundle()
    bundle = load_preset(shipped, "beta0.25")
    assert bundle.expert("legibility").kl_coef == 0.25
    assert bundle.expert("boldness").kl_coef == 0.25
    assert bundle.oracle({"legibility": 0.5, "boldness": 0.5}).kl_coef == 0.25
    assert shipped.expert("legibility").kl_coef == 1.0  # the shipped bundle is untouched
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset(shipped, "beta0.1")


def test_demo_preset_compares_msdda_db_rs_and_the_oracle_on_reward_and_kl(tmp_path):
    import json

    from typer.testing import CliRunner

    from msdda.cli import app

    out = tmp_path / "demo"
    args = ["demo", "--preset", "beta0.25", "--samples-per-prompt", "20", "--num-weights", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["methods"]}
    assert set(rows) == {"msdda", "db", "rs", "oracle"}
    for name in ("db", "rs"):
        r = rows[name]
        assert r["kl"] > 0 and r["num_images"] == 200
        # the objective is reward - beta KL, paired image by image against msdda
        want = r["objective"] - rows["msdda"]["objective"]
        assert r["objective_minus_msdda"] == pytest.approx(want, abs=1e-9)
        assert r["objective"] == pytest.approx(r["weighted_reward"] - 0.25 * r["kl"], abs=1e-9)
    assert rows["msdda"]["objective_minus_msdda"] == 0.0
    assert "reward - beta KL" in result.output


def test_demo_refuses_an_unknown_preset(tmp_path):
    from typer.testing import CliRunner

    from msdda.cli import app

    result = CliRunner().invoke(app, ["demo", "--preset", "nope", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--preset" in result.output
    assert not (tmp_path / "d").exists()
