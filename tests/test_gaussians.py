"""Step Gaussians agree with diffusers' own ``step()``.

For every scheduler setting we support, ``mean + sqrt(variance) * z`` must equal
``scheduler.step(model_output, t, x_t, ...)`` driven by the same variance noise z,
and ``pred_x0`` must equal the scheduler's ``pred_original_sample``.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from msdda import Schedule, StepSpec, step_gaussian
from msdda.gaussians import MIN_VARIANCE

C = 3
SHAPE = (2, C, 4, 4)  # (B, C, H, W)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
STEP_POSITIONS = ("first", "middle", "last")


def _draw(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _timestep(schedule: Schedule, position: str) -> int:
    index = {"first": 0, "middle": len(schedule.timesteps) // 2, "last": -1}[position]
    return schedule.timesteps[index]


def _model_output(prediction_type: str, learned: bool, seed: int) -> torch.Tensor:
    # x0 predictions beyond [-1, 1] so that clip_sample has work to do
    out = _draw(SHAPE, seed, scale=1.5 if prediction_type == "sample" else 1.0)
    if learned:
        v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
        out = torch.cat([out, v], dim=1)  # (B, 2C, H, W): prediction, then variance channel
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("num_steps", [50, 10])
@pytest.mark.parametrize("position", STEP_POSITIONS)
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_diffusers(
    variance_type, prediction_type, clip_sample, position, num_steps
):
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )
    schedule = Schedule.from_scheduler(sched, num_steps)
    t = _timestep(schedule, position)
    spec = StepSpec(prediction_type=prediction_type, variance_type=variance_type)
    model_output = _model_output(prediction_type, variance_type == "learned_range", seed=t)
    x_t = _draw(SHAPE, seed=t + 7)

    g = step_gaussian(model_output, x_t, t, schedule, spec)
    out = sched.step(model_output, t, x_t, generator=torch.Generator().manual_seed(99))

    # diffusers splits off the variance channel first, then draws C-channel noise
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    if t == 0:  # diffusers adds no noise at the last step
        _close(g.mean, out.prev_sample)
    else:
        _close(g.mean + g.variance.sqrt() * z, out.prev_sample)
    torch.testing.assert_close(g.pred_x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
    assert g.mean.shape == g.variance.shape == x_t.shape
    assert bool((g.variance > 0).all())


@pytest.mark.parametrize("num_steps", [50, 10])
@pytest.mark.parametrize("position", STEP_POSITIONS)
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_matches_diffusers(eta, prediction_type, clip_sample, position, num_steps):
    sched = DDIMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample
    )
    schedule = Schedule.from_scheduler(sched, num_steps)
    t = _timestep(schedule, position)
    spec = StepSpec(prediction_type=prediction_type, eta=eta)
    model_output = _model_output(prediction_type, learned=False, seed=t)
    x_t = _draw(SHAPE, seed=t + 7)
    z = _draw(SHAPE, seed=t + 11)

    g = step_gaussian(model_output, x_t, t, schedule, spec)
    out = sched.step(model_output, t, x_t, eta=eta, variance_noise=z)

    _close(g.mean + g.variance.sqrt() * z, out.prev_sample)
    torch.testing.assert_close(g.pred_x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
    assert bool((g.variance > 0).all())


def _in_float64(sched):
    """The scheduler with its tables promoted to float64, so its step() runs in float64."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if isinstance(sched, DDPMScheduler):
        sched.one = sched.one.double()
    else:
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


@pytest.mark.parametrize("num_steps", [50, 10])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_equals_diffusers_to_float64_round_off_at_every_timestep(
    variance_type, prediction_type, clip_sample, num_steps
):
    """In float32 diffusers' own round-off is ~1e-5 near the end; in float64 both agree."""
    sched = DDPMScheduler(
        variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample
    )
    schedule = Schedule.from_scheduler(sched, num_steps)
    sched = _in_float64(sched)
    spec = StepSpec(prediction_type=prediction_type, variance_type=variance_type)
    for t in schedule.timesteps:
        model_output = _model_output(prediction_type, variance_type == "learned_range", t).double()
        x_t = _draw(SHAPE, t + 7).double()
        g = step_gaussian(model_output, x_t, t, schedule, spec)
        out = sched.step(model_output, t, x_t, generator=torch.Generator().manual_seed(t))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        expected = out.prev_sample - (g.variance.sqrt() * z if t > 0 else 0)
        _close(g.mean, expected, atol=1e-12)
        _close(g.pred_x0, out.pred_original_sample, atol=1e-12)


