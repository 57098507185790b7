"""Pairs and the DPO training loop: what they promise, on small analytic problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msdda import Expert, StepSpec, expert_policy, step_gaussian
from msdda.alignment import (
    PairSet,
    TrainConfig,
    collect_pairs,
    evaluate_policy,
    step_gaussians_per_sample,
    train_dpo,
    training_step_indices,
    tweedie_step_rewards,
)
from msdda.alignment.testbed import TestbedPolicy
from msdda.rewards import tweedie_step_reward
from msdda.testbed import GaussianMixture
from msdda.testbed import testbed_schedule as make_testbed_schedule

DIM = 3


@pytest.fixture(scope="module")
def problem():
    mixture = GaussianMixture.random(dim=DIM, seed=3)
    schedule = make_testbed_schedule(10)
    reference = Expert(mixture.denoiser(schedule), StepSpec("epsilon", "fixed_small"))
    return mixture, schedule, reference


def _rewards(x, t, cond):
    return {"first": x[:, 0], "norm": -(x**2).sum(1)}


def _collect(problem, seed: int) -> PairSet:
    """200 chains, 3 pairs per state at steps 0, 4 and 8, in float64."""
    _, schedule, reference = problem
    return collect_pairs(
        reference,
        schedule,
        _rewards,
        shape=(DIM,),
        num_chains=200,
        pairs_per_state=3,
        steps=[0, 4, 8],
        seed=seed,
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def pairs(problem):
    return _collect(problem, seed=5)


def test_pairs_cover_every_chain_step_and_pair(pairs):
    assert len(pairs) == 200 * 3 * 3
    assert sorted(pairs.step_indices.unique().tolist()) == [0, 4, 8]
    assert pairs.reward_names == ("first", "norm")
    assert pairs.states.dtype == torch.float64


def test_states_carry_the_reference_step_gaussian(problem, pairs):
    _, schedule, reference = problem
    for i in (0, 4, 8):
        m = pairs.step_indices == i
        t = schedule.timesteps[i]
        assert (pairs.timesteps[m] == t).all()
        g = expert_policy(reference, schedule)(pairs.states[m], t)
        torch.testing.assert_close(pairs.reference_mean[m], g.mean)
        torch.testing.assert_close(pairs.reference_variance[m], g.variance)


def test_actions_are_independent_draws_from_the_reference(pairs):
    z = torch.cat(
        [
            (pairs.action_a - pairs.reference_mean) / pairs.reference_variance.sqrt(),
            (pairs.action_b - pairs.reference_mean) / pairs.reference_variance.sqrt(),
        ]
    )
    assert abs(float(z.mean())) < 0.03
    assert abs(float(z.std()) - 1) < 0.03
    corr = float(
        ((pairs.action_a - pairs.reference_mean) * (pairs.action_b - pairs.reference_mean)).mean()
    )
    assert abs(corr) < 0.03 * float(pairs.reference_variance.mean())


def test_rewards_score_the_actions(pairs):
    torch.testing.assert_close(pairs.rewards_a["first"], pairs.action_a[:, 0])
    torch.testing.assert_close(pairs.rewards_b["norm"], -(pairs.action_b**2).sum(1))


def test_a_state_with_several_pairs_is_the_same_state(pairs):
    step0 = pairs.subset(pairs.step_indices == 0)
    # three pairs per state: the states come in three copies of the same 200 chains
    torch.testing.assert_close(step0.states[:200], step0.states[200:400])


def test_same_seed_same_pairs_other_seed_other_pairs(problem, pairs):
    torch.testing.assert_close(_collect(problem, seed=5).action_a, pairs.action_a)
    assert not torch.equal(_collect(problem, seed=6).action_a, pairs.action_a)


def test_chains_are_conditioned_per_chain(problem):
    _, schedule, reference = problem
    seen = []

    def rewards(x, t, cond):
        seen.append(cond)
        return {"c": cond.double()}

    cond = torch.arange(4)
    p = collect_pairs(
        reference,
        schedule,
        rewards,
        shape=(DIM,),
        num_chains=4,
        pairs_per_state=2,
        steps=[1],
        cond=cond,
    )
    assert torch.equal(p.cond, cond.repeat(2))
    assert torch.equal(
        p.rewards_a["c"], cond.repeat(2).double()
    )  # each action scored with its chain's condition
    assert torch.equal(seen[0], cond.repeat(4))  # 2 pairs x 2 actions, scored together


def test_weighted_rewards_are_the_weighted_sum(pairs):
    r_a, r_b = pairs.weighted_rewards({"first": 0.25, "norm": 0.75})
    torch.testing.assert_close(
        r_a, 0.25 * pairs.rewards_a["first"] + 0.75 * pairs.rewards_a["norm"]
    )
    torch.testing.assert_close(
        r_b, 0.25 * pairs.rewards_b["first"] + 0.75 * pairs.rewards_b["norm"]
    )
    with pytest.raises(ValueError, match="unknown reward"):
        pairs.weighted_rewards({"boldness": 1.0})
    with pytest.raises(ValueError, match="empty"):
        pairs.weighted_rewards({})
    with pytest.raises(ValueError, match="finite"):
        pairs.weighted_rewards({"first": float("nan")})


def test_tweedie_step_rewards_equal_the_core_definition_name_by_name(problem):
    mixture, schedule, _ = problem
    denoise = mixture.denoiser(schedule)
    rewards = {"first": lambda x, c: x[:, 0], "sum": lambda x, c: x.sum(1)}
    several = tweedie_step_rewards(rewards, denoise, schedule)
    x = torch.randn(5, DIM, dtype=torch.float64)
    for t_prev in (schedule.timesteps[3], -1):
        got = several(x, t_prev, None)
        for name, r in rewards.items():
            torch.testing.assert_close(
                got[name], tweedie_step_reward(r, denoise, schedule)(x, t_prev, None)
            )
    with pytest.raises(ValueError, match="rewards is empty"):
        tweedie_step_rewards({}, denoise, schedule)


def test_collect_pairs_refuses_bad_input(problem):
    _, schedule, reference = problem
    kw = dict(shape=(DIM,), num_chains=2)
    with pytest.raises(TypeError, match="reference"):
        collect_pairs(reference.denoiser, schedule, _rewards, **kw)
    with pytest.raises(ValueError, match="num_chains"):
        collect_pairs(reference, schedule, _rewards, shape=(DIM,), num_chains=0)
    with pytest.raises(ValueError, match="pairs_per_state"):
        collect_pairs(reference, schedule, _rewards, pairs_per_state=-1, **kw)
    with pytest.raises(ValueError, match="steps"):
        collect_pairs(reference, schedule, _rewards, steps=[10], **kw)
    with pytest.raises(ValueError, match="cond"):
        collect_pairs(reference, schedule, _rewards, cond=torch.arange(3), **kw)


def test_training_steps_leave_out_the_last_ones(problem):
    _, schedule, _ = problem
    assert training_step_indices(schedule, 2) == tuple(range(8))
    with pytest.raises(ValueError, match="skip_last"):
        training_step_indices(schedule, 10)


def test_pair_set_checks_its_shapes(pairs):
    with pytest.raises(ValueError, match="action_b"):
        PairSet(**{**pairs.__dict__, "action_b": pairs.action_b[:-1]})
    with pytest.raises(ValueError, match="same"):
        PairSet(**{**pairs.__dict__, "rewards_b": {"first": pairs.rewards_b["first"]}})


def test_per_sample_step_gaussians_equal_step_gaussian_row_by_row(problem):
    _, schedule, _ = problem
    for spec in (StepSpec("epsilon", "fixed_small"), StepSpec("epsilon", "learned_log")):
        c = 2 if spec.learned_variance else 1
        x = torch.randn(7, DIM, dtype=torch.float64)
        out = torch.randn(7, c * DIM, dtype=torch.float64)
        t = torch.tensor([schedule.timesteps[i] for i in (0, 3, 3, 9, 0, 5, 9)])
        got = step_gaussians_per_sample(out, x, t, schedule, spec)
        for row in range(7):
            want = step_gaussian(out[row : row + 1], x[row : row + 1], int(t[row]), schedule, spec)
            torch.testing.assert_close(got.mean[row], want.mean[0])
            torch.testing.assert_close(got.variance[row], want.variance[0])


def test_train_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="kl_coef"):
        TrainConfig(kl_coef=0)
    with pytest.raises(ValueError, match="labels"):
        TrainConfig(labels="greedy")
    with pytest.raises(ValueError, match="num_steps"):
        TrainConfig(num_steps=0)
    with pytest.raises(ValueError, match="variance_lr"):
        TrainConfig(variance_lr=-1.0)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")


def test_train_dpo_refuses_bad_input(problem, pairs):
    mixture, schedule, _ = problem
    policy = TestbedPolicy(mixture, schedule)
    spec = StepSpec()
    r = pairs.weighted_rewards({"first": 1.0})
    with pytest.raises(TypeError, match="policy"):
        train_dpo(lambda x, t, c: x, pairs, r, schedule, spec)
    with pytest.raises(TypeError, match="pairs"):
        train_dpo(policy, "pairs", r, schedule, spec)
    with pytest.raises(ValueError, match="reward_a"):
        train_dpo(policy, pairs, (r[0][:-1], r[1]), schedule, spec)
    with pytest.raises(ValueError, match="finite"):
        train_dpo(policy, pairs, (r[0] * float("nan"), r[1]), schedule, spec)


def test_the_reference_has_no_kl_and_no_preference(problem, pairs):
    mixture, schedule, _ = problem
    m = evaluate_policy(
        TestbedPolicy(mixture, schedule),
        pairs,
        pairs.weighted_rewards({"first": 1.0}),
        schedule,
        StepSpec(),
        1.0,
    )
    assert m.kl == pytest.approx(0.0, abs=1e-12)
    assert set(m.kl_per_step) == {0, 4, 8}
    # z = 0 everywhere: the loss is the entropy of the soft labels, >= 0, < log 2
    assert 0 < m.loss < 0.6932


def test_training_raises_the_implicit_accuracy_and_moves_away_from_the_reference(problem, pairs):
    mixture, schedule, _ = problem
    policy = TestbedPolicy(mixture, schedule, learned_variance=True)
    spec = StepSpec("epsilon", "learned_log")
    rewards = pairs.weighted_rewards({"first": 1.0})
    before = evaluate_policy(policy, pairs, rewards, schedule, spec, 1.0)
    records = []
    result = train_dpo(
        policy,
        pairs,
        rewards,
        schedule,
        spec,
        TrainConfig(num_steps=60, batch_size=512, lr=0.05, log_every=20),
        variance_parameters=policy.variance_parameters(),
        callback=records.append,
    )
    after = evaluate_policy(policy, pairs, rewards, schedule, spec, 1.0)
    assert [r.step for r in result.history] == [20, 40, 60] and records == list(result.history)
    assert after.loss < before.loss
    assert before.accuracy < 0.6 < 0.75 < after.accuracy  # z = 0 at the start: a coin flip
    assert after.kl > 0.01


def test_the_variance_head_learns_at_its_own_rate(problem, pairs):
    """A quadratic reward asks for a narrower step; with variance_lr tiny, the variance stays put."""
    mixture, schedule, _ = problem
    spec = StepSpec("epsilon", "learned_log")
    rewards = pairs.weighted_rewards({"norm": 1.0})
    moved = {}
    for vlr in (1e-9, 0.05):
        policy = TestbedPolicy(mixture, schedule, learned_variance=True)
        train_dpo(
            policy,
            pairs,
            rewards,
            schedule,
            spec,
            TrainConfig(num_steps=40, batch_size=len(pairs), lr=0.05, variance_lr=vlr),
            variance_parameters=policy.variance_parameters(),
        )
        moved[vlr] = float(policy.log_variance.detach().abs().max())
    assert moved[1e-9] < 1e-6
    assert moved[0.05] > 0.1


class _DropoutDenoiser(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.drop = nn.Dropout(0.9)

    def forward(self, x, t, cond=None):
        return self.drop(self.inner(x, t, cond))


def test_the_policy_trains_in_eval_mode_and_keeps_its_mode(problem, pairs):
    mixture, schedule, _ = problem
    policy = _DropoutDenoiser(TestbedPolicy(mixture, schedule))
    policy.train()
    modes = []
    policy.register_forward_pre_hook(lambda m, args: modes.append(m.drop.training))
    train_dpo(
        policy,
        pairs,
        pairs.weighted_rewards({"first": 1.0}),
        schedule,
        StepSpec(),
        TrainConfig(num_steps=3),
    )
    assert modes == [False] * 3
    assert policy.training
