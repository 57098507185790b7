"""``train_all``: reproduce the digits weights folder from scratch on a CPU.

Stages, in order, all seeded: the classifier, the base denoiser, the reward
normalisation (raw rewards on base samples), then, through :mod:`msdda.digits.align`,
for every training seed: one set of reference pairs, the single-objective experts (every
reward, fixed and learned variance) and the oracles (every oracle weight, both kinds),
stored as LoRA adapters of the base. Everything is written to a staging folder beside
the target and moved in only when the run has finished, so a failed or interrupted run
leaves the previous weights untouched.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import check_output_path, writing
from ..experts import Expert
from ..validation import check_int, check_number, check_positive, check_seed, check_seeds
from .bundle import expert_spec
from .data import NUM_CLASSES
from .models import DigitClassifier, DigitDenoiser, GuidedDenoiser
from .rewards import REWARDS, RewardNormalisation, fit_normalisation, make_rewards
from .sampling import sample_expert
from .schedule import NUM_INFERENCE_STEPS, SCHEDULER_CONFIG, make_schedule
from .store import (
    EXPERT_KINDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    check_expert_kind,
    save_module,
    write_manifest,
)
from .train import (
    BaseTraining,
    ClassifierTraining,
    per_class_accuracy,
    train_base,
    train_classifier,
)

__all__ = [
    "DigitsTrainConfig",
    "ToyTrainConfig",
    "StageProgress",
    "train_all",
    "base_sample_metrics",
    "write_domain_folder",
]

#: ``progress(stage, step, total, loss)``: stage is "classifier", "base", "normalisation",
#: "pairs seed <s>", "expert <reward>/<kind> seed <s>" or "oracle <weights>/<kind> seed <s>";
#: loss may be NaN.
StageProgress = Callable[[str, int, int, float], None]

#: Every reward with fixed and learned variance.
DEFAULT_EXPERTS: tuple[tuple[str, str], ...] = tuple(
    (reward, kind) for kind in EXPERT_KINDS for reward in ("legibility", "boldness", "symmetry")
)


@dataclass(frozen=True)
class DigitsTrainConfig:
    """Everything ``msdda train`` does, with its seeds."""

    classifier: ClassifierTraining = field(default_factory=ClassifierTraining)
    base: BaseTraining = field(default_factory=BaseTraining)
    guidance_scale: float = 1.0  # classifier-free guidance of every denoiser (1 = none)
    legibility_temperature: float = 8.0  # classifier logits / T: unsaturated on base samples
    normalisation_samples_per_prompt: int = 100  # base samples per digit for reward mean/std
    normalisation_seed: int = 1  # noise of those base samples
    align: bool = True  # train experts and oracles (msdda.digits.align)
    align_seeds: tuple[int, ...] = (
        0,
        1,
    )  # training seeds (pairs, LoRA init, batches); first: default
    experts: tuple[tuple[str, str], ...] = DEFAULT_EXPERTS  # (reward, kind), each seed
    oracle_kinds: tuple[str, ...] = EXPERT_KINDS  # kinds of the oracles, each seed
    oracle_weights: tuple[tuple[tuple[str, float], ...], ...] | None = None  # None: ORACLE_WEIGHTS
    align_config: Any = None  # msdda.digits.align.AlignConfig (None: its defaults)
    pairs_config: Any = None  # msdda.digits.align.PairsConfig (None: its defaults)

    def __post_init__(self) -> None:
        for reward, kind in self.experts:
            if reward not in REWARDS:
                raise ValueError(f"unknown reward {reward!r}; known rewards: {', '.join(REWARDS)}")
            check_expert_kind(kind, "expert kind")
        for kind in self.oracle_kinds:
            if kind not in EXPERT_KINDS:
                raise ValueError(f"oracle kinds must be in {EXPERT_KINDS}, got {kind!r}")
        seeds = tuple(check_seeds(self.align_seeds, "align_seeds"))
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"align_seeds must be distinct seeds, at least one, got {seeds!r}")
        object.__setattr__(self, "align_seeds", seeds)
        for name, cls in (("classifier", ClassifierTraining), ("base", BaseTraining)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"DigitsTrainConfig.{name} must be a {cls.__name__}")
        check_number(self.guidance_scale, "guidance_scale")
        check_positive(self.legibility_temperature, "legibility_temperature")
        check_int(
            self.normalisation_samples_per_prompt,
            "normalisation_samples_per_prompt",
            low=2,
            high=1_000_000,
        )
        check_seed(self.normalisation_seed, "normalisation_seed")
        if not isinstance(self.align, bool):
            raise TypeError(f"align must be a bool, got {self.align!r}")

    def to_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if k not in ("align_config", "pairs_config", "classifier", "base")
        }
        d["classifier"] = self.classifier.to_dict()
        d["base"] = self.base.to_dict()
        d["experts"] = [list(e) for e in self.experts]
        d["oracle_kinds"] = list(self.oracle_kinds)
        d["align_seeds"] = list(self.align_seeds)
        if self.oracle_weights is not None:
            d["oracle_weights"] = [dict(w) for w in self.oracle_weights]
        for k in ("align_config", "pairs_config"):
            v = getattr(self, k)
            d[k] = None if v is None else v.to_dict()
        return d


def _versions() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors
    import sklearn

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # only the aligner needs it
        peft_version = "not installed"

    from ..version import __version__

    return {
        "msdda": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "peft": peft_version,
    }


@torch.no_grad()
def base_sample_metrics(
    images: torch.Tensor, prompts: torch.Tensor, classifier: DigitClassifier, temperature: float
) -> dict[str, Any]:
    """Quality of base samples: accuracy of the prompted digit and legibility saturation."""
    logits = classifier(images)
    p_t = torch.softmax(logits / temperature, 1).gather(1, prompts[:, None]).squeeze(1)
    per_class = per_class_accuracy(classifier, images, prompts)
    return {
        "num_samples": int(images.shape[0]),
        "prompt_accuracy": float((logits.argmax(1) == prompts).float().mean()),
        "prompt_accuracy_per_digit": per_class,
        "tempered_prob_mean": float(p_t.mean()),
        "tempered_prob_frac_above_0.99": float((p_t > 0.99).float().mean()),
    }


def _noop(stage: str, step: int, total: int, loss: float) -> None:
    pass


def _stage_progress(progress: StageProgress, stage: str):
    return lambda step, total, loss: progress(stage, step, total, loss)


def _train_domain(stage_dir: Path, cfg: DigitsTrainConfig, progress: StageProgress) -> dict:
    """Classifier, base and normalisation into ``stage_dir``; returns the manifest."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    classifier, clf_metrics = train_classifier(
        cfg.classifier, _stage_progress(progress, "classifier")
    )
    timings["classifier"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    schedule = make_schedule(NUM_INFERENCE_STEPS)
    base, base_metrics = train_base(schedule, cfg.base, _stage_progress(progress, "base"))
    timings["base"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = cfg.normalisation_samples_per_prompt * NUM_CLASSES
    prompts = torch.arange(n) % NUM_CLASSES
    denoiser = base if cfg.guidance_scale == 1.0 else GuidedDenoiser(base, cfg.guidance_scale)
    reference = Expert(denoiser, expert_spec("fixed"), 1.0, "base")
    total = len(schedule.timesteps)
    images = sample_expert(
        reference,
        prompts,
        schedule,
        cfg.normalisation_seed,
        callback=lambda i, t, x: progress("normalisation", i + 1, total, float("nan")),
    )
    raw = make_rewards(classifier, cfg.legibility_temperature)
    stats = fit_normalisation(raw, images, prompts)
    sample_metrics = base_sample_metrics(images, prompts, classifier, cfg.legibility_temperature)
    sample_metrics["raw_reward_means"] = {k: s.mean for k, s in stats.items()}
    timings["normalisation"] = time.perf_counter() - t0

    return write_domain_folder(
        stage_dir,
        classifier,
        base,
        stats,
        legibility_temperature=cfg.legibility_temperature,
        guidance_scale=cfg.guidance_scale,
        normalisation_samples=n,
        classifier_record={"metrics": clf_metrics, "training": cfg.classifier.to_dict()},
        base_record={
            "metrics": {**base_metrics, "samples": sample_metrics},
            "training": cfg.base.to_dict(),
        },
        extra={
            "seeds": {
                "classifier": cfg.classifier.seed,
                "base": cfg.base.seed,
                "normalisation": cfg.normalisation_seed,
                "align": list(cfg.align_seeds) if cfg.align else [],
                "data_split": 0,
            },
            "default_seed": cfg.align_seeds[0],
            "timings_s": timings,
            "toy_train_config": cfg.to_dict(),
        },
    )


def _save_model(
    folder: Path, name: str, model: DigitClassifier | DigitDenoiser, record: Mapping | None
) -> dict:
    """Save ``model`` as ``<name>.safetensors``; its manifest entry (plus ``record``'s fields)."""
    file = f"{name}.safetensors"
    return {
        "file": file,
        "sha256": save_module(folder / file, model),
        "config": model.config.to_dict(),
        **dict(record or {}),
    }


def write_domain_folder(
    folder: str | Path,
    classifier: DigitClassifier,
    base: DigitDenoiser,
    normalisation: Mapping[str, RewardNormalisation],
    *,
    legibility_temperature: float,
    guidance_scale: float = 1.0,
    normalisation_samples: int | None = None,
    classifier_record: Mapping[str, Any] | None = None,
    base_record: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``classifier.safetensors``, ``base.safetensors`` and a manifest with no experts.

    The starting point of a weights folder (experts and oracles are added with
    :func:`~msdda.digits.store.add_expert` / :func:`~msdda.digits.store.add_oracle`).
    ``normalisation_samples`` records how many base samples the normalisation used.
    ``*_record`` add fields (metrics, training settings) to the models' manifest entries;
    ``extra`` adds top-level fields. Returns the manifest.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"weights folder {folder} does not exist")
    legibility_temperature = check_positive(legibility_temperature, "legibility_temperature")
    guidance_scale = check_number(guidance_scale, "guidance_scale")
    if normalisation_samples is not None:
        check_int(normalisation_samples, "normalisation_samples", low=1)
    if base.config.variance_head:
        raise ValueError("base must not have a variance head")
    missing = [n for n in REWARDS if n not in normalisation]
    if missing:
        raise ValueError(f"normalisation is missing reward(s) {missing}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "scheduler": dict(SCHEDULER_CONFIG),
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "sampler": "ddpm",
        "guidance_scale": float(guidance_scale),
        "legibility_temperature": float(legibility_temperature),
        "classifier": _save_model(folder, "classifier", classifier, classifier_record),
        "base": _save_model(folder, "base", base, base_record),
        "reward_normalisation": {
            k: {"mean": s.mean, "std": s.std, "num_samples": normalisation_samples}
            for k, s in normalisation.items()
        },
        "experts": [],
        "oracles": [],
        "timings_s": {},
        **dict(extra or {}),
    }
    write_manifest(folder, manifest)
    return manifest


def _align(stage_dir: Path, cfg: DigitsTrainConfig, progress: StageProgress) -> dict[str, float]:
    """Experts and oracles of every seed via :mod:`msdda.digits.align`, stored as adapters.

    Returns the seconds of every stage (pairs and each model, by stage name).
    """
    from . import align
    from .bundle import load_digits_bundle
    from .catalog import add_expert, add_oracle

    timings: dict[str, float] = {}
    bundle = load_digits_bundle(stage_dir)
    align_config = cfg.align_config or align.AlignConfig()
    pairs_config = cfg.pairs_config or align.PairsConfig()
    oracle_weights = (
        align.ORACLE_WEIGHTS
        if cfg.oracle_weights is None
        else tuple(dict(w) for w in cfg.oracle_weights)
    )
    jobs = [(f"expert {r}/{k}", {r: 1.0}, k) for r, k in cfg.experts]
    jobs += [
        ("oracle " + ",".join(f"{n}={w:g}" for n, w in weights.items()) + f"/{k}", weights, k)
        for k in cfg.oracle_kinds
        for weights in oracle_weights
    ]
    for seed in cfg.align_seeds:
        t0 = time.perf_counter()
        stage = f"pairs seed {seed}"
        progress(stage, 0, 1, float("nan"))
        pairs = align.collect_digit_pairs(bundle, pairs_config, seed)
        progress(stage, 1, 1, float("nan"))
        timings[stage] = time.perf_counter() - t0
        for label, weights, kind in jobs:
            t0 = time.perf_counter()
            stage = f"{label} seed {seed}"
            m = align.train_aligned(
                bundle,
                weights,
                kind,
                pairs=pairs,
                config=align_config,
                pairs_config=pairs_config,
                seed=seed,
                progress=_stage_progress(progress, stage),
            )
            record = dict(
                kind=kind,
                kl_coef=m.kl_coef,
                seed=seed,
                adapter=m.lora_adapter,
                metrics=m.metrics,
                training=m.training,
            )
            if label.startswith("expert"):
                add_expert(stage_dir, m.model, reward=next(iter(weights)), **record)
            else:
                add_oracle(stage_dir, m.model, weights=m.weights, **record)
            timings[stage] = time.perf_counter() - t0
    return timings


_OWNED_PATTERNS = (
    "classifier.safetensors",
    "base.safetensors",
    "expert-*.safetensors",
    "oracle-*.safetensors",
)


def _publish(stage_dir: Path, out_dir: Path) -> None:
    """Move the staged files into ``out_dir`` (manifest last) and drop stale model files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((stage_dir / MANIFEST_NAME).read_text())
    keep = {manifest["classifier"]["file"], manifest["base"]["file"]}
    keep |= {e["file"] for e in manifest["experts"]} | {e["file"] for e in manifest["oracles"]}
    for f in stage_dir.iterdir():
        if f.name != MANIFEST_NAME:
            os.replace(f, out_dir / f.name)
    os.replace(stage_dir / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    for pattern in _OWNED_PATTERNS:
        for f in out_dir.glob(pattern):
            if f.name not in keep:
                f.unlink()


def train_all(
    out_dir: str | Path,
    cfg: DigitsTrainConfig = DigitsTrainConfig(),
    progress: StageProgress | None = None,
) -> dict:
    """Train every model of the digits domain and write the weights folder ``out_dir``.

    Returns the manifest written. Threads are left as the caller set them; results are
    deterministic for a fixed machine and thread count.
    """
    out_dir = Path(out_dir)
    if not isinstance(cfg, DigitsTrainConfig):
        raise TypeError(f"cfg must be a DigitsTrainConfig, got {type(cfg).__name__}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise ValueError(f"the folder of out_dir {out_dir} does not exist")
    check_output_path(out_dir, directory=True)
    progress = progress or _noop
    start = time.perf_counter()
    with writing(out_dir):
        stage_dir = Path(tempfile.mkdtemp(prefix=".msdda-staging-", dir=out_dir.parent))
    try:
        manifest = _train_domain(stage_dir, cfg, progress)
        if cfg.align:
            timings = _align(stage_dir, cfg, progress)
            manifest = json.loads((stage_dir / MANIFEST_NAME).read_text())
            manifest["timings_s"].update(timings)
        manifest["timings_s"]["total"] = time.perf_counter() - start
        manifest["torch_num_threads"] = torch.get_num_threads()
        write_manifest(stage_dir, manifest)
        with writing(out_dir):
            _publish(stage_dir, out_dir)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return manifest


#: The old name of :class:`DigitsTrainConfig` ("toy" is the 2-D mixture now).
ToyTrainConfig = DigitsTrainConfig
