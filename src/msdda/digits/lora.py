"""LoRA adapters of the digits base: the merge and the adapter file, without peft.

The aligner (:mod:`msdda.digits.align`) fine-tunes the base with peft; what it keeps is
peft's adapter state dict (``get_peft_model_state_dict``), with keys

- ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)
  for every target linear layer ``<module>`` of the :class:`DigitDenoiser`;
- ``base_model.model.var_out.weight`` (64, hidden) and ``...var_out.bias`` (64,) for the
  ``"learned"`` kind: the whole variance head (peft's ``modules_to_save``).

These are the keys of the one LoRA format (:mod:`msdda.lora`): the merge is the core's,
peft's for a plain ``nn.Linear``: ``W' = W + (alpha / r) * B @ A``
(:func:`msdda.lora.factors_from_peft_state`, :func:`msdda.lora.merge_lora`), biases
unchanged. Done on state dicts, it costs a few small matrix products, so the shipped
experts and oracles are stored as adapters (~0.1 MB each) and merged at load.

An adapter file is safetensors with string metadata: the format tag, the LoRA settings,
the fingerprint of the base it was trained on (:func:`base_fingerprint`), and what the
model is (kind, preference weights, beta, training seed).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputFileError
from ..lora import (
    PEFT_PREFIX,
    LoRAFactors,
    factors_from_peft_state,
    lora_delta_weight,
    merge_lora,
    peft_lora_keys,
    peft_saved_modules,
)
from ..validation import check_int, check_number, check_positive, check_seed
from .models import DenoiserConfig, DigitDenoiser
from .store import (
    EXPERT_KINDS,
    check_expert_kind,
    check_finite,
    check_state_fits,
    encode_safetensors,
    read_safetensors,
)

__all__ = [
    "ADAPTER_FORMAT",
    "PEFT_PREFIX",
    "LoraSettings",
    "LoraAdapter",
    "lora_delta",
    "adapter_keys",
    "merge_lora_state",
    "merged_denoiser",
    "base_fingerprint",
    "adapter_metadata",
    "encode_adapter",
    "read_adapter_file",
    "adapter_shapes",
    "peft_lora_model",
    "peft_adapter_state",
]

ADAPTER_FORMAT = "msdda-digits-adapter/1"
#: The largest LoRA rank accepted (the digits layers are at most a few hundred wide).
MAX_RANK = 4096
#: The variance head, trained in full for the "learned" kind (peft's modules_to_save).
VARIANCE_HEAD = "var_out"


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter fine-tuned on the base (peft)."""

    rank: int = 8  # r
    alpha: float = 8.0  # scale alpha / r
    target_modules: tuple[str, ...] = (  # every linear layer of the DigitDenoiser trunk
        "time_mlp.0",
        "time_mlp.2",
        "inp",
        "fc1",
        "emb",
        "fc2",
        "out",
    )

    def __post_init__(self) -> None:
        check_int(self.rank, "LoraSettings.rank", low=1, high=MAX_RANK)
        object.__setattr__(self, "alpha", check_number(self.alpha, "LoraSettings.alpha"))
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(m, str) for m in targets):
            raise ValueError("LoraSettings.target_modules must be a non-empty tuple of names")
        object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scaling(self) -> float:
        """alpha / r: the factor of B @ A in the merged weight."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoraSettings:
        """Settings from :meth:`to_dict`'s output (a ValueError if it does not fit)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"LoRA settings must be a mapping, got {type(raw).__name__}")
        try:
            return cls(**{**raw, "target_modules": tuple(raw["target_modules"])})
        except (KeyError, TypeError) as err:
            raise ValueError(f"bad LoRA settings {dict(raw)}: {err}") from None


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """An adapter's tensors, its settings and the base it belongs to."""

    tensors: dict[str, Tensor]  # peft adapter state dict (see the module docstring)
    lora: LoraSettings = field(default_factory=LoraSettings)
    base_fingerprint: str = ""  # base_fingerprint(base) of the base it was trained on


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The weight update of one LoRA layer: scaling * B @ A, (out, r) @ (r, in) -> (out, in).

    :func:`msdda.lora.lora_delta_weight` of these factors.
    """
    return lora_delta_weight(LoRAFactors(lora_a, lora_b, scaling))


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule: a module is targeted when its name is, or ends with ".", a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_keys(base: nn.Module, lora: LoraSettings, kind: str) -> dict[str, tuple[int, ...]]:
    """The adapter keys (peft naming) of ``kind`` on ``base``, with their shapes."""
    check_expert_kind(kind)
    keys: dict[str, tuple[int, ...]] = {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and _targeted(name, lora.target_modules):
            if name == VARIANCE_HEAD:
                continue  # the head is trained in full, never as LoRA
            down, up = peft_lora_keys(name)
            keys[down] = (lora.rank, module.in_features)
            keys[up] = (module.out_features, lora.rank)
    if kind == "learned":
        hidden, pixels = base.inp.out_features, base.out.out_features
        keys[f"{PEFT_PREFIX}{VARIANCE_HEAD}.weight"] = (pixels, hidden)
        keys[f"{PEFT_PREFIX}{VARIANCE_HEAD}.bias"] = (pixels,)
    return keys


def _check_fit(adapter: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    check_state_fits(adapter, expected, "adapter")
    for key, value in adapter.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapter does not fit the model: {key} is not finite floats")


def merge_lora_state(
    base_state: Mapping[str, Tensor], adapter: Mapping[str, Tensor], scaling: float
) -> dict[str, Tensor]:
    """The merged state dict: W + scaling * B @ A per adapted layer, the head replaced.

    ``base_state`` is the state dict of the model to merge into (with a variance head for
    the learned kind); ``adapter`` holds checked peft keys. Pure: nothing is modified.
    """
    merged = merge_lora(base_state, factors_from_peft_state(adapter, scaling))
    for name, value in peft_saved_modules(adapter).items():
        merged[name] = value.to(base_state[name])
    return merged


def merged_denoiser(
    base: DigitDenoiser,
    adapter: Mapping[str, Tensor],
    lora: LoraSettings | Mapping[str, Any],
    kind: str,
    *,
    start: DigitDenoiser | None = None,
) -> DigitDenoiser:
    """A new :class:`DigitDenoiser`, ``base`` + ``adapter`` merged, in eval mode, no grads.

    ``kind`` is ``"fixed"`` (same shape as the base) or ``"learned"`` (with the variance
    head the adapter carries). ``start`` may pass ``base`` (fixed) or
    ``base.with_variance_head()`` (learned), built once for many adapters.

    Raises:
        ValueError: when the adapter's keys or shapes do not fit ``base`` and ``kind``.
    """
    lora = lora if isinstance(lora, LoraSettings) else LoraSettings.from_dict(lora)
    check_expert_kind(kind)
    if start is None:
        start = base.with_variance_head() if kind == "learned" else base
    if start.config.variance_head != (kind == "learned"):
        raise ValueError(f"start must {'' if kind == 'learned' else 'not '}have a variance head")
    _check_fit(adapter, adapter_keys(start, lora, kind))
    with torch.no_grad():
        state = merge_lora_state(start.state_dict(), adapter, lora.scaling)
    model = DigitDenoiser(start.config)
    model.load_state_dict(state)
    return model.to(next(start.parameters()).device).eval().requires_grad_(False)


def base_fingerprint(base: nn.Module) -> str:
    """sha256 of a model's state (names, shapes, values): which base an adapter belongs to."""
    h = hashlib.sha256()
    for name, value in base.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_metadata(
    adapter: LoraAdapter, *, weights: Mapping[str, float], kind: str, kl_coef: float, seed: int
) -> dict[str, str]:
    """The string metadata of an adapter file (what :func:`read_adapter_file` returns)."""
    return {
        "format": ADAPTER_FORMAT,
        "weights": json.dumps({str(n): float(w) for n, w in weights.items()}),
        "kind": kind,
        "kl_coef": repr(float(kl_coef)),
        "lora": json.dumps(adapter.lora.to_dict()),
        "seed": str(int(seed)),
        "base": adapter.base_fingerprint,
    }


