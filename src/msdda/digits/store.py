"""Weights on disk: safetensors files plus one ``manifest.json``, written atomically.

A weights folder (the shipped one is ``msdda/digits/weights/``) holds

- ``manifest.json``: format tag, versions, seeds, scheduler config, model configs,
  held-out metrics, reward temperature and normalisation, and one entry per model
  file (``file``, ``sha256``, ``config``, ``storage``, plus ``reward``/``kind``/
  ``kl_coef``/``seed`` for experts and ``weights``/``kind``/``kl_coef``/``seed`` for
  oracles);
- ``classifier.safetensors``, ``base.safetensors``, ``expert-<reward>-<kind>.safetensors``,
  ``oracle-<tag>-<kind>.safetensors`` (training seed 0; ``...-seed<k>.safetensors`` for
  seed k).

An expert or oracle is stored either in full (``"storage": "full"``, the network's state
dict) or, as the shipped ones are, as a LoRA adapter of the base (``"storage": "lora"``,
:mod:`msdda.digits.lora`, ~0.1 MB instead of 0.8 MB), merged into the base at load time.

Every file is written to a temporary name and renamed, so a failure leaves nothing
half-written. Loading checks existence, the recorded sha256, the safetensors
format, and that keys and shapes match the model: any failure is a ``ValueError``
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "EXPERT_KINDS",
    "check_expert_kind",
    "atomic_write_bytes",
    "publish_file",
    "atomic_write_text",
    "save_module",
    "encode_safetensors",
    "read_safetensors",
    "check_state_fits",
    "load_module_state",
    "file_sha256",
    "read_manifest",
    "write_manifest",
    "update_manifest",
    "add_expert",
    "add_oracle",
    "oracle_tag",
    "model_file_name",
    "entry_seed",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "msdda-digits/1"
#: "fixed": fixed_small variance (C_out = 1); "learned": learned_log variance head (C_out = 2).
EXPERT_KINDS = ("fixed", "learned")


def check_expert_kind(kind: str, name: str = "kind") -> str:
    """``kind`` if it is one of :data:`EXPERT_KINDS`, else a ValueError naming ``name``."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"{name} must be one of {EXPERT_KINDS}, got {kind!r}")
    return kind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_file(tmp: str | Path, path: Path) -> None:
    """Give ``tmp`` ordinary file permissions (0666 less the umask) and rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encode_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """``tensors`` (copied to contiguous CPU tensors) as safetensors bytes, with string metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return save(state, metadata=dict(metadata) if metadata else None)


def save_module(path: Path, module: nn.Module, metadata: Mapping[str, str] | None = None) -> str:
    """Save ``module``'s state dict as safetensors at ``path`` (atomically); returns its sha256."""
    data = encode_safetensors(module.state_dict(), metadata)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_safetensors(
    path: str | Path, sha256: str | None = None, what: str = "weight file"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its string metadata (``{}`` when it has none).

    Raises:
        ValueError: naming ``path`` (as ``what``) when it is missing, does not match
            ``sha256``, or is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} is missing")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{what} {path} is corrupt: its sha256 differs from the manifest's")
    try:
        tensors = load(data)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"{what} {path} is not a valid safetensors file: {err}") from None
    return tensors, meta


