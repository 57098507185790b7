"""The digits domain's noise schedule: 1000 training timesteps, 50 sampling steps.

A diffusers ``DDPMScheduler`` with the cosine ("squaredcos_cap_v2") betas, epsilon
prediction, x0 clipped to [-1, 1]; sampling is strided DDPM (``fixed_small``
variance, or ``learned_log`` for experts with a variance head).
"""

from __future__ import annotations

from ..gaussians import Schedule
from ..validation import check_int

__all__ = ["SCHEDULER_CONFIG", "NUM_INFERENCE_STEPS", "make_scheduler", "make_schedule"]

#: The diffusers DDPMScheduler config (recorded in the weights' manifest).
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}
NUM_INFERENCE_STEPS = 50


def make_scheduler(config: dict | None = None):
    """A fresh ``diffusers.DDPMScheduler`` from ``config`` (default :data:`SCHEDULER_CONFIG`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or SCHEDULER_CONFIG))


def make_schedule(
    num_inference_steps: int = NUM_INFERENCE_STEPS, config: dict | None = None
) -> Schedule:
    """msdda's :class:`~msdda.Schedule` for sampling in ``num_inference_steps`` DDPM steps."""
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict of DDPMScheduler settings, got {config!r}")
    scheduler = make_scheduler(config)
    check_int(
        num_inference_steps,
        "num_inference_steps",
        low=1,
        high=int(scheduler.config.num_train_timesteps),
    )
    return Schedule.from_scheduler(scheduler, num_inference_steps)
