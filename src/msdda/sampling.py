"""One sampling loop for every method, and the one home of the noise every method sees.

A method is a *step policy*: ``(x_t, t) -> Gaussian``. :func:`sample_chain` draws
x_{t-1} = :meth:`Gaussian.sample` (mean + sqrt(variance) * z) with z from a noise
sampler indexed by step, and adds no noise after the chain's last step. A method that
picks its next state itself (resampling, search) returns a point mass (variance 0).
Look-ahead continuations and the trainer's rollouts run through the same loop, on a
slice of the timesteps where needed (``first_index``, ``ends_chain``).

The noise rule
--------------
Which noise a sample sees is fixed by its seed alone:

1. **Chain noise.** Sample b's generator (``SeededNoise(seeds)``, one
   ``torch.Generator`` per seed) draws x_T first, then one z per step i = 0, 1, ..., in
   step order, except at the last step, which adds none. ``SeededNoise(seed)`` with one
   int draws the whole batch from one generator in the same order. A pipeline that must
   match diffusers draws through :class:`GeneratorNoise` instead (diffusers'
   ``randn_tensor`` order: the latents, then one z per step but the last).
2. **Shared by every method.** The loop reads step noise through one :class:`NoiseTape`,
   which draws step i once and remembers it; so every method run from the same seeds
   starts from the same x_T and sees the same z at every step.
3. **A method's own randomness** (a drawn expert, extra search candidates, a resampling
   choice) comes from :class:`SampleGenerators` streams seeded by ``derive_seed(seed,
   method name)``, per sample; it never touches the tape.
4. **Look-ahead.** Candidate 0 of a search continues with the loop's own noise (read
   from the tape at the steps' global indices), so a search over one candidate is the
   base sampler exactly; candidates 1..N-1 use the method's stream.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .gaussian import Gaussian
from .validation import (
    ArgumentKindError,
    check_callable,
    check_floating_tensor,
    check_int,
    check_seed,
    check_sequence,
)

__all__ = [
    "StepPolicy",
    "NoiseSampler",
    "SeededNoise",
    "NoiseTape",
    "GeneratorNoise",
    "SampleGenerators",
    "derive_seed",
    "check_seed_arg",
    "sample_chain",
]

StepPolicy = Callable[[Tensor, int], Gaussian]


class NoiseSampler(Protocol):
    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` for step ``step_index``."""


