"""Digits experts and oracles by step-level DPO on the base model (docs/design.md §4).

An *expert* is the base fine-tuned towards p_ref * exp(r / beta) at every reverse step for
one standardised reward r (``legibility``, ``boldness``, ``symmetry``); an *oracle* is the
same for a weighted reward sum_i w_i r_i (for instance ``{"legibility": w, "boldness":
1 - w}``). Both come from one trainer (:func:`msdda.alignment.train_dpo`) on one set of
reference pairs per seed (:func:`collect_digit_pairs`): they differ only in their labels.

Fine-tuning is a LoRA adapter (peft) on the base's linear layers, plus, for the
``"learned"`` kind, the base's zero-initialised variance head trained in full at its own
learning rate (``learned_log`` variance, bounded by the model). The adapter is merged for
sampling; its tensors (:attr:`AlignedModel.adapter`) are what is worth storing. With
``AlignConfig(adapter="full")`` every weight of the base is trained instead (stored in full).
Beta is ``AlignConfig.kl_coef``; the sampler the models are trained for (schedule length,
DDPM or DDIM with a per-expert eta) is the bundle's: :func:`sampler_bundle`.

Public API (stable; used by ``msdda train`` and ``benchmarks/digits_quality.py``):

- :func:`collect_digit_pairs` (bundle, config, seed) -> :class:`msdda.alignment.PairSet`
- :func:`train_expert` (bundle, reward, kind, ...) -> :class:`AlignedModel`
- :func:`train_oracle` (bundle, weights, kind, ...) -> :class:`AlignedModel`
- :func:`train_experts_and_oracles` (bundle, seed, ...) -> every expert and oracle of a seed
- :func:`mean_rewards` (bundle, expert, ...) -> mean standardised reward by name
  (``evaluate_rewards`` is its old name); :func:`reward_samples` and :func:`reward_gains`
  for per-sample values and paired gains
- :func:`apply_adapter` (base, adapter, lora, kind) -> the merged :class:`DigitDenoiser`
- :func:`save_adapter` / :func:`load_adapter`: an aligned model as a small safetensors file
  (its adapter: ~0.10 MB fixed, ~0.14 MB learned on the shipped base, vs 0.77 MB for
  the full network) that rebuilds it on the base
- :data:`ORACLE_WEIGHTS`: the oracles' (legibility, boldness) weights
- :func:`sampler_bundle` (bundle, num_steps, eta) -> the domain on another sampler;
  :func:`model_spec` the step spec its models get
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch
from torch import Tensor, nn

from ..alignment import (
    PairSet,
    TrainConfig,
    collect_pairs,
    evaluate_policy,
    train_dpo,
    training_step_indices,
    tweedie_step_rewards,
)
from ..errors import InputFileError, check_output_path, writing
from ..experts import Expert
from ..gaussians import Schedule, StepSpec
from ..io import atomic_write_bytes
from ..validation import check_int, check_number, check_positive, check_seed
from .bundle import DigitsBundle, expert_spec
from .data import IMAGE_SHAPE, NUM_CLASSES, decode
from .lora import (
    ADAPTER_FORMAT,
    LoraAdapter,
    LoraSettings,
    adapter_metadata,
    base_fingerprint,
    encode_adapter,
    merged_denoiser,
    peft_adapter_state,
    peft_lora_model,
    read_adapter_file,
)
from .models import DigitDenoiser, GuidedDenoiser
from .rewards import REWARDS, check_reward_weights
from .sampling import sample_expert
from .schedule import NUM_INFERENCE_STEPS, SCHEDULER_CONFIG, make_schedule
from .store import EXPERT_KINDS, check_expert_kind

__all__ = [
    "ORACLE_WEIGHTS",
    "ADAPTER_KINDS",
    "PairsConfig",
    "LoraSettings",
    "AlignConfig",
    "AlignedModel",
    "TrainOptions",
    "ADAPTER_FORMAT",
    "collect_digit_pairs",
    "train_expert",
    "train_oracle",
    "train_aligned",
    "train_experts_and_oracles",
    "mean_rewards",
    "evaluate_rewards",
    "reward_samples",
    "reward_gains",
    "apply_adapter",
    "save_adapter",
    "load_adapter",
    "base_fingerprint",
    "variance_offsets",
    "sampler_bundle",
    "model_spec",
]

#: Preference weights of the shipped oracles: legibility w, boldness 1 - w.
ORACLE_WEIGHTS: tuple[dict[str, float], ...] = tuple(
    {"legibility": w, "boldness": 1.0 - w} for w in (0.25, 0.5, 0.75)
)

#: How an expert or oracle is fine-tuned: a LoRA adapter on the base's linear layers
#: (``"lora"``, stored as the adapter) or every weight of the base (``"full"``, stored in full).
ADAPTER_KINDS = ("lora", "full")

#: The largest count (chains, steps, batch, samples) a config or argument may ask for.
MAX_COUNT = 10_000_000

#: ``progress(step, total, loss)``, as the domain's other trainers call it.
Progress = Callable[[int, int, float], None]


class TrainOptions(TypedDict, total=False):
    """The keyword options of :func:`train_aligned`, which :func:`train_expert` and
    :func:`train_oracle` pass on (defaults there)."""

    pairs: PairSet | None
    config: AlignConfig
    pairs_config: PairsConfig
    seed: int
    progress: Progress | None


@dataclass(frozen=True)
class PairsConfig:
    """Reference rollouts and candidate pairs shared by every expert and oracle of a seed."""

    num_chains: int = 2048  # reference chains, prompts cycling through the digits 0-9
    pairs_per_state: int = 1  # candidate pairs (a, b) per visited state
    skip_last: int = 3  # final, nearly deterministic steps left out of training
    batch_size: int = 1024  # chains rolled out together

    def __post_init__(self) -> None:
        check_int(self.num_chains, "PairsConfig.num_chains", low=1, high=MAX_COUNT)
        check_int(self.pairs_per_state, "PairsConfig.pairs_per_state", low=1, high=1024)
        check_int(self.skip_last, "PairsConfig.skip_last", low=0, high=1000)
        check_int(self.batch_size, "PairsConfig.batch_size", low=1, high=MAX_COUNT)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlignConfig:
    """How one expert or oracle is trained (beta on standardised rewards)."""

    kl_coef: float = 1.0  # beta: the model targets p_ref * exp(r / beta) per step
    num_steps: int = 300  # optimiser steps
    batch_size: int = 1024  # pairs per step
    lr: float = 2e-3  # AdamW learning rate of the LoRA factors or weights (cosine decay)
    variance_lr: float = 1e-3  # learning rate of the variance head ("learned" kind)
    max_grad_norm: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval_samples: int = 1000  # held-out samples (digits cycling) for the reward metrics, 0: none
    adapter: str = "lora"  # "lora": a LoRA adapter (stored small); "full": every weight trained

    def __post_init__(self) -> None:
        check_positive(self.kl_coef, "AlignConfig.kl_coef")
        check_int(self.num_steps, "AlignConfig.num_steps", low=1, high=MAX_COUNT)
        check_int(self.batch_size, "AlignConfig.batch_size", low=1, high=MAX_COUNT)
        check_positive(self.lr, "AlignConfig.lr")
        check_number(self.variance_lr, "AlignConfig.variance_lr", low=0.0)
        check_positive(self.max_grad_norm, "AlignConfig.max_grad_norm")
        if not isinstance(self.lora, LoraSettings):
            raise TypeError(
                f"AlignConfig.lora must be LoraSettings, got {type(self.lora).__name__}"
            )
        check_int(self.eval_samples, "AlignConfig.eval_samples", low=0, high=MAX_COUNT)
        if self.adapter not in ADAPTER_KINDS:
            raise ValueError(
                f"AlignConfig.adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "lora": self.lora.to_dict()}


@dataclass(frozen=True, eq=False)
class AlignedModel:
    """A trained expert or oracle, ready for ``msdda.digits.add_expert`` / ``add_oracle``."""

    model: DigitDenoiser  # merged network (variance head iff kind == "learned"), eval mode
    expert: Expert  # the model as an msdda Expert (guided like the base, kl_coef = beta)
    weights: dict[str, float]  # reward name -> weight ({reward: 1.0} for an expert)
    kind: str  # "fixed" or "learned"
    kl_coef: float  # beta
    adapter: dict[str, Tensor]  # LoRA factors (+ variance head): model = apply_adapter(base, ...)
    base_fingerprint: str  # base_fingerprint(base) of the base it was trained on
    metrics: dict[str, Any]  # held-out numbers (JSON-able)
    training: dict[str, Any]  # settings and seeds (JSON-able)

    @property
    def lora_adapter(self) -> LoraAdapter | None:
        """The adapter with its settings and base: what ``add_expert(..., adapter=)`` stores.

        None for a full fine-tune (``AlignConfig.adapter == "full"``): ``add_expert`` then
        stores the whole network.
        """
        if self.training["config"].get("adapter", "lora") == "full":
            return None
        lora = LoraSettings.from_dict(self.training["config"]["lora"])
        return LoraAdapter(self.adapter, lora, self.base_fingerprint)


def _check_bundle(bundle: Any) -> DigitsBundle:
    if not isinstance(bundle, DigitsBundle):
        raise TypeError(
            f"bundle must be a DigitsBundle (load_digits_bundle), got {type(bundle).__name__}"
        )
    return bundle


def _training_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Checked preference weights (:func:`~msdda.digits.rewards.check_reward_weights`), not all 0."""
    out = check_reward_weights(weights)
    if not any(out.values()):
        raise ValueError("weights are all 0: there is nothing to align to")
    return out