def encode_adapter(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> bytes:
    """An adapter file's bytes: ``tensors`` as safetensors with string metadata ``meta``."""
    return encode_safetensors(tensors, meta)


def _adapter_info(path: Path, meta: Mapping[str, str], what: str) -> dict[str, Any]:
    """The decoded metadata of an adapter file (:class:`InputFileError` if it is not one)."""
    if meta.get("format") != ADAPTER_FORMAT:
        raise InputFileError(
            path, f"not a {ADAPTER_FORMAT} {what} (its metadata has no such format)"
        )
    try:
        weights = json.loads(meta["weights"])
        info = {
            "weights": {
                str(n): check_number(w, f"weight of {n!r}", low=0.0) for n, w in weights.items()
            },
            "kind": meta["kind"],
            "kl_coef": check_positive(float(meta["kl_coef"]), "kl_coef"),
            "lora": LoraSettings.from_dict(json.loads(meta["lora"])),
            "seed": check_seed(int(meta["seed"])),
            "base": meta["base"],
        }
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputFileError(path, f"the {what} has bad metadata: {err}") from None
    if info["kind"] not in EXPERT_KINDS:
        raise InputFileError(path, f"the {what} has bad metadata: kind {info['kind']!r}")
    return info


def adapter_shapes(
    base_config: DenoiserConfig, lora: LoraSettings, kind: str
) -> dict[str, tuple[int, ...]]:
    """:func:`adapter_keys` of a base of ``base_config``, computed without building it."""
    check_expert_kind(kind)
    config = replace(base_config, variance_head=kind == "learned")
    with torch.device("meta"):
        start = DigitDenoiser(config)
    return adapter_keys(start, lora, kind)


def read_adapter_file(
    path: str | Path,
    sha256: str | None = None,
    what: str = "adapter file",
    *,
    base_config: DenoiserConfig | None = None,
    fingerprint: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of an adapter file and its decoded metadata.

    Metadata: ``weights`` (dict), ``kind``, ``kl_coef`` (float), ``lora``
    (:class:`LoraSettings`), ``seed`` (int), ``base`` (fingerprint). With
    ``fingerprint`` (:func:`base_fingerprint` of a base), an adapter of another base is
    refused, and with ``base_config`` the header's keys, shapes and dtypes are checked
    against an adapter of that base, both before any tensor is loaded.

    Raises:
        InputFileError: naming ``path`` (as ``what``) when it is missing, empty, a pickle
            file, truncated, not safetensors, does not match ``sha256``, is not an
            adapter file, does not fit ``base_config`` or holds non-finite values.
    """
    path = Path(path)
    decoded: dict[str, Any] = {}

    def expected(meta: dict[str, str]):
        decoded.update(_adapter_info(path, meta, what))
        if fingerprint is not None and decoded["base"] != fingerprint:
            raise InputFileError(path, f"the {what} was trained on another base model")
        if base_config is None:
            return None
        return adapter_shapes(base_config, decoded["lora"], decoded["kind"])

    tensors, _ = read_safetensors(path, sha256, what, expected=expected)
    check_finite(tensors, path, what)
    return tensors, decoded


def peft_lora_model(base: DigitDenoiser, kind: str, lora: LoraSettings) -> nn.Module:
    """A peft LoRA model of a copy of ``base`` to train (with a zero variance head, trained
    whole, for ``"learned"``); the base itself is left as it is."""
    from peft import LoraConfig, get_peft_model

    start = base.with_variance_head() if kind == "learned" else copy.deepcopy(base)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=list(lora.target_modules),
        modules_to_save=["var_out"] if kind == "learned" else None,
    )
    return get_peft_model(start, config)


def peft_adapter_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a peft model (peft keys), detached contiguous CPU copies."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().cpu().clone().contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
