"""Flow-matching step Gaussians: parity with the public samplers, the schedule, the methods.

The reference formulas below are written here from the public code, independently of
``msdda.flows``: Flow-GRPO's ``sde_step_with_logprob`` (``sde`` and ``cps`` branches),
DanceGRPO's ``flux_step`` (``sde_solver=True``) and diffusers'
``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from msdda import Expert, Gaussian, StepSpec, sample_chain, step_gaussian
from msdda.experts import expert_policy, msdda_step
from msdda.flows import (
    FLOW_RULES,
    FlowStepSpec,
    euler_step,
    flow_noise_factor,
    flow_step_gaussian,
)
from msdda.gaussians import MIN_VARIANCE, FlowSchedule, Schedule
from msdda.methods import MethodContext, NoiseTape, build_policy
from msdda.sampling import GeneratorNoise

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 4, 4, 4)


def sd3_scheduler(**config) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **config)


def tensors(seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(
        SHAPE, generator=g, dtype=dtype
    )


# --- the public reference formulas, written from their code ---------------------------------


def flow_grpo_sde(v, x, sigmas, i, noise_level, z):
    """Flow-GRPO sde_step_with_logprob, sde_type='sde': returns (prev_sample, mean, std)."""
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = (
        x * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    std = std_dev_t * torch.sqrt(-1 * dt)
    return mean + std * z, mean, std


def flow_grpo_cps(v, x, sigmas, i, noise_level, z):
    """Flow-GRPO sde_step_with_logprob, sde_type='cps'."""
    sigma, sigma_prev = sigmas[i], sigmas[i + 1]
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    return mean + std_dev_t * z, mean, std_dev_t


def dance_grpo(v, x, sigmas, i, eta, z):
    """DanceGRPO flux_step with sde_solver=True."""
    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    mean = x + dsigma * v
    pred_original_sample = x - sigma * v
    std_dev_t = eta * math.sqrt(sigma - sigmas[i + 1])
    score_estimate = -(x - pred_original_sample * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score_estimate) * dsigma
    return mean + std_dev_t * z, mean, std_dev_t


REFERENCES = {"sde": flow_grpo_sde, "cps": flow_grpo_cps, "dance": dance_grpo}


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule,level", [("sde", 0.7), ("sde", 1.0), ("cps", 0.3), ("cps", 0.8), ("dance", 0.3)]
)
def test_every_step_equals_the_public_reference_formula_in_float32(rule, level):
    scheduler = sd3_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 8)
    sigmas = scheduler.sigmas  # float32, as the reference reads them
    assert float(sigmas[0]) == 1.0  # the first step is the sigma = 1 case
    spec = FlowStepSpec(rule, level)
    for i, key in enumerate(schedule.timesteps):
        v, x = tensors(i)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        want, want_mean, _ = REFERENCES[rule](v, x, sigmas, i, level, z)
        g = step_gaussian(v, x, key, schedule, spec)
        torch.testing.assert_close(g.mean, want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.sample(z), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.pred_x0, x - sigmas[i] * v, rtol=1e-6, atol=1e-6)


def test_cps_at_noise_level_one_is_diffusers_stochastic_sampling_with_the_same_noise():
    scheduler = sd3_scheduler(stochastic_sampling=True)
    schedule = Schedule.from_scheduler(scheduler, 6)
    spec = FlowStepSpec("cps", 1.0)
    for i, (t, key) in enumerate(zip(scheduler.timesteps, schedule.timesteps, strict=True)):
        v, x = tensors(i)
        want = scheduler.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(step_gaussian(v, x, key, schedule, spec).sample(z), want)


def velocity_model(schedule: FlowSchedule):
    """A fixed non-linear velocity field of (x, model timestep), keys mapped by the schedule."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 0.5

    def denoise(x, t, cond=None):
        tm = schedule.model_timesteps(t).to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w.to(x.dtype), x)) + tm / 1000

    return denoise


