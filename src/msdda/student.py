"""A weight-conditioned student distilled from MSDDA by the closed-form Gaussian KL.

MSDDA costs K expert evaluations per step. For every preference weight w it also gives,
in closed form and from the experts alone, the optimal reverse step p_w(x_{t-1} | x_t)
(:mod:`msdda.fusion`). A *student* is one model conditioned on w: the base plus a
low-rank adapter plus a weight embedding (:class:`WeightEmbedding`, zero at
initialisation, so the untrained student is the base bit for bit). It is fitted by

    L(theta) = E_w E_{x_t ~ visited} sum_t KL( p_w(. | x_t) || q_theta(. | x_t, w) )

with the KL of two diagonal Gaussians computed exactly (:func:`step_kl`), at states
visited by the MSDDA teacher's chains and, for coverage, by the student's own chains.
No reward model is read. The weights of an iteration are the simplex's vertices, its
centre and uniform draws (:func:`distillation_weights`). Afterwards the student costs one
forward per step for every weight.

This module is domain-independent: a domain gives a :class:`DistillationProblem` (the
teacher's and the student's steps, the schedule, how to draw conditions) and
:func:`distill` trains it. The digits student is :mod:`msdda.digits.student`, the
Stable Diffusion (UNet LoRA) student :mod:`msdda.sd.student`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .gaussian import Gaussian, kl_divergence
from .gaussians import Schedule
from .sampling import StepPolicy, sample_chain
from .validation import check_callable, check_int, check_number, check_seed

__all__ = [
    "WeightEmbedding",
    "distillation_weights",
    "step_kl",
    "DistillConfig",
    "DistillationProblem",
    "DistillRecord",
    "DistillResult",
    "visited_steps",
    "distillation_loss",
    "distill",
]

#: The most objectives a student is conditioned on.
MAX_OBJECTIVES = 64


class WeightEmbedding(nn.Module):
    """Preference weights (B, K) on the simplex -> (B, dim), added to a model's conditioning.

    A two-layer MLP whose last layer starts at zero: the untrained embedding is exactly
    0, so a model with it added is the model itself, bit for bit.
    """

    def __init__(self, num_objectives: int, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_objectives = check_int(
            num_objectives, "num_objectives", low=1, high=MAX_OBJECTIVES
        )
        check_int(dim, "dim", low=1)
        check_int(hidden, "hidden", low=1)
        self.net = nn.Sequential(
            nn.Linear(num_objectives, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, weights: Tensor) -> Tensor:
        if not isinstance(weights, Tensor) or weights.ndim != 2:
            raise ValueError(f"weights must be a (B, K) tensor, got {type(weights).__name__}")
        if weights.shape[1] != self.num_objectives:
            raise ValueError(
                f"weights has {weights.shape[1]} objectives, the embedding {self.num_objectives}"
            )
        return self.net(weights.to(self.net[0].weight.dtype))


def distillation_weights(k: int, random: int, generator: torch.Generator) -> Tensor:
    """(K + 1 + random, K) float64 weights: the K vertices, the centre, then uniform draws.

    Uniform on the simplex: normalised standard exponentials (Dirichlet(1, ..., 1)).
    """
    k = check_int(k, "k", low=1, high=MAX_OBJECTIVES)
    random = check_int(random, "random", low=0)
    fixed = torch.cat([torch.eye(k), torch.full((1, k), 1.0 / k)]).double()
    e = -torch.log(
        torch.rand(random, k, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    )
    return torch.cat([fixed, e / e.sum(1, keepdim=True)])


def step_kl(teacher: Gaussian, student: Gaussian) -> Tensor:
    """KL(teacher step || student step) in nats, exact for diagonal Gaussians: (B,).

    1/2 sum [log(v_s / v_t) + (v_t + (m_t - m_s)^2) / v_s - 1] (:func:`msdda.gaussian.kl_divergence`),
    differentiable in the student's mean and variance.
    """
    return kl_divergence(teacher, student)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`: rounds of rollouts, each followed by optimiser steps."""

    rounds: int = 30  # rounds of fresh rollouts
    random_weights: int = 2  # uniform weight draws per round, besides vertices and centre
    chains: int = 32  # MSDDA (teacher) chains per weight vector and round
    student_chains: int = 16  # student chains per weight vector and round (coverage)
    updates: int = 8  # optimiser steps per round, each on a random minibatch of states
    batch_rows: int = 2048  # visited states per optimiser step
    lr: float = 2e-3  # Adam learning rate (cosine-decayed to 10%)
    grad_clip: float = 1.0  # gradient-norm clip
    log_every: int = 5  # rounds between two records of per-step and path KL
    seed: int = 0  # weights, conditions, initial and step noise, minibatches

    def __post_init__(self) -> None:
        check_int(self.rounds, "rounds", low=1, high=10_000_000)
        check_int(self.random_weights, "random_weights", low=0, high=10_000)
        check_int(self.chains, "chains", low=1, high=1_000_000)
        check_int(self.student_chains, "student_chains", low=0, high=1_000_000)
        check_int(self.updates, "updates", low=1, high=1_000_000)
        check_int(self.batch_rows, "batch_rows", low=1, high=100_000_000)
        check_number(self.lr, "lr", low=0.0, low_inclusive=False)
        check_number(self.grad_clip, "grad_clip", low=0.0, low_inclusive=False)
        check_int(self.log_every, "log_every", low=1)
        check_seed(self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


#: ``(x_t (B, ...), t (B,) long, cond, weights (B, K)) -> Gaussian``: the student's step,
#: differentiable in its parameters, one timestep per row.
StudentStep = Callable[[Tensor, Tensor, Any, Tensor], Gaussian]


def _tile(cond: Any, n: int) -> Any:
    """``cond`` of B rows repeated n times along the batch (row order: copy-major)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat(n, *([1] * (cond.ndim - 1)))
    if hasattr(cond, "repeat"):
        return cond.repeat(n)
    raise TypeError(f"cannot tile a condition of type {type(cond).__name__}: give tile=")


@dataclass(frozen=True, eq=False)
class DistillationProblem:
    """What :func:`distill` needs from a domain."""

    schedule: Schedule  # the sampling schedule of teacher and student
    num_objectives: int  # K
    sample_shape: tuple[int, ...]  # one sample's shape
    teacher: Callable[[tuple[float, ...], Any], StepPolicy]  # (w, cond) -> MSDDA's step policy
    student: StudentStep  # see StudentStep
    draw_cond: Callable[[int, torch.Generator], Any]  # (n, generator) -> cond of n chains
    parameters: Sequence[nn.Parameter]  # what the optimiser moves
    tile: Callable[[Any, int], Any] = _tile  # (cond of B rows, n) -> cond of n*B rows
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError("schedule must be a msdda.Schedule")
        check_int(self.num_objectives, "num_objectives", low=1, high=MAX_OBJECTIVES)
        for name in ("teacher", "student", "draw_cond", "tile"):
            check_callable(getattr(self, name), name)
        params = list(self.parameters)
        if not all(isinstance(p, nn.Parameter) for p in params):
            raise ValueError("parameters must be a sequence of nn.Parameter")
        object.__setattr__(self, "parameters", params)
        object.__setattr__(self, "sample_shape", tuple(self.sample_shape))

    def student_policy(self, weights: Tensor, cond: Any) -> StepPolicy:
        """The student's step policy at one weight vector (K,) for a batch of ``cond``."""

        def step(x_t: Tensor, t: int) -> Gaussian:
            b = x_t.shape[0]
            tb = torch.full((b,), int(t), dtype=torch.long, device=x_t.device)
            return self.student(x_t, tb, cond, weights.to(x_t.device).expand(b, -1))

        return step


@dataclass(frozen=True)
class Visited:
    """States of some chains at every step but the last, with the teacher's step there."""

    x: Tensor  # (S * B, ...) states x_t, step-major
    t: Tensor  # (S * B,) their timesteps
    teacher: Gaussian  # the teacher's step at each state (detached)
    steps: int  # S
    chains: int  # B


def visited_steps(
    roll: StepPolicy,
    teacher: StepPolicy,
    x_T: Tensor,
    schedule: Schedule,
    noise,
    *,
    roll_is_teacher: bool,
) -> Visited:
    """Run a chain with ``roll`` and keep (x_t, t, teacher step) at every step but the last.

    The last step adds no noise (x_0 is its mean; its variance may be 0), so it carries no
    KL, as in :func:`msdda.methods.metered`. With ``roll_is_teacher`` the teacher's step is
    the one the chain took (no second evaluation).
    """
    xs, ts, means, variances = [], [], [], []
    last = int(schedule.timesteps[-1])

    def recording(x_t: Tensor, t: int) -> Gaussian:
        g = roll(x_t, t)
        if int(t) != last:
            target = g if roll_is_teacher else teacher(x_t, t)
            xs.append(x_t)
            ts.append(torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device))
            means.append(target.mean.detach())
            variances.append(target.variance.detach().expand_as(target.mean))
        return g

    with torch.no_grad():
        sample_chain(recording, x_T, schedule.timesteps, noise)
    teacher_steps = Gaussian(torch.cat(means), torch.cat(variances))
    return Visited(torch.cat(xs), torch.cat(ts), teacher_steps, len(xs), x_T.shape[0])


