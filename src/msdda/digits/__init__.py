"""The digits domain: class-conditional 8x8 handwritten digits, trained on a CPU in minutes.

The prompt is a digit 0-9. Data (``sklearn.datasets.load_digits``) lives in model space
[-1, 1] as (N, 1, 8, 8); :func:`decode` maps samples to images in [0, 1].

- Models (:mod:`.models`): :class:`DigitDenoiser` (epsilon prediction, null class 10 for
  classifier-free guidance, optional ``learned_log`` variance head) with signature
  ``(x_t (B, 1, 8, 8), t (B,) long, cond (B,) long) -> (B, C_out, 8, 8)``;
  :class:`DigitClassifier`; :class:`GuidedDenoiser`.
- Schedule (:mod:`.schedule`): diffusers ``DDPMScheduler``, 1000 cosine-beta training
  steps, 50 strided DDPM sampling steps: :func:`make_schedule`.
- Rewards (:mod:`.rewards`): ``legibility``, ``boldness``, ``symmetry``,
  ``(images in [0, 1], prompts) -> (B,)``, raw in :data:`REWARDS`, standardised in a bundle.
- Weights (:mod:`.store` at the bottom, :mod:`.lora`, :mod:`.bundle`, :mod:`.catalog`):
  safetensors + ``manifest.json``; experts and oracles are LoRA adapters of the base (the
  core's :mod:`msdda.lora` format; two training seeds shipped), merged at load;
  :func:`load_digits_bundle` loads everything (``bundle.expert(name, kind, seed=0)``);
  :func:`add_expert` / :func:`add_oracle` record newly trained models.
- Sampling (:mod:`.sampling`): :func:`generate` (MSDDA for one prompt), :func:`sample_msdda`,
  :func:`sample_expert`, :func:`fused_policy`; :func:`method_context` is the domain as
  :mod:`msdda.methods` sees it.
- Training (:mod:`.train`, :mod:`.pipeline`): :func:`train_all` reproduces the shipped
  weights (``msdda train``).
"""

from .bundle import DigitsBundle, Oracle, expert_spec, load_denoiser, load_digits_bundle
from .catalog import add_expert, add_oracle
from .data import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    DigitData,
    check_prompts,
    decode,
    encode,
    load_digit_data,
)
from .models import (
    NULL_CLASS,
    ClassifierConfig,
    DenoiserConfig,
    DigitClassifier,
    DigitDenoiser,
    GuidedDenoiser,
)
from .pipeline import DigitsTrainConfig, ToyTrainConfig, train_all, write_domain_folder
from .rewards import (
    REWARD_NAMES,
    REWARDS,
    Legibility,
    RewardNormalisation,
    StandardisedReward,
    boldness,
    check_reward_weights,
    fit_normalisation,
    make_reward,
    make_rewards,
    standardise,
    symmetry,
)
from .sampling import (
    check_weights,
    fused_policy,
    generate,
    method_context,
    msdda_policy,
    run_policy,
    sample_expert,
    sample_msdda,
    torch_threads,
)
from .schedule import NUM_INFERENCE_STEPS, SCHEDULER_CONFIG, make_schedule, make_scheduler
from .store import (
    DEFAULT_WEIGHTS_DIR,
    EXPERT_KINDS,
    load_module_state,
    read_manifest,
    save_module,
    write_manifest,
)

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "EXPERT_KINDS",
    "IMAGE_SHAPE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "NUM_INFERENCE_STEPS",
    "REWARDS",
    "REWARD_NAMES",
    "SCHEDULER_CONFIG",
    "ClassifierConfig",
    "DenoiserConfig",
    "DigitClassifier",
    "DigitData",
    "DigitDenoiser",
    "DigitsBundle",
    "DigitsTrainConfig",
    "GuidedDenoiser",
    "Legibility",
    "Oracle",
    "RewardNormalisation",
    "StandardisedReward",
    "add_expert",
    "add_oracle",
    "boldness",
    "check_prompts",
    "check_reward_weights",
    "check_weights",
    "decode",
    "encode",
    "expert_spec",
    "fit_normalisation",
    "fused_policy",
    "generate",
    "load_denoiser",
    "load_digit_data",
    "load_digits_bundle",
    "load_module_state",
    "make_reward",
    "make_rewards",
    "make_schedule",
    "make_scheduler",
    "method_context",
    "msdda_policy",
    "read_manifest",
    "run_policy",
    "sample_expert",
    "sample_msdda",
    "save_module",
    "standardise",
    "symmetry",
    "torch_threads",
    "train_all",
    "ToyTrainConfig",
    "write_domain_folder",
    "write_manifest",
]