def test_a_whole_cps_chain_is_diffusers_stochastic_loop_with_its_generator():
    scheduler = sd3_scheduler(stochastic_sampling=True)
    schedule = Schedule.from_scheduler(scheduler, 10)
    denoise = velocity_model(schedule)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(11)
    x = x_T
    for t, key in zip(scheduler.timesteps, schedule.timesteps, strict=True):
        v = denoise(x, torch.full((x.shape[0],), key))
        x = scheduler.step(v, t, x, generator=g).prev_sample
    expert = Expert(denoise, FlowStepSpec("cps", 1.0))
    noise = GeneratorNoise(torch.Generator().manual_seed(11), torch.device("cpu"), torch.float32)
    got = sample_chain(expert_policy(expert, schedule), x_T, schedule.timesteps, noise)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", FLOW_RULES)
def test_noise_level_zero_is_the_euler_ode_step_and_small_levels_tend_to_it(rule):
    scheduler = sd3_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 8)
    key = schedule.timesteps[2]
    sigma, sigma_next = schedule.sigma_pair(key)
    v, x = tensors(5, torch.float64)
    euler = euler_step(v, x, sigma, sigma_next)
    g0 = step_gaussian(v, x, key, schedule, FlowStepSpec(rule, 0.0))
    torch.testing.assert_close(g0.mean, euler, rtol=1e-12, atol=1e-12)
    assert bool((g0.variance == 0).all())
    t = scheduler.timesteps[2]  # diffusers' deterministic step is the same Euler step
    want = scheduler.step(v.float(), t, x.float()).prev_sample
    torch.testing.assert_close(g0.mean.float(), want, rtol=1e-5, atol=1e-5)
    gaps = [
        float((step_gaussian(v, x, key, schedule, FlowStepSpec(rule, a)).mean - euler).abs().max())
        for a in (0.3, 0.03, 0.003)
    ]
    assert gaps[0] > 1e-4  # a real difference at a = 0.3 ...
    assert gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50  # ... shrinking like a^2


# --- the schedule -----------------------------------------------------------------------------


def test_a_static_shift_schedule_is_read_from_the_scheduler():
    scheduler = sd3_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 7)
    assert isinstance(schedule, FlowSchedule) and schedule.sampler == "flow"
    torch.testing.assert_close(schedule.sigmas, scheduler.sigmas.double(), rtol=0, atol=0)
    assert schedule.timesteps == (6, 5, 4, 3, 2, 1, 0)
    assert schedule.prev_timesteps == (5, 4, 3, 2, 1, 0, -1)
    keys = torch.tensor(schedule.timesteps)
    torch.testing.assert_close(schedule.model_timesteps(keys), scheduler.timesteps, rtol=0, atol=0)
    assert FlowSchedule.from_scheduler(sd3_scheduler(), 7).compatible_with(schedule)
    assert not schedule.compatible_with(Schedule.from_scheduler(sd3_scheduler(), 8))


def test_a_dynamic_shift_schedule_takes_sigmas_and_mu_as_the_flux_pipeline_passes_them():
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    n, mu = 6, 1.1
    sigmas = np.linspace(1.0, 1 / n, n)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    schedule = Schedule.from_scheduler(scheduler, n, sigmas=sigmas, mu=mu)
    direct = FlowMatchEulerDiscreteScheduler(**config)
    direct.set_timesteps(n, sigmas=sigmas, mu=mu)
    torch.testing.assert_close(schedule.sigmas, direct.sigmas.double(), rtol=0, atol=0)
    torch.testing.assert_close(schedule.scheduler_timesteps, direct.timesteps, rtol=0, atol=0)
    other = Schedule.from_scheduler(
        FlowMatchEulerDiscreteScheduler(**config), n, sigmas=sigmas, mu=0.6
    )
    assert not schedule.compatible_with(other)
    with pytest.raises(ValueError, match="mu is required"):
        Schedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**config), n)