def _seed(value, name: str) -> int:
    """One seed: an int in [0, 2**63 - 1] (:data:`msdda.validation.MAX_SEED`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        where = "" if name == "seed" else f" at {name}"
        raise TypeError(f"each seed must be an int, got {type(value).__name__} ({value!r}){where}")
    return check_seed(value, name)


def check_seed_arg(seeds, name: str = "seeds") -> tuple[list[int], bool]:
    """``seeds`` as (list of seeds, per_sample): one int for the batch, or one seed per sample.

    Seeds are ints in [0, 2**63 - 1], the one range every domain and generator accepts.
    """
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return [check_seed(seeds, name)], False
    if isinstance(seeds, Tensor) and seeds.ndim == 1 and not seeds.is_floating_point():
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise TypeError(
            f"{name} must be an int or a non-empty sequence of ints, got {type(seeds).__name__}"
        )
    return [_seed(s, f"{name}[{i}]") for i, s in enumerate(seeds)], True


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, "seed"))


class SeededNoise:
    """Initial and step noise from seeds, drawn in a fixed order: x_T first, then z per step.

    ``SeededNoise(0)`` draws the whole batch from one generator; ``SeededNoise([3, 4, 5])``
    gives every sample its own generator (EDM style), so a sample's noise does not
    depend on the rest of the batch. Every method run from equal seeds sees equal noise
    provided it draws through this object once per step (the loop does that).
    Seeds are ints in [0, 2**63 - 1] (:func:`check_seed_arg`), as everywhere in msdda.
    """

    def __init__(self, seeds: int | Sequence[int]) -> None:
        values, self.per_sample = check_seed_arg(seeds)
        self._gens = [torch.Generator().manual_seed(s) for s in values]

    def _draw(self, shape: Sequence[int]) -> Tensor:
        shape = tuple(shape)
        if not self.per_sample:
            return torch.randn(shape, generator=self._gens[0])
        if shape[0] != len(self._gens):
            raise ValueError(
                f"batch of {shape[0]} samples for {len(self._gens)} seeds: the leading axis of "
                "the shape must equal len(seeds)"
            )
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self._gens])

    def initial(self, shape: Sequence[int]) -> Tensor:
        """x_T ~ N(0, I), float32, of the given (B, ...) shape."""
        return self._draw(shape)

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        return self._draw(like.shape).to(like)


class NoiseTape:
    """Step noise drawn once per step index, in order, and remembered.

    The sampling loop and a method that looks ahead (``code``, ``target``) read the
    same tape, so the noise of step i is one tensor whoever asks first; the draw order
    is that of the wrapped sampler, so a tape over ``SeededNoise(seeds)`` gives the
    loop exactly the noise ``SeededNoise(seeds)`` gives it directly.
    """

    def __init__(self, noise: NoiseSampler) -> None:
        self._noise = check_callable(noise, "noise", "a noise sampler (step_index, like) -> Tensor")
        self._tape: list[Tensor] = []

    def initial(self, shape: Sequence[int]) -> Tensor:
        if not hasattr(self._noise, "initial"):
            raise TypeError("noise (the wrapped noise sampler) has no initial(shape)")
        if self._tape:
            raise RuntimeError("initial() must be drawn before any step noise")
        return self._noise.initial(shape)

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        step_index = check_int(step_index, "step_index", low=0)
        while len(self._tape) <= step_index:
            self._tape.append(self._noise(len(self._tape), like))
        z = self._tape[step_index]
        if z.shape != like.shape:
            raise ValueError(
                f"step {step_index} noise has shape {tuple(z.shape)}, asked for {tuple(like.shape)}"
            )
        return z.to(like)

    @classmethod
    def seeded(cls, seeds: int | Sequence[int]) -> NoiseTape:
        return cls(SeededNoise(seeds))


class GeneratorNoise:
    """Step noise drawn as diffusers' schedulers draw it, from a pipeline's generator(s).

    ``randn_tensor(shape, generator, device, dtype)`` (diffusers), so a run with one
    expert sees exactly the noise ``StableDiffusionPipeline`` would with ``dtype`` the
    UNet's; returned in the state's dtype.
    """

    def __init__(self, generator, device: torch.device, dtype: torch.dtype) -> None:
        self.generator = generator
        self.device = device
        self.dtype = dtype

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        z = randn_tensor(
            tuple(like.shape), generator=self.generator, device=self.device, dtype=self.dtype
        )
        return z.to(like.dtype)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names (numpy SeedSequence): distinct inputs, distinct streams."""
    if not parts:
        raise ValueError("derive_seed needs at least one part (an int or a str)")
    entropy = []
    for i, p in enumerate(parts):
        if isinstance(p, str):
            entropy.extend(p.encode())
        elif isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            if p < 0:
                entropy.extend([1, -int(p)])
            else:
                entropy.append(int(p))
        else:
            raise TypeError(
                f"seed parts must be ints or strings: parts[{i}] is {p!r} ({type(p).__name__})"
            )
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


class SampleGenerators:
    """A method's own randomness: one generator per sample (or one for the batch).

    Seeded from the samples' seeds and a stream name, so it never touches the step
    noise and a sample's draws do not depend on the rest of its batch.
    """

    UNIFORM_BLOCK = 64  # uniforms drawn per generator at a time (one draw per call is slow)

    def __init__(self, seeds: int | Sequence[int], stream: str) -> None:
        values, self.per_sample = check_seed_arg(seeds)
        if not isinstance(stream, str):
            raise TypeError(f"stream must be a str (a method name), got {type(stream).__name__}")
        self._gens = [torch.Generator().manual_seed(derive_seed(s, stream)) for s in values]
        self._uniforms: Tensor | None = None  # (B, UNIFORM_BLOCK) not yet used
        self._used = 0

    def _check(self, batch: int) -> None:
        if self.per_sample and batch != len(self._gens):
            raise ValueError(
                f"batch of {batch} samples for {len(self._gens)} seeds: the batch must equal "
                "len(seeds)"
            )

    def randn(self, n: int, like: Tensor) -> Tensor:
        """(n, B, ...) standard normal draws, sample b's from its own generator."""
        n = check_int(n, "n", low=0)
        self._check(like.shape[0])
        if not self.per_sample:
            return torch.randn((n, *like.shape), generator=self._gens[0]).to(like)
        per = [torch.randn((n, *like.shape[1:]), generator=g) for g in self._gens]
        return torch.stack(per, dim=1).to(like)

    def uniform(self, batch: int) -> Tensor:
        """(B,) float64 uniforms on [0, 1), sample b's from its own generator."""
        batch = check_int(batch, "batch", low=0)
        self._check(batch)
        if not self.per_sample:
            return torch.rand(batch, generator=self._gens[0], dtype=torch.float64)
        if self._uniforms is None or self._used == self.UNIFORM_BLOCK:
            block = self.UNIFORM_BLOCK
            self._uniforms = torch.stack(
                [torch.rand(block, generator=g, dtype=torch.float64) for g in self._gens]
            )
            self._used = 0
        u = self._uniforms[:, self._used]
        self._used += 1
        return u

    def categorical(self, probs: Tensor) -> Tensor:
        """(B,) indices, row b drawn from the distribution ``probs[b]`` (B, M) (inverse CDF)."""
        probs = probs.detach().to(torch.float64).cpu()
        cdf = probs.cumsum(dim=1)
        u = self.uniform(probs.shape[0]) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None], right=True).flatten()
        return pick.clamp_max(probs.shape[1] - 1)


