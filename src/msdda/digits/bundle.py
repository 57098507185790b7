"""Everything the digits domain ships, loaded in one call: :func:`load_digits_bundle`.

``bundle.schedule`` (msdda :class:`~msdda.Schedule`, 50 DDPM steps), ``bundle.base``
(the :class:`DigitDenoiser`), ``bundle.reference`` (the base as an msdda
:class:`~msdda.Expert`, fixed_small), ``bundle.classifier``, ``bundle.rewards``
(standardised, by name) and ``bundle.raw_rewards``, ``bundle.experts`` (by
``(reward, kind)`` with kind ``"fixed"`` or ``"learned"``), ``bundle.oracles`` and
``bundle.manifest``. Use :meth:`DigitsBundle.expert` and :meth:`DigitsBundle.oracle`
to look models up: they say clearly what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..experts import Expert
from ..gaussians import Schedule, StepSpec
from ..rewards import Reward
from .models import (
    ClassifierConfig,
    DenoiserConfig,
    DigitClassifier,
    DigitDenoiser,
    GuidedDenoiser,
)
from .rewards import REWARDS, RewardNormalisation, StandardisedReward, make_rewards, standardise
from .schedule import NUM_INFERENCE_STEPS, make_schedule
from .store import DEFAULT_WEIGHTS_DIR, EXPERT_KINDS, load_module_state, read_manifest

__all__ = ["DigitsBundle", "Oracle", "load_digits_bundle", "expert_spec", "load_denoiser"]


def expert_spec(kind: str) -> StepSpec:
    """The step spec of an expert kind: epsilon prediction, fixed_small or learned_log."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"expert kind must be one of {EXPERT_KINDS}, got {kind!r}")
    return StepSpec("epsilon", "learned_log" if kind == "learned" else "fixed_small")


@dataclass(frozen=True, eq=False)
class Oracle:
    """A model fine-tuned on the weighted reward sum_i w_i r_i itself."""

    weights: dict[str, float]  # preference weights by reward name
    kind: str  # "fixed" or "learned"
    expert: Expert  # the model as an msdda Expert (kl_coef = its beta)


@dataclass(frozen=True, eq=False)
class DigitsBundle:
    """The digits domain's models, rewards and schedule (see the module docstring)."""

    path: Path  # the weights folder
    manifest: dict  # manifest.json as loaded
    schedule: Schedule  # 50-step strided DDPM
    guidance_scale: float  # classifier-free guidance applied to every denoiser
    base: DigitDenoiser  # unguided base network
    reference: Expert  # base (guided), fixed_small: the reference policy p_ref
    classifier: DigitClassifier
    raw_rewards: dict[str, Reward]  # by name, raw scale
    rewards: dict[str, StandardisedReward]  # by name, standardised on base samples
    experts: dict[tuple[str, str], Expert] = field(default_factory=dict)  # (reward, kind)
    oracles: tuple[Oracle, ...] = ()

    def expert_names(self, kind: str = "fixed") -> tuple[str, ...]:
        """Rewards that have an expert of ``kind``."""
        return tuple(name for name, k in self.experts if k == kind)

    def expert(self, name: str, kind: str = "fixed") -> Expert:
        """The expert aligned to reward ``name`` with variance ``kind``; a clear error if absent."""
        if kind not in EXPERT_KINDS:
            raise ValueError(f"expert kind must be one of {EXPERT_KINDS}, got {kind!r}")
        if (name, kind) not in self.experts:
            have = ", ".join(self.expert_names(kind)) or "none"
            raise ValueError(
                f"no {kind!r} expert for reward {name!r} in {self.path} (available {kind} "
                f"experts: {have}); train them with `msdda toy train`"
            )
        return self.experts[(name, kind)]

    def oracle(self, weights: Mapping[str, float], kind: str = "fixed") -> Expert:
        """The oracle trained on exactly these preference weights (zeros may be omitted)."""
        want = {n: float(w) for n, w in weights.items() if float(w) != 0.0}
        for o in self.oracles:
            have = {n: w for n, w in o.weights.items() if w != 0.0}
            if o.kind == kind and have.keys() == want.keys():
                if all(math.isclose(have[n], want[n], abs_tol=1e-6) for n in want):
                    return o.expert
        known = "; ".join(f"{o.weights} ({o.kind})" for o in self.oracles) or "none"
        raise ValueError(
            f"no {kind!r} oracle for weights {dict(weights)} in {self.path} (available: {known})"
        )


