"""The step-level DPO training loop: a denoiser fitted to p_ref * exp(r / beta) per step.

The policy is any ``torch.nn.Module`` denoiser ``(x_t, t (B,) long, cond) -> model output``
(with a variance channel for a learned variance type); its step Gaussians come from the
core's :func:`msdda.step_gaussian`, so the trained model is an :class:`msdda.Expert` as is.
The reference enters only through the precomputed pairs (its step Gaussians at the states).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..fusion import Gaussian
from ..gaussians import Schedule, StepSpec, step_gaussian
from ..validation import (
    ArgumentKindError,
    check_callable,
    check_int,
    check_number,
    check_positive,
    check_seed,
    compat_check,
)
from .losses import (
    LABEL_KINDS,
    LabelKind,
    dpo_logits,
    gaussian_log_likelihood_difference,
    implicit_accuracy,
    preference_labels,
    soft_dpo_loss,
)
from .pairs import PairSet

__all__ = [
    "TrainConfig",
    "TrainRecord",
    "TrainResult",
    "PolicyMetrics",
    "step_gaussians_per_sample",
    "policy_step_gaussians",
    "train_dpo",
    "evaluate_policy",
    "reference_log_likelihood_differences",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one step-level DPO run."""

    kl_coef: float = 1.0  # beta: the policy targets p_ref * exp(r / beta)
    labels: LabelKind = "soft"  # how reward pairs become labels (see losses.LabelKind)
    num_steps: int = 300  # optimiser steps
    batch_size: int = 1024  # pairs per optimiser step
    lr: float = 1e-3  # Adam learning rate of the mean (epsilon) parameters
    variance_lr: float | None = None  # Adam learning rate of the variance parameters (None: lr)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float | None = 1.0  # gradient clipping (None: off)
    lr_decay: Literal["cosine", "constant"] = "cosine"  # learning-rate schedule over num_steps
    seed: int = 0  # minibatch order and sampled labels
    log_every: int = 25  # optimiser steps between history records

    def __post_init__(self) -> None:
        # A wrong kind (a bool, a string) is a TypeError that is also a ValueError, as
        # every refusal here always was.
        compat_check(check_positive, self.kl_coef, "kl_coef")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}, got {self.labels!r}")
        for name in ("num_steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ArgumentKindError(f"{name} must be a positive int, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        compat_check(check_positive, self.lr, "lr")
        if self.variance_lr is not None:
            compat_check(check_positive, self.variance_lr, "variance_lr")
        if self.max_grad_norm is not None:
            compat_check(check_positive, self.max_grad_norm, "max_grad_norm")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {self.lr_decay!r}")
        compat_check(check_number, self.weight_decay, "weight_decay", low=0.0)
        compat_check(check_seed, self.seed, "seed")


@dataclass(frozen=True)
class TrainRecord:
    """Training state every ``log_every`` steps, averaged over the steps since the last."""

    step: int  # optimiser steps done
    loss: float  # soft DPO loss (0.693 = no preference learned)
    accuracy: float  # implicit accuracy: sign(z) agrees with p > 1/2
    kl: float  # mean KL(p_theta || p_ref) per step and state, nats


@dataclass(frozen=True)
class TrainResult:
    history: tuple[TrainRecord, ...]
    seconds: float  # wall-clock training time


@dataclass(frozen=True)
class PolicyMetrics:
    """A policy measured on a pair set against its labels."""

    loss: float
    accuracy: float
    kl: float  # mean KL(p_theta || p_ref) per state, nats
    kl_per_step: dict[int, float]  # schedule step index -> mean KL at that step


#: Former name of :func:`msdda.step_gaussian` with one timestep per sample (kept as an alias).
step_gaussians_per_sample = step_gaussian


def policy_step_gaussians(
    policy: Callable, pairs: PairSet, index: Tensor, schedule: Schedule, spec: StepSpec
) -> Gaussian:
    """The policy's step Gaussians at the states of ``pairs[index]`` (one forward)."""
    x = pairs.states[index]
    t = pairs.timesteps[index]
    cond = None if pairs.cond is None else pairs.cond[index]
    return step_gaussian(policy(x, t, cond), x, t, schedule, spec)


def _optimizer(
    policy: nn.Module, config: TrainConfig, variance_parameters: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    var_params = [p for p in variance_parameters if p.requires_grad]
    var_ids = {id(p) for p in var_params}
    mean_params = [p for p in policy.parameters() if p.requires_grad and id(p) not in var_ids]
    groups = [{"params": mean_params, "lr": config.lr}]
    if var_params:
        groups.append({"params": var_params, "lr": config.variance_lr or config.lr})
    if not mean_params and not var_params:
        raise ValueError("policy has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def reference_log_likelihood_differences(pairs: PairSet) -> Tensor:
    """log p_ref(a) - log p_ref(b) of every pair, (N,) float64: the fixed half of each logit."""
    return gaussian_log_likelihood_difference(
        pairs.action_a.double(),
        pairs.action_b.double(),
        pairs.reference_mean.double(),
        pairs.reference_variance.double(),
    )


def _pair_logits(
    policy: Gaussian, pairs: PairSet, index: Tensor, ref_diff: Tensor, kl_coef: float
) -> Tensor:
    """z = beta * ([log p(a) - log p(b)] - [log p_ref(a) - log p_ref(b)]) at ``pairs[index]``."""
    dtype = policy.mean.dtype
    a, b = pairs.action_a[index].to(dtype), pairs.action_b[index].to(dtype)
    diff = gaussian_log_likelihood_difference(a, b, policy.mean, policy.variance)
    return dpo_logits(diff - ref_diff[index].to(dtype), kl_coef)


def _check_rewards(pairs: PairSet, rewards: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    if not (isinstance(rewards, Sequence) and len(rewards) == 2):
        raise TypeError("rewards must be a (reward_a, reward_b) pair of (N,) tensors")
    r_a, r_b = rewards
    for name, r in (("reward_a", r_a), ("reward_b", r_b)):
        if not isinstance(r, Tensor) or r.shape != (len(pairs),):
            raise ValueError(f"{name} must be a tensor of shape ({len(pairs)},)")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"{name} must be finite")
    return r_a, r_b


def train_dpo(
    policy: nn.Module,
    pairs: PairSet,
    rewards: Sequence[Tensor],
    schedule: Schedule,
    spec: StepSpec,
    config: TrainConfig = TrainConfig(),
    *,
    variance_parameters: Iterable[nn.Parameter] = (),
    callback: Callable[[TrainRecord], None] | None = None,
) -> TrainResult:
    """Fit ``policy`` in place by step-level DPO on ``pairs`` labelled by ``rewards``.

    Args:
        policy: the denoiser to train, usually a copy of the reference; run in eval mode
            (no dropout, no class dropout) and in the pairs' dtype.
        pairs: states and candidate actions (:func:`collect_pairs`).
        rewards: (r(a), r(b)), each (N,), e.g. ``pairs.weighted_rewards({"boldness": 1})``.
        schedule, spec: how the policy's output becomes its step Gaussian.
        config: beta, labels, optimiser settings.
        variance_parameters: parameters trained at ``config.variance_lr`` (a variance head).
        callback: called with each :class:`TrainRecord` (progress display).
    """
    _check_train_arguments(policy, pairs, schedule, spec, config, callback)
    r_a, r_b = _check_rewards(pairs, rewards)
    gen = torch.Generator().manual_seed(config.seed)
    labels = preference_labels(r_a, r_b, config.labels, generator=gen)
    ref_diff = reference_log_likelihood_differences(pairs)  # fixed: computed once
    opt = _optimizer(policy, config, variance_parameters)
    lr_schedule = _lr_schedule(opt, config)
    was_training = policy.training
    policy.eval()
    history = _History(config, callback)
    start = time.perf_counter()
    batches = _minibatches(len(pairs), config.batch_size, config.num_steps, gen)
    for step, idx in enumerate(batches, start=1):
        g = policy_step_gaussians(policy, pairs, idx, schedule, spec)
        logits = _pair_logits(g, pairs, idx, ref_diff, config.kl_coef)
        loss = soft_dpo_loss(logits, labels[idx])
        _optimiser_step(opt, lr_schedule, loss, config.max_grad_norm)
        history.add(step, _batch_metrics(g, pairs, idx, logits, labels[idx], loss))
    policy.train(was_training)
    return TrainResult(tuple(history.records), time.perf_counter() - start)


def _check_train_arguments(policy, pairs, schedule, spec, config, callback) -> None:
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be a PairSet, got {type(pairs).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a msdda.Schedule, got {type(schedule).__name__}")
    if not isinstance(spec, StepSpec):
        raise TypeError(f"spec must be a msdda.StepSpec, got {type(spec).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")


def _lr_schedule(opt: torch.optim.Optimizer, config: TrainConfig):
    """The learning-rate schedule over ``config.num_steps`` (None: constant)."""
    if config.lr_decay == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.num_steps)
    return None


def _minibatches(n: int, batch_size: int, num_steps: int, gen: torch.Generator):
    """``num_steps`` index batches of consecutive slices of a random order of the n pairs.

    A fresh order is drawn (from ``gen``) when the next batch would run past the end.
    """
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for _ in range(num_steps):
        if cursor + batch_size > n and cursor > 0:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def _optimiser_step(opt, lr_schedule, loss: Tensor, max_grad_norm: float | None) -> None:
    """One backward pass and update, with gradient clipping when ``max_grad_norm`` is set."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for grp in opt.param_groups for p in grp["params"]], max_grad_norm
        )
    opt.step()
    if lr_schedule is not None:
        lr_schedule.step()


@torch.no_grad()
def _batch_metrics(
    g: Gaussian, pairs: PairSet, idx: Tensor, logits: Tensor, labels: Tensor, loss: Tensor
) -> Tensor:
    """(loss, implicit accuracy, mean KL(p_theta || p_ref)) of one batch, float64."""
    ref = Gaussian(pairs.reference_mean[idx], pairs.reference_variance[idx])
    kl = g.detach().kl(ref).mean()
    acc = implicit_accuracy(logits.detach(), labels)
    return torch.tensor([loss.item(), float(acc), kl.item()], dtype=torch.float64)


class _History:
    """Batch metrics averaged every ``config.log_every`` steps (and at the last) as records."""

    def __init__(self, config: TrainConfig, callback: Callable[[TrainRecord], None] | None):
        self.log_every, self.num_steps, self.callback = config.log_every, config.num_steps, callback
        self.records: list[TrainRecord] = []
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.seen = 0

    def add(self, step: int, metrics: Tensor) -> None:
        self.sums += metrics
        self.seen += 1
        if step % self.log_every == 0 or step == self.num_steps:
            m = (self.sums / self.seen).tolist()
            record = TrainRecord(step, m[0], m[1], m[2])
            self.records.append(record)
            if self.callback is not None:
                self.callback(record)
            self.sums.zero_()
            self.seen = 0


@torch.no_grad()
def evaluate_policy(
    policy: Callable,
    pairs: PairSet,
    rewards: Sequence[Tensor],
    schedule: Schedule,
    spec: StepSpec,
    kl_coef: float,
    *,
    batch_size: int = 4096,
) -> PolicyMetrics:
    """Soft DPO loss, implicit accuracy and per-step KL to the reference on ``pairs`` (float64)."""
    check_callable(policy, "policy", "a denoiser (x_t, t, cond) -> model output")
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be a PairSet, got {type(pairs).__name__}")
    kl_coef = check_positive(kl_coef, "kl_coef")
    batch_size = check_int(batch_size, "batch_size", low=1)
    r_a, r_b = _check_rewards(pairs, rewards)
    labels = preference_labels(r_a, r_b, "soft").double()
    ref_diff = reference_log_likelihood_differences(pairs)
    was_training = getattr(policy, "training", None)
    if isinstance(policy, nn.Module):
        policy.eval()
    logits, kls = [], []
    for s in range(0, len(pairs), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(pairs)))
        g = policy_step_gaussians(policy, pairs, idx, schedule, spec)
        g = g.to(torch.float64)
        ref = Gaussian(pairs.reference_mean[idx], pairs.reference_variance[idx])
        logits.append(_pair_logits(g, pairs, idx, ref_diff, kl_coef))
        kls.append(g.kl(ref.to(torch.float64)))
    if isinstance(policy, nn.Module):
        policy.train(was_training)
    z, kl = torch.cat(logits), torch.cat(kls)
    per_step = {
        int(i): float(kl[pairs.step_indices == i].mean())
        for i in pairs.step_indices.unique().tolist()
    }
    return PolicyMetrics(
        loss=float(soft_dpo_loss(z, labels)),
        accuracy=float(implicit_accuracy(z, labels)),
        kl=float(kl.mean()),
        kl_per_step=per_step,
    )
