"""Bad inputs to the Python API of the core, the methods and the trainer (issue 10, items 3-4).

Every numeric argument of every public function and dataclass is one row of
:data:`NUMERIC`: a callable that makes the call with the value substituted, the name
the error message must carry, and the argument's kind and range. Every row is walked
through the classes of bad numbers (NaN, +-infinity, a bool, a numeric string, a float
for an int, an int beyond the float range, a huge int, a negative number) and the
exception type is asserted: ``TypeError`` for a wrong kind, ``ValueError`` (and not a
``TypeError``) for a wrong value; the message names the argument. A new argument is
one new row. :data:`STRUCTURAL` covers arguments of the wrong shape or kind that must
be refused where they are given (a policy that is not callable, a ``(mean, variance)``
pair where a step policy is expected, a reference that does not broadcast, timesteps
that are not a sequence of ints, ...), before any step runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given
from hypothesis import strategies as st

from msdda import (
    Expert,
    Gaussian,
    Schedule,
    SeededNoise,
    StepSpec,
    expert_policy,
    fuse_gaussians,
    fusion_coefficients,
    joint_policy,
    msdda_step,
    sample_chain,
    step_gaussian,
)
from msdda.alignment import (
    PairSet,
    TrainConfig,
    collect_pairs,
    dpo_logits,
    evaluate_policy,
    train_dpo,
    training_step_indices,
    tweedie_step_rewards,
)
from msdda.alignment.testbed import LinearReward, TestbedPolicy, validate_on_testbed
from msdda.methods import (
    KLMeter,
    MethodContext,
    MethodSettings,
    NoiseTape,
    SampleGenerators,
    Search,
    base_policy,
    best_of_n_kl,
    build_policy,
    code_policy,
    db_ls_policy,
    derive_seed,
    metered,
    parameter_soup,
    rgg_policy,
    run_method,
)
from msdda.rewards import tweedie_step_reward, tweedie_x0
from msdda.testbed import (
    CheckCase,
    GaussianMixture,
    QuadraticReward,
    run_check,
    tilted_step,
    weighted_optimum_step,
)
from msdda.testbed import (
    testbed_schedule as make_testbed_schedule,
)
from msdda.validation import MAX_SEED

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------- a tiny world

DIM = 3
W = (0.4, 0.6)


def _eps(x, t, cond=None):
    return 0.1 * x


@cache
def schedule() -> Schedule:
    return Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000), 5)  # 800..0


@cache
def ctx() -> MethodContext:
    experts = (Expert(_eps, name="a"), Expert(_eps, name="b"))
    rewards = (lambda im, c: -(im**2).sum(-1), lambda im, c: im.sum(-1))
    return MethodContext(schedule(), Expert(_eps, name="ref"), experts, (DIM,), rewards=rewards)


def policy(x, t):
    return Gaussian(0.9 * x, torch.full_like(x, 0.1))


def policies(k: int = 2) -> list:
    return [policy] * k


def joint(x, t, members):
    return [policy(x, t) for _ in members]


def steps2() -> tuple[list, list]:
    means = [torch.zeros(2, DIM), torch.ones(2, DIM)]
    return means, [torch.full((2, DIM), 0.5), torch.full((2, DIM), 0.25)]


def tape() -> NoiseTape:
    return NoiseTape.seeded([0, 1])


def search(candidates: int = 2) -> Search:
    return Search(tape(), SampleGenerators([0, 1], "code"), candidates)


@cache
def mixture() -> GaussianMixture:
    return GaussianMixture.random(dim=2, seed=0)


@cache
def pairs() -> PairSet:
    g = torch.Generator().manual_seed(0)
    n, t0 = 4, schedule().timesteps[0]

    def draw():
        return torch.randn(n, 2, generator=g, dtype=torch.float64)

    return PairSet(
        states=draw(),
        timesteps=torch.full((n,), t0, dtype=torch.long),
        step_indices=torch.zeros(n, dtype=torch.long),
        cond=None,
        action_a=draw(),
        action_b=draw(),
        reference_mean=draw(),
        reference_variance=torch.ones(n, 2, dtype=torch.float64),
        rewards_a={"r": torch.randn(n, generator=g)},
        rewards_b={"r": torch.randn(n, generator=g)},
    )


def rewards_of(p: PairSet):
    return p.weighted_rewards({"r": 1.0})


def step_rewards(x, t, c):
    return {"r": x.sum(-1)}


def collect(**kw):
    args = dict(shape=(2,), num_chains=2, steps=[0, 1])
    args.update(kw)
    return collect_pairs(Expert(_eps, name="ref"), schedule(), step_rewards, **args)


def quadratic() -> QuadraticReward:
    return QuadraticReward(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))


def ref_step() -> Gaussian:
    return Gaussian(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))


# ------------------------------------------------------------------- the numeric table


@dataclass(frozen=True)
class Row:
    """One numeric argument: ``call(value)`` makes the call with ``value`` substituted."""

    id: str
    call: Callable[[Any], Any]
    name: str  # what the message must name (the argument)
    kind: str = "real"  # "real", "int", "seed" or "part" (of derive_seed)
    negative: bool = False  # a negative value is allowed
    huge: bool | None = True  # 2**70: allowed (True), refused (False), not tried (None)
    good: Any = None  # a value the call must accept (None: not tried; the call is costly)


def _cfg(name):
    return lambda v: TrainConfig(**{name: v})


def _settings(name):
    return lambda v: MethodSettings(**{name: v})


def _vot(name):
    return lambda v: validate_on_testbed(**{name: v})


def _run_check(name):
    return lambda v: run_check(**{name: v})


# fmt: off
NUMERIC: list[Row] = [
    # fusion
    Row("fuse_gaussians.weights", lambda v: fuse_gaussians(*steps2(), [0.5, v]), "weights[1]",
        huge=None, good=0.5),
    Row("fusion_coefficients.weights", lambda v: fusion_coefficients([v, 0.5]), "weights[0]",
        good=0.5),
    Row("fuse_gaussians.kl_coef", lambda v: fuse_gaussians(*steps2(), list(W), kl_coef=v),
        "kl_coef", huge=None, good=1.0),
    Row("fusion_coefficients.kl_coef", lambda v: fusion_coefficients(W, kl_coef=v), "kl_coef",
        good=2.0),
    Row("fuse_gaussians.kl_coefs",
        lambda v: fuse_gaussians(*steps2(), list(W), kl_coefs=[1.0, v], kl_coef=1.0),
        "kl_coefs[1]", huge=None, good=1.0),
    Row("fusion_coefficients.kl_coefs", lambda v: fusion_coefficients(W, [v, 1.0], 1.0),
        "kl_coefs[0]", good=0.5),
    Row("fusion_coefficients.num_experts", lambda v: fusion_coefficients(W, num_experts=v),
        "num_experts", kind="int", huge=None, good=2),
    # experts
    Row("msdda_step.weights", lambda v: msdda_step(policies(), [v, 0.5]), "weights[0]",
        huge=None, good=0.5),
    Row("msdda_step.kl_coef",
        lambda v: msdda_step(policies(), list(W), kl_coef=v, reference=policy), "kl_coef",
        good=0.5),
    Row("msdda_step.kl_coefs",
        lambda v: msdda_step(policies(), list(W), kl_coefs=[v, 1.0], kl_coef=1.0,
                             reference=policy),
        "kl_coefs[0]", good=2.0),
    Row("msdda_step.num_experts", lambda v: msdda_step(joint, list(W), num_experts=v),
        "num_experts", kind="int", huge=None, good=2),
    Row("Expert.kl_coef", lambda v: Expert(_eps, kl_coef=v, name="x"), "kl_coef", good=0.5),
    # gaussians
    Row("StepSpec.eta", lambda v: StepSpec(eta=v), "eta", good=0.5),
    Row("Schedule.from_scheduler.num_inference_steps",
        lambda v: Schedule.from_scheduler(DDIMScheduler(), v), "num_inference_steps",
        kind="int", huge=False, good=10),
    Row("testbed_schedule.num_inference_steps", make_testbed_schedule, "num_inference_steps",
        kind="int", huge=False, good=10),
    Row("step_gaussian.t",
        lambda v: step_gaussian(torch.zeros(2, DIM), torch.zeros(2, DIM), v, schedule(),
                                StepSpec()),
        "t", kind="int", huge=False, good=800),
    Row("Schedule.alpha_bars.t", lambda v: schedule().alpha_bars(v), "t", kind="int",
        huge=False, good=600),
    Row("tweedie_x0.t", lambda v: tweedie_x0(_eps, torch.zeros(2, DIM), v, None, schedule()),
        "t", kind="int", negative=True, huge=False, good=200),
    # sampling: seeds and step indices
    Row("SeededNoise.seeds", SeededNoise, "seeds", kind="seed", good=MAX_SEED),
    Row("SeededNoise.seeds[i]", lambda v: SeededNoise([0, v]), "seeds[1]", kind="seed",
        good=MAX_SEED),
    Row("NoiseTape.seeded", NoiseTape.seeded, "seeds", kind="seed", good=7),
    Row("SampleGenerators.seeds", lambda v: SampleGenerators(v, "rs"), "seeds", kind="seed",
        good=MAX_SEED),
    Row("SampleGenerators.seeds[i]", lambda v: SampleGenerators([v, 1], "rs"), "seeds[0]",
        kind="seed", good=3),
    Row("SampleGenerators.randn.n",
        lambda v: SampleGenerators([0, 1], "s").randn(v, torch.zeros(2, DIM)), "n", kind="int",
        huge=None, good=3),
    Row("SampleGenerators.uniform.batch", lambda v: SampleGenerators([0, 1], "s").uniform(v),
        "batch", kind="int", huge=False, good=2),
    Row("derive_seed.parts", lambda v: derive_seed("x", v), "parts[1]", kind="part", good=-5),
    Row("NoiseTape.step_index", lambda v: tape()(v, torch.zeros(2, DIM)), "step_index",
        kind="int", huge=None, good=3),
    Row("sample_chain.first_index",
        lambda v: sample_chain(policy, torch.zeros(2, DIM), [800, 600], SeededNoise(0),
                               first_index=v),
        "first_index", kind="int", huge=None, good=3),
    Row("sample_chain.timesteps",
        lambda v: sample_chain(policy, torch.zeros(2, DIM), [800, v], SeededNoise(0)),
        "timesteps[1]", kind="int", negative=True, good=600),
    # methods
    Row("MethodSettings.rgg_scale", _settings("rgg_scale"), "rgg_scale", good=0.0),
    Row("MethodSettings.code_candidates", _settings("code_candidates"), "code_candidates",
        kind="int", huge=False, good=8),
    Row("MethodSettings.code_block", _settings("code_block"), "code_block", kind="int", good=2),
    Row("MethodSettings.target_candidates", _settings("target_candidates"),
        "target_candidates", kind="int", huge=False, good=3),
    Row("MethodContext.kl_coef",
        lambda v: MethodContext(schedule(), ctx().reference, ctx().experts, (DIM,), kl_coef=v),
        "kl_coef", good=0.7),
    Row("MethodContext.sample_shape",
        lambda v: MethodContext(schedule(), ctx().reference, ctx().experts, (v, 2)),
        "sample_shape[0]", kind="int", huge=None, good=4),
    Row("rgg_policy.scale", lambda v: rgg_policy(ctx(), W, scale=v), "scale", good=2.0),
    Row("rgg_policy.weights", lambda v: rgg_policy(ctx(), (v, 0.5), scale=1.0), "weights[0]",
        negative=True, good=0.5),
    Row("Search.candidates", search, "candidates", kind="int", huge=False, good=3),
    Row("code_policy.block", lambda v: code_policy(ctx(), W, search=search(), block=v), "block",
        kind="int", good=2),
    Row("build_policy.seeds",
        lambda v: build_policy("db-ls", ctx(), W, None, seeds=v, noise=tape()), "seeds",
        kind="seed", good=5),
    Row("build_policy.weights",
        lambda v: build_policy("msdda", ctx(), (v, 0.5), None, seeds=[0, 1], noise=tape()),
        "weights[0]", huge=None, good=0.5),
    Row("run_method.seeds", lambda v: run_method("base", ctx(), None, None, [v, 1]), "seeds[0]",
        kind="seed", good=MAX_SEED),
    Row("parameter_soup.weights",
        lambda v: parameter_soup([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], [0.5, v]),
        "weights[1]", negative=True, good=-0.5),
    Row("KLMeter.batch", KLMeter, "batch", kind="int", huge=None, good=4),
    Row("best_of_n_kl.n", best_of_n_kl, "n", kind="int", good=4),
    # trainer
    Row("TrainConfig.kl_coef", _cfg("kl_coef"), "kl_coef", good=0.5),
    Row("TrainConfig.lr", _cfg("lr"), "lr", good=1e-2),
    Row("TrainConfig.variance_lr", _cfg("variance_lr"), "variance_lr", good=1e-2),
    Row("TrainConfig.max_grad_norm", _cfg("max_grad_norm"), "max_grad_norm", good=2.0),
    Row("TrainConfig.weight_decay", _cfg("weight_decay"), "weight_decay", good=0.0),
    Row("TrainConfig.num_steps", _cfg("num_steps"), "num_steps", kind="int", good=5),
    Row("TrainConfig.batch_size", _cfg("batch_size"), "batch_size", kind="int", good=5),
    Row("TrainConfig.log_every", _cfg("log_every"), "log_every", kind="int", good=5),
    Row("TrainConfig.seed", _cfg("seed"), "seed", kind="seed", good=MAX_SEED),
    Row("evaluate_policy.kl_coef",
        lambda v: evaluate_policy(TestbedPolicy(mixture(), schedule()), pairs(),
                                  rewards_of(pairs()), schedule(), StepSpec(), v),
        "kl_coef", good=0.5),
    Row("evaluate_policy.batch_size",
        lambda v: evaluate_policy(TestbedPolicy(mixture(), schedule()), pairs(),
                                  rewards_of(pairs()), schedule(), StepSpec(), 1.0,
                                  batch_size=v),
        "batch_size", kind="int", good=3),
    Row("PairSet.weighted_rewards.weights", lambda v: pairs().weighted_rewards({"r": v}),
        "weights['r']", negative=True, good=-2.0),
    Row("collect_pairs.num_chains", lambda v: collect(num_chains=v), "num_chains", kind="int",
        huge=None, good=3),
    Row("collect_pairs.pairs_per_state", lambda v: collect(pairs_per_state=v),
        "pairs_per_state", kind="int", huge=None, good=2),
    Row("collect_pairs.batch_size", lambda v: collect(batch_size=v), "batch_size", kind="int",
        good=1),
    Row("collect_pairs.seed", lambda v: collect(seed=v), "seed", kind="seed", good=MAX_SEED),
    Row("collect_pairs.shape", lambda v: collect(shape=(v,)), "shape[0]", kind="int",
        huge=None, good=2),
    Row("collect_pairs.steps", lambda v: collect(steps=[0, v]), "steps", kind="int",
        huge=False, good=3),
    Row("training_step_indices.skip_last", lambda v: training_step_indices(schedule(), v),
        "skip_last", kind="int", huge=False, good=2),
    Row("dpo_logits.kl_coef", lambda v: dpo_logits(torch.ones(3), v), "kl_coef", good=0.5),
    Row("LinearReward.tilt.kl_coef",
        lambda v: LinearReward(torch.ones(2, dtype=torch.float64)).tilt(ref_step(), v),
        "kl_coef", good=2.0),
    Row("TestbedPolicy.log_variance_bound",
        lambda v: TestbedPolicy(mixture(), schedule(), log_variance_bound=v),
        "log_variance_bound", good=2.0),
    Row("validate_on_testbed.kl_coef", _vot("kl_coef"), "kl_coef"),
    Row("validate_on_testbed.lr", _vot("lr"), "lr"),
    Row("validate_on_testbed.dim", _vot("dim"), "dim", kind="int", huge=None),
    Row("validate_on_testbed.num_chains", _vot("num_chains"), "num_chains", kind="int",
        huge=None),
    Row("validate_on_testbed.pairs_per_state", _vot("pairs_per_state"), "pairs_per_state",
        kind="int", huge=None),
    Row("validate_on_testbed.num_inference_steps", _vot("num_inference_steps"),
        "num_inference_steps", kind="int", huge=None),
    Row("validate_on_testbed.skip_last", _vot("skip_last"), "skip_last", kind="int", huge=None),
    Row("validate_on_testbed.num_steps", _vot("num_steps"), "num_steps", kind="int", huge=None),
    Row("validate_on_testbed.seed", _vot("seed"), "seed", kind="seed"),
    # the exactness testbed
    Row("GaussianMixture.random.dim", lambda v: GaussianMixture.random(dim=v), "dim",
        kind="int", huge=None, good=2),
    Row("GaussianMixture.random.components", lambda v: GaussianMixture.random(components=v),
        "components", kind="int", huge=None, good=2),
    Row("GaussianMixture.random.seed", lambda v: GaussianMixture.random(seed=v), "seed",
        kind="seed", good=MAX_SEED),
    Row("GaussianMixture.sample.n", lambda v: mixture().sample(v), "n", kind="int", huge=None,
        good=3),
    Row("GaussianMixture.epsilon.abar_t",
        lambda v: mixture().epsilon(torch.zeros(2, 2), v), "abar_t", huge=False, good=0.5),
    Row("weighted_optimum_step.kl_coef",
        lambda v: weighted_optimum_step(ref_step(), [quadratic()], [1.0], v), "kl_coef",
        good=0.5),
    Row("weighted_optimum_step.weights",
        lambda v: weighted_optimum_step(ref_step(), [quadratic()], [v], 1.0), "weights[0]",
        negative=True, good=0.5),
    Row("tilted_step.coefs", lambda v: tilted_step(ref_step(), [quadratic()], [v]), "coefs[0]",
        negative=True, good=0.5),
    Row("CheckCase.kl_coef", lambda v: CheckCase("c", (0.5, 0.5), (1.0, 1.0), v), "kl_coef",
        good=0.5),
    Row("CheckCase.weights", lambda v: CheckCase("c", (v, 0.5), (1.0, 1.0), 1.0), "weights[0]",
        good=0.5),
    Row("CheckCase.kl_coefs", lambda v: CheckCase("c", (0.5, 0.5), (1.0, v), 1.0),
        "kl_coefs[1]", good=2.0),
    Row("run_check.dim", _run_check("dim"), "dim", kind="int", huge=None),
    Row("run_check.num_samples", _run_check("num_samples"), "num_samples", kind="int",
        huge=None),
    Row("run_check.num_inference_steps", _run_check("num_inference_steps"),
        "num_inference_steps", kind="int", huge=False),
    Row("run_check.seed", _run_check("seed"), "seed", kind="seed"),
]
# fmt: on

# (label, value, expected exception) per kind; "neg" and "huge" depend on the row.
_REAL = [
    ("nan", math.nan, ValueError),
    ("inf", math.inf, ValueError),
    ("-inf", -math.inf, ValueError),
    ("True", True, TypeError),
    ("np.bool_", np.bool_(True), TypeError),
    ("str", "1", TypeError),
    ("beyond-float", 10**400, ValueError),
]
_INT = [
    ("nan", math.nan, TypeError),
    ("inf", math.inf, TypeError),
    ("float", 1.5, TypeError),
    ("True", True, TypeError),
    ("str", "1", TypeError),
]
_SEED = [*_INT, ("2**63", MAX_SEED + 1, ValueError), ("beyond-float", 10**400, ValueError)]
_PART = [
    ("nan", math.nan, TypeError),
    ("float", 1.5, TypeError),
    ("True", True, TypeError),
    ("bytes", b"1", TypeError),
]


def _cases():
    for row in NUMERIC:
        base = {"real": _REAL, "int": _INT, "seed": _SEED, "part": _PART}[row.kind]
        values = list(base)
        if row.kind != "part" and not row.negative:
            values.append(("negative", -1.0 if row.kind == "real" else -1, ValueError))
        if row.kind == "seed" or row.huge is False:
            values.append(("2**70", 2**70, ValueError))
        for label, value, error in values:
            yield pytest.param(row, value, error, id=f"{row.id}-{label}")


def _named(name: str) -> str:
    """A regex for the argument's name, not as part of a longer identifier."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