def _weights_label(weights: Mapping[str, float]) -> str:
    """``"0.25*legibility+0.75*boldness"``: preference weights in a model's name."""
    return "+".join(f"{w:g}*{n}" for n, w in weights.items())


def _guided(model: nn.Module, bundle: DigitsBundle) -> nn.Module:
    return model if bundle.guidance_scale == 1.0 else GuidedDenoiser(model, bundle.guidance_scale)


def collect_digit_pairs(
    bundle: DigitsBundle, config: PairsConfig = PairsConfig(), seed: int = 0
) -> PairSet:
    """Reference rollouts of ``bundle.reference`` and pairs scored by every standardised reward.

    The step reward of an action is the standardised reward of the base's Tweedie x0 at the
    landing timestep (:func:`msdda.alignment.tweedie_step_rewards`).
    """
    bundle = _check_bundle(bundle)
    seed = check_seed(seed)
    if not isinstance(config, PairsConfig):
        raise TypeError(f"config must be a PairsConfig, got {type(config).__name__}")
    step_rewards = tweedie_step_rewards(
        bundle.rewards, bundle.reference.denoiser, bundle.schedule, decode, "epsilon"
    )
    prompts = torch.arange(config.num_chains) % NUM_CLASSES
    return collect_pairs(
        bundle.reference,
        bundle.schedule,
        step_rewards,
        shape=IMAGE_SHAPE,
        num_chains=config.num_chains,
        pairs_per_state=config.pairs_per_state,
        steps=training_step_indices(bundle.schedule, config.skip_last),
        cond=prompts,
        seed=seed,
        batch_size=config.batch_size,
    )


