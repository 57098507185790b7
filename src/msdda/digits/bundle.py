"""Everything the digits domain ships, loaded in one call: :func:`load_digits_bundle`.

``bundle.schedule`` (msdda :class:`~msdda.Schedule`, 50 DDPM steps), ``bundle.base``
(the :class:`DigitDenoiser`), ``bundle.reference`` (the base as an msdda
:class:`~msdda.Expert`, fixed_small), ``bundle.classifier``, ``bundle.rewards``
(standardised, by name) and ``bundle.raw_rewards``, ``bundle.experts`` (by
``(reward, kind)`` with kind ``"fixed"`` or ``"learned"``), ``bundle.oracles`` and
``bundle.manifest``. Use :meth:`DigitsBundle.expert` and :meth:`DigitsBundle.oracle`
to look models up: they say clearly what is missing.

Models of several training seeds may be shipped: ``experts`` and ``oracles`` hold those
of the default seed (``bundle.default_seed``, 0), ``all_experts`` (by ``(reward, kind,
seed)``) and ``all_oracles`` every seed's; ``bundle.expert(name, kind, seed=1)`` picks one.
Experts and oracles stored as LoRA adapters (:mod:`.lora`) are merged into the base here.
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
from .lora import base_fingerprint, merged_denoiser, read_adapter_file
from .models import (
    ClassifierConfig,
    DenoiserConfig,
    DigitClassifier,
    DigitDenoiser,
    GuidedDenoiser,
)
from .rewards import REWARDS, RewardNormalisation, StandardisedReward, make_rewards, standardise
from .schedule import NUM_INFERENCE_STEPS, make_schedule
from .store import (
    DEFAULT_WEIGHTS_DIR,
    EXPERT_KINDS,
    check_expert_kind,
    load_module_state,
    read_manifest,
)

__all__ = ["DigitsBundle", "Oracle", "load_digits_bundle", "expert_spec", "load_denoiser"]


def expert_spec(kind: str) -> StepSpec:
    """The step spec of an expert kind: epsilon prediction, fixed_small or learned_log."""
    check_expert_kind(kind, "expert kind")
    return StepSpec("epsilon", "learned_log" if kind == "learned" else "fixed_small")


@dataclass(frozen=True, eq=False)
class Oracle:
    """A model fine-tuned on the weighted reward sum_i w_i r_i itself."""

    weights: dict[str, float]  # preference weights by reward name
    kind: str  # "fixed" or "learned"
    expert: Expert  # the model as an msdda Expert (kl_coef = its beta)
    seed: int = 0  # training seed


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
    oracles: tuple[Oracle, ...] = ()  # the default seed's
    default_seed: int = 0  # training seed of ``experts`` and ``oracles``
    all_experts: dict[tuple[str, str, int], Expert] = field(default_factory=dict)  # + seed
    all_oracles: tuple[Oracle, ...] = ()  # every seed's

    @property
    def seeds(self) -> tuple[int, ...]:
        """Training seeds that have an expert or an oracle here (the default seed first)."""
        found = {s for _, _, s in self.all_experts} | {o.seed for o in self.all_oracles}
        if self.experts or self.oracles:
            found.add(self.default_seed)
        return tuple(sorted(found, key=lambda s: (s != self.default_seed, s)))

    def _experts_of(self, seed: int | None) -> dict[tuple[str, str], Expert]:
        if seed is None or seed == self.default_seed:
            return self.experts
        return {(r, k): e for (r, k, s), e in self.all_experts.items() if s == seed}

    def _oracles_of(self, seed: int | None) -> tuple[Oracle, ...]:
        if seed is None or seed == self.default_seed:
            return self.oracles
        return tuple(o for o in self.all_oracles if o.seed == seed)

    def expert_names(self, kind: str = "fixed", seed: int | None = None) -> tuple[str, ...]:
        """Rewards that have an expert of ``kind`` (and training ``seed``; None: the default)."""
        return tuple(name for name, k in self._experts_of(seed) if k == kind)

    def expert(self, name: str, kind: str = "fixed", seed: int | None = None) -> Expert:
        """The expert aligned to reward ``name`` with variance ``kind``; a clear error if absent.

        ``seed`` is the training seed (None: :attr:`default_seed`).
        """
        check_expert_kind(kind, "expert kind")
        experts = self._experts_of(seed)
        if (name, kind) not in experts:
            have = ", ".join(self.expert_names(kind, seed)) or "none"
            which = "" if seed is None else f" of seed {seed}"
            raise ValueError(
                f"no {kind!r} expert{which} for reward {name!r} in {self.path} (available "
                f"{kind} experts{which}: {have}; seeds here: {list(self.seeds) or 'none'}); "
                "train them with `msdda train`"
            )
        return experts[(name, kind)]

    def oracle(
        self, weights: Mapping[str, float], kind: str = "fixed", seed: int | None = None
    ) -> Expert:
        """The oracle trained on exactly these preference weights (zeros may be omitted).

        ``seed`` is the training seed (None: :attr:`default_seed`).
        """
        want = {n: float(w) for n, w in weights.items() if float(w) != 0.0}
        oracles = self._oracles_of(seed)
        for o in oracles:
            have = {n: w for n, w in o.weights.items() if w != 0.0}
            if o.kind == kind and have.keys() == want.keys():
                if all(math.isclose(have[n], want[n], abs_tol=1e-6) for n in want):
                    return o.expert
        known = "; ".join(f"{o.weights} ({o.kind})" for o in oracles) or "none"
        which = "" if seed is None else f" of seed {seed}"
        raise ValueError(
            f"no {kind!r} oracle{which} for weights {dict(weights)} in {self.path} "
            f"(available{which}: {known})"
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


class _ModelLoader:
    """Experts and oracles from manifest entries: full networks, or adapters merged into the base."""

    def __init__(self, weights_dir: Path, base: DigitDenoiser, base_file: Path) -> None:
        self.weights_dir = weights_dir
        self.base = base
        self.base_file = base_file
        self._fingerprint: str | None = None
        self._starts: dict[str, DigitDenoiser] = {}

    def start(self, kind: str) -> DigitDenoiser:
        """The network adapters of ``kind`` merge into (built once)."""
        if kind not in self._starts:
            self._starts[kind] = self.base.with_variance_head() if kind == "learned" else self.base
        return self._starts[kind]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.base)
        return self._fingerprint

    def load(self, entry: dict, kind: str, where: str) -> DigitDenoiser:
        storage = entry.get("storage", "full")
        if storage == "full":
            return load_denoiser(self.weights_dir, entry, where)
        file, sha = _entry_file(self.weights_dir, entry, where)
        if storage != "lora":
            raise ValueError(f"manifest entry of {file}: unknown storage {storage!r}")
        tensors, info = read_adapter_file(file, sha, what="weight file")
        if info["base"] != self.fingerprint():
            raise ValueError(
                f"weight file {file} is an adapter of another base than {self.base_file}"
            )
        if info["kind"] != kind:
            raise ValueError(
                f"weight file {file} holds a {info['kind']!r} adapter, the manifest says {kind!r}"
            )
        try:
            return merged_denoiser(self.base, tensors, info["lora"], kind, start=self.start(kind))
        except ValueError as err:
            raise ValueError(f"weight file {file}: {err}") from None


def _seed_of(entry: dict, where: Path, key: str = "seed") -> int:
    seed = entry.get(key, 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"manifest {where}: {key} must be a non-negative int, got {seed!r}")
    return seed


def _entries(manifest: dict, key: str, where: Path) -> list[dict]:
    entries = manifest.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"manifest {where}: {key!r} must be a list of objects")
    return entries


@dataclass(frozen=True)
class _Folder:
    """What every model of a weights folder is loaded with."""

    path: Path  # the weights folder
    where: Path  # its manifest, for messages
    manifest: dict
    loader: _ModelLoader
    guidance_scale: float
    default_seed: int

    def name(self, label: str, kind: str, seed: int) -> str:
        """``<label>/<kind>``, plus ``/seed<k>`` for a seed other than the default."""
        return f"{label}/{kind}" + ("" if seed == self.default_seed else f"/seed{seed}")

    def expert(self, entry: dict, kind: str, name: str, where: str) -> Expert:
        """The entry's model as an Expert called ``name`` (``where`` names it in errors)."""
        model = self.loader.load(entry, kind, where)
        return _as_expert(model, kind, entry.get("kl_coef"), name, self.guidance_scale)