@pytest.mark.parametrize(("row", "value", "error"), list(_cases()))
def test_a_bad_number_is_refused_naming_the_argument(row: Row, value, error):
    with pytest.raises(error, match=_named(row.name)) as info:
        row.call(value)
    if error is ValueError:  # a wrong value of the right kind is not a TypeError
        assert not isinstance(info.value, TypeError), info.value


@pytest.mark.parametrize(
    "row", [r for r in NUMERIC if r.good is not None], ids=lambda r: f"{r.id}-good"
)
def test_a_good_number_is_accepted(row: Row):
    """The rows' calls are right apart from the value: a good value goes through."""
    row.call(row.good)


def test_the_table_covers_enough_cases():
    assert len(NUMERIC) >= 80
    assert len(list(_cases())) >= 500


# ---------------------------------------------------------------- hypothesis properties

non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
not_numbers = st.one_of(st.booleans(), st.text(max_size=5), st.binary(max_size=3), st.none())


@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_eta_is_accepted_exactly_when_finite_and_non_negative(x):
    if math.isfinite(x) and x >= 0:
        assert StepSpec(eta=x).eta == x
    else:
        with pytest.raises(ValueError, match=_named("eta")):
            StepSpec(eta=x)


@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_a_kl_coef_is_refused_unless_finite_and_positive(x):
    if math.isfinite(x) and x > 0:
        Expert(_eps, kl_coef=x)
        TrainConfig(kl_coef=x)
    else:
        for call in (
            lambda: Expert(_eps, kl_coef=x),
            lambda: TrainConfig(kl_coef=x),
            lambda: fusion_coefficients(W, kl_coef=x),
            lambda: dpo_logits(torch.ones(2), x),
        ):
            with pytest.raises(ValueError, match=_named("kl_coef")):
                call()