def check_state_fits(
    state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Refuse ``state`` unless it has exactly the keys of ``shapes``, each of that shape.

    Raises:
        ValueError: ``"<what> does not fit the model: ..."`` naming the first keys that are
            missing or unexpected, or the first key of another shape.
    """
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit the model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    for key, shape in shapes.items():
        got = tuple(state[key].shape)
        if got != tuple(shape):
            raise ValueError(
                f"{what} does not fit the model: {key} has shape {got}, expected {tuple(shape)}"
            )


def load_module_state(path: Path, module: nn.Module, sha256: str | None = None) -> nn.Module:
    """Load safetensors ``path`` into ``module`` (in place; returned in eval mode).

    Raises:
        ValueError: naming ``path`` when it is missing, does not match ``sha256``, is not
            a readable safetensors file, or its keys or shapes differ from the module's.
    """
    path = Path(path)
    state, _ = read_safetensors(path, sha256)
    expected = module.state_dict()
    check_state_fits(state, {k: tuple(v.shape) for k, v in expected.items()}, f"weight file {path}")
    for key, value in expected.items():
        if value.is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise ValueError(f"weight file {path} is corrupt: {key} holds non-finite values")
    module.load_state_dict(state)
    return module.eval()


def read_manifest(weights_dir: Path) -> dict:
    """The manifest of a weights folder, checked for its format tag."""
    path = Path(weights_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST_NAME} in {Path(weights_dir)}: not a digits weights folder "
            "(create one with `msdda toy train --out FOLDER`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {path} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def write_manifest(weights_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` (atomically) as ``weights_dir/manifest.json``."""
    text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(Path(weights_dir) / MANIFEST_NAME, text)


def update_manifest(weights_dir: Path, **fields: Any) -> dict:
    """Read the manifest, set top-level ``fields``, write it back; returns the new manifest."""
    manifest = read_manifest(weights_dir)
    manifest.update(fields)
    write_manifest(weights_dir, manifest)
    return manifest


def _check_kind(kind: str, model: nn.Module) -> None:
    check_expert_kind(kind)
    head = bool(getattr(getattr(model, "config", None), "variance_head", False))
    if head != (kind == "learned"):
        raise ValueError(
            f"kind={kind!r} needs a model {'with' if kind == 'learned' else 'without'} a variance head"
        )


def _check_kl_coef(kl_coef: float) -> float:
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)):
        raise TypeError(f"kl_coef must be a number, got {type(kl_coef).__name__}")
    if not (math.isfinite(kl_coef) and kl_coef > 0):
        raise ValueError(f"kl_coef must be positive and finite, got {kl_coef!r}")
    return float(kl_coef)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def entry_seed(entry: Mapping[str, Any]) -> int:
    """The training seed of a manifest entry (0 for entries written before seeds were kept)."""
    return int(entry.get("seed", 0))


def model_file_name(prefix: str, tag: str, kind: str, seed: int = 0) -> str:
    """``<prefix>-<tag>-<kind>.safetensors`` for seed 0, ``...-<kind>-seed<k>.safetensors`` else."""
    return f"{prefix}-{tag}-{kind}{'' if seed == 0 else f'-seed{seed}'}.safetensors"


def _check_adapter(weights_dir: Path, model: nn.Module, adapter: Any, kind: str) -> None:
    """Refuse an adapter of another base, or one that does not rebuild ``model``."""
    from .bundle import load_denoiser
    from .lora import LoraAdapter, base_fingerprint, merged_denoiser

    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"adapter must be a LoraAdapter, got {type(adapter).__name__}")
    manifest = read_manifest(weights_dir)
    base = load_denoiser(weights_dir, manifest["base"], "base")
    if adapter.base_fingerprint != base_fingerprint(base):
        raise ValueError(
            f"the adapter was trained on another base than {Path(weights_dir) / manifest['base']['file']}"
        )
    merged = merged_denoiser(base, adapter.tensors, adapter.lora, kind)
    want = model.state_dict()
    for key, value in merged.state_dict().items():
        if not torch.allclose(value, want[key].to(value), rtol=1e-5, atol=1e-6):
            raise ValueError(f"the adapter does not rebuild the model: {key} differs")


