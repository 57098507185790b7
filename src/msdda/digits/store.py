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

Every file is written whole or not at all (:mod:`msdda.io`). Reading checks, before any
model is built, that the file exists and is not empty, that it is safetensors (its header
parsed and checked against the file's length: a truncated file is named as such; a
pickle file written by ``torch.save`` is refused and never unpickled), the recorded
sha256, and that its keys, shapes and dtypes match the model: any failure is an
:class:`msdda.errors.InputFileError` naming the file and what is wrong with it.

This module is the bottom of the domain: it imports nothing else from
:mod:`msdda.digits`. Writing a trained expert or oracle into a folder (which checks it
against the folder's base) is :mod:`msdda.digits.catalog`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputFileError, reading
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
    "read_input_bytes",
    "read_json_file",
    "read_safetensors_header",
    "read_safetensors",
    "check_state_fits",
    "check_header_fits",
    "state_shapes",
    "load_module_state",
    "file_sha256",
    "read_manifest",
    "check_weights_dir",
    "check_finite",
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


def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` looks like a ``torch.save`` (zip) or plain pickle file."""
    return data[:4] == b"PK\x03\x04" or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5)


def read_input_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of the input file ``path`` (a ``what``), refused if missing, a folder or empty.

    Raises:
        InputFileError: naming ``path`` and the problem (OS errors included).
    """
    path = Path(path)
    if path.is_dir():
        raise InputFileError(path, f"is a folder, not a {what}")
    if not path.exists() and not path.is_symlink():
        raise InputFileError(path, f"no such {what} (the file is missing)")
    with reading(path, what):
        data = path.read_bytes()
    if not data:
        raise InputFileError(path, f"the {what} is empty")
    return data


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON value of ``path`` (a ``what``): an :class:`InputFileError` for anything else."""
    data = read_input_bytes(path, what)
    if _is_pickle(data):
        raise InputFileError(
            path, f"is a pickle file (torch.save), not a JSON {what}: refused, never unpickled"
        )
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(path, f"the {what} is not text (not UTF-8): not JSON") from None
    except json.JSONDecodeError as err:
        raise InputFileError(path, f"the {what} is not valid JSON: {err}") from None


#: Bytes per element of the safetensors dtypes, and whether each is floating point.
_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False),
    "BOOL": (1, False),
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length


def _parse_header(path: Path, data: bytes, what: str) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """The tensors ``{name: (dtype, shape)}`` and string metadata of safetensors ``data``."""
    if _is_pickle(data):
        raise InputFileError(
            path,
            f"is a pickle file (torch.save), not a safetensors {what}: refused, never unpickled",
        )
    if len(data) < 8:
        raise InputFileError(path, f"not a safetensors {what}: only {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    looks_like_json = data[8:9] == b"{"
    if size > _MAX_HEADER or not looks_like_json:
        raise InputFileError(path, f"not a safetensors {what} (no safetensors header)")
    if 8 + size > len(data):
        raise InputFileError(
            path,
            f"the {what} is truncated: its header needs {8 + size} bytes, the file has {len(data)}",
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputFileError(path, f"not a safetensors {what}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InputFileError(path, f"not a safetensors {what}: its header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputFileError(path, f"not a safetensors {what}: its metadata is not strings")
    tensors: dict[str, tuple[str, tuple]] = {}
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = _DTYPES[dtype][0]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= lo <= hi
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or hi - lo != math.prod(shape) * itemsize:
            raise InputFileError(path, f"not a safetensors {what}: bad header entry {name!r}")
        tensors[name] = (dtype, shape)
        end = max(end, hi)
    if 8 + size + end > len(data):
        raise InputFileError(
            path,
            f"the {what} is truncated: its header lists {8 + size + end} bytes, the file has "
            f"{len(data)}",
        )
    return tensors, meta


def read_safetensors_header(
    path: str | Path, what: str = "weight file"
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """The header of a safetensors file: ``{name: (dtype, shape)}`` and its string metadata.

    Nothing is loaded into tensors and nothing is unpickled.

    Raises:
        InputFileError: naming ``path`` when it is missing, empty, a pickle file,
            truncated or not safetensors.
    """
    path = Path(path)
    return _parse_header(path, read_input_bytes(path, what), what)


def read_safetensors(
    path: str | Path,
    sha256: str | None = None,
    what: str = "weight file",
    expected: Mapping[str, tuple[int, ...]]
    | Callable[[dict[str, str]], Mapping[str, tuple[int, ...]] | None]
    | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its string metadata (``{}`` when it has none).

    ``expected`` (``{name: shape}``, or a function of the metadata giving it), when
    given, is checked against the header before any tensor is loaded
    (:func:`check_header_fits`).

    Raises:
        InputFileError: naming ``path`` (as ``what``) when it is missing, empty, a pickle
            file, truncated, not safetensors, does not match ``sha256`` or does not fit
            ``expected``.
    """
    from safetensors.torch import load

    path = Path(path)
    data = read_input_bytes(path, what)
    header, meta = _parse_header(path, data, what)
    if callable(expected):
        expected = expected(meta)
    if expected is not None:
        check_header_fits(header, expected, path, what)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputFileError(path, f"the {what} is corrupt: its sha256 differs from the manifest's")
    with reading(path, f"safetensors {what}"):
        tensors = load(data)
    return tensors, meta


def state_shapes(module_class: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the state dict of ``module_class(config)``, built on the meta device
    (no memory, no values): what a weight file must hold before the real model is built."""
    with torch.device("meta"):
        module = module_class(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _fit_problem(
    got: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why tensors of shapes ``got`` do not fit a model of ``shapes`` (None: they fit)."""
    missing = sorted(set(shapes) - set(got))
    unexpected = sorted(set(got) - set(shapes))
    if missing or unexpected:
        return f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
    for key, shape in shapes.items():
        if tuple(got[key]) != tuple(shape):
            return f"{key} has shape {tuple(got[key])}, expected {tuple(shape)}"
    return None


def check_state_fits(
    state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Refuse ``state`` unless it has exactly the keys of ``shapes``, each of that shape.

    Raises:
        ValueError: ``"<what> does not fit the model: ..."`` naming the first keys that are
            missing or unexpected, or the first key of another shape.
    """
    problem = _fit_problem({k: tuple(v.shape) for k, v in state.items()}, shapes)
    if problem:
        raise ValueError(f"{what} does not fit the model: {problem}")


def check_header_fits(
    header: Mapping[str, tuple[str, tuple[int, ...]]],
    shapes: Mapping[str, tuple[int, ...]],
    path: str | Path,
    what: str = "weight file",
) -> None:
    """Refuse a header (``{name: (dtype, shape)}``) without exactly the keys and shapes of
    ``shapes``, or with a tensor that is not floating point.

    Raises:
        InputFileError: ``"<path>: the <what> does not fit the model: ..."``.
    """
    problem = _fit_problem({k: s for k, (_, s) in header.items()}, shapes)
    if problem is None:
        for key, (dtype, _) in header.items():
            if not _DTYPES[dtype][1]:
                problem = f"{key} is {dtype}, not floating point"
                break
    if problem:
        raise InputFileError(path, f"the {what} does not fit the model: {problem}")


def load_module_state(path: Path, module: nn.Module, sha256: str | None = None) -> nn.Module:
    """Load safetensors ``path`` into ``module`` (in place; returned in eval mode).

    Raises:
        InputFileError: naming ``path`` when it is missing, empty, not a safetensors file,
            does not match ``sha256``, or its keys, shapes or dtypes differ from the
            module's (checked on the header, before any tensor is loaded), or it holds
            non-finite values.
    """
    path = Path(path)
    expected = module.state_dict()
    state, _ = read_safetensors(
        path, sha256, expected={k: tuple(v.shape) for k, v in expected.items()}
    )
    check_finite(state, path)
    module.load_state_dict(state)
    return module.eval()


def check_finite(state: Mapping[str, Tensor], path: str | Path, what: str = "weight file") -> None:
    """Refuse (:class:`InputFileError`) a state read from ``path`` holding NaN or infinity."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputFileError(path, f"the {what} is corrupt: {key} holds non-finite values")


def check_weights_dir(weights_dir: Any) -> Path:
    """``weights_dir`` as a Path to an existing folder (:class:`InputFileError` if not)."""
    if isinstance(weights_dir, bool) or not isinstance(weights_dir, (str, os.PathLike)):
        raise TypeError(f"the weights folder must be a path, got {type(weights_dir).__name__}")
    path = Path(weights_dir)
    if not path.exists():
        raise InputFileError(path, "no such weights folder (it does not exist)")
    if not path.is_dir():
        raise InputFileError(path, "is not a folder: a weights folder holds manifest.json")
    return path


def read_manifest(weights_dir: Path) -> dict:
    """The manifest of a weights folder, checked for its format tag.

    Raises:
        InputFileError: naming the folder or the manifest when the folder does not
            exist, has no manifest, or the manifest is empty, not JSON or not a
            :data:`MANIFEST_FORMAT` manifest.
    """
    folder = check_weights_dir(weights_dir)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise InputFileError(
            folder,
            f"no {MANIFEST_NAME}: not a digits weights folder "
            "(create one with `msdda train --out FOLDER`)",
        )
    manifest = read_json_file(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputFileError(path, f"not a {MANIFEST_FORMAT} manifest")
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
    """A model's beta: a positive finite number (a TypeError for anything but a number)."""
    return check_positive(kl_coef, "kl_coef")


def check_training_seed(seed: int) -> int:
    """A model's training seed: an int in [0, 2**63 - 1] (:func:`msdda.validation.check_seed`)."""
    return check_seed(seed)


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
