"""Step-level DPO as pure functions over tensors (docs/design.md §4).

At a state x_t, two actions a, b ~ p_ref(.|x_t) with step rewards r(a), r(b). The
policy's implicit reward of an action is beta * log(p_theta(a|x_t) / p_ref(a|x_t)); the
DPO logit of the pair is

    z = beta * ([log p_theta(a) - log p_ref(a)] - [log p_theta(b) - log p_ref(b)])

and the loss is the cross-entropy -[p log sigmoid(z) + (1 - p) log sigmoid(-z)] with the
Bradley-Terry probability p = sigmoid(r(a) - r(b)) as a *soft* label. Its minimiser is
z = r(a) - r(b) on every pair, i.e. p_theta ∝ p_ref * exp(r / beta): the step-level optimum.

For Gaussian steps the normalisers of log p(a) and log p(b) cancel (same state, same
variance), so a log-likelihood difference is a quadratic form, computed without the large
log-determinant terms.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gaussian import Gaussian, kl_divergence
from ..validation import check_positive

__all__ = [
    "LabelKind",
    "LABEL_KINDS",
    "gaussian_log_likelihood_difference",
    "pair_log_ratio_difference",
    "dpo_logits",
    "preference_labels",
    "soft_dpo_loss",
    "implicit_accuracy",
    "gaussian_kl",
]

#: How rewards become labels: "soft" p = sigmoid(r(a) - r(b)) (consistent); "sampled"
#: y ~ Bernoulli(p) (consistent, noisier); "hard" y = [r(a) > r(b)] (NOT consistent:
#: the effective beta shrinks without end; kept to show it).
LabelKind = Literal["soft", "sampled", "hard"]
LABEL_KINDS = ("soft", "sampled", "hard")


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def gaussian_log_likelihood_difference(
    action_a: Tensor, action_b: Tensor, mean: Tensor, variance: Tensor
) -> Tensor:
    """log N(a; mean, var) - log N(b; mean, var), summed over all but the batch axis.

    Equals sum (b - a) (a + b - 2 mean) / (2 var): the normalisers cancel.
    Shapes: (B, ...) each (variance may broadcast); returns (B,).
    """
    return _sum_per_sample(
        (action_b - action_a) * (action_a + action_b - 2 * mean) / (2 * variance)
    )


def pair_log_ratio_difference(
    action_a: Tensor, action_b: Tensor, policy: Gaussian, reference: Gaussian
) -> Tensor:
    """[log p(a)/p_ref(a)] - [log p(b)/p_ref(b)] for Gaussian steps p, p_ref; (B,)."""
    return gaussian_log_likelihood_difference(
        action_a, action_b, policy.mean, policy.variance
    ) - gaussian_log_likelihood_difference(action_a, action_b, reference.mean, reference.variance)


def dpo_logits(log_ratio_difference: Tensor, kl_coef: float) -> Tensor:
    """z = beta * (log-ratio of a - log-ratio of b): the implicit reward margin of a over b."""
    check_positive(kl_coef, "kl_coef")  # a 0-d tensor stays a tensor (and differentiable)
    return kl_coef * log_ratio_difference


def preference_labels(
    reward_a: Tensor,
    reward_b: Tensor,
    kind: LabelKind = "soft",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Probability (or 0/1 draw) that a is preferred to b, from rewards (B,) -> (B,).

    ``soft``: sigmoid(r(a) - r(b)), the Bradley-Terry probability itself;
    ``sampled``: one Bernoulli draw from it; ``hard``: 1 where r(a) > r(b), 0.5 on ties.
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    if reward_a.shape != reward_b.shape:
        raise ValueError(
            f"reward_a and reward_b must have one shape, got {tuple(reward_a.shape)} "
            f"and {tuple(reward_b.shape)}"
        )
    margin = reward_a - reward_b
    if kind == "hard":
        return (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)
    p = torch.sigmoid(margin)
    if kind == "sampled":
        return torch.bernoulli(p.cpu(), generator=generator).to(p)
    return p


def soft_dpo_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean of -[p log sigmoid(z) + (1 - p) log sigmoid(-z)] over the batch (a scalar)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def implicit_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of pairs whose implicit preference sign(z) agrees with p > 1/2 (ties excluded)."""
    decided = labels != 0.5
    if not bool(decided.any()):
        return torch.tensor(float("nan"))
    agree = (logits > 0) == (labels > 0.5)
    return agree[decided].to(torch.float64).mean()


#: KL(N(policy) || N(reference)) per sample, (B,), differentiable: :func:`msdda.gaussian.kl_divergence`
#: (former name, kept as an alias).
gaussian_kl = kl_divergence