def _cat(conds: Sequence[Any]) -> Any:
    if all(c is None for c in conds):
        return None
    if all(isinstance(c, Tensor) for c in conds):
        return torch.cat(list(conds))
    return type(conds[0]).cat(conds)  # a domain's own condition type


def _select(cond: Any, idx: Tensor) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx.to(cond.device)]
    return cond.select(idx)


@dataclass(frozen=True)
class Buffer:
    """Visited states of one round, all weights together, with the teacher's step there."""

    x: Tensor  # (N, ...) states x_t
    t: Tensor  # (N,) their timesteps
    cond: Any  # the condition of each row
    weights: Tensor  # (N, K) float32
    teacher: Gaussian  # (N, ...) the teacher's step (detached)
    groups: list[tuple[str, slice, int]]  # (weight label, rows, chains) of the teacher's chains
    steps: int  # S: steps per chain that carry a KL

    def __len__(self) -> int:
        return int(self.x.shape[0])


def distillation_loss(problem: DistillationProblem, buffer: Buffer, idx: Tensor) -> Tensor:
    """S times the mean step KL(teacher || student) over rows ``idx``: an unbiased estimate
    of the mean path KL sum_t KL per chain (differentiable in the student)."""
    g = problem.student(
        buffer.x[idx], buffer.t[idx], _select(buffer.cond, idx), buffer.weights[idx]
    )
    teacher = Gaussian(buffer.teacher.mean[idx], buffer.teacher.variance[idx])
    kl = step_kl(teacher, Gaussian(g.mean, g.variance.expand_as(g.mean)))
    return kl.mean() * buffer.steps