@given(x=not_numbers)
def test_what_is_not_a_number_is_a_type_error(x):
    for name, call, none_is_default in (
        ("eta", lambda: StepSpec(eta=x), False),
        ("kl_coef", lambda: Expert(_eps, kl_coef=x), False),
        ("kl_coef", lambda: fusion_coefficients(W, kl_coef=x), True),
        ("rgg_scale", lambda: MethodSettings(rgg_scale=x), False),
        ("lr", lambda: TrainConfig(lr=x), False),
        ("scale", lambda: rgg_policy(ctx(), W, scale=x), False),
    ):
        if x is None and none_is_default:
            continue
        with pytest.raises(TypeError, match=_named(name)):
            call()


@given(seed=st.integers(min_value=-(2**70), max_value=2**70))
def test_every_seed_argument_has_the_one_range(seed):
    calls = (
        lambda: SeededNoise(seed),
        lambda: SeededNoise([seed]),
        lambda: SampleGenerators(seed, "x"),
        lambda: TrainConfig(seed=seed),
        lambda: GaussianMixture.random(dim=1, components=1, seed=seed),
    )
    for call in calls:
        if 0 <= seed <= MAX_SEED:
            call()
        else:
            with pytest.raises(ValueError, match="seed"):
                call()


@given(n=st.integers(min_value=-5, max_value=2**70))
def test_num_inference_steps_is_in_one_to_the_training_steps(n):
    if 1 <= n <= 1000:
        assert len(Schedule.from_scheduler(DDPMScheduler(), n).timesteps) == n
    else:
        with pytest.raises(ValueError, match="num_inference_steps"):
            Schedule.from_scheduler(DDPMScheduler(), n)


