"""What every sampling method shares: the problem, shared noise, own randomness, counting.

A method is built for one :class:`MethodContext` (schedule, reference, experts,
objective rewards), one weight vector and one condition, and is then a step policy
for :func:`msdda.sample_chain`. The noise each sample sees follows the one rule of
:mod:`msdda.sampling` (where :class:`NoiseTape`, :class:`SampleGenerators` and
:func:`derive_seed` live; they are re-exported here): all methods of a comparison read
their step noise from one tape, and a method's own randomness comes from its own
stream, never from the tape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..experts import Denoiser, Expert, JointDenoiser, Member
from ..fusion import Gaussian, fusion_coefficients
from ..gaussians import Schedule
from ..rewards import Reward
from ..sampling import NoiseTape, SampleGenerators, derive_seed  # re-exported here
from ..validation import (
    check_int,
    check_number,
    check_positive,
    check_sequence,
    check_simplex_weights,
)

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
    #: members (expert indices, None = reference) evaluated in one call; msdda and db use it
    joint: JointDenoiser | None = None
    #: (members, coefficients) -> the denoiser with parameters sum_j c_j theta_j (rs);
    #: None: :func:`parameter_soup` of the members' ``nn.Module`` denoisers
    soup: Callable[[tuple[Member, ...], tuple[float, ...]], Denoiser] | None = None
    device: torch.device | str = "cpu"  # where x_T is put (the models' device)
    #: weights -> the weight-conditioned student at those weights (the ``student`` method,
    #: :mod:`msdda.student`); None: the domain has no trained student
    student: Callable[[tuple[float, ...]], Expert] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError("schedule must be a msdda.Schedule")
        if not isinstance(self.reference, Expert):
            raise TypeError("reference must be a msdda.Expert")
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "rewards", tuple(self.rewards))
        shape = check_sequence(self.sample_shape, "sample_shape")
        object.__setattr__(
            self,
            "sample_shape",
            tuple(check_int(v, f"sample_shape[{i}]", low=1) for i, v in enumerate(shape)),
        )
        if self.kl_coef is not None:
            check_positive(self.kl_coef, "kl_coef")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if not isinstance(self.device, (torch.device, str)):
            raise TypeError(f"device must be a torch.device or a str, got {self.device!r}")
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except RuntimeError as err:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from err
        if not callable(self.decode):
            raise TypeError("decode must be callable: model space -> reward input")
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
        for name in ("joint", "soup", "student"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable or None")

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
        """The same problem with every denoiser, joint call, soup and reward counted by ``counter``.

        A joint call counts its rows once per member asked for.
        """

        def expert(e: Expert) -> Expert:
            return replace(e, denoiser=counter.wrap_denoiser(e.denoiser))

        soup = self.soup
        if soup is not None:

            def soup(members, coefficients, _soup=self.soup):
                return counter.wrap_denoiser(_soup(members, coefficients))

        student = self.student
        if student is not None:

            def student(weights, _student=self.student):
                return expert(_student(weights))

        return replace(
            self,
            student=student,
            reference=expert(self.reference),
            experts=tuple(expert(e) for e in self.experts),
            oracles={k: expert(e) for k, e in self.oracles.items()},
            rewards=tuple(counter.wrap_reward(r) for r in self.rewards),
            joint=None if self.joint is None else counter.wrap_joint(self.joint),
            soup=soup,
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

    def wrap_joint(self, joint: JointDenoiser) -> JointDenoiser:
        def counted(x_t: Tensor, t: Tensor, cond: Any, members: Sequence[Member]):
            self.denoiser_rows += int(x_t.shape[0]) * len(members)
            return joint(x_t, t, cond, members)

        counted.__wrapped__ = getattr(joint, "__wrapped__", joint)
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


#: Former name of :meth:`msdda.Gaussian.point_mass` (kept as an alias).
point_mass = Gaussian.point_mass


def repeat_cond(cond: Any, n: int) -> Any:
    """The condition of ``n`` stacked copies of a batch (copy-major, like ``torch.cat([x] * n)``)."""
    if cond is None or n == 1:
        return cond
    if hasattr(cond, "repeat") and not isinstance(cond, Tensor):
        return cond.repeat(n)
    if isinstance(cond, Tensor):
        return torch.cat([cond] * n) if cond.ndim else cond
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * n)
    return cond


#: K preference weights on the simplex, as floats: :func:`msdda.validation.check_simplex_weights`
#: (this name is kept as an alias).
check_weights = check_simplex_weights


def weight_key(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights rounded for use as a dictionary key (oracles, result rows)."""
    return tuple(round(float(w), 9) for w in weights)


# What the method builders share (msdda.methods.strategies and msdda.methods.search).


def check_context(ctx: MethodContext) -> None:
    """Refuse anything but a :class:`MethodContext` as a builder's ``ctx``."""
    if not isinstance(ctx, MethodContext):
        raise TypeError(f"ctx must be a MethodContext, got {type(ctx).__name__}")


def step_index(ctx: MethodContext) -> Callable[[int], int]:
    """``t -> i``: the index of timestep t in ``ctx.schedule`` (a ValueError if it has none)."""
    index = {int(t): i for i, t in enumerate(ctx.schedule.timesteps)}

    def lookup(t: int) -> int:
        if int(t) not in index:
            raise ValueError(
                f"timestep {t} is not in this schedule: t must be one of ctx.schedule.timesteps"
            )
        return index[int(t)]

    return lookup


def t_batch(x: Tensor, t: int) -> Tensor:
    """The timestep t once per row of x, (B,) long on x's device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def weighted_reward(ctx: MethodContext, weights: Sequence[float]) -> Reward:
    """``(images, cond) -> sum_i w_i r_i(images, cond)`` over the objectives of nonzero weight."""
    items = check_sequence(weights, "weights")
    if len(items) != len(ctx.rewards):
        raise ValueError(
            f"weights must hold one weight per objective (K = {len(ctx.rewards)}), got {len(items)}"
        )
    items = [check_number(w, f"weights[{i}]") for i, w in enumerate(items)]
    active = [(w, r) for w, r in zip(items, ctx.rewards, strict=True) if w != 0]

    def reward(images: Tensor, cond: Any) -> Tensor:
        total = None
        for w, r in active:
            term = w * r(images, cond)
            total = term if total is None else total + term
        return total

    return reward
