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

from torch import Tensor, nn

from ..errors import InputFileError, quiet_libraries
from ..experts import Expert
from ..gaussians import Schedule, StepSpec
from ..rewards import Reward
from ..validation import check_int, check_number, check_positive, check_seed
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
    MANIFEST_NAME,
    check_expert_kind,
    check_finite,
    check_weights_dir,
    read_manifest,
    read_safetensors,
    state_shapes,
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
        if seed is not None:
            check_seed(seed)
        if seed is None or seed == self.default_seed:
            return self.experts
        return {(r, k): e for (r, k, s), e in self.all_experts.items() if s == seed}

    def _oracles_of(self, seed: int | None) -> tuple[Oracle, ...]:
        if seed is not None:
            check_seed(seed)
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
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of reward name to weight, got {weights!r}")
        checked = {n: check_number(w, f"weight of {n!r}", low=0.0) for n, w in weights.items()}
        want = {n: w for n, w in checked.items() if w != 0.0}
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


def _config(cls, entry: Any, where: Path, label: str):
    """The model config of a manifest entry (:class:`InputFileError` naming the manifest)."""
    raw = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(raw, dict):
        raise InputFileError(where, f"the {label} entry has no 'config' object")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as err:
        raise InputFileError(where, f"the {label} entry has a bad config {raw}: {err}") from None


def _entry_file(weights_dir: Path, entry: Any, where: Path, label: str) -> tuple[Path, str | None]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
        raise InputFileError(where, f"the {label} entry has no 'file'")
    name = entry["file"]
    if Path(name).name != name:
        raise InputFileError(where, f"the {label} entry's file {name!r} is not a plain file name")
    sha = entry.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise InputFileError(where, f"the {label} entry's sha256 is not a string")
    return weights_dir / name, sha


def _read_full(
    weights_dir: Path, entry: Any, where: Path, label: str, cls, config
) -> dict[str, Tensor]:
    """The checked state dict of a network stored in full (no model built)."""
    file, sha = _entry_file(weights_dir, entry, where, label)
    tensors, _ = read_safetensors(file, sha, expected=state_shapes(cls, config))
    check_finite(tensors, file)
    return tensors


def _build(cls, config, state: dict[str, Tensor]) -> nn.Module:
    model = cls(config)
    model.load_state_dict(state)
    return model.eval()


def load_denoiser(weights_dir: Path, entry: dict, where: str = "model") -> DigitDenoiser:
    """A :class:`DigitDenoiser` from a manifest entry (``file``, ``sha256``, ``config``).

    Raises:
        InputFileError: naming the manifest or the file when the entry, the file or its
            fit to the config is wrong (checked before the model is built).
    """
    weights_dir = check_weights_dir(weights_dir)
    manifest = weights_dir / MANIFEST_NAME
    config = _config(DenoiserConfig, entry, manifest, where)
    state = _read_full(weights_dir, entry, manifest, where, DigitDenoiser, config)
    return _build(DigitDenoiser, config, state)


def _wrap(model: nn.Module, guidance_scale: float) -> nn.Module:
    return model if guidance_scale == 1.0 else GuidedDenoiser(model, guidance_scale)


@dataclass
class _ModelFile:
    """An expert's or oracle's file, read and checked against the base; nothing built yet."""

    file: Path
    kind: str
    kl_coef: float
    storage: str  # "full" or "lora"
    tensors: dict[str, Tensor]
    config: DenoiserConfig | None = None  # full storage
    info: dict[str, Any] | None = None  # lora storage: the adapter's metadata