@dataclass(frozen=True)
class DistillRecord:
    """Per-step and path KL of the student to the teacher at one round, on the teacher's
    chains of that round (before its optimiser steps), mean over chains."""

    round: int
    loss: float  # mean over the round's optimiser steps of the minibatch path-KL estimate
    path_kl: dict[str, float]  # by weight label: mean path KL (nats)
    step_kl: list[float]  # per step index, mean over weights
    seconds: float


@dataclass(frozen=True)
class DistillResult:
    records: list[DistillRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "records": [asdict(r) for r in self.records]}


def _label(w: Tensor) -> str:
    return "(" + ", ".join(f"{float(v):.2f}" for v in w) + ")"


def _noise(generator: torch.Generator):
    return lambda i, like: torch.randn(like.shape, generator=generator).to(like)


def _rollout(problem, w, n, who, generator) -> tuple[Visited, Any]:
    cond = problem.draw_cond(n, generator)
    x_T = torch.randn((n, *problem.sample_shape), generator=generator).to(problem.device)
    teacher = problem.teacher(tuple(float(v) for v in w), cond)
    roll = teacher if who == "teacher" else problem.student_policy(w.float(), cond)
    visited = visited_steps(
        roll, teacher, x_T, problem.schedule, _noise(generator), roll_is_teacher=who == "teacher"
    )
    return visited, problem.tile(cond, visited.steps)