@pytest.mark.parametrize("num_steps", [50, 10])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_equals_diffusers_to_float64_round_off_at_every_timestep(
    eta, prediction_type, clip_sample, num_steps
):
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    schedule = Schedule.from_scheduler(sched, num_steps)
    sched = _in_float64(sched)
    spec = StepSpec(prediction_type=prediction_type, eta=eta)
    for t in schedule.timesteps:
        model_output = _model_output(prediction_type, learned=False, seed=t).double()
        x_t, z = _draw(SHAPE, t + 7).double(), _draw(SHAPE, t + 11).double()
        g = step_gaussian(model_output, x_t, t, schedule, spec)
        out = sched.step(model_output, t, x_t, eta=eta, variance_noise=z)
        # the last step's variance is floored at eta^2 * MIN_VARIANCE (std ~1e-10)
        _close(g.mean + g.variance.sqrt() * z, out.prev_sample, atol=1e-9)
        _close(g.pred_x0, out.pred_original_sample, atol=1e-12)


SD_LIKE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({**SD_LIKE, "steps_offset": 1, "set_alpha_to_one": False}, id="sd-ddim"),
        pytest.param({**SD_LIKE, "timestep_spacing": "trailing"}, id="trailing"),
        pytest.param({"timestep_spacing": "linspace"}, id="linspace"),
    ],
)
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_other_scheduler_configs_match_diffusers_at_every_timestep(scheduler_cls, config):
    if scheduler_cls is DDPMScheduler:
        config = {k: v for k, v in config.items() if k != "set_alpha_to_one"}
    sched = scheduler_cls(clip_sample=False, **config)
    schedule = Schedule.from_scheduler(sched, 25)
    sched = _in_float64(sched)
    for t in schedule.timesteps:
        model_output, x_t, z = (_draw(SHAPE, t + i).double() for i in range(3))
        g = step_gaussian(model_output, x_t, t, schedule, StepSpec(eta=1.0))
        if scheduler_cls is DDIMScheduler:
            out = sched.step(model_output, t, x_t, eta=1.0, variance_noise=z)
        else:
            out = sched.step(model_output, t, x_t, generator=torch.Generator().manual_seed(t))
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            z = z if t > 0 else torch.zeros_like(z)
        _close(g.mean + g.variance.sqrt() * z, out.prev_sample, atol=1e-9)


def test_ddim_eta_zero_is_deterministic_and_matches_diffusers():
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    schedule = Schedule.from_scheduler(sched, 50)
    t = schedule.timesteps[10]
    model_output, x_t = _draw(SHAPE, 1), _draw(SHAPE, 2)

    g = step_gaussian(model_output, x_t, t, schedule, StepSpec(eta=0.0))

    assert bool((g.variance == 0).all())
    _close(g.mean, sched.step(model_output, t, x_t, eta=0.0).prev_sample)


def test_last_ddpm_step_has_a_tiny_positive_variance_so_it_stays_fusable():
    schedule = Schedule.from_scheduler(DDPMScheduler(clip_sample=False), 50)
    assert schedule.timesteps[-1] == 0
    g = step_gaussian(_draw(SHAPE, 1), _draw(SHAPE, 2), 0, schedule, StepSpec())
    assert bool((g.variance == MIN_VARIANCE).all())