def sampler_bundle(
    bundle: DigitsBundle, num_steps: int = NUM_INFERENCE_STEPS, eta: float | None = None
) -> DigitsBundle:
    """The domain sampled in ``num_steps`` steps: strided DDPM, or DDIM with ``eta`` > 0.

    Same base, rewards and noise tables; the reference (and every model trained on the
    returned bundle) steps with this sampler. DDIM experts have the ``"fixed"`` kind: their
    variance is set by eta. Experts already in ``bundle`` are left as they are.
    """
    bundle = _check_bundle(bundle)
    num_steps = check_int(num_steps, "num_steps", low=1, high=1000)
    if eta is not None:
        eta = check_number(eta, "eta", low=0.0, low_inclusive=False)
    config = bundle.manifest.get("scheduler") or SCHEDULER_CONFIG
    if eta is None:
        schedule, spec = make_schedule(num_steps, config), expert_spec("fixed")
    else:
        from diffusers import DDIMScheduler

        keys = (
            "num_train_timesteps",
            "beta_schedule",
            "prediction_type",
            "clip_sample",
            "clip_sample_range",
        )
        ddim = DDIMScheduler(**{k: config[k] for k in keys if k in config})
        schedule = Schedule.from_scheduler(ddim, num_steps)
        spec = StepSpec("epsilon", "fixed_small", float(eta))
    reference = Expert(bundle.reference.denoiser, spec, 1.0, "base")
    return replace(bundle, schedule=schedule, reference=reference)