@given(w=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=2, max_size=2))
def test_fusion_weights_are_finite_and_non_negative(w):
    if all(math.isfinite(x) and x >= 0 for x in w):
        try:
            fusion_coefficients(w)
        except ValueError as err:  # exponents beyond the float range: named too
            assert "weights" in str(err)
    else:
        with pytest.raises(ValueError, match=r"weights\[[01]\]"):
            fusion_coefficients(w)


# ------------------------------------------------------------------ structural cases


def _never(*args):
    raise AssertionError("called: the argument should have been refused before any step")


PAIR = (torch.zeros(2, DIM), torch.ones(2, DIM))


def _chain(**kw):
    args = dict(step=policy, x_T=torch.zeros(2, DIM), timesteps=[800, 600], noise=SeededNoise(0))
    args.update(kw)
    return sample_chain(args.pop("step"), args.pop("x_T"), args.pop("timesteps"),
                        args.pop("noise"), **args)  # fmt: skip


def _step(t=800, **kw):
    args = dict(model_output=torch.zeros(2, DIM), x_t=torch.zeros(2, DIM), schedule=schedule(),
                spec=StepSpec())  # fmt: skip
    args.update(kw)
    return step_gaussian(args["model_output"], args["x_t"], t, args["schedule"], args["spec"])


