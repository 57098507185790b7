"""Trained experts and oracles into a weights folder: :func:`add_expert`, :func:`add_oracle`.

Each writes the model's file (the full network, or, as shipped, its LoRA adapter of the
folder's base, checked to rebuild the model) and records it in the folder's manifest
(:mod:`msdda.digits.store`), replacing an earlier model of the same identity, kind and
training seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import check_output_path, writing
from .bundle import load_denoiser
from .lora import LoraAdapter, adapter_metadata, base_fingerprint, encode_adapter, merged_denoiser
from .rewards import REWARDS, check_reward_weights
from .store import (
    check_kl_coef,
    check_model_kind,
    check_training_seed,
    model_file_name,
    oracle_tag,
    read_manifest,
    replace_entry,
    save_module,
    write_manifest,
    write_weight_file,
)

__all__ = ["add_expert", "add_oracle"]


def _check_adapter(weights_dir: Path, model: nn.Module, adapter: Any, kind: str) -> None:
    """Refuse an adapter of another base, or one that does not rebuild ``model``."""
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


def _write_model(
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
    path = Path(weights_dir) / file
    if adapter is None:
        entry: dict[str, Any] = {"file": file, "sha256": save_module(path, model)}
        entry["storage"] = "full"
    else:
        _check_adapter(weights_dir, model, adapter, kind)
        meta = adapter_metadata(adapter, weights=weights, kind=kind, kl_coef=kl_coef, seed=seed)
        entry = {
            "file": file,
            "sha256": write_weight_file(path, encode_adapter(adapter.tensors, meta)),
        }
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
    :func:`~msdda.digits.store.model_file_name` (``prefix``, ``tag``, kind, seed).
    """
    check_model_kind(kind, model)
    seed = check_training_seed(seed)
    kl_coef = check_kl_coef(kl_coef)
    manifest = read_manifest(weights_dir)
    file = model_file_name(prefix, tag, kind, seed)
    check_output_path(Path(weights_dir) / file)
    with writing(Path(weights_dir) / file):
        entry = _write_model(
            weights_dir,
            file,
            model,
            adapter,
            weights=weights,
            kind=kind,
            kl_coef=kl_coef,
            seed=seed,
        )
    field, value = identity
    entry = {**entry, field: value, "metrics": dict(metrics or {})}
    entry["training"] = dict(training or {})
    with writing(Path(weights_dir) / "manifest.json"):
        write_manifest(weights_dir, replace_entry(manifest, section, entry, field))
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
    clean = check_reward_weights(weights)
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