def sample_chain(
    step: StepPolicy,
    x_T: Tensor,
    timesteps: Sequence[int],
    noise: NoiseSampler,
    *,
    callback: Callable[[int, int, Tensor], None] | None = None,
    first_index: int = 0,
    ends_chain: bool = True,
) -> Tensor:
    """Run the reverse chain x_T -> x_0 (or a slice of it) with the policy ``step``.

    Args:
        step: the method, ``(x_t, t) -> Gaussian``.
        x_T: (B, ...) state before the first of ``timesteps`` (initial noise for a whole chain).
        timesteps: the timesteps to run, noisiest first: the schedule's, or a slice of them.
        noise: step noise; step i of the slice reads ``noise(first_index + i, x)``.
        callback: called as ``callback(first_index + i, t, x_{t-1})`` after every step
            (progress, logging, or collecting the visited states).
        first_index: index of ``timesteps[0]`` in the full schedule (0 for a whole chain).
        ends_chain: whether the slice's last step is the chain's last, which adds no noise.

    Returns:
        The state after the last of ``timesteps``.

    Raises:
        TypeError, ValueError: naming the argument, before any step is taken, for a
            ``step``, ``noise`` or ``callback`` that is not callable, an ``x_T`` that is not
            a floating tensor, ``timesteps`` that are not a non-empty sequence of ints, or
            a bad ``first_index`` / ``ends_chain``; at a step, for a step that does not
            return a :class:`~msdda.Gaussian` shaped like the state.
    """
    timesteps = _check_chain_arguments(
        step, x_T, timesteps, noise, callback, first_index, ends_chain
    )
    x = x_T
    last = len(timesteps) - 1 if ends_chain else len(timesteps)
    for i, t in enumerate(timesteps):
        g = _checked_step(step(x, t), x, t)
        x = g.sample(noise(first_index + i, x)) if i < last else g.mean
        if callback is not None:
            callback(first_index + i, t, x)
    return x


def _check_chain_arguments(
    step, x_T, timesteps, noise, callback, first_index, ends_chain
) -> list[int]:
    """Every argument of :func:`sample_chain` checked; the timesteps as ints."""
    check_callable(step, "step", "a step policy (x_t, t) -> Gaussian")
    check_floating_tensor(x_T, "x_T")
    if isinstance(timesteps, Tensor) and timesteps.is_floating_point():
        raise TypeError(f"timesteps must be a sequence of ints, got a {timesteps.dtype} tensor")
    timesteps = [
        check_int(t, f"timesteps[{i}]")
        for i, t in enumerate(check_sequence(timesteps, "timesteps"))
    ]
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty")
    check_callable(noise, "noise", "a noise sampler (step_index, like) -> Tensor")
    if callback is not None:
        check_callable(callback, "callback", "a callable (step_index, t, x) or None")
    if isinstance(first_index, bool) or not isinstance(first_index, numbers.Integral):
        raise ArgumentKindError(f"first_index must be an int >= 0, got {first_index!r}")
    if first_index < 0:
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    if not isinstance(ends_chain, bool):
        raise TypeError(f"ends_chain must be a bool, got {type(ends_chain).__name__}")
    return timesteps


def _checked_step(g, x: Tensor, t: int) -> Gaussian:
    """The step policy's output ``g`` at (x, t), refused unless a Gaussian shaped like x."""
    if not isinstance(g, Gaussian):
        raise TypeError(
            f"step must return a msdda.Gaussian (mean, variance), got {type(g).__name__} "
            f"at timestep {t}"
        )
    if g.mean.shape != x.shape:
        raise ValueError(
            f"step returned a mean of shape {tuple(g.mean.shape)} for x_t of {tuple(x.shape)}"
        )
    return g
