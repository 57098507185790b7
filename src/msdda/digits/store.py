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

Every file is written whole or not at all (:mod:`msdda.io`). Loading checks existence,
the recorded sha256, the safetensors format, and that keys and shapes match the model:
any failure is a ``ValueError`` naming the file.

This module is the bottom of the domain: it imports nothing else from
:mod:`msdda.digits`. Writing a trained expert or oracle into a folder (which checks it
against the folder's base) is :mod:`msdda.digits.catalog`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import atomic_write_bytes, atomic_write_text
from ..validation import check_positive, check_seed

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "EXPERT_KINDS",
    "check_expert_kind",
    "check_model_kind",
    "check_kl_coef",
    "check_training_seed",
    "save_module",
    "write_weight_file",
    "encode_safetensors",
    "read_safetensors",
    "check_state_fits",
    "load_module_state",
    "file_sha256",
    "read_manifest",
    "write_manifest",
    "update_manifest",
    "replace_entry",
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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encode_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """``tensors`` (copied to contiguous CPU tensors) as safetensors bytes, with string metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return save(state, metadata=dict(metadata) if metadata else None)


def write_weight_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` whole or not at all; returns its sha256 (for the manifest)."""
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def save_module(path: Path, module: nn.Module, metadata: Mapping[str, str] | None = None) -> str:
    """Save ``module``'s state dict as safetensors at ``path`` (atomically); returns its sha256."""
    return write_weight_file(path, encode_safetensors(module.state_dict(), metadata))


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
            "(create one with `msdda train --out FOLDER`)"
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


def check_model_kind(kind: str, model: nn.Module) -> str:
    """``kind`` if ``model`` has a variance head exactly when ``kind`` is ``"learned"``."""
    check_expert_kind(kind)
    head = bool(getattr(getattr(model, "config", None), "variance_head", False))
    if head != (kind == "learned"):
        raise ValueError(
            f"kind={kind!r} needs a model {'with' if kind == 'learned' else 'without'} a variance head"
        )
    return kind


def check_kl_coef(kl_coef: float) -> float:
    """A model's beta: a positive finite number (a TypeError for anything else)."""
    try:
        return check_positive(kl_coef, "kl_coef")
    except ValueError:
        raise ValueError(f"kl_coef must be positive and finite, got {kl_coef!r}") from None


def check_training_seed(seed: int) -> int:
    """A model's training seed: a non-negative int."""
    try:
        return check_seed(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}") from None


def entry_seed(entry: Mapping[str, Any]) -> int:
    """The training seed of a manifest entry (0 for entries written before seeds were kept)."""
    return int(entry.get("seed", 0))


def model_file_name(prefix: str, tag: str, kind: str, seed: int = 0) -> str:
    """``<prefix>-<tag>-<kind>.safetensors`` for seed 0, ``...-<kind>-seed<k>.safetensors`` else."""
    return f"{prefix}-{tag}-{kind}{'' if seed == 0 else f'-seed{seed}'}.safetensors"


def oracle_tag(weights: Mapping[str, float]) -> str:
    """A file-name tag for preference weights, e.g. ``boldness0.7-legibility0.3``."""
    return "-".join(f"{name}{float(w):g}" for name, w in sorted(weights.items()))


def replace_entry(manifest: Mapping[str, Any], section: str, entry: dict, field: str) -> dict:
    """``manifest`` with ``entry`` appended to ``section`` (``"experts"`` or ``"oracles"``).

    An earlier entry with the same ``field`` value (the reward, or the weights), kind and
    seed is dropped: one model per identity. Pure: returns a new manifest.
    """
    key = (entry[field], entry["kind"], entry_seed(entry))
    kept = [e for e in manifest.get(section, []) if (e[field], e["kind"], entry_seed(e)) != key]
    return {**manifest, section: [*kept, entry]}
