"""One sampling loop for every method, and noise that every method shares.

A method is a *step policy*: ``(x_t, t) -> Gaussian`` (anything with ``mean`` and
``variance``). The loop draws x_{t-1} = mean + sqrt(variance) * z with z from a
noise sampler indexed by step, so two methods run with the same seed see
identical noise, and adds no noise after the last step. A method that picks its
next state itself (resampling, search) returns a point mass (variance 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .fusion import Gaussian

__all__ = [
    "StepPolicy",
    "NoiseSampler",
    "SeededNoise",
    "sample_chain",
]

StepPolicy = Callable[[Tensor, int], Gaussian]


class NoiseSampler(Protocol):
    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` for step ``step_index``."""


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


class SeededNoise:
    """Initial and step noise from seeds, drawn in a fixed order: x_T first, then z per step.

    ``SeededNoise(0)`` draws the whole batch from one generator; ``SeededNoise([3, 4, 5])``
    gives every sample its own generator (EDM style), so a sample's noise does not
    depend on the rest of the batch. Every method run from equal seeds sees equal noise
    provided it draws through this object once per step (the loop does that).
    """

    def __init__(self, seeds: int | Sequence[int]) -> None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            self._gens = [_generator(seeds)]
            self.per_sample = False
        else:
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
                raise TypeError("seeds must be an int or a non-empty sequence of ints")
            self._gens = [_generator(s) for s in seeds]
            self.per_sample = True

    def _draw(self, shape: Sequence[int]) -> Tensor:
        shape = tuple(shape)
        if not self.per_sample:
            return torch.randn(shape, generator=self._gens[0])
        if shape[0] != len(self._gens):
            raise ValueError(f"batch of {shape[0]} samples for {len(self._gens)} seeds")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self._gens])

    def initial(self, shape: Sequence[int]) -> Tensor:
        """x_T ~ N(0, I), float32, of the given (B, ...) shape."""
        return self._draw(shape)

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        return self._draw(like.shape).to(like)


def sample_chain(
    step: StepPolicy,
    x_T: Tensor,
    timesteps: Sequence[int],
    noise: NoiseSampler,
    *,
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Run the reverse chain x_T -> x_0 with the policy ``step``.

    Args:
        step: the method, ``(x_t, t) -> Gaussian``.
        x_T: (B, ...) initial noise.
        timesteps: the schedule's timesteps, noisiest first.
        noise: step noise; the last step adds none.
        callback: called as ``callback(i, t, x_{t-1})`` after every step (progress, logging).
    """
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty")
    x = x_T
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        g = step(x, int(t))
        if g.mean.shape != x.shape:
            raise ValueError(
                f"step returned a mean of shape {tuple(g.mean.shape)} for x_t of {tuple(x.shape)}"
            )
        if i < last:
            x = g.mean + g.variance.clamp_min(0).sqrt() * noise(i, x)
        else:
            x = g.mean
        if callback is not None:
            callback(i, int(t), x)
    return x