def model_spec(bundle: DigitsBundle, kind: str) -> StepSpec:
    """The step spec of a model of ``kind`` trained on ``bundle``: its sampler's (eta for DDIM)."""
    check_expert_kind(kind)
    if bundle.schedule.sampler == "ddim":
        if kind == "learned":
            raise ValueError("a DDIM sampler sets the variance by eta: use kind 'fixed'")
        return bundle.reference.spec
    return expert_spec(kind)


def _full_model(base: DigitDenoiser, kind: str) -> nn.Module:
    """A trainable copy of the base (with a zero variance head for ``"learned"``)."""
    start = base.with_variance_head() if kind == "learned" else copy.deepcopy(base)
    return start.train(False).requires_grad_(True)


def apply_adapter(
    base: DigitDenoiser, adapter: Mapping[str, Tensor], lora: LoraSettings | Mapping, kind: str
) -> DigitDenoiser:
    """The merged network base + adapter (as :func:`train_expert` returns it), eval mode.

    The merge is :func:`msdda.digits.lora.merged_denoiser` (peft's arithmetic, no peft).
    """
    check_expert_kind(kind)
    return merged_denoiser(base, adapter, lora, kind)


def save_adapter(path: str | Path, aligned: AlignedModel) -> None:
    """Write ``aligned``'s adapter as safetensors (atomically), with what rebuilds it as metadata.

    Raises:
        ValueError: ``aligned`` is a full fine-tune (it has no adapter: store it with
            ``add_expert(..., adapter=None)``).
    """
    lora_adapter = aligned.lora_adapter
    if lora_adapter is None:
        raise ValueError("a full fine-tune has no adapter: store it with add_expert(adapter=None)")
    meta = adapter_metadata(
        lora_adapter,
        weights=aligned.weights,
        kind=aligned.kind,
        kl_coef=aligned.kl_coef,
        seed=aligned.training["seed"],
    )
    path = check_output_path(path)
    with writing(path):
        atomic_write_bytes(path, encode_adapter(aligned.adapter, meta))


def load_adapter(path: str | Path, base: DigitDenoiser) -> tuple[DigitDenoiser, dict[str, Any]]:
    """The merged model of an adapter file on ``base``, and its metadata (weights, kind, ...).

    Raises:
        InputFileError: naming ``path`` when it is missing, empty, a pickle file, not a
            safetensors file, not an adapter file, does not fit ``base`` (checked on its
            header, before any tensor is loaded), or was trained on another base.
    """
    if not isinstance(base, DigitDenoiser):
        raise TypeError(f"base must be a DigitDenoiser, got {type(base).__name__}")
    adapter, info = read_adapter_file(
        path, base_config=base.config, fingerprint=base_fingerprint(base)
    )
    try:
        model = merged_denoiser(base, adapter, info["lora"], info["kind"])
    except ValueError as err:
        raise InputFileError(path, f"the adapter file does not fit the base: {err}") from None
    info = {k: v for k, v in info.items() if k != "base"}
    info["lora"] = info["lora"].to_dict()
    return model, info