def test_schedules_that_cannot_be_read_are_refused():
    with pytest.raises(ValueError, match="invert_sigmas"):
        Schedule.from_scheduler(sd3_scheduler(invert_sigmas=True), 4)
    with pytest.raises(ValueError, match="no timesteps"):
        Schedule.from_scheduler(sd3_scheduler())
    with pytest.raises(ValueError, match="sigmas and mu apply"):
        Schedule.from_scheduler(DDPMScheduler(), 10, mu=1.0)
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowSchedule.from_scheduler(DDPMScheduler(), 10)
    with pytest.raises(TypeError, match="num_inference_steps"):
        Schedule.from_scheduler(sd3_scheduler(), 2.5)
    schedule = Schedule.from_scheduler(sd3_scheduler(), 4)
    with pytest.raises(ValueError, match="no alpha bars"):
        schedule.alpha_bars(0)
    with pytest.raises(ValueError, match="not in this schedule"):
        schedule.sigma_pair(4)
    with pytest.raises(ValueError, match="keys in"):
        schedule.model_timesteps(torch.tensor([4]))


def test_the_end_of_the_schedule():
    """Key 0 steps from the last non-zero sigma to 0; cps lands on x0_hat, sde adds noise."""
    scheduler = sd3_scheduler()
    schedule = Schedule.from_scheduler(scheduler, 8)
    last = float(scheduler.sigmas[-2])
    assert 0 < last < 0.02 and schedule.sigma_pair(0) == (last, 0.0)
    assert schedule.sigma_at(-1) == 0.0
    assert float(schedule.model_timesteps(torch.tensor([-1]))) == 0.0
    v, x = tensors(2, torch.float64)
    x0, x1 = x - last * v, x + (1 - last) * v
    cps = step_gaussian(v, x, 0, schedule, FlowStepSpec("cps", 0.6))
    torch.testing.assert_close(cps.mean, x0, rtol=1e-12, atol=1e-12)
    floor = MIN_VARIANCE * math.sin(0.6 * math.pi / 2) ** 2
    torch.testing.assert_close(cps.variance, torch.full_like(x, floor), rtol=1e-12, atol=0)
    sde = step_gaussian(v, x, 0, schedule, FlowStepSpec("sde", 0.7))
    std2 = 0.49 * last / (1 - last)
    torch.testing.assert_close(sde.mean, x0 - std2 / 2 * x1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sde.variance, torch.full_like(x, std2 * last), rtol=1e-10, atol=0)
    # the loop adds no noise after the last step: it lands on the last step's mean
    out = sample_chain(lambda x_t, t: sde, x, [0], lambda i, like: torch.ones_like(like))
    torch.testing.assert_close(out, sde.mean, rtol=0, atol=0)


def test_one_key_per_sample_gives_each_row_its_own_step():
    schedule = Schedule.from_scheduler(sd3_scheduler(), 6)
    v, x = tensors(4)
    keys = torch.tensor([5, 2, 0])
    spec = FlowStepSpec("sde", 0.7)
    g = step_gaussian(v, x, keys, schedule, spec)
    for b, k in enumerate(keys.tolist()):
        row = step_gaussian(v[b : b + 1], x[b : b + 1], k, schedule, spec)
        torch.testing.assert_close(g.mean[b : b + 1], row.mean, rtol=0, atol=0)
        torch.testing.assert_close(g.variance[b : b + 1], row.variance, rtol=0, atol=0)
    sigma = torch.tensor([schedule.sigma_pair(k)[0] for k in keys.tolist()])
    nxt = torch.tensor([schedule.sigma_pair(k)[1] for k in keys.tolist()])
    direct = flow_step_gaussian(v, x, sigma, nxt, spec, sigma_max=float(schedule.sigmas[1]))
    torch.testing.assert_close(direct.mean, g.mean, rtol=1e-6, atol=1e-6)


def test_half_precision_is_stepped_in_float32():
    schedule = Schedule.from_scheduler(sd3_scheduler(), 4)
    v, x = tensors(1)
    g = step_gaussian(v.half(), x.half(), 2, schedule, FlowStepSpec("sde", 0.7))
    assert g.mean.dtype == torch.float32 and g.variance.dtype == torch.float32
    want = step_gaussian(v.half().float(), x.half().float(), 2, schedule, FlowStepSpec())
    torch.testing.assert_close(g.mean, want.mean, rtol=0, atol=0)


