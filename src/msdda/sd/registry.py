"""The experts a Stable Diffusion pipeline holds: full UNets and LoRA adapters of its base.

:class:`ExpertRegistry` keeps them in the order they were added (that order is the
expert order of weights given as a sequence), the LoRA experts' factors in one
:class:`~msdda.lora.LoRABank` over the base UNet (and one per text encoder when
an adapter changes it), and writes/reads them beside a saved pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputFileError
from ..lora import LORA_MODES, LoRABank, LoRAFactors
from .loading import (
    BaseView,
    ExpertSource,
    PreparedExpert,
    check_expert_files,
    load_expert_unet,
    load_lora_factors,
    read_json,
    resolve_expert_source,
)

__all__ = ["REFERENCE", "MANIFEST", "ExpertEntry", "ExpertRegistry"]

#: The name under which the base model plays the reference p_ref (reserved).
REFERENCE = "base"
#: File beside a saved pipeline's model_index.json listing its experts.
MANIFEST = "msdda_experts.json"
_EXPERTS_DIR = "msdda_experts"


@dataclass(eq=False)
class ExpertEntry:
    """One expert: a full UNet, or LoRA factors of the base UNet (and text encoders)."""

    name: str
    kind: Literal["unet", "lora"]
    prediction_type: str  # what the expert's UNet outputs (epsilon, v_prediction, sample)
    unet: Any = None  # a full UNet expert's model
    factors: dict[str, LoRAFactors] = field(default_factory=dict)  # LoRA: UNet layers
    text_factors: dict[str, dict[str, LoRAFactors]] = field(default_factory=dict)  # per encoder
    source: ExpertSource | None = None  # where it was loaded from (for saving)


class ExpertRegistry:
    """The experts of one pipeline, and how its LoRA experts are executed."""

    def __init__(self) -> None:
        self.entries: dict[str, ExpertEntry] = {}
        self.bank: LoRABank | None = None
        self.text_banks: dict[str, LoRABank] = {}
        self._lora_mode = "auto"
        self._merged: dict[str, Any] = {}

    # ------------------------------------------------------------------ names
    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def lora_names(self) -> list[str]:
        return [n for n, e in self.entries.items() if e.kind == "lora"]

    def get(self, name: str) -> ExpertEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(f"unknown expert {name!r}; the experts are {self.names}") from None

    @property
    def lora_mode(self) -> str:
        return self._lora_mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        if mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {mode!r}")
        self._lora_mode = mode
        if mode != "merged":
            self._merged.clear()

    @property
    def execution(self) -> str:
        """The resolved LoRA execution: batched, sequential or merged."""
        return "batched" if self._lora_mode == "auto" else self._lora_mode

    # ---------------------------------------------------------------- loading
    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"expert names must be non-empty strings, got {name!r}")
        if name == REFERENCE:
            raise ValueError(
                f"{REFERENCE!r} is reserved for the base model; name the expert otherwise"
            )
        if name in self.entries:
            raise ValueError(f"an expert named {name!r} is already loaded")

    def load(
        self,
        pipe,
        experts: Mapping[str, str | os.PathLike],
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """Resolve, check and load ``{name: path or hub id}`` into ``pipe`` (all or nothing)."""
        base = BaseView.of_pipeline(pipe)
        self.install(pipe, self.prepare(experts, base, type(pipe), cache_dir=cache_dir))

    def prepare(
        self,
        experts: Mapping[str, str | os.PathLike],
        base: BaseView,
        pipeline_cls,
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> list[PreparedExpert]:
        """Resolve ``{name: path or hub id}`` and check every expert's files against ``base``
        (configs, safetensors headers, shapes), before any model is built."""
        if not isinstance(experts, Mapping):
            raise TypeError(
                f"experts must be a mapping {{name: path or hub id}}, got {type(experts).__name__}"
            )
        for name in experts:
            self._check_new_name(name)
        sources = [resolve_expert_source(n, s, cache_dir=cache_dir) for n, s in experts.items()]
        return [check_expert_files(src, base, pipeline_cls) for src in sources]

    def install(self, pipe, prepared: list[PreparedExpert]) -> None:
        """Build the checked experts' models (UNets, LoRA factors) into ``pipe``."""
        new: list[ExpertEntry] = []
        for p in prepared:
            src = p.source
            if src.kind == "unet":
                unet = load_expert_unet(p, pipe.msdda_backbone)
                new.append(ExpertEntry(src.name, "unet", p.prediction_type, unet=unet, source=src))
            else:
                factors, text = load_lora_factors(
                    p, pipe.msdda_backbone, type(pipe), text_encoders=_text_encoders(pipe)
                )
                new.append(
                    ExpertEntry(
                        src.name,
                        "lora",
                        p.prediction_type,
                        factors=factors,
                        text_factors=text,
                        source=src,
                    )
                )
        for e in new:
            self.entries[e.name] = e
        self.rebuild(pipe)

    def add_unet(self, pipe, name: str, unet, prediction_type: str | None = None) -> None:
        """Add an in-memory full-UNet expert (checked against the base's architecture)."""
        from .loading import check_unet_architecture

        self._check_new_name(name)
        check_unet_architecture(name, unet.config, pipe.msdda_backbone.config)
        pred = prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")
        _move(unet, pipe.msdda_backbone.device, pipe.msdda_backbone.dtype)
        unet.eval().requires_grad_(False)
        self.entries[name] = ExpertEntry(name, "unet", pred, unet=unet)

    def remove(self, pipe, name: str) -> None:
        self.get(name)
        del self.entries[name]
        self._merged.pop(name, None)
        self.rebuild(pipe)

    def rebuild(self, pipe) -> None:
        """(Re)install the LoRA banks over the base UNet and text encoders."""
        if self.bank is not None:
            self.bank.remove()
        for b in self.text_banks.values():
            b.remove()
        self.bank, self.text_banks = None, {}
        self._merged.clear()
        loras = [self.entries[n] for n in self.lora_names]
        if not loras:
            return
        names = [e.name for e in loras]
        self.bank = LoRABank(names, [e.factors for e in loras], pipe.msdda_backbone)
        for attr, te in _text_encoders(pipe).items():
            per = [e.text_factors.get(attr, {}) for e in loras]
            if any(per):
                self.text_banks[attr] = LoRABank(names, per, te)

    def has_text_lora(self, name: str) -> bool:
        return bool(self.get(name).text_factors)

    def merged_unet(self, pipe, name: str):
        """Expert ``name``'s LoRA merged into a full copy of the base UNet (cached)."""
        if name not in self._merged:
            base = pipe.msdda_backbone  # the UNet, or a flow model's transformer
            unet = type(base).from_config(base.config)
            unet.load_state_dict(self.bank.merged_state_dict(base, name))
            _move(unet, base.device, base.dtype)
            unet.eval().requires_grad_(False)
            self._merged[name] = unet
        return self._merged[name]

    def to(self, device, dtype) -> None:
        for e in self.entries.values():
            if e.unet is not None:
                _move(e.unet, device, dtype)
        for u in self._merged.values():
            _move(u, device, dtype)
        for b in [self.bank, *self.text_banks.values()]:
            if b is not None:
                b.to(device=device, dtype=dtype)

    # ----------------------------------------------------------- save / load
    def save(self, pipe, folder: Path) -> None:
        """Write every expert under ``folder/msdda_experts`` and the manifest ``folder/msdda_experts.json``."""
        manifest: dict[str, Any] = {"lora_mode": self._lora_mode, "experts": {}}
        root = folder / _EXPERTS_DIR
        for i, (name, e) in enumerate(self.entries.items()):
            rel = Path(_EXPERTS_DIR) / f"{i:02d}"
            dest = folder / rel
            dest.mkdir(parents=True)
            if e.kind == "unet":
                e.unet.save_pretrained(dest / pipe._backbone_name, safe_serialization=True)
                sched = dict(pipe.scheduler.config)
                sched["prediction_type"] = e.prediction_type
                (dest / "scheduler").mkdir()
                (dest / "scheduler" / "scheduler_config.json").write_text(
                    json.dumps(sched, indent=2, sort_keys=True, default=list)
                )
            elif e.source is None:
                raise ValueError(f"expert {name!r} has no source files to save")
            elif e.source.lora_format == "peft":
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy2(e.source.path / f, dest / f)
            else:
                shutil.copy2(e.source.path, dest / e.source.path.name)
            manifest["experts"][name] = rel.as_posix()
        if not self.entries:
            root.mkdir(exist_ok=True)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @staticmethod
    def read_manifest(folder: Path) -> tuple[dict[str, str], str] | None:
        """``({name: absolute path}, lora_mode)`` of a saved pipeline, or None without a manifest."""
        path = folder / MANIFEST
        if not path.is_file():
            return None
        data = read_json(path, "msdda experts manifest")
        listed, mode = data.get("experts", {}), data.get("lora_mode", "auto")
        if not isinstance(listed, dict) or not all(isinstance(r, str) for r in listed.values()):
            raise InputFileError(path, "'experts' must map expert names to relative folders")
        if mode not in LORA_MODES:
            raise InputFileError(path, f"lora_mode must be one of {LORA_MODES}, got {mode!r}")
        return {n: str(folder / rel) for n, rel in listed.items()}, mode


def _move(model, device, dtype) -> None:
    """``model.to(device, dtype)``, casting only when the dtype differs."""
    model.to(device)
    if model.dtype != dtype:
        model.to(dtype)


def _text_encoders(pipe) -> dict[str, Any]:
    return {
        attr: getattr(pipe, attr)
        for attr in ("text_encoder", "text_encoder_2")
        if getattr(pipe, attr, None) is not None
    }