def _load_experts(folder: _Folder) -> dict[tuple[str, str, int], Expert]:
    """Every expert of the manifest, by (reward, kind, seed)."""
    out: dict[tuple[str, str, int], Expert] = {}
    for entry in _entries(folder.manifest, "experts", folder.where):
        reward, kind, seed = entry.get("reward"), entry.get("kind"), _seed_of(entry, folder.where)
        if reward not in REWARDS or kind not in EXPERT_KINDS:
            raise ValueError(
                f"manifest {folder.where}: expert entry with reward {reward!r}, kind {kind!r}"
            )
        if (reward, kind, seed) in out:
            raise ValueError(f"manifest {folder.where}: two experts {reward}/{kind} of seed {seed}")
        name = folder.name(reward, kind, seed)
        out[(reward, kind, seed)] = folder.expert(entry, kind, name, f"expert {name}")
    return out


def _load_oracles(folder: _Folder) -> list[Oracle]:
    """Every oracle of the manifest, in its order."""
    out: list[Oracle] = []
    for entry in _entries(folder.manifest, "oracles", folder.where):
        weights, kind, seed = entry.get("weights"), entry.get("kind"), _seed_of(entry, folder.where)
        if not isinstance(weights, dict) or kind not in EXPERT_KINDS:
            raise ValueError(
                f"manifest {folder.where}: oracle entry with weights {weights!r}, kind {kind!r}"
            )
        try:
            weights = {str(n): float(w) for n, w in weights.items()}
        except (TypeError, ValueError):
            raise ValueError(
                f"manifest {folder.where}: oracle weights {weights!r} are not numbers"
            ) from None
        name = folder.name(f"oracle {weights}", kind, seed)
        expert = folder.expert(entry, kind, name, name)
        out.append(Oracle(weights, kind, expert, seed))
    return out