# --- the spec and its refusals ----------------------------------------------------------------


def test_the_spec_is_checked_and_reads_like_a_step_spec():
    spec = FlowStepSpec()
    assert (spec.rule, spec.noise_level) == ("sde", 0.7)
    assert spec.prediction_type == "flow" and not spec.learned_variance
    assert FlowStepSpec("sde", 0.0).deterministic
    assert flow_noise_factor(FlowStepSpec("cps", 1.0)) == 1.0
    assert hash(FlowStepSpec("cps", 0.5)) == hash(FlowStepSpec("cps", 0.5))
    with pytest.raises(ValueError, match="rule must be one of"):
        FlowStepSpec("ode", 0.5)
    with pytest.raises(ValueError, match=r"noise_level of rule 'cps'.*\[0, 1\]"):
        FlowStepSpec("cps", 1.5)
    with pytest.raises(ValueError, match="noise_level"):
        FlowStepSpec("sde", -0.1)
    with pytest.raises(TypeError, match="noise_level"):
        FlowStepSpec("sde", True)
    with pytest.raises(ValueError, match="noise_level"):
        FlowStepSpec("dance", float("nan"))


def test_a_flow_spec_and_a_ddpm_schedule_do_not_mix():
    flow = Schedule.from_scheduler(sd3_scheduler(), 4)
    ddpm = Schedule.from_scheduler(DDPMScheduler(), 4)
    v, x = tensors(0)
    with pytest.raises(ValueError, match="FlowStepSpec needs a FlowSchedule"):
        step_gaussian(v, x, ddpm.timesteps[0], ddpm, FlowStepSpec())
    with pytest.raises(ValueError, match="FlowStepSpec needs a FlowSchedule"):
        step_gaussian(v, x, 3, flow, StepSpec())
    assert not flow.compatible_with(ddpm) and not ddpm.compatible_with(flow)
    with pytest.raises(TypeError, match="StepSpec or FlowStepSpec"):
        step_gaussian(v, x, 3, flow, "sde")


def test_the_pure_step_refuses_bad_sigmas_and_shapes():
    v, x = tensors(0)
    spec = FlowStepSpec()
    with pytest.raises(ValueError, match="sigma_next must be in"):
        flow_step_gaussian(v, x, 0.5, 0.6, spec)
    with pytest.raises(ValueError, match=r"sigma must be in \(0, 1\]"):
        flow_step_gaussian(v, x, 0.0, 0.0, spec)
    with pytest.raises(ValueError, match="needs sigma_max"):
        flow_step_gaussian(v, x, 1.0, 0.5, spec)
    with pytest.raises(ValueError, match="velocity shape"):
        flow_step_gaussian(v[:, :2], x, 0.5, 0.2, spec)
    with pytest.raises(ValueError, match="one per sample"):
        flow_step_gaussian(v, x, torch.tensor([0.5, 0.4]), 0.2, spec)
    with pytest.raises(TypeError, match="FlowStepSpec"):
        flow_step_gaussian(v, x, 0.5, 0.2, StepSpec())


# --- fusion and the methods on flow experts ---------------------------------------------------


def test_fusion_refuses_a_deterministic_flow_step():
    schedule = Schedule.from_scheduler(sd3_scheduler(), 4)
    denoise = velocity_model(schedule)
    experts = [expert_policy(Expert(denoise, FlowStepSpec("sde", a)), schedule) for a in (0.7, 0.0)]
    fused = msdda_step(experts, [0.5, 0.5])
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="deterministic step"):
        fused(x, 3)


