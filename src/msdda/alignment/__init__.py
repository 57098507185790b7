"""Step-level alignment: train single-objective experts (and oracles) by step-level DPO.

A model aligned to reward r with KL coefficient beta at the step level is
p_ref * exp(r / beta) at every reverse step (docs/design.md §1, §4). We fit it by logistic
regression on the implicit reward beta * log(p_theta / p_ref) of pairs of reference
actions, with Bradley-Terry *soft* labels sigmoid(r(a) - r(b)):

- :mod:`.losses`: the pure loss functions (Gaussian log-ratio differences, labels, loss, KL);
- :mod:`.pairs`: reference rollouts and scored candidate pairs, computed once per domain;
- :mod:`.train`: the training loop over any denoiser ``nn.Module``;
- :mod:`.testbed`: the trainer validated against the closed-form optimum.
"""

from .losses import (
    LABEL_KINDS,
    LabelKind,
    dpo_logits,
    gaussian_kl,
    gaussian_log_likelihood_difference,
    implicit_accuracy,
    pair_log_ratio_difference,
    preference_labels,
    soft_dpo_loss,
)
from .pairs import PairSet, StepRewards, collect_pairs, training_step_indices, tweedie_step_rewards
from .train import (
    PolicyMetrics,
    TrainConfig,
    TrainRecord,
    TrainResult,
    evaluate_policy,
    policy_step_gaussians,
    step_gaussians_per_sample,
    train_dpo,
)

__all__ = [
    "LABEL_KINDS",
    "LabelKind",
    "PairSet",
    "PolicyMetrics",
    "StepRewards",
    "TrainConfig",
    "TrainRecord",
    "TrainResult",
    "collect_pairs",
    "dpo_logits",
    "evaluate_policy",
    "gaussian_kl",
    "gaussian_log_likelihood_difference",
    "implicit_accuracy",
    "pair_log_ratio_difference",
    "policy_step_gaussians",
    "preference_labels",
    "soft_dpo_loss",
    "step_gaussians_per_sample",
    "train_dpo",
    "training_step_indices",
    "tweedie_step_rewards",
]
