"""What every sampling method shares: the problem, shared noise, own randomness, counting.

A method is built for one :class:`MethodContext` (schedule, reference, experts,
objective rewards), one weight vector and one condition, and is then a step policy
for :func:`msdda.sample_chain`. All methods of a comparison draw their step noise
from one :class:`NoiseTape`, so they see identical noise; a method that needs more
randomness (a drawn expert, extra candidates, a resampling choice) draws it from its
own :class:`SampleGenerators`, never from the tape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..experts import Expert
from ..fusion import Gaussian, fusion_coefficients
from ..gaussians import Schedule
from ..rewards import Reward
from ..sampling import NoiseSampler, SeededNoise

__all__ = [
    "MethodContext",
    "EvalCounter",
    "NoiseTape",
    "SampleGenerators",
    "derive_seed",
    "point_mass",
    "repeat_cond",
    "check_weights",
    "weight_key",
]


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True, eq=False)
class MethodContext:
    """One alignment problem, as every method sees it.

    ``rewards[i]`` is the objective the expert ``experts[i]`` was aligned to; rewards
    score clean samples: ``(decode(x0) (B, ...), cond) -> (B,)``, and must be
    differentiable in the images for ``rgg``.
    """

    schedule: Schedule  # the sampling schedule every expert shares
    reference: Expert  # the base model p_ref
    experts: tuple[Expert, ...]  # single-objective experts p_1..p_K
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)
    rewards: tuple[Reward, ...] = ()  # objectives r_1..r_K (needed by rgg, code, target)
    decode: Callable[[Tensor], Tensor] = _identity  # model space -> reward input
    oracles: Mapping[tuple[float, ...], Expert] = field(default_factory=dict)  # by weights
    kl_coef: float | None = None  # target beta; default the experts' common beta
    dtype: torch.dtype = torch.float32  # dtype of x_T and of the chain

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError("schedule must be a msdda.Schedule")
        if not isinstance(self.reference, Expert):
            raise TypeError("reference must be a msdda.Expert")
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))
        if not self.experts:
            raise ValueError("experts is empty: a multi-objective problem needs K >= 1 experts")
        for i, e in enumerate(self.experts):
            if not isinstance(e, Expert):
                raise TypeError(f"experts[{i}] must be a msdda.Expert, got {type(e).__name__}")
        if self.rewards and len(self.rewards) != len(self.experts):
            raise ValueError(
                f"rewards has {len(self.rewards)} entries, expected one per expert "
                f"(K = {len(self.experts)})"
            )
        for i, r in enumerate(self.rewards):
            if not callable(r):
                raise TypeError(f"rewards[{i}] must be callable (images, cond) -> (B,)")
        for key, e in self.oracles.items():
            if len(key) != len(self.experts) or not isinstance(e, Expert):
                raise ValueError(
                    f"oracles must map K = {len(self.experts)} weights to an Expert, got {key!r}"
                )

    @property
    def num_objectives(self) -> int:
        return len(self.experts)

    def coefficients(self, weights):
        """lambda_i = w_i beta_i / beta and lambda_0 for these weights (see msdda.fusion)."""
        return fusion_coefficients(
            weights,
            [e.kl_coef for e in self.experts],
            self.kl_coef,
            num_experts=len(self.experts),
        )

    def target_kl_coef(self) -> float:
        """The target beta: ``kl_coef`` or the experts' common coefficient."""
        if self.kl_coef is not None:
            return float(self.kl_coef)
        betas = {float(e.kl_coef) for e in self.experts}
        if len(betas) != 1:
            raise ValueError(f"kl_coef is required when the experts' kl_coefs differ: {betas}")
        return betas.pop()

    def require_rewards(self, method: str) -> None:
        if not self.rewards:
            raise ValueError(f"method {method!r} needs the objective rewards: context.rewards")

    def counted(self, counter: EvalCounter) -> MethodContext:
        """The same problem with every denoiser and reward counted by ``counter``."""

        def expert(e: Expert) -> Expert:
            return replace(e, denoiser=counter.wrap_denoiser(e.denoiser))

        return replace(
            self,
            reference=expert(self.reference),
            experts=tuple(expert(e) for e in self.experts),
            oracles={k: expert(e) for k, e in self.oracles.items()},
            rewards=tuple(counter.wrap_reward(r) for r in self.rewards),
        )


