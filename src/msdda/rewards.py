"""Rewards as the step-level objective sees them.

A reward scores a batch of clean images: ``(images, prompts) -> (B,)`` scores.
The step-level RL problem of docs/design.md §1 scores an *action* x_{t-1}; msdda scores
it by the reward of its Tweedie estimate x0_hat(x_{t-1}) under the reference model
(x_{t-1} itself after the last step). Trainers, the ``target`` method and
guidance all use :func:`tweedie_step_reward`, so they optimise one objective.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from .flows import flow_x0_x1
from .gaussians import PREDICTION_TYPES, FlowSchedule, Schedule, predicted_x0_and_epsilon
from .validation import check_callable, check_instance

__all__ = ["Reward", "StepReward", "flow_x0", "tweedie_x0", "tweedie_step_reward"]


class Reward(Protocol):
    def __call__(self, images: Tensor, prompts: Any) -> Tensor:
        """(B, ...) clean images and their prompts -> (B,) scores."""


#: ``(x_prev, t_prev, cond) -> (B,)``: the reward of landing at x_prev at timestep
#: t_prev (t_prev < 0: the end of the chain, x_prev is the clean sample).
StepReward = Callable[[Tensor, int, Any], Tensor]


def tweedie_x0(
    denoiser, x: Tensor, t: int, cond: Any, schedule: Schedule, prediction_type: str = "epsilon"
) -> Tensor:
    """x0_hat(x_t) by Tweedie's formula under ``denoiser``; ``x`` itself when t < 0.

    On a :class:`~msdda.gaussians.FlowSchedule` ``t`` is a loop key and the denoiser's
    output the velocity: x0_hat = x - sigma_t v, the flow step's own ``pred_x0``
    (``prediction_type`` is not read)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"t must be an integer timestep (< 0: the end), got {t!r}")
    if t < 0:
        return x
    last = len(schedule.timesteps) if isinstance(schedule, FlowSchedule) else None
    last = schedule.num_train_timesteps if last is None else last
    if not 0 <= t < last:
        raise ValueError(f"t = {t} is not a timestep of the schedule (0..{last - 1})")
    tb = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    out = denoiser(x, tb, cond)
    if isinstance(schedule, FlowSchedule):  # a velocity v = eps - x0 at the key's sigma
        return flow_x0(out, x, schedule.sigma_at(int(t)))
    if out.shape[1] != x.shape[1]:  # drop a learned-variance channel
        out = out[:, : x.shape[1]]
    abar = float(schedule.alphas_cumprod[int(t)])
    x0, _ = predicted_x0_and_epsilon(out, x, abar, prediction_type)
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def flow_x0(velocity: Tensor, x: Tensor, sigma: float) -> Tensor:
    """x0_hat = x - sigma v of a flow model's velocity (the step Gaussian's pred_x0)."""
    x0, _ = flow_x0_x1(velocity.to(x.dtype), x, sigma)
    return x0


def tweedie_step_reward(
    reward: Reward,
    denoiser,
    schedule: Schedule,
    decode: Callable[[Tensor], Tensor] = lambda x: x,
    prediction_type: str = "epsilon",
) -> StepReward:
    """The step reward r(decode(x0_hat_ref(x_prev))) of an action x_prev landing at t_prev."""
    check_callable(reward, "reward", "a reward (images, prompts) -> (B,)")
    check_callable(denoiser, "denoiser", "a denoiser (x_t, t, cond) -> model output")
    check_instance(schedule, Schedule, "schedule", "a msdda.Schedule")
    check_callable(decode, "decode", "a callable (x) -> images")
    flow = isinstance(schedule, FlowSchedule)
    if prediction_type not in (("flow",) if flow else PREDICTION_TYPES):
        expected = "'flow' on a flow schedule" if flow else f"one of {PREDICTION_TYPES}"
        raise ValueError(f"prediction_type must be {expected}, got {prediction_type!r}")

    def step_reward(x_prev: Tensor, t_prev: int, cond: Any) -> Tensor:
        x0 = tweedie_x0(denoiser, x_prev, t_prev, cond, schedule, prediction_type)
        return reward(decode(x0), cond)

    return step_reward
