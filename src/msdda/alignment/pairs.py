"""Reference rollouts and candidate pairs, computed once and relabelled per objective.

Every expert and every oracle is trained on the *same* states and actions: reference
chains x_T -> x_0 (the core's :func:`msdda.sample_chain`), and at each training step
pairs of actions a, b ~ p_ref(.|x_t) scored by every reward at once. An expert and an
oracle differ only in how those rewards become labels (:meth:`PairSet.weighted_rewards`).

The step reward of an action x_{t-1} is the reward of the reference model's Tweedie
estimate x0_hat(x_{t-1}) at the landing timestep (x_{t-1} itself after the last step):
the definition of :func:`msdda.rewards.tweedie_step_reward`, which the ``target`` method
uses too.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..experts import Expert, expert_policy
from ..fusion import Gaussian
from ..gaussians import Schedule
from ..rewards import Reward, tweedie_x0
from ..sampling import SeededNoise, sample_chain
from ..validation import (
    MAX_SEED,
    ArgumentKindError,
    check_callable,
    check_int,
    check_number,
    check_seed,
    check_sequence,
    compat_check,
)

__all__ = [
    "StepRewards",
    "PairSet",
    "tweedie_step_rewards",
    "training_step_indices",
    "collect_pairs",
]

#: ``(x_prev (B, ...), t_prev, cond) -> {name: (B,) reward}``: several step rewards of the
#: same actions (t_prev < 0: x_prev is the clean sample).
StepRewards = Callable[[Tensor, int, Any], Mapping[str, Tensor]]


def tweedie_step_rewards(
    rewards: Mapping[str, Reward],
    denoiser,
    schedule: Schedule,
    decode: Callable[[Tensor], Tensor] = lambda x: x,
    prediction_type: str = "epsilon",
) -> StepRewards:
    """Every reward of decode(x0_hat_ref(x_prev)), one denoiser forward for all of them.

    Name by name equal to :func:`msdda.rewards.tweedie_step_reward`.
    """
    if not isinstance(rewards, Mapping):
        raise TypeError(
            f"rewards must be a mapping of names to rewards, got {type(rewards).__name__}"
        )
    if not rewards:
        raise ValueError("rewards is empty: give at least one named reward")
    for name, reward in rewards.items():
        check_callable(reward, f"rewards[{name!r}]", "a reward (images, cond) -> (B,)")
    check_callable(denoiser, "denoiser", "a denoiser (x_t, t, cond) -> model output")
    check_callable(decode, "decode", "a callable (x) -> images")

    @torch.no_grad()
    def step_rewards(x_prev: Tensor, t_prev: int, cond: Any) -> dict[str, Tensor]:
        images = decode(tweedie_x0(denoiser, x_prev, t_prev, cond, schedule, prediction_type))
        return {name: reward(images, cond).detach() for name, reward in rewards.items()}

    return step_rewards


@dataclass(frozen=True, eq=False)
class PairSet:
    """N candidate pairs (a, b) at reference states x_t, with every reward of each action."""

    states: Tensor  # (N, C, ...) x_t of each pair
    timesteps: Tensor  # (N,) long: timestep t of the state
    step_indices: Tensor  # (N,) long: index of t in the schedule (0 = noisiest)
    cond: Tensor | None  # (N, ...) condition of each pair (a prompt, a class), or None
    action_a: Tensor  # (N, C, ...) x_{t-1} ~ p_ref(.|x_t)
    action_b: Tensor  # (N, C, ...) another independent draw
    reference_mean: Tensor  # (N, C, ...) mean of p_ref(.|x_t)
    reference_variance: Tensor  # (N, C, ...) its per-element variance
    rewards_a: Mapping[str, Tensor]  # reward name -> (N,) step reward of a
    rewards_b: Mapping[str, Tensor]  # reward name -> (N,) step reward of b

    def __post_init__(self) -> None:
        n = self.states.shape[0]
        for name in ("action_a", "action_b", "reference_mean", "reference_variance"):
            if getattr(self, name).shape != self.states.shape:
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected the "
                    f"states' {tuple(self.states.shape)}"
                )
        for name in ("timesteps", "step_indices"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if self.cond is not None and self.cond.shape[0] != n:
            raise ValueError(f"cond has {self.cond.shape[0]} rows for {n} pairs")
        if set(self.rewards_a) != set(self.rewards_b) or not self.rewards_a:
            raise ValueError("rewards_a and rewards_b must name the same, non-empty rewards")
        for side in (self.rewards_a, self.rewards_b):
            for name, r in side.items():
                if r.shape != (n,):
                    raise ValueError(f"reward {name!r} must have shape ({n},)")

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def reward_names(self) -> tuple[str, ...]:
        return tuple(self.rewards_a)

    @property
    def reference(self) -> Gaussian:
        return Gaussian(self.reference_mean, self.reference_variance)

    def weighted_rewards(self, weights: Mapping[str, float]) -> tuple[Tensor, Tensor]:
        """(r(a), r(b)) for r = sum_i w_i r_i, each (N,); names must be among the rewards."""
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"weights must map reward names to numbers, got {type(weights).__name__}"
            )
        if not weights:
            raise ValueError("weights is empty: name at least one reward")
        unknown = sorted(set(weights) - set(self.rewards_a))
        if unknown:
            raise ValueError(
                f"weights name unknown reward(s) {unknown}; this pair set has {list(self.reward_names)}"
            )
        # A bool or a string is a TypeError that is also a ValueError, as it always was.
        w = {k: compat_check(check_number, v, f"weights[{k!r}]") for k, v in weights.items()}
        r_a = sum(v * self.rewards_a[k] for k, v in w.items())
        r_b = sum(v * self.rewards_b[k] for k, v in w.items())
        return r_a, r_b

    def subset(self, index: Tensor) -> PairSet:
        """The pairs at ``index`` (a long or boolean tensor over N)."""
        return PairSet(
            states=self.states[index],
            timesteps=self.timesteps[index],
            step_indices=self.step_indices[index],
            cond=None if self.cond is None else self.cond[index],
            action_a=self.action_a[index],
            action_b=self.action_b[index],
            reference_mean=self.reference_mean[index],
            reference_variance=self.reference_variance[index],
            rewards_a={k: v[index] for k, v in self.rewards_a.items()},
            rewards_b={k: v[index] for k, v in self.rewards_b.items()},
        )


def training_step_indices(schedule: Schedule, skip_last: int) -> tuple[int, ...]:
    """Indices of the schedule's steps to train on: all but the last ``skip_last``.

    The final steps are nearly deterministic: their tiny variances make log-ratios
    explode, and their tilt (a mean shift of about variance * grad r / beta) is negligible,
    so the reference is already their optimum (docs/design.md §4).
    """
    n = len(schedule.timesteps)
    if isinstance(skip_last, bool) or not isinstance(skip_last, numbers.Integral):
        raise ArgumentKindError(f"skip_last must be an int in [0, {n - 1}], got {skip_last!r}")
    if not 0 <= skip_last < n:
        raise ValueError(f"skip_last must be an int in [0, {n - 1}], got {skip_last!r}")
    skip_last = int(skip_last)
    return tuple(range(n - skip_last))


def _tile(cond: Any, times: int) -> Any:
    if cond is None:
        return None
    if not isinstance(cond, Tensor):
        raise TypeError(
            f"cond must be a tensor with a leading batch axis or None, got {type(cond).__name__}"
        )
    return cond.repeat(times, *([1] * (cond.ndim - 1)))


class _PairRecorder:
    """Draws and scores the candidate pairs at the visited reference states, and keeps them."""

    def __init__(
        self,
        step_rewards: StepRewards,
        schedule: Schedule,
        wanted: dict[int, int],
        pairs_per_state: int,
        draw: torch.Generator,
    ) -> None:
        self.step_rewards, self.schedule = step_rewards, schedule
        self.wanted = wanted  # timestep -> its index in the schedule
        self.pairs_per_state, self.draw = pairs_per_state, draw
        self.rows: dict[str, list] = {k: [] for k in ("x", "t", "i", "c", "a", "b", "m", "v")}
        self.rewards: dict[str, list[list[Tensor]]] = {}

    def record(self, x_t: Tensor, t: int, g: Gaussian, c: Tensor | None) -> None:
        """2P draws a, b ~ g at the states x_t (B, ...), scored by every reward."""
        rows, p, i, b = self.rows, self.pairs_per_state, self.wanted[t], x_t.shape[0]
        z = torch.randn((2 * p, *x_t.shape), generator=self.draw)
        actions = g.sample(z.to(g.mean))  # (2P, B, ...) draws of the reference step
        scores = self.step_rewards(
            actions.reshape(-1, *x_t.shape[1:]), self.schedule.prev_timesteps[i], _tile(c, 2 * p)
        )
        for name, s in scores.items():
            s = s.reshape(2, p * b).detach().cpu()
            self.rewards.setdefault(name, [[], []])
            self.rewards[name][0].append(s[0])
            self.rewards[name][1].append(s[1])
        actions = actions.reshape(2, p * b, *x_t.shape[1:]).cpu()
        rows["a"].append(actions[0])
        rows["b"].append(actions[1])
        reps = (p, *([1] * (x_t.ndim - 1)))
        rows["x"].append(x_t.detach().cpu().repeat(reps))
        rows["m"].append(g.mean.detach().cpu().repeat(reps))
        rows["v"].append(g.variance.detach().cpu().repeat(reps))
        rows["t"].append(torch.full((p * b,), t, dtype=torch.long))
        rows["i"].append(torch.full((p * b,), i, dtype=torch.long))
        if c is not None:
            rows["c"].append(_tile(c, p).cpu())

    def pair_set(self) -> PairSet:
        rows, rewards = self.rows, self.rewards
        return PairSet(
            states=torch.cat(rows["x"]),
            timesteps=torch.cat(rows["t"]),
            step_indices=torch.cat(rows["i"]),
            cond=torch.cat(rows["c"]) if rows["c"] else None,
            action_a=torch.cat(rows["a"]),
            action_b=torch.cat(rows["b"]),
            reference_mean=torch.cat(rows["m"]),
            reference_variance=torch.cat(rows["v"]),
            rewards_a={k: torch.cat(v[0]) for k, v in rewards.items()},
            rewards_b={k: torch.cat(v[1]) for k, v in rewards.items()},
        )


def collect_pairs(
    reference: Expert,
    schedule: Schedule,
    step_rewards: StepRewards,
    *,
    shape: Sequence[int],
    num_chains: int,
    pairs_per_state: int = 1,
    steps: Sequence[int] | None = None,
    cond: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> PairSet:
    """Roll out the reference and draw scored candidate pairs at its states.

    Args:
        reference: the reference model (its denoiser and step spec).
        schedule: the sampling schedule the experts will run on.
        step_rewards: every reward of a batch of actions (:func:`tweedie_step_rewards`).
        shape: (C, ...) of one sample, e.g. (1, 8, 8).
        num_chains: reference chains to roll out.
        pairs_per_state: independent pairs drawn at each visited state.
        steps: schedule step indices to draw pairs at (default all but the last 5%).
        cond: (num_chains, ...) condition of each chain, or None.
        seed: seeds the chains' noise and the candidate draws.
        batch_size: chains rolled out together.
        dtype: dtype of the chains (float64 for exactness checks).

    Returns:
        A :class:`PairSet` with num_chains * len(steps) * pairs_per_state pairs, on CPU.
    """
    _check_collect_arguments(
        reference, schedule, step_rewards, num_chains, pairs_per_state, batch_size
    )
    shape, seed = _check_sample_arguments(shape, seed, dtype, cond, num_chains)
    recorder = _PairRecorder(
        step_rewards,
        schedule,
        {schedule.timesteps[i]: i for i in _collect_steps(steps, schedule)},
        pairs_per_state,
        torch.Generator().manual_seed((seed + 7919) % (MAX_SEED + 1)),
    )
    for start in range(0, num_chains, batch_size):
        stop = min(start + batch_size, num_chains)
        c = None if cond is None else cond[start:stop]
        noise = SeededNoise((seed * 1_000_003 + start) % (MAX_SEED + 1))  # in the seed range
        x_T = noise.initial((stop - start, *shape)).to(dtype)
        recording = _recording(expert_policy(reference, schedule, c), recorder, c)
        sample_chain(recording, x_T, schedule.timesteps, noise)
    return recorder.pair_set()


def _recording(policy, recorder: _PairRecorder, c: Tensor | None):
    """``policy``, recording pairs at the states it visits at the wanted timesteps."""

    @torch.no_grad()
    def recording(x_t: Tensor, t: int) -> Gaussian:
        g = policy(x_t, t)
        if t in recorder.wanted:
            recorder.record(x_t, t, g, c)
        return g

    return recording


def _check_collect_arguments(
    reference, schedule, step_rewards, num_chains, pairs_per_state, batch_size
) -> None:
    """What :func:`collect_pairs` rolls out and scores, and how many."""
    if not isinstance(reference, Expert):
        raise TypeError(f"reference must be an msdda Expert, got {type(reference).__name__}")
    for name, v in (
        ("num_chains", num_chains),
        ("pairs_per_state", pairs_per_state),
        ("batch_size", batch_size),
    ):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ArgumentKindError(f"{name} must be a positive int, got {v!r}")
        if v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a msdda.Schedule, got {type(schedule).__name__}")
    check_callable(
        step_rewards, "step_rewards", "step rewards (x_prev, t_prev, cond) -> {name: (B,)}"
    )


def _check_sample_arguments(shape, seed, dtype, cond, num_chains) -> tuple[tuple[int, ...], int]:
    """The samples' shape and seed, checked along with their dtype and condition."""
    shape = tuple(
        check_int(v, f"shape[{i}]", low=1) for i, v in enumerate(check_sequence(shape, "shape"))
    )
    seed = check_seed(seed)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != num_chains):
        raise ValueError(f"cond must be a tensor with num_chains = {num_chains} rows or None")
    return shape, seed


def _collect_steps(steps: Sequence[int] | None, schedule: Schedule) -> list[int]:
    """The sorted, distinct step indices to draw pairs at (default all but the last 5%)."""
    if steps is None:
        steps = training_step_indices(schedule, max(1, len(schedule.timesteps) // 20))
    steps = sorted(
        {
            compat_check(check_int, i, f"steps[{j}]")
            for j, i in enumerate(check_sequence(steps, "steps"))
        }
    )
    if not steps or steps[0] < 0 or steps[-1] >= len(schedule.timesteps):
        raise ValueError(
            f"steps must be indices in [0, {len(schedule.timesteps) - 1}], got {steps}"
        )
    return steps