class EvalCounter:
    """Counts network evaluations: rows passed through denoisers and through rewards.

    ``denoiser_rows / images`` is the number of network evaluations per image (a
    backward pass, as in ``rgg``, is not counted here).
    """

    def __init__(self) -> None:
        self.denoiser_rows = 0
        self.reward_rows = 0

    def wrap_denoiser(self, denoiser):
        def counted(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            self.denoiser_rows += int(x_t.shape[0])
            return denoiser(x_t, t, cond)

        counted.__wrapped__ = getattr(denoiser, "__wrapped__", denoiser)
        counted.counter = self
        return counted

    def wrap_reward(self, reward):
        def counted(images: Tensor, cond: Any = None) -> Tensor:
            self.reward_rows += int(images.shape[0])
            return reward(images, cond)

        counted.__wrapped__ = getattr(reward, "__wrapped__", reward)
        return counted


def unwrap(fn):
    """The object a counting wrapper stands for (the function itself when not wrapped)."""
    return getattr(fn, "__wrapped__", fn)


class NoiseTape:
    """Step noise drawn once per step index, in order, and remembered.

    The sampling loop and a method that looks ahead (``code``, ``target``) read the
    same tape, so the noise of step i is one tensor whoever asks first; the draw order
    is that of the wrapped sampler, so a tape over ``SeededNoise(seeds)`` gives the
    loop exactly the noise ``SeededNoise(seeds)`` gives it directly.
    """

    def __init__(self, noise: NoiseSampler) -> None:
        self._noise = noise
        self._tape: list[Tensor] = []

    def initial(self, shape: Sequence[int]) -> Tensor:
        if not hasattr(self._noise, "initial"):
            raise TypeError("the wrapped noise sampler has no initial(shape)")
        if self._tape:
            raise RuntimeError("initial() must be drawn before any step noise")
        return self._noise.initial(shape)

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        if step_index < 0:
            raise ValueError(f"step_index must be >= 0, got {step_index}")
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


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names (numpy SeedSequence): distinct inputs, distinct streams."""
    entropy = []
    for p in parts:
        if isinstance(p, str):
            entropy.extend(p.encode())
        elif isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            if p < 0:
                entropy.extend([1, -int(p)])
            else:
                entropy.append(int(p))
        else:
            raise TypeError(f"seed parts must be ints or strings, got {p!r}")
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


class SampleGenerators:
    """A method's own randomness: one generator per sample (or one for the batch).

    Seeded from the samples' seeds and a stream name, so it never touches the step
    noise and a sample's draws do not depend on the rest of its batch.
    """

    UNIFORM_BLOCK = 64  # uniforms drawn per generator at a time (one draw per call is slow)

    def __init__(self, seeds: int | Sequence[int], stream: str) -> None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            self._gens = [torch.Generator().manual_seed(derive_seed(seeds, stream))]
            self.per_sample = False
        else:
            if not isinstance(seeds, Sequence) or isinstance(seeds, (str, bytes)) or not seeds:
                raise TypeError("seeds must be an int or a non-empty sequence of ints")
            self._gens = [torch.Generator().manual_seed(derive_seed(s, stream)) for s in seeds]
            self.per_sample = True
        self._uniforms: Tensor | None = None  # (B, UNIFORM_BLOCK) not yet used
        self._used = 0

    def _check(self, batch: int) -> None:
        if self.per_sample and batch != len(self._gens):
            raise ValueError(f"batch of {batch} samples for {len(self._gens)} seeds")

    def randn(self, n: int, like: Tensor) -> Tensor:
        """(n, B, ...) standard normal draws, sample b's from its own generator."""
        self._check(like.shape[0])
        if not self.per_sample:
            return torch.randn((n, *like.shape), generator=self._gens[0]).to(like)
        per = [torch.randn((n, *like.shape[1:]), generator=g) for g in self._gens]
        return torch.stack(per, dim=1).to(like)

    def uniform(self, batch: int) -> Tensor:
        """(B,) float64 uniforms on [0, 1), sample b's from its own generator."""
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


def point_mass(x: Tensor) -> Gaussian:
    """The step that lands exactly on ``x`` (the loop adds sqrt(0) * z = 0)."""
    return Gaussian(x, torch.zeros_like(x))


def repeat_cond(cond: Any, n: int) -> Any:
    """The condition of ``n`` stacked copies of a batch (copy-major, like ``torch.cat([x] * n)``)."""
    if cond is None or n == 1:
        return cond
    if isinstance(cond, Tensor):
        return torch.cat([cond] * n) if cond.ndim else cond
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * n)
    return cond


def check_weights(weights, k: int, name: str = "weights") -> tuple[float, ...]:
    """K finite, non-negative preference weights on the simplex (summing to 1), as floats."""
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a sequence of {k} numbers, got {type(weights).__name__}")
    if len(weights) != k:
        raise ValueError(f"{name} must hold one weight per objective (K = {k}), got {len(weights)}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name}[{i}] must be a number, got {w!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{name}[{i}] = {w} must be a finite number >= 0")
        out.append(w)
    if abs(math.fsum(out) - 1.0) > 1e-6:
        raise ValueError(f"{name} = {out} must lie on the simplex (sum to 1), sum = {sum(out):.6g}")
    return tuple(out)


def weight_key(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights rounded for use as a dictionary key (oracles, result rows)."""
    return tuple(round(float(w), 9) for w in weights)