def _context(**kw):
    args = dict(schedule=schedule(), reference=ctx().reference, experts=ctx().experts,
                sample_shape=(DIM,))  # fmt: skip
    args.update(kw)
    return MethodContext(**args)


def _not_broadcasting_reference():
    means, variances = steps2()
    ref = (torch.zeros(5, 7), torch.ones(5, 7))
    return fuse_gaussians(means, variances, [0.25, 0.25], reference=ref)


def _train(**kw):
    args = dict(policy=TestbedPolicy(mixture(), schedule()), pairs=pairs(),
                rewards=rewards_of(pairs()), schedule=schedule(), spec=StepSpec())  # fmt: skip
    config = kw.pop("config", TrainConfig(num_steps=1))
    args.update(kw)
    return train_dpo(args.pop("policy"), args.pop("pairs"), args.pop("rewards"),
                     args.pop("schedule"), args.pop("spec"), config)  # fmt: skip


# fmt: off
STRUCTURAL: list[tuple[str, Callable[[], Any], type, str]] = [
    # msdda_step and the expert policies: refused at construction, no step taken
    ("msdda_step experts not callable", lambda: msdda_step([policy, "unet"], list(W)),
     TypeError, r"experts\[1\]"),
    ("msdda_step experts a (mean, variance) pair", lambda: msdda_step(PAIR, list(W)),
     TypeError, r"experts\[0\] must be a step policy"),
    ("msdda_step experts a Gaussian", lambda: msdda_step(Gaussian(*PAIR), list(W)), TypeError,
     r"experts must be K step policies"),
    ("msdda_step experts a number", lambda: msdda_step(3, list(W)), TypeError, r"experts"),
    ("msdda_step reference a (mean, variance) pair",
     lambda: msdda_step([_never, _never], [0.25, 0.25], reference=PAIR), TypeError,
     r"reference must be a step policy .*\(mean, variance\) pair"),
    ("msdda_step reference a Gaussian",
     lambda: msdda_step([_never, _never], [0.25, 0.25], reference=Gaussian(*PAIR)), TypeError,
     r"reference must be a step policy"),
    ("msdda_step reference not callable",
     lambda: msdda_step([_never, _never], list(W), reference=42), TypeError, r"reference"),
    ("msdda_step num_experts disagrees with experts",
     lambda: msdda_step([_never, _never], list(W), num_experts=3), ValueError, r"num_experts"),
    ("joint_policy joint not callable",
     lambda: joint_policy("unet", ctx().experts, None, schedule()), TypeError, r"joint"),
    ("joint_policy experts not Experts",
     lambda: joint_policy(joint, [_eps], None, schedule()), TypeError, r"experts\[0\]"),
    ("joint_policy reference not an Expert",
     lambda: joint_policy(joint, ctx().experts, _eps, schedule()), TypeError, r"reference"),
    ("joint_policy schedule not a Schedule",
     lambda: joint_policy(joint, ctx().experts, None, "ddpm"), TypeError, r"schedule"),
    ("expert_policy expert not an Expert", lambda: expert_policy(_eps, schedule()), TypeError,
     r"expert"),
    ("expert_policy schedule not a Schedule",
     lambda: expert_policy(ctx().reference, DDPMScheduler()), TypeError, r"schedule"),
    ("Expert denoiser not callable", lambda: Expert("unet", name="x"), TypeError, r"denoiser"),
    # fuse_gaussians: the reference named as the reference
    ("fuse_gaussians reference does not broadcast", _not_broadcasting_reference, ValueError,
     r"reference \(mean \(5, 7\), variance \(5, 7\)\) does not broadcast"),
    ("fuse_gaussians reference a single tensor",
     lambda: fuse_gaussians(*steps2(), [0.25, 0.25], reference=torch.ones(2, DIM)), TypeError,
     r"reference must be a \(mean, variance\) pair"),
    ("fuse_gaussians reference variance not a tensor",
     lambda: fuse_gaussians(*steps2(), [0.25, 0.25], reference=(PAIR[0], [1.0])), TypeError,
     r"reference\[1\]"),
    ("fuse_gaussians reference variance an int tensor",
     lambda: fuse_gaussians(*steps2(), [0.25, 0.25],
                            reference=(PAIR[0], torch.ones(2, DIM, dtype=torch.long))),
     TypeError, r"reference\[1\] must be a floating-point tensor"),
    ("fuse_gaussians weights a string", lambda: fuse_gaussians(*steps2(), "0.5,0.5"),
     TypeError, r"weights"),
    ("fuse_gaussians weights a bool tensor",
     lambda: fuse_gaussians(*steps2(), torch.tensor([True, False])), TypeError, r"weights"),
    ("fusion_coefficients weights beyond the exponent range",
     lambda: fusion_coefficients([1e300, 1e300], [1.0, 1.0], kl_coef=1e-300), ValueError,
     r"weights, kl_coefs and kl_coef give non-finite exponents"),
    # sample_chain: step, x_T, timesteps, noise, callback, ends_chain
    ("sample_chain step not callable", lambda: _chain(step="policy"), TypeError, r"step"),
    ("sample_chain step a (mean, variance) pair", lambda: _chain(step=PAIR), TypeError,
     r"step must be a step policy"),
    ("sample_chain step returns a pair", lambda: _chain(step=lambda x, t: (x, x)), TypeError,
     r"step must return a msdda.Gaussian"),
    ("sample_chain x_T a list", lambda: _chain(x_T=[[0.0, 1.0]]), TypeError, r"x_T"),
    ("sample_chain x_T an int tensor", lambda: _chain(x_T=torch.zeros(2, DIM, dtype=torch.long)),
     TypeError, r"x_T"),
    ("sample_chain timesteps an int", lambda: _chain(timesteps=800), TypeError, r"timesteps"),
    ("sample_chain timesteps a string", lambda: _chain(timesteps="800"), TypeError,
     r"timesteps"),
    ("sample_chain timesteps a float tensor",
     lambda: _chain(timesteps=torch.tensor([800.0, 600.0])), TypeError,
     r"timesteps must be a sequence of ints"),
    ("sample_chain timesteps a 2-D tensor", lambda: _chain(timesteps=torch.ones(2, 2).long()),
     ValueError, r"timesteps must be 1-D"),
    ("sample_chain timesteps holding a float", lambda: _chain(timesteps=[800, 600.5]),
     TypeError, r"timesteps\[1\]"),
    ("sample_chain timesteps a dict", lambda: _chain(timesteps={800: 1}), TypeError,
     r"timesteps"),
    ("sample_chain noise not callable", lambda: _chain(noise=[0.0]), TypeError, r"noise"),
    ("sample_chain callback not callable", lambda: _chain(callback="print"), TypeError,
     r"callback"),
    ("sample_chain ends_chain not a bool", lambda: _chain(ends_chain="yes"), TypeError,
     r"ends_chain"),
    # step_gaussian and the schedule: t named
    ("step_gaussian t not in the schedule", lambda: _step(450), ValueError,
     r"timestep 450 is not in this schedule: t must be one of its timesteps \(800, 600, 400"),
    ("step_gaussian t a float", lambda: _step(800.0), TypeError, r"t must be an integer"),
    ("step_gaussian t a string", lambda: _step("800"), TypeError, r"t must be an integer"),
    ("step_gaussian t a float tensor", lambda: _step(torch.tensor(800.0)), TypeError,
     r"t must be an integer"),
    ("step_gaussian t a bool tensor", lambda: _step(torch.tensor(True)), TypeError,
     r"t must be an integer"),
    ("step_gaussian schedule a scheduler", lambda: _step(schedule=DDPMScheduler()), TypeError,
     r"schedule must be a msdda.Schedule"),
    ("step_gaussian spec a string", lambda: _step(spec="epsilon"), TypeError,
     r"spec must be a msdda.StepSpec"),
    ("step_gaussian x_t a list", lambda: _step(x_t=[[0.0] * DIM] * 2), TypeError, r"x_t"),
    ("step_gaussian model_output an int tensor",
     lambda: _step(model_output=torch.zeros(2, DIM, dtype=torch.long)), TypeError,
     r"model_output"),
    ("Schedule.alpha_bars t not in the schedule", lambda: schedule().alpha_bars(999), ValueError,
     r"t must be one of its timesteps"),
    ("Schedule.from_scheduler num_inference_steps above the training steps",
     lambda: Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=100), 101), ValueError,
     r"num_inference_steps must be a positive int <= .*\(100\)"),
    # noise objects
    ("NoiseTape noise not callable", lambda: NoiseTape([0.0]), TypeError, r"noise"),
    ("SeededNoise seeds a float tensor", lambda: SeededNoise(torch.tensor([1.0, 2.0])),
     TypeError, r"seeds"),
    ("SampleGenerators stream not a str", lambda: SampleGenerators(0, 3), TypeError, r"stream"),
    ("derive_seed with no parts", lambda: derive_seed(), ValueError, r"part"),
    # methods
    ("MethodContext sample_shape a float", lambda: _context(sample_shape=(8.5,)), TypeError,
     r"sample_shape\[0\]"),
    ("MethodContext sample_shape a string", lambda: _context(sample_shape="8"), TypeError,
     r"sample_shape"),
    ("MethodContext dtype an int dtype", lambda: _context(dtype=torch.long), TypeError,
     r"dtype"),
    ("MethodContext decode not callable", lambda: _context(decode="vae"), TypeError, r"decode"),
    ("MethodContext joint not callable", lambda: _context(joint="unet"), TypeError, r"joint"),
    ("build_policy ctx not a context",
     lambda: build_policy("base", "ctx", None, None, seeds=0, noise=tape()), TypeError, r"ctx"),
    ("build_policy noise not callable",
     lambda: build_policy("base", ctx(), None, None, seeds=0, noise="tape"), TypeError,
     r"noise"),
    ("build_policy settings a dict",
     lambda: build_policy("rgg", ctx(), W, None, seeds=0, noise=tape(),
                          settings={"rgg_scale": 1.0}),
     TypeError, r"settings"),
    ("build_policy kl not a KLMeter",
     lambda: build_policy("code", ctx(), W, None, seeds=0, noise=tape(), kl=[]), TypeError,
     r"kl"),
    ("base_policy ctx not a context", lambda: base_policy("ctx"), TypeError, r"ctx"),
    ("rgg_policy schedule unknown", lambda: rgg_policy(ctx(), W, scale=1.0, schedule="cubic"),
     ValueError, r"guidance schedule \(schedule\)"),
    ("MethodSettings rgg_schedule a number", lambda: MethodSettings(rgg_schedule=3), TypeError,
     r"rgg_schedule"),
    ("rgg_policy guidance schedule returning NaN",
     lambda: rgg_policy(ctx(), W, scale=1.0, schedule=lambda i, n: math.nan)(
         torch.zeros(2, DIM), 800),
     ValueError, r"guidance schedule at step 0"),
    ("Search noise not callable",
     lambda: Search("tape", SampleGenerators(0, "code"), 2), TypeError, r"noise"),
    ("Search rng not SampleGenerators", lambda: Search(tape(), torch.Generator(), 2), TypeError,
     r"rng"),
    ("code_policy search not a Search", lambda: code_policy(ctx(), W, search=4, block=2),
     TypeError, r"search"),
    ("db_ls_policy rng not SampleGenerators",
     lambda: db_ls_policy(ctx(), W, rng=torch.Generator()), TypeError, r"rng"),
    ("run_method seeds an int", lambda: run_method("base", ctx(), None, None, 3), TypeError,
     r"seeds"),
    ("run_method seeds a string", lambda: run_method("base", ctx(), None, None, "12"),
     TypeError, r"seeds"),
    ("run_method seeds empty", lambda: run_method("base", ctx(), None, None, []), TypeError,
     r"seeds"),
    ("run_method callback not callable",
     lambda: run_method("base", ctx(), None, None, [0], callback=1), TypeError, r"callback"),
    ("metered policy not callable",
     lambda: metered("rs", policy, schedule(), KLMeter(2)), TypeError, r"policy"),
    ("metered meter not a KLMeter", lambda: metered(policy, policy, schedule(), None),
     TypeError, r"meter"),
    ("parameter_soup weights a string",
     lambda: parameter_soup([torch.nn.Linear(2, 2)], "1"), TypeError, r"weights"),
    # rewards and the trainer
    ("tweedie_step_reward reward not callable",
     lambda: tweedie_step_reward("clip", _eps, schedule()), TypeError, r"reward"),
    ("tweedie_step_reward denoiser not callable",
     lambda: tweedie_step_reward(lambda im, c: im.sum(-1), None, schedule()), TypeError,
     r"denoiser"),
    ("tweedie_step_reward prediction_type unknown",
     lambda: tweedie_step_reward(lambda im, c: im, _eps, schedule(), prediction_type="score"),
     ValueError, r"prediction_type"),
    ("tweedie_step_rewards a list", lambda: tweedie_step_rewards([_eps], _eps, schedule()),
     TypeError, r"rewards"),
    ("tweedie_step_rewards a reward not callable",
     lambda: tweedie_step_rewards({"a": 3}, _eps, schedule()), TypeError, r"rewards\['a'\]"),
    ("tweedie_x0 t a float", lambda: tweedie_x0(_eps, torch.zeros(1, 2), 800.0, None, schedule()),
     TypeError, r"t must be an integer"),
    ("train_dpo config a dict", lambda: _train(config={"lr": 1.0}), TypeError, r"config"),
    ("train_dpo schedule a scheduler", lambda: _train(schedule=DDPMScheduler()), TypeError,
     r"schedule"),
    ("train_dpo spec a string", lambda: _train(spec="epsilon"), TypeError, r"spec"),
    ("collect_pairs steps an int", lambda: collect(steps=3), TypeError, r"steps"),
    ("collect_pairs shape a string", lambda: collect(shape="2"), TypeError, r"shape"),
    ("collect_pairs dtype an int dtype", lambda: collect(dtype=torch.long), TypeError, r"dtype"),
    ("collect_pairs step_rewards not callable", lambda: collect_pairs(
        Expert(_eps), schedule(), {"r": 1}, shape=(2,), num_chains=1), TypeError,
     r"step_rewards"),
    ("weighted_rewards a list of pairs",
     lambda: pairs().weighted_rewards([("r", 1.0)]), TypeError, r"weights"),
    ("TestbedPolicy a DDIM schedule",
     lambda: TestbedPolicy(mixture(), Schedule.from_scheduler(DDIMScheduler(), 5)), ValueError,
     r"schedule\.sampler"),
    ("run_check cases not CheckCases", lambda: run_check([("c", (1.0,), (1.0,), 1.0)]),
     TypeError, r"cases\[0\]"),
]
# fmt: on


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(c, e, m, id=label) for label, c, e, m in STRUCTURAL],
)
def test_a_wrong_argument_is_refused_where_it_is_given(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    if error is ValueError:
        assert not isinstance(info.value, TypeError), info.value


def test_the_reference_is_checked_before_any_step():
    """A (mean, variance) pair as a policy is refused by msdda_step itself, not at step one."""
    calls = []

    def counted(x, t):
        calls.append(t)
        return policy(x, t)

    with pytest.raises(TypeError, match="reference"):
        msdda_step([counted, counted], [0.25, 0.25], reference=PAIR)
    assert calls == []


def test_legacy_value_errors_for_wrong_kinds_are_still_value_errors():
    """A wrong kind where msdda documented a ValueError is a TypeError that is also one."""
    for call in (
        lambda: StepSpec(eta=True),
        lambda: Expert(_eps, kl_coef="1"),
        lambda: TrainConfig(num_steps=True),
        lambda: MethodSettings(code_candidates=2.0),
        lambda: Schedule.from_scheduler(DDPMScheduler(), "10"),
    ):
        with pytest.raises(TypeError) as info:
            call()
        assert isinstance(info.value, ValueError)


def test_fuse_with_coefficients_wants_fusion_coefficients():
    from msdda import fuse_with_coefficients

    with pytest.raises(TypeError, match="coefficients must be a FusionCoefficients"):
        fuse_with_coefficients(*steps2(), ((0.5, 0.5), 0.0))
