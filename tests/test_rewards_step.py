"""``tweedie_step_reward``: an action x_{t-1} is scored by the reward of its Tweedie x0.

Checked against an analytic denoiser: for data x0 ~ N(0, s^2 I),
E[x0 | x_t] = sqrt(abar) s^2 / (abar s^2 + 1 - abar) * x_t.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from msdda import Schedule
from msdda.rewards import tweedie_step_reward, tweedie_x0

S2 = 0.49  # data variance s^2
SHAPE = (3, 2, 4, 4)


def _schedule(clip: bool = False) -> Schedule:
    return Schedule.from_scheduler(DDPMScheduler(clip_sample=clip), 10)


def _x0_by_hand(x: torch.Tensor, abar: float) -> torch.Tensor:
    return math.sqrt(abar) * S2 / (abar * S2 + 1 - abar) * x


class GaussianDataDenoiser:
    """The exact denoiser for x0 ~ N(0, S2 I), in any prediction type; records its calls."""

    def __init__(self, schedule: Schedule, prediction_type: str = "epsilon", extra_channels=False):
        self.schedule, self.prediction_type = schedule, prediction_type
        self.extra_channels = extra_channels
        self.calls: list[tuple[list[int], object]] = []

    def __call__(self, x_t, t, cond):
        self.calls.append((t.tolist(), cond))
        abar = float(self.schedule.alphas_cumprod[int(t[0])])
        x0 = _x0_by_hand(x_t, abar)
        eps = (x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        out = {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0,
        }[self.prediction_type]
        if self.extra_channels:  # a learned-variance channel that must be ignored
            out = torch.cat([out, torch.full_like(out, 123.0)], dim=1)
        return out


class RecordingReward:
    """r(images, prompts) = -sum (images - target)^2 per sample, with target = prompts."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, object]] = []

    def __call__(self, images, prompts):
        self.seen.append((images.clone(), prompts))
        return -((images - prompts) ** 2).flatten(1).sum(1)


def test_at_the_end_of_the_chain_the_action_itself_is_scored():
    schedule = _schedule()
    denoiser, reward = GaussianDataDenoiser(schedule), RecordingReward()
    step_reward = tweedie_step_reward(reward, denoiser, schedule)
    x = torch.randn(SHAPE, dtype=torch.float64)

    scores = step_reward(x, -1, 0.5)

    assert denoiser.calls == []
    assert torch.equal(reward.seen[0][0], x)
    torch.testing.assert_close(scores, -((x - 0.5) ** 2).flatten(1).sum(1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t_prev", [800, 300, 0])
def test_before_the_end_the_tweedie_x0_is_scored(prediction_type, t_prev):
    schedule = _schedule()
    denoiser, reward = GaussianDataDenoiser(schedule, prediction_type), RecordingReward()
    step_reward = tweedie_step_reward(reward, denoiser, schedule, prediction_type=prediction_type)
    x = torch.randn(SHAPE, dtype=torch.float64)

    scores = step_reward(x, t_prev, 0.5)

    x0 = _x0_by_hand(x, float(schedule.alphas_cumprod[t_prev]))
    ((t_batch, cond),) = denoiser.calls
    assert t_batch == [t_prev] * SHAPE[0] and cond == 0.5
    torch.testing.assert_close(reward.seen[0][0], x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores, -((x0 - 0.5) ** 2).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    assert reward.seen[0][1] == 0.5


def test_the_decoder_sees_the_tweedie_x0_and_the_reward_sees_the_decoded_image():
    schedule = _schedule()
    reward = RecordingReward()
    step_reward = tweedie_step_reward(
        reward, GaussianDataDenoiser(schedule), schedule, decode=lambda z: 2 * z + 1
    )
    x = torch.randn(SHAPE, dtype=torch.float64)
    step_reward(x, 500, 0.0)
    x0 = _x0_by_hand(x, float(schedule.alphas_cumprod[500]))
    torch.testing.assert_close(reward.seen[0][0], 2 * x0 + 1, rtol=1e-12, atol=1e-12)


def test_a_learned_variance_channel_is_dropped():
    schedule = _schedule()
    x = torch.randn(SHAPE, dtype=torch.float64)
    plain = tweedie_x0(GaussianDataDenoiser(schedule), x, 500, None, schedule)
    with_var = tweedie_x0(
        GaussianDataDenoiser(schedule, extra_channels=True), x, 500, None, schedule
    )
    assert with_var.shape == x.shape
    torch.testing.assert_close(with_var, plain, rtol=0, atol=0)


def test_a_clipping_schedule_clips_the_tweedie_x0():
    schedule = _schedule(clip=True)
    x = torch.randn(SHAPE, dtype=torch.float64) * 20  # x0_hat far outside [-1, 1]
    x0 = tweedie_x0(GaussianDataDenoiser(schedule), x, 100, None, schedule)
    hand = _x0_by_hand(x, float(schedule.alphas_cumprod[100]))
    assert bool((hand.abs() > 1).any())
    torch.testing.assert_close(x0, hand.clamp(-1, 1), rtol=1e-12, atol=1e-12)