_BASE_REWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base_reward_samples(bundle: DigitsBundle, num_samples: int) -> dict[str, Tensor]:
    cache = _BASE_REWARDS.setdefault(bundle, {})
    if num_samples not in cache:
        cache[num_samples] = reward_samples(bundle, bundle.reference, num_samples)
    return cache[num_samples]


@torch.no_grad()
def reward_samples(
    bundle: DigitsBundle, expert: Expert, num_samples: int = 1000, seed: int = 10_000
) -> dict[str, Tensor]:
    """Per-sample standardised rewards (and 0/1 accuracy) of ``expert``: (num_samples,) each.

    Prompts cycle through the digits; ``seed`` seeds the chains' noise, so two models
    evaluated with the same seed are compared on the same noise (paired).
    """
    num_samples = check_int(num_samples, "num_samples", low=1, high=MAX_COUNT)
    seed = check_seed(seed)
    prompts = torch.arange(num_samples) % NUM_CLASSES
    images = sample_expert(expert, prompts, bundle.schedule, seed)
    out = {name: r(images, prompts).double() for name, r in bundle.rewards.items()}
    out["accuracy"] = (bundle.classifier(images).argmax(1) == prompts).double()
    return out


def mean_rewards(
    bundle: DigitsBundle, expert: Expert, num_samples: int = 500, seed: int = 10_000
) -> dict[str, float]:
    """Mean standardised reward (and classifier accuracy) of ``expert``'s samples.

    Prompts cycle through the digits; ``seed`` seeds the chains' noise.
    """
    return {
        k: float(v.mean()) for k, v in reward_samples(bundle, expert, num_samples, seed).items()
    }


#: The old name of :func:`mean_rewards` (``msdda.evaluation`` has its own reward scoring).
evaluate_rewards = mean_rewards