def collect(problem: DistillationProblem, config: DistillConfig, generator) -> Buffer:
    """One round's rollouts: for each weight (vertices, centre, uniform draws), the MSDDA
    teacher's chains and the student's, their visited states and the teacher's steps."""
    weights = distillation_weights(problem.num_objectives, config.random_weights, generator)
    parts, groups, start, steps = [], [], 0, 0
    for w in weights:
        for who, n in (("teacher", config.chains), ("student", config.student_chains)):
            if n == 0:
                continue
            visited, cond = _rollout(problem, w, n, who, generator)
            rows = visited.x.shape[0]
            if who == "teacher":
                groups.append((_label(w), slice(start, start + rows), n))
            parts.append((visited, cond, w.float().expand(rows, -1)))
            start, steps = start + rows, visited.steps
    v = [p[0] for p in parts]
    teacher = Gaussian(
        torch.cat([x.teacher.mean for x in v]), torch.cat([x.teacher.variance for x in v])
    )
    return Buffer(
        torch.cat([x.x for x in v]),
        torch.cat([x.t for x in v]),
        _cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]).to(problem.device),
        teacher,
        groups,
        steps,
    )


@torch.no_grad()
def measure(problem: DistillationProblem, buffer: Buffer) -> tuple[dict[str, float], list[float]]:
    """Path KL per weight and per-step KL (mean over weights) on the teacher's chains."""
    paths, per_step = {}, []
    for label, rows, chains in buffer.groups:
        idx = torch.arange(rows.start, rows.stop)
        g = problem.student(
            buffer.x[idx], buffer.t[idx], _select(buffer.cond, idx), buffer.weights[idx]
        )
        teacher = Gaussian(buffer.teacher.mean[idx], buffer.teacher.variance[idx])
        kl = step_kl(teacher, Gaussian(g.mean, g.variance.expand_as(g.mean)))
        steps = kl.double().reshape(-1, chains).mean(1)
        paths[label] = float(steps.sum())
        per_step.append(steps)
    return paths, [float(v) for v in torch.stack(per_step).mean(0)]


def distill(
    problem: DistillationProblem,
    config: DistillConfig | None = None,
    *,
    progress: Callable[[DistillRecord], None] | None = None,
) -> DistillResult:
    """Fit the student to the MSDDA teacher by the exact step KL (see the module docstring).

    Every round draws fresh rollouts (:func:`collect`) and takes ``config.updates``
    optimiser steps on minibatches of their states. Records the per-step and path KL to
    the teacher every ``config.log_every`` rounds, at the first and at the last
    (``progress`` is called with each record).
    """
    if not isinstance(problem, DistillationProblem):
        raise TypeError(f"problem must be a DistillationProblem, got {type(problem).__name__}")
    config = config or DistillConfig()
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    if progress is not None:
        check_callable(progress, "progress")
    if not problem.parameters:
        raise ValueError("problem.parameters is empty: the student has nothing to train")
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(problem.parameters, lr=config.lr)
    total = config.rounds * config.updates
    lr = torch.optim.lr_scheduler.LambdaLR(optimiser, _cosine(total))
    records: list[DistillRecord] = []
    start = time.perf_counter()
    for r in range(1, config.rounds + 1):
        buffer = collect(problem, config, generator)
        log = r % config.log_every == 0 or r in (1, config.rounds)
        measured = measure(problem, buffer) if log else None
        losses = []
        for _ in range(config.updates):
            idx = torch.randint(
                0, len(buffer), (min(config.batch_rows, len(buffer)),), generator=generator
            )
            optimiser.zero_grad(set_to_none=True)
            loss = distillation_loss(problem, buffer, idx)
            loss.backward()
            nn.utils.clip_grad_norm_(problem.parameters, config.grad_clip)
            optimiser.step()
            lr.step()
            losses.append(float(loss.detach()))
        if measured is not None:
            record = DistillRecord(
                r, sum(losses) / len(losses), measured[0], measured[1], time.perf_counter() - start
            )
            records.append(record)
            if progress is not None:
                progress(record)
    return DistillResult(records, time.perf_counter() - start)


def _cosine(steps: int) -> Callable[[int], float]:
    return lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