def _read_model(
    weights_dir: Path, entry: dict, kind: str, base_config: DenoiserConfig, where: Path, label: str
) -> _ModelFile:
    """Read an expert's or oracle's file, checked (header first) against its config or base."""
    try:
        kl_coef = check_positive(entry.get("kl_coef"), "kl_coef")
    except (TypeError, ValueError) as err:
        raise InputFileError(where, f"the {label} entry: {err}") from None
    storage = entry.get("storage", "full")
    file, sha = _entry_file(weights_dir, entry, where, label)
    if storage == "full":
        config = _config(DenoiserConfig, entry, where, label)
        if config.variance_head != (kind == "learned"):
            raise InputFileError(
                where, f"the {label} entry: kind {kind!r} does not match its config's variance head"
            )
        tensors = _read_full(weights_dir, entry, where, label, DigitDenoiser, config)
        return _ModelFile(file, kind, kl_coef, storage, tensors, config=config)
    if storage != "lora":
        raise InputFileError(where, f"the {label} entry has an unknown storage {storage!r}")
    tensors, info = read_adapter_file(file, sha, what="weight file", base_config=base_config)
    if info["kind"] != kind:
        raise InputFileError(file, f"holds a {info['kind']!r} adapter, the manifest says {kind!r}")
    return _ModelFile(file, kind, kl_coef, storage, tensors, info=info)


class _Builder:
    """Networks from checked files: full networks, or adapters merged into the base."""

    def __init__(self, base: DigitDenoiser, base_file: Path, guidance_scale: float) -> None:
        self.base = base
        self.base_file = base_file
        self.guidance_scale = guidance_scale
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

    def expert(self, read: _ModelFile, name: str) -> Expert:
        if read.storage == "full":
            model = _build(DigitDenoiser, read.config, read.tensors)
        else:
            if read.info["base"] != self.fingerprint():
                raise InputFileError(
                    read.file, f"is an adapter of another base than {self.base_file}"
                )
            try:
                model = merged_denoiser(
                    self.base,
                    read.tensors,
                    read.info["lora"],
                    read.kind,
                    start=self.start(read.kind),
                )
            except ValueError as err:
                raise InputFileError(read.file, str(err)) from None
        return Expert(_wrap(model, self.guidance_scale), expert_spec(read.kind), read.kl_coef, name)


def _seed_of(entry: dict, where: Path, key: str = "seed") -> int:
    seed = entry.get(key, 0)
    try:
        return check_seed(seed, key)
    except (TypeError, ValueError) as err:
        raise InputFileError(where, str(err)) from None


def _entries(manifest: dict, key: str, where: Path) -> list[dict]:
    entries = manifest.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputFileError(where, f"{key!r} must be a list of objects")
    return entries


def _name(label: str, kind: str, seed: int, default_seed: int) -> str:
    """``<label>/<kind>``, plus ``/seed<k>`` for a seed other than the default."""
    return f"{label}/{kind}" + ("" if seed == default_seed else f"/seed{seed}")


def _read_experts(weights_dir, manifest, where, base_config, default_seed) -> dict:
    """Every expert file of the manifest, read and checked, by (reward, kind, seed)."""
    out: dict[tuple[str, str, int], tuple[str, _ModelFile]] = {}
    for entry in _entries(manifest, "experts", where):
        reward, kind, seed = entry.get("reward"), entry.get("kind"), _seed_of(entry, where)
        if reward not in REWARDS or kind not in EXPERT_KINDS:
            raise InputFileError(where, f"expert entry with reward {reward!r}, kind {kind!r}")
        if (reward, kind, seed) in out:
            raise InputFileError(where, f"two experts {reward}/{kind} of seed {seed}")
        name = _name(reward, kind, seed, default_seed)
        read = _read_model(weights_dir, entry, kind, base_config, where, f"expert {name}")
        out[(reward, kind, seed)] = (name, read)
    return out


def _read_oracles(weights_dir, manifest, where, base_config, default_seed) -> list:
    """Every oracle file of the manifest, read and checked, in its order."""
    out = []
    for entry in _entries(manifest, "oracles", where):
        weights, kind, seed = entry.get("weights"), entry.get("kind"), _seed_of(entry, where)
        if not isinstance(weights, dict) or kind not in EXPERT_KINDS:
            raise InputFileError(where, f"oracle entry with weights {weights!r}, kind {kind!r}")
        try:
            weights = {
                str(n): check_number(w, f"weight of {n!r}", low=0.0) for n, w in weights.items()
            }
        except (TypeError, ValueError) as err:
            raise InputFileError(where, f"oracle weights {weights!r}: {err}") from None
        name = _name(f"oracle {weights}", kind, seed, default_seed)
        out.append(
            (
                weights,
                kind,
                seed,
                name,
                _read_model(weights_dir, entry, kind, base_config, where, name),
            )
        )
    return out