def _config(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: config must be an object")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ValueError(f"{where}: bad config {raw}: {err}") from None


def _entry_file(weights_dir: Path, entry: Any, where: str) -> tuple[Path, str | None]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise ValueError(f"manifest {where} entry has no 'file'")
    return weights_dir / entry["file"], entry.get("sha256")


def load_denoiser(weights_dir: Path, entry: dict, where: str = "model") -> DigitDenoiser:
    """A :class:`DigitDenoiser` from a manifest entry (``file``, ``sha256``, ``config``)."""
    file, sha = _entry_file(Path(weights_dir), entry, where)
    model = DigitDenoiser(_config(DenoiserConfig, entry.get("config"), f"{file}"))
    return load_module_state(file, model, sha)


def _wrap(model: nn.Module, guidance_scale: float) -> nn.Module:
    return model if guidance_scale == 1.0 else GuidedDenoiser(model, guidance_scale)


def _as_expert(model: DigitDenoiser, kind: str, kl_coef: Any, name: str, g: float) -> Expert:
    want = kind == "learned"
    if model.config.variance_head != want:
        raise ValueError(f"{name}: kind {kind!r} does not match the model's variance head")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef > 0:
        raise ValueError(f"{name}: kl_coef must be a positive number, got {kl_coef!r}")
    return Expert(_wrap(model, g), expert_spec(kind), float(kl_coef), name)


def _entries(manifest: dict, key: str, where: Path) -> list[dict]:
    entries = manifest.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"manifest {where}: {key!r} must be a list of objects")
    return entries


def load_digits_bundle(
    path: str | Path | None = None, *, num_inference_steps: int = NUM_INFERENCE_STEPS
) -> DigitsBundle:
    """Load a digits weights folder (default: the shipped ``msdda/digits/weights``).

    Raises:
        ValueError: naming the file, when the manifest or a weight file is missing,
            corrupt or does not fit its model.
    """
    weights_dir = Path(DEFAULT_WEIGHTS_DIR if path is None else path)
    if not weights_dir.is_dir():
        raise ValueError(f"weights folder {weights_dir} does not exist")
    manifest = read_manifest(weights_dir)
    where = weights_dir / "manifest.json"
    for key in ("base", "classifier", "reward_normalisation", "legibility_temperature"):
        if key not in manifest:
            raise ValueError(f"manifest {where} has no {key!r}")
    g = float(manifest.get("guidance_scale", 1.0))
    schedule = make_schedule(num_inference_steps, manifest.get("scheduler"))

    base = load_denoiser(weights_dir, manifest["base"], "base")
    if base.config.variance_head:
        raise ValueError(
            f"{weights_dir / manifest['base']['file']}: the base must not have a variance head"
        )
    file, sha = _entry_file(weights_dir, manifest["classifier"], "classifier")
    classifier = DigitClassifier(
        _config(ClassifierConfig, manifest["classifier"].get("config"), f"{file}")
    )
    load_module_state(file, classifier, sha)

    raw = make_rewards(classifier, float(manifest["legibility_temperature"]))
    try:
        stats = {
            n: RewardNormalisation(float(s["mean"]), float(s["std"]))
            for n, s in manifest["reward_normalisation"].items()
        }
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"manifest {where}: bad reward_normalisation: {err}") from None
    rewards = standardise(raw, stats)

    experts: dict[tuple[str, str], Expert] = {}
    for entry in _entries(manifest, "experts", where):
        reward, kind = entry.get("reward"), entry.get("kind")
        if reward not in REWARDS or kind not in EXPERT_KINDS:
            raise ValueError(
                f"manifest {where}: expert entry with reward {reward!r}, kind {kind!r}"
            )
        model = load_denoiser(weights_dir, entry, f"expert {reward}/{kind}")
        experts[(reward, kind)] = _as_expert(
            model, kind, entry.get("kl_coef"), f"{reward}/{kind}", g
        )
    oracles = []
    for entry in _entries(manifest, "oracles", where):
        weights, kind = entry.get("weights"), entry.get("kind")
        if not isinstance(weights, dict) or kind not in EXPERT_KINDS:
            raise ValueError(
                f"manifest {where}: oracle entry with weights {weights!r}, kind {kind!r}"
            )
        try:
            weights = {str(n): float(w) for n, w in weights.items()}
        except (TypeError, ValueError):
            raise ValueError(
                f"manifest {where}: oracle weights {weights!r} are not numbers"
            ) from None
        name = f"oracle {weights}/{kind}"
        model = load_denoiser(weights_dir, entry, name)
        oracles.append(
            Oracle(weights, kind, _as_expert(model, kind, entry.get("kl_coef"), name, g))
        )

    return DigitsBundle(
        path=weights_dir,
        manifest=manifest,
        schedule=schedule,
        guidance_scale=g,
        base=base,
        reference=Expert(_wrap(base, g), expert_spec("fixed"), 1.0, "base"),
        classifier=classifier,
        raw_rewards=raw,
        rewards=rewards,
        experts=experts,
        oracles=tuple(oracles),
    )