def _model_entry(
    weights_dir: Path,
    file: str,
    model: nn.Module,
    adapter: Any,
    *,
    weights: Mapping[str, float],
    kind: str,
    kl_coef: float,
    seed: int,
) -> dict:
    """Write the model's file (full, or its LoRA adapter) and return its manifest fields."""
    entry: dict[str, Any] = {"file": file}
    if adapter is None:
        entry["sha256"] = save_module(Path(weights_dir) / file, model)
        entry["storage"] = "full"
    else:
        from .lora import adapter_metadata, encode_adapter

        _check_adapter(weights_dir, model, adapter, kind)
        meta = adapter_metadata(adapter, weights=weights, kind=kind, kl_coef=kl_coef, seed=seed)
        data = encode_adapter(adapter.tensors, meta)
        atomic_write_bytes(Path(weights_dir) / file, data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        entry["storage"] = "lora"
        entry["lora"] = adapter.lora.to_dict()
        entry["base_fingerprint"] = adapter.base_fingerprint
    return {
        **entry,
        "config": model.config.to_dict(),
        "kind": kind,
        "kl_coef": kl_coef,
        "seed": seed,
    }


def _add_model(
    weights_dir: Path,
    model: nn.Module,
    adapter: Any,
    *,
    section: str,
    identity: tuple[str, Any],
    prefix: str,
    tag: str,
    weights: Mapping[str, float],
    kind: str,
    kl_coef: float,
    seed: int,
    metrics: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
) -> dict:
    """Check, write and record an expert or oracle in the manifest's ``section``.

    ``identity`` is the entry's (field, value) that, with kind and seed, names the model:
    an earlier entry with the same three is replaced. Its file is
    :func:`model_file_name` (``prefix``, ``tag``, kind, seed).
    """
    _check_kind(kind, model)
    seed = _check_seed(seed)
    manifest = read_manifest(weights_dir)
    entry = _model_entry(
        weights_dir,
        model_file_name(prefix, tag, kind, seed),
        model,
        adapter,
        weights=weights,
        kind=kind,
        kl_coef=_check_kl_coef(kl_coef),
        seed=seed,
    )
    field, value = identity
    entry = {**entry, field: value, "metrics": dict(metrics or {})}
    entry["training"] = dict(training or {})
    key = (value, kind, seed)
    kept = [e for e in manifest.get(section, []) if (e[field], e["kind"], entry_seed(e)) != key]
    manifest[section] = [*kept, entry]
    write_manifest(weights_dir, manifest)
    return entry


def add_expert(
    weights_dir: Path,
    model: nn.Module,
    *,
    reward: str,
    kind: str,
    kl_coef: float,
    seed: int = 0,
    adapter: Any = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict:
    """Save a single-objective expert (a :class:`DigitDenoiser`) and record it in the manifest.

    Args:
        reward: the reward it was aligned to (a name of :data:`~msdda.digits.rewards.REWARDS`).
        kind: ``"fixed"`` (no variance head) or ``"learned"`` (variance head, learned_log).
        kl_coef: the beta it was aligned with (on the standardised reward).
        seed: its training seed (the bundle's default seed is 0).
        adapter: a :class:`~msdda.digits.lora.LoraAdapter` of the folder's base that
            rebuilds ``model``: stored instead of the full network (checked on writing).
        metrics, training: free-form JSON-able records (held-out numbers, settings, seeds).

    Replaces an earlier expert of the same reward, kind and seed. Returns the manifest entry.
    """
    from .rewards import REWARDS

    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; known rewards: {', '.join(REWARDS)}")
    return _add_model(
        weights_dir,
        model,
        adapter,
        section="experts",
        identity=("reward", reward),
        prefix="expert",
        tag=reward,
        weights={reward: 1.0},
        kind=kind,
        kl_coef=kl_coef,
        seed=seed,
        metrics=metrics,
        training=training,
    )


def oracle_tag(weights: Mapping[str, float]) -> str:
    """A file-name tag for preference weights, e.g. ``boldness0.7-legibility0.3``."""
    return "-".join(f"{name}{float(w):g}" for name, w in sorted(weights.items()))


def add_oracle(
    weights_dir: Path,
    model: nn.Module,
    *,
    weights: Mapping[str, float],
    kind: str,
    kl_coef: float,
    seed: int = 0,
    adapter: Any = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict:
    """Save an oracle (fine-tuned on sum_i w_i r_i) and record it in the manifest.

    ``weights`` maps reward names to preference weights, e.g.
    ``{"legibility": 0.3, "boldness": 0.7}``; the other arguments are as for
    :func:`add_expert`. Replaces an earlier oracle with the same weights, kind and seed.
    Returns the manifest entry.
    """
    from .sampling import check_weights

    clean = check_weights(weights)
    return _add_model(
        weights_dir,
        model,
        adapter,
        section="oracles",
        identity=("weights", clean),
        prefix="oracle",
        tag=oracle_tag(clean),
        weights=clean,
        kind=kind,
        kl_coef=kl_coef,
        seed=seed,
        metrics=metrics,
        training=training,
    )