def test_learned_log_variance_is_beta_tilde_times_exp_v_around_the_fixed_small_mean():
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    schedule = Schedule.from_scheduler(sched, 50)
    i = 20
    t, t_prev = schedule.timesteps[i], schedule.timesteps[i + 1]
    eps, x_t = _draw(SHAPE, 1), _draw(SHAPE, 2)
    v = _draw(SHAPE, 3, scale=0.5)

    g = step_gaussian(
        torch.cat([eps, v], 1), x_t, t, schedule, StepSpec(variance_type="learned_log")
    )
    fixed = step_gaussian(eps, x_t, t, schedule, StepSpec(variance_type="fixed_small"))

    abar_t = float(sched.alphas_cumprod[t].double())
    abar_prev = float(sched.alphas_cumprod[t_prev].double())
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    torch.testing.assert_close(g.variance, beta_tilde * torch.exp(v), rtol=1e-6, atol=0)
    torch.testing.assert_close(g.mean, fixed.mean, rtol=0, atol=0)
    torch.testing.assert_close(g.pred_x0, fixed.pred_x0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_half_precision_inputs_give_float32_gaussians(dtype, variance_type):
    schedule = Schedule.from_scheduler(DDPMScheduler(variance_type=variance_type), 50)
    t = schedule.timesteps[5]
    spec = StepSpec(variance_type=variance_type)
    model_output = _model_output("epsilon", variance_type == "learned_range", 1).to(dtype)
    x_t = _draw(SHAPE, 2).to(dtype)

    g = step_gaussian(model_output, x_t, t, schedule, spec)
    expected = step_gaussian(model_output.float(), x_t.float(), t, schedule, spec)

    for got, want in zip(g, expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float64_inputs_stay_float64():
    schedule = Schedule.from_scheduler(DDPMScheduler(), 10)
    g = step_gaussian(
        _draw(SHAPE, 1).double(),
        _draw(SHAPE, 2).double(),
        schedule.timesteps[3],
        schedule,
        StepSpec(),
    )
    assert g.mean.dtype == g.variance.dtype == g.pred_x0.dtype == torch.float64


def test_schedule_reads_the_scheduler_tables():
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=2.0)
    schedule = Schedule.from_scheduler(sched, 10)
    assert schedule.sampler == "ddim"
    assert schedule.timesteps == tuple(range(900, -1, -100))
    assert schedule.prev_timesteps == tuple(range(800, -101, -100))
    assert schedule.clip_sample_range == 2.0
    abar_t, abar_prev = schedule.alpha_bars(0)
    assert abar_prev == float(sched.final_alpha_cumprod)
    assert math.isclose(abar_t, float(sched.alphas_cumprod[0]), rel_tol=1e-7)
    ddpm = Schedule.from_scheduler(DDPMScheduler(clip_sample=False), 10)
    assert ddpm.sampler == "ddpm" and ddpm.clip_sample_range is None
    assert ddpm.prev_timesteps[-1] < 0 and ddpm.alpha_bars(0)[1] == 1.0


# ----------------------------------------------------------------------------- refusals


def _ddpm_schedule(**config) -> Schedule:
    return Schedule.from_scheduler(DDPMScheduler(**config), 10)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned_log"])
def test_learned_variance_needs_2c_output_channels(variance_type):
    schedule = _ddpm_schedule()
    with pytest.raises(ValueError, match=r"2C = 6 output channels, got 3"):
        step_gaussian(
            _draw(SHAPE, 1),
            _draw(SHAPE, 2),
            schedule.timesteps[0],
            schedule,
            StepSpec(variance_type=variance_type),
        )


def test_fixed_variance_refuses_an_extra_variance_channel():
    schedule = _ddpm_schedule()
    with pytest.raises(ValueError, match=r"model_output shape \(2, 6, 4, 4\) must equal x_t's"):
        step_gaussian(
            _model_output("epsilon", learned=True, seed=1),
            _draw(SHAPE, 2),
            schedule.timesteps[0],
            schedule,
            StepSpec(variance_type="fixed_small"),
        )


def test_unknown_prediction_or_variance_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        StepSpec(prediction_type="score")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        StepSpec(variance_type="learned")
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        StepSpec(eta=-0.5)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        StepSpec(eta=float("nan"))


def test_ddim_refuses_a_learned_variance():
    schedule = Schedule.from_scheduler(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match="needs a DDPM schedule"):
        step_gaussian(
            _model_output("epsilon", learned=True, seed=1),
            _draw(SHAPE, 2),
            schedule.timesteps[0],
            schedule,
            StepSpec(variance_type="learned_range"),
        )


def test_timestep_outside_the_schedule_is_refused():
    schedule = _ddpm_schedule()  # timesteps 900, 800, ..., 0
    with pytest.raises(ValueError, match="timestep 450 is not in this schedule"):
        step_gaussian(_draw(SHAPE, 1), _draw(SHAPE, 2), 450, schedule, StepSpec())


def test_thresholding_scheduler_is_refused():
    with pytest.raises(ValueError, match="thresholding is not supported"):
        Schedule.from_scheduler(DDPMScheduler(thresholding=True), 10)
    with pytest.raises(ValueError, match="thresholding is not supported"):
        Schedule.from_scheduler(DDIMScheduler(thresholding=True), 10)


def test_other_schedulers_are_refused():
    with pytest.raises(
        TypeError, match="scheduler must be a diffusers DDPMScheduler or DDIMScheduler"
    ):
        Schedule.from_scheduler(EulerDiscreteScheduler(), 10)
    with pytest.raises(TypeError, match="scheduler must be"):
        Schedule.from_scheduler("ddpm", 10)


def test_schedule_needs_timesteps():
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        Schedule.from_scheduler(DDPMScheduler(), 0)
    with pytest.raises(ValueError, match="pass num_inference_steps"):
        Schedule.from_scheduler(DDIMScheduler())


@pytest.mark.parametrize(
    ("scheduler", "spec"),
    [
        (DDPMScheduler(), StepSpec("epsilon", "fixed_small")),
        (DDPMScheduler(), StepSpec("v_prediction", "learned_range")),
        (DDPMScheduler(clip_sample=True), StepSpec("sample", "learned_log")),
        (DDIMScheduler(), StepSpec("epsilon", eta=0.7)),
    ],
)
def test_one_timestep_per_sample_equals_each_rows_own_step(scheduler, spec):
    schedule = Schedule.from_scheduler(scheduler, num_inference_steps=10)
    b = 6
    ts = [schedule.timesteps[i] for i in (0, 9, 4, 0, 9, 2)]
    channels = 2 * C if spec.learned_variance else C
    out = _draw((b, channels, 4, 4), 1)
    if spec.learned_variance:
        out[:, C:] = out[:, C:].tanh()
    x_t = _draw((b, C, 4, 4), 2)
    for t in (torch.tensor(ts), ts, tuple(ts)):
        got = step_gaussian(out, x_t, t, schedule, spec)
        for row, t_row in enumerate(ts):
            want = step_gaussian(out[row : row + 1], x_t[row : row + 1], t_row, schedule, spec)
            for field, value in zip(got, want, strict=True):
                assert torch.equal(field[row : row + 1], value), (field, row)
    same = step_gaussian(out, x_t, torch.full((b,), ts[2]), schedule, spec)
    shared = step_gaussian(out, x_t, ts[2], schedule, spec)
    assert all(torch.equal(a, c) for a, c in zip(same, shared, strict=True))


def test_per_sample_timesteps_are_checked():
    schedule = Schedule.from_scheduler(DDPMScheduler(), num_inference_steps=10)
    out, x_t = _draw(SHAPE, 1), _draw(SHAPE, 2)
    with pytest.raises(ValueError, match=r"one per sample, shape \(2,\)"):
        step_gaussian(out, x_t, torch.tensor([schedule.timesteps[0]] * 3), schedule, StepSpec())
    with pytest.raises(TypeError, match="integer timesteps"):
        step_gaussian(out, x_t, torch.tensor([1.0, 2.0]), schedule, StepSpec())
    with pytest.raises(TypeError, match=r"t\[1\] must be an integer"):
        step_gaussian(out, x_t, [schedule.timesteps[0], True], schedule, StepSpec())
    with pytest.raises(ValueError, match="is not in this schedule"):
        step_gaussian(out, x_t, [schedule.timesteps[0], 3], schedule, StepSpec())


def test_step_spec_refuses_a_bool_eta():
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        StepSpec(eta=True)
