"""Joint evaluation: msdda and db ask one joint denoiser for every member a step needs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from msdda import Expert, StepSpec, joint_policy, msdda_step
from msdda.methods import MethodContext, run_method
from msdda.testbed import GaussianMixture
from msdda.testbed import testbed_schedule as make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 3
SCHEDULE = make_schedule(8)
SEEDS = [5, 6, 7]


def _context(**fields) -> MethodContext:
    ref, *experts = (
        Expert(GaussianMixture.random(DIM, seed=s).denoiser(SCHEDULE), StepSpec(), name=f"m{s}")
        for s in (0, 1, 2)
    )
    return MethodContext(SCHEDULE, ref, tuple(experts), (DIM,), dtype=torch.float64, **fields)


class Joint:
    """A joint denoiser over the context's models that records what it is asked for."""

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx, self.asked = ctx, []

    def __call__(self, x_t, t, cond, members):
        self.asked.append(tuple(members))
        models = [self.ctx.reference if m is None else self.ctx.experts[m] for m in members]
        return [e.denoiser(x_t, t, cond) for e in models]


@pytest.mark.parametrize("method", ["msdda", "db"])
@pytest.mark.parametrize(
    ("weights", "kl_coef", "members"),
    [((0.3, 0.7), None, (0, 1)), ((1.0, 0.0), None, (0,)), ((0.3, 0.7), 0.5, (0, 1, None))],
)
def test_joint_evaluation_gives_the_same_samples_in_one_call(method, weights, kl_coef, members):
    plain = _context(kl_coef=kl_coef)
    joint = Joint(plain)
    ctx = replace(plain, joint=joint)
    want = run_method(method, plain, weights, None, SEEDS)
    got = run_method(method, ctx, weights, None, SEEDS)
    assert torch.equal(got.samples, want.samples)
    assert joint.asked == [members] * len(SCHEDULE.timesteps)  # one call per step
    assert got.denoiser_rows == want.denoiser_rows == len(SEEDS) * len(members) * 8


def test_msdda_step_asks_the_joint_policy_for_the_reference_as_member_none():
    ctx = _context()
    asked = []
    policy = joint_policy(Joint(ctx), ctx.experts, ctx.reference, SCHEDULE)

    def recording(x_t, t, members):
        asked.append(list(members))
        return policy(x_t, t, members)

    kw = {"kl_coefs": [1.0, 1.0], "kl_coef": 0.5}  # lambda_0 = -1
    step = msdda_step(recording, [0.4, 0.6], num_experts=2, **kw)
    x = torch.randn(4, DIM, dtype=torch.float64)
    t = SCHEDULE.timesteps[2]
    ref = ctx.reference
    separate = msdda_step(
        [lambda x, t, i=i: policy(x, t, [i])[0] for i in range(2)],
        [0.4, 0.6],
        **kw,
        reference=lambda x, t: joint_policy(Joint(ctx), (), ref, SCHEDULE)(x, t, [None])[0],
    )
    got, want = step(x, t), separate(x, t)
    assert asked == [[0, 1, None]]
    assert torch.equal(got.mean, want.mean) and torch.equal(got.variance, want.variance)


def test_joint_policy_needs_the_reference_only_when_asked_for_it():
    ctx = _context()
    policy = joint_policy(Joint(ctx), ctx.experts, None, SCHEDULE)
    x = torch.randn(2, DIM, dtype=torch.float64)
    assert len(policy(x, SCHEDULE.timesteps[0], [1])) == 1
    with pytest.raises(ValueError, match="member None"):
        policy(x, SCHEDULE.timesteps[0], [None])


def test_rs_uses_the_domains_soup_and_counts_its_rows():
    plain = _context()
    asked = []

    def soup(members, coefficients):
        asked.append((members, coefficients))
        experts = [plain.reference if m is None else plain.experts[m] for m in members]

        def denoiser(x_t, t, cond):
            return sum(
                c * e.denoiser(x_t, t, cond) for c, e in zip(coefficients, experts, strict=True)
            )

        return denoiser

    ctx = replace(plain, soup=soup)
    run = run_method("rs", ctx, (0.25, 0.75), None, SEEDS)
    assert asked == [((0, 1), (0.25, 0.75))]
    assert run.denoiser_rows == len(SEEDS) * 8