def _load_rewards(
    manifest: dict, classifier: DigitClassifier, where: Path
) -> tuple[dict[str, Reward], dict[str, StandardisedReward]]:
    """The raw rewards and their standardised versions (the manifest's normalisation)."""
    raw = make_rewards(classifier, float(manifest["legibility_temperature"]))
    try:
        stats = {
            n: RewardNormalisation(float(s["mean"]), float(s["std"]))
            for n, s in manifest["reward_normalisation"].items()
        }
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"manifest {where}: bad reward_normalisation: {err}") from None
    return raw, standardise(raw, stats)


def _load_classifier(weights_dir: Path, entry: Any) -> DigitClassifier:
    file, sha = _entry_file(weights_dir, entry, "classifier")
    classifier = DigitClassifier(_config(ClassifierConfig, entry.get("config"), f"{file}"))
    load_module_state(file, classifier, sha)
    return classifier


def _load_base(weights_dir: Path, entry: dict) -> DigitDenoiser:
    base = load_denoiser(weights_dir, entry, "base")
    if base.config.variance_head:
        raise ValueError(f"{weights_dir / entry['file']}: the base must not have a variance head")
    return base


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
    default_seed = _seed_of(manifest, where, "default_seed")
    schedule = make_schedule(num_inference_steps, manifest.get("scheduler"))
    base = _load_base(weights_dir, manifest["base"])
    classifier = _load_classifier(weights_dir, manifest["classifier"])
    raw, rewards = _load_rewards(manifest, classifier, where)
    loader = _ModelLoader(weights_dir, base, weights_dir / manifest["base"]["file"])
    folder = _Folder(weights_dir, where, manifest, loader, g, default_seed)
    all_experts = _load_experts(folder)
    all_oracles = _load_oracles(folder)
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
        experts={(r, k): e for (r, k, s), e in all_experts.items() if s == default_seed},
        oracles=tuple(o for o in all_oracles if o.seed == default_seed),
        default_seed=default_seed,
        all_experts=all_experts,
        all_oracles=tuple(all_oracles),
    )
