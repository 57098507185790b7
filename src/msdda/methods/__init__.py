"""Every compared method as a step strategy on msdda's one sampling loop.

``base``, ``rs`` (rewarded soups), ``db`` (Diffusion Blend), ``db-ls`` (one expert per
step), ``rgg`` (reward gradient guidance), ``code`` (blockwise controlled decoding),
``target`` (exact step-level optimum by importance resampling), ``msdda``, ``oracle``
and ``student`` (one weight-conditioned model distilled from MSDDA). :func:`run_method`
samples with any of them on shared seeds and counts network evaluations.
"""

from .common import (
    EvalCounter,
    MethodContext,
    NoiseTape,
    SampleGenerators,
    check_weights,
    derive_seed,
    point_mass,
    weight_key,
)
from .kl import KLMeter, best_of_n_kl, gaussian_kl, metered
from .registry import (
    METHODS,
    MethodInfo,
    MethodRun,
    MethodSettings,
    build_policy,
    check_method,
    run_method,
)
from .search import Search, code_policy, target_policy, weighted_step_reward
from .soup import parameter_soup
from .strategies import (
    GUIDANCE_SCHEDULES,
    base_policy,
    db_ls_policy,
    db_policy,
    guidance_schedule,
    msdda_policy,
    oracle_policy,
    rgg_policy,
    rs_policy,
    student_policy,
)

__all__ = [
    "EvalCounter",
    "KLMeter",
    "GUIDANCE_SCHEDULES",
    "METHODS",
    "MethodContext",
    "MethodInfo",
    "MethodRun",
    "MethodSettings",
    "NoiseTape",
    "SampleGenerators",
    "Search",
    "base_policy",
    "best_of_n_kl",
    "build_policy",
    "check_method",
    "check_weights",
    "code_policy",
    "db_ls_policy",
    "db_policy",
    "derive_seed",
    "gaussian_kl",
    "metered",
    "guidance_schedule",
    "msdda_policy",
    "oracle_policy",
    "parameter_soup",
    "point_mass",
    "rgg_policy",
    "rs_policy",
    "run_method",
    "student_policy",
    "target_policy",
    "weight_key",
    "weighted_step_reward",
]