def _normalisation(manifest: dict, where: Path) -> dict[str, RewardNormalisation]:
    raw = manifest["reward_normalisation"]
    try:
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        stats = {
            n: RewardNormalisation(
                check_number(s["mean"], f"{n} mean"),
                check_number(s["std"], f"{n} std", low=0.0, low_inclusive=False),
            )
            for n, s in raw.items()
        }
    except (KeyError, TypeError, ValueError) as err:
        raise InputFileError(where, f"bad reward_normalisation: {err}") from None
    missing = [n for n in REWARDS if n not in stats]
    if missing:
        raise InputFileError(where, f"reward_normalisation has no entry for {missing}")
    return stats


def _manifest_number(manifest: dict, key: str, where: Path, default=None, **limits) -> float:
    try:
        return check_number(manifest.get(key, default), key, **limits)
    except (TypeError, ValueError) as err:
        raise InputFileError(where, str(err)) from None


def load_digits_bundle(
    path: str | Path | None = None, *, num_inference_steps: int = NUM_INFERENCE_STEPS
) -> DigitsBundle:
    """Load a digits weights folder (default: the shipped ``msdda/digits/weights``).

    Every file is read and checked (existence, safetensors header, sha256, keys, shapes
    and dtypes against its config or the base) before any model is built.

    Raises:
        InputFileError: naming the folder, the manifest or the weight file, when one is
            missing, empty, corrupt, truncated, a pickle file, or does not fit its model.
        TypeError, ValueError: ``num_inference_steps`` is not an int in [1, 1000].
    """
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps", low=1, high=1000)
    weights_dir = check_weights_dir(DEFAULT_WEIGHTS_DIR if path is None else path)
    manifest = read_manifest(weights_dir)
    where = weights_dir / MANIFEST_NAME
    for key in ("base", "classifier", "reward_normalisation", "legibility_temperature"):
        if key not in manifest:
            raise InputFileError(where, f"the manifest has no {key!r}")
    g = _manifest_number(manifest, "guidance_scale", where, 1.0)
    temperature = _manifest_number(
        manifest, "legibility_temperature", where, low=0.0, low_inclusive=False
    )
    stats = _normalisation(manifest, where)
    default_seed = _seed_of(manifest, where, "default_seed")
    scheduler = manifest.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, dict):
        raise InputFileError(where, "'scheduler' must be an object")
    try:
        with quiet_libraries():
            schedule = make_schedule(num_inference_steps, scheduler)
    except (TypeError, ValueError) as err:
        raise InputFileError(where, f"bad scheduler config: {err}") from None
    # every file read and checked first, then the models built
    base_cfg = _config(DenoiserConfig, manifest["base"], where, "base")
    if base_cfg.variance_head:
        raise InputFileError(where, "the base must not have a variance head")
    base_state = _read_full(weights_dir, manifest["base"], where, "base", DigitDenoiser, base_cfg)
    clf_cfg = _config(ClassifierConfig, manifest["classifier"], where, "classifier")
    clf_state = _read_full(
        weights_dir, manifest["classifier"], where, "classifier", DigitClassifier, clf_cfg
    )
    expert_files = _read_experts(weights_dir, manifest, where, base_cfg, default_seed)
    oracle_files = _read_oracles(weights_dir, manifest, where, base_cfg, default_seed)

    base = _build(DigitDenoiser, base_cfg, base_state)
    classifier = _build(DigitClassifier, clf_cfg, clf_state)
    raw = make_rewards(classifier, temperature)
    rewards = standardise(raw, stats)
    builder = _Builder(base, weights_dir / manifest["base"]["file"], g)
    all_experts = {key: builder.expert(read, name) for key, (name, read) in expert_files.items()}
    all_oracles = [
        Oracle(weights, kind, builder.expert(read, name), seed)
        for weights, kind, seed, name, read in oracle_files
    ]
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