def reward_gains(
    got: Mapping[str, Tensor], base: Mapping[str, Tensor]
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean paired gains got - base per reward, and their standard errors (same noise)."""
    means, ses = {}, {}
    for name, values in got.items():
        diff = values - base[name]
        means[name] = float(diff.mean())
        ses[name] = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return means, ses


@torch.no_grad()
def variance_offsets(expert: Expert, pairs: PairSet, max_states: int = 4096) -> dict[str, float]:
    """How far a learned variance moved from fixed_small: stats of v = log(var / beta_tilde).

    Measured at (up to ``max_states``) reference states of ``pairs``.
    """
    max_states = check_int(max_states, "max_states", low=1)
    n = min(max_states, len(pairs))
    idx = torch.linspace(0, len(pairs) - 1, n).long()
    out = expert.denoiser(pairs.states[idx], pairs.timesteps[idx], pairs.cond[idx])
    if out.shape[1] != 2 * pairs.states.shape[1]:
        return {"mean": 0.0, "mean_abs": 0.0, "max_abs": 0.0}
    v = out[:, pairs.states.shape[1] :]
    return {
        "mean": float(v.mean()),
        "mean_abs": float(v.abs().mean()),
        "max_abs": float(v.abs().max()),
    }


def _fit(
    bundle: DigitsBundle,
    pairs: PairSet,
    rewards: Tensor,
    kind: str,
    config: AlignConfig,
    seed: int,
    progress: Progress | None,
) -> tuple[nn.Module, Any]:
    """The peft model fine-tuned by step-level DPO on ``pairs``, and the trainer's result."""
    with torch.random.fork_rng(devices=[]):  # seeded LoRA init, global RNG untouched
        torch.manual_seed(seed)
        if config.adapter == "full":
            peft_model = _full_model(bundle.base, kind)
        else:
            peft_model = peft_lora_model(bundle.base, kind, config.lora)
    variance_params = [
        p for n, p in peft_model.named_parameters() if "var_out" in n and p.requires_grad
    ]
    train_config = TrainConfig(
        kl_coef=config.kl_coef,
        labels="soft",
        num_steps=config.num_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        variance_lr=config.variance_lr,
        max_grad_norm=config.max_grad_norm,
        seed=seed,
        log_every=max(1, config.num_steps // 20),
    )
    callback = None
    if progress is not None:

        def callback(record) -> None:
            progress(record.step, config.num_steps, record.loss)

    result = train_dpo(
        _guided(peft_model, bundle),
        pairs,
        rewards,
        bundle.schedule,
        model_spec(bundle, kind),
        train_config,
        variance_parameters=variance_params,
        callback=callback,
    )
    return peft_model, result


def _metrics(
    bundle: DigitsBundle,
    expert: Expert,
    pairs: PairSet,
    rewards: Tensor,
    weights: Mapping[str, float],
    config: AlignConfig,
    result: Any,
) -> dict[str, Any]:
    """Fit on the training pairs and, with ``config.eval_samples``, held-out reward gains."""
    fit = evaluate_policy(
        expert.denoiser, pairs, rewards, bundle.schedule, expert.spec, config.kl_coef
    )
    metrics: dict[str, Any] = {
        "train_loss": fit.loss,
        "train_implicit_accuracy": fit.accuracy,
        "kl_per_state": fit.kl,
        "kl_per_step": {str(k): v for k, v in fit.kl_per_step.items()},
        "train_seconds": result.seconds,
    }
    if expert.spec.variance_type == "learned_log":  # the "learned" kind
        metrics["log_variance_offset"] = variance_offsets(expert, pairs)
    if config.eval_samples:
        got = reward_samples(bundle, expert, config.eval_samples)
        base = _base_reward_samples(bundle, config.eval_samples)
        gains, gain_se = reward_gains(got, base)
        metrics["eval_samples"] = config.eval_samples
        metrics["rewards"] = {k: float(v.mean()) for k, v in got.items()}
        metrics["base_rewards"] = {k: float(v.mean()) for k, v in base.items()}
        metrics["reward_gains"] = gains  # held-out, paired with the base on the same noise
        metrics["reward_gain_se"] = gain_se
        metrics["weighted_reward_gain"] = sum(w * gains[n] for n, w in weights.items())
    return metrics


def train_aligned(
    bundle: DigitsBundle,
    weights: Mapping[str, float],
    kind: str = "fixed",
    *,
    pairs: PairSet | None = None,
    config: AlignConfig = AlignConfig(),
    pairs_config: PairsConfig = PairsConfig(),
    seed: int = 0,
    progress: Progress | None = None,
) -> AlignedModel:
    """Fine-tune the base towards p_ref * exp(sum_i w_i r_i / beta) per step (r_i standardised).

    Args:
        bundle: the domain (base, schedule, standardised rewards); experts in it are unused.
        weights: reward name -> weight, e.g. ``{"boldness": 1.0}``.
        kind: ``"fixed"`` (fixed_small variance) or ``"learned"`` (learned_log head).
        pairs: precomputed :func:`collect_digit_pairs` (computed here from ``pairs_config``
            and ``seed`` when None); share them between the models of one seed.
        config: beta, optimiser and LoRA settings.
        seed: seeds the pairs (if computed here), the LoRA initialisation and the minibatches.
        progress: ``progress(step, total, loss)``.
    """
    bundle = _check_bundle(bundle)
    weights = _training_weights(weights)
    check_expert_kind(kind)
    seed = check_seed(seed)
    if not isinstance(config, AlignConfig):
        raise TypeError(f"config must be an AlignConfig, got {type(config).__name__}")
    start = time.perf_counter()
    pairs_record: dict[str, Any] = {"given": pairs is not None}
    if pairs is None:
        pairs = collect_digit_pairs(bundle, pairs_config, seed)
        pairs_record.update(pairs_config.to_dict(), seed=seed)
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be a PairSet, got {type(pairs).__name__}")
    rewards = pairs.weighted_rewards(weights)
    peft_model, result = _fit(bundle, pairs, rewards, kind, config, seed, progress)
    if config.adapter == "full":
        adapter, model = {}, peft_model.eval().requires_grad_(False)
    else:
        adapter = peft_adapter_state(peft_model)
        model = peft_model.merge_and_unload().eval().requires_grad_(False)
    name, beta = f"{_weights_label(weights)}/{kind}", float(config.kl_coef)
    expert = Expert(_guided(model, bundle), model_spec(bundle, kind), beta, name)
    metrics = _metrics(bundle, expert, pairs, rewards, weights, config, result)
    metrics["seconds"] = time.perf_counter() - start
    pairs_record.update(
        num_pairs=len(pairs), trained_steps=sorted(pairs.step_indices.unique().tolist())
    )
    training = {
        "method": "step-level DPO, soft Bradley-Terry labels",
        "seed": seed,
        "weights": weights,
        "kind": kind,
        "config": config.to_dict(),
        "pairs": pairs_record,
        "history": [asdict(r) for r in result.history],
    }
    fingerprint = base_fingerprint(bundle.base)
    return AlignedModel(model, expert, weights, kind, beta, adapter, fingerprint, metrics, training)


def train_expert(
    bundle: DigitsBundle, reward: str, kind: str = "fixed", **options: Unpack[TrainOptions]
) -> AlignedModel:
    """A single-objective expert for the standardised reward ``reward`` (see :func:`train_aligned`).

    Save it with ``msdda.digits.add_expert(folder, m.model, reward=reward, kind=kind,
    kl_coef=m.kl_coef, seed=seed, adapter=m.lora_adapter, metrics=m.metrics,
    training=m.training)`` (``adapter=None`` stores the full network instead).
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; known rewards: {', '.join(REWARDS)}")
    return train_aligned(bundle, {reward: 1.0}, kind, **options)


def train_oracle(
    bundle: DigitsBundle,
    weights: Mapping[str, float],
    kind: str = "fixed",
    **options: Unpack[TrainOptions],
) -> AlignedModel:
    """An oracle for sum_i w_i r_i, e.g. ``{"legibility": 0.25, "boldness": 0.75}`` (see
    :func:`train_aligned`).

    Save it with ``msdda.digits.add_oracle(folder, m.model, weights=m.weights, kind=kind,
    kl_coef=m.kl_coef, seed=seed, adapter=m.lora_adapter, metrics=m.metrics,
    training=m.training)``.
    """
    return train_aligned(bundle, weights, kind, **options)


def train_experts_and_oracles(
    bundle: DigitsBundle,
    *,
    seed: int = 0,
    rewards: tuple[str, ...] = tuple(REWARDS),
    oracle_weights: tuple[Mapping[str, float], ...] = ORACLE_WEIGHTS,
    kinds: tuple[str, ...] = EXPERT_KINDS,
    config: AlignConfig = AlignConfig(),
    pairs_config: PairsConfig = PairsConfig(),
    progress: Callable[[str, int, int, float], None] | None = None,
) -> list[AlignedModel]:
    """Every expert (each reward x kind) and oracle (each weight x kind) of one seed, on one pair set.

    ``progress(label, step, total, loss)`` with labels like ``"expert boldness/fixed"``.
    Save experts with ``add_expert`` (``len(m.weights) == 1``) and oracles with ``add_oracle``.
    """
    seed = check_seed(seed)
    pairs = collect_digit_pairs(_check_bundle(bundle), pairs_config, seed)
    jobs = [(f"expert {r}/{k}", {r: 1.0}, k) for r in rewards for k in kinds]
    jobs += [
        (f"oracle {_weights_label(ws)}/{k}", dict(ws), k) for ws in oracle_weights for k in kinds
    ]
    out = []
    for label, weights, kind in jobs:
        report = (
            None
            if progress is None
            else (lambda s, n, loss, label=label: progress(label, s, n, loss))
        )
        out.append(
            train_aligned(
                bundle,
                weights,
                kind,
                pairs=pairs,
                config=config,
                pairs_config=pairs_config,
                seed=seed,
                progress=report,
            )
        )
    return out