def test_distinct_noise_levels_fuse_by_precision_not_by_mixing_velocities():
    schedule = Schedule.from_scheduler(sd3_scheduler(), 4)
    v1, x = tensors(1, torch.float64)
    v2, _ = tensors(2, torch.float64)
    specs = FlowStepSpec("sde", 0.4), FlowStepSpec("sde", 0.9)
    g1, g2 = (step_gaussian(v, x, 2, schedule, s) for v, s in zip((v1, v2), specs, strict=True))
    fused = msdda_step([lambda x_t, t: g1, lambda x_t, t: g2], [0.3, 0.7])(x, 2)
    precision = 0.3 / g1.variance + 0.7 / g2.variance
    torch.testing.assert_close(fused.variance, 1 / precision, rtol=1e-12, atol=0)
    want = (0.3 * g1.mean / g1.variance + 0.7 * g2.mean / g2.variance) / precision
    torch.testing.assert_close(fused.mean, want, rtol=1e-12, atol=1e-12)
    mixed = step_gaussian(0.3 * v1 + 0.7 * v2, x, 2, schedule, specs[0])
    assert float((mixed.mean - fused.mean).abs().max()) > 1e-3


class VelocityNet(nn.Module):
    """A tiny velocity model of (x, model timestep) for rs, keys mapped by the schedule."""

    def __init__(self, seed: int, schedule: FlowSchedule):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.schedule = schedule

    def forward(self, x, t, cond=None):
        tm = self.schedule.model_timesteps(t).to(x.dtype)[:, None]
        return torch.tanh(self.lin(x)) * (1 + tm / 1000)


def flow_context(levels, dim: int = 4, steps: int = 6) -> MethodContext:
    schedule = Schedule.from_scheduler(sd3_scheduler(), steps)
    ref, *experts = (
        Expert(VelocityNet(i, schedule), FlowStepSpec("sde", a), name=f"m{i}")
        for i, a in enumerate(levels)
    )
    return MethodContext(schedule, ref, tuple(experts), (dim,), dtype=torch.float64)


def run(ctx: MethodContext, method: str, weights, seeds=(1, 2, 3)) -> torch.Tensor:
    tape = NoiseTape.seeded(list(seeds))
    x_T = tape.initial((len(seeds), *ctx.sample_shape)).double()
    policy = build_policy(method, ctx, weights, None, seeds=list(seeds), noise=tape)
    with torch.no_grad():
        return sample_chain(policy, x_T, ctx.schedule.timesteps, tape)


def test_every_expert_only_method_runs_on_flow_experts_and_reduces_as_it_should():
    ctx = flow_context((0.7, 0.7, 0.7))
    base = run(ctx, "base", None)
    assert bool(torch.isfinite(base).all())
    one_hot = run(ctx, "msdda", (1.0, 0.0))
    alone = MethodContext(ctx.schedule, ctx.experts[0], ctx.experts, (4,), dtype=torch.float64)
    torch.testing.assert_close(one_hot, run(alone, "base", None), rtol=1e-12, atol=1e-12)
    # equal noise levels and lambdas on the simplex: MSDDA is velocity mixing (db)
    torch.testing.assert_close(
        run(ctx, "msdda", (0.3, 0.7)), run(ctx, "db", (0.3, 0.7)), rtol=1e-10, atol=1e-10
    )
    for method in ("db-ls", "rs"):
        out = run(ctx, method, (0.3, 0.7))
        assert out.shape == base.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(run(ctx, "rs", (1.0, 0.0)), one_hot, rtol=1e-12, atol=1e-12)


def test_msdda_and_velocity_mixing_part_with_distinct_noise_levels():
    ctx = flow_context((0.7, 0.4, 0.9))
    gap = (run(ctx, "msdda", (0.3, 0.7)) - run(ctx, "db", (0.3, 0.7))).abs().max()
    assert float(gap) > 1e-4


def test_a_flow_expert_is_an_ordinary_expert():
    e = Expert(lambda x, t, c: x, FlowStepSpec("cps", 0.5), kl_coef=0.5, name="ocr")
    assert e.spec.rule == "cps"
    with pytest.raises(TypeError, match="StepSpec or a FlowStepSpec"):
        Expert(lambda x, t, c: x, "cps")
    assert isinstance(Gaussian(torch.zeros(1), torch.ones(1)), Gaussian)
