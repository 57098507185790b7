"""Bad inputs to the digits domain and the evaluation harness: one clear error, nothing written.

Three families, each generated from the entry points and their definitions:

- files: every file the digits domain and the evaluation read (the weights folder, its
  manifest, base, classifier and adapter files, a user's --weights-dir, adapter files,
  results files, a report's input) x the classes missing / empty / garbage bytes /
  truncated / pickle-only (``torch.save``, never unpickled) / wrong JSON / a valid file
  of the wrong shape: an :class:`~msdda.errors.InputFileError` naming the file;
- numbers: every numeric argument of the public API, the numeric fields of every config
  dataclass enumerated from its fields (so a new field is covered when it is added) x
  NaN, infinity, ``True``, ``"1"``, huge and negative: a ``TypeError`` (not a number)
  or ``ValueError`` (out of range) naming the argument;
- outputs: unwritable and over-long output paths give an
  :class:`~msdda.errors.OutputError` before any work, and written files get ordinary
  permissions under umask 022 and 077.

Every refusal is checked to leave the folder it ran in exactly as it was.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from msdda.digits import (
    DenoiserConfig,
    DigitDenoiser,
    DigitsTrainConfig,
    add_expert,
    generate,
    load_digits_bundle,
    load_module_state,
    make_schedule,
    read_manifest,
    run_policy,
    sample_expert,
    sample_msdda,
    save_module,
    torch_threads,
)
from msdda.digits.align import AlignConfig, PairsConfig, load_adapter, reward_samples
from msdda.digits.demo import DemoConfig, write_demo
from msdda.digits.lora import LoraSettings, adapter_metadata, encode_adapter, read_adapter_file
from msdda.digits.models import ClassifierConfig, GuidedDenoiser
from msdda.digits.plots import save_grid, save_npy, save_pareto_plot
from msdda.digits.rewards import Legibility, RewardNormalisation
from msdda.digits.store import read_safetensors_header
from msdda.digits.testing import TINY_DENOISER, make_tiny_weights, random_adapter
from msdda.digits.train import BaseTraining, ClassifierTraining
from msdda.errors import InputFileError, OutputError
from msdda.evaluation import (
    FORMAT,
    SweepConfig,
    TuningConfig,
    build_report,
    choose,
    load_domain,
    plot_pareto,
    read_results,
    run_sweep,
    sample_seeds,
    simplex_grid,
    write_markdown,
)
from msdda.evaluation.hypervolume import default_reference_point, hypervolume_2d
from msdda.evaluation.results import open_results

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="module")
def bundle(tiny_weights: Path):
    return load_digits_bundle(tiny_weights)


@pytest.fixture
def weights(tiny_weights: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny weights folder."""
    dst = tmp_path / "weights"
    shutil.copytree(tiny_weights, dst)
    return dst


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its size, mtime and mode: what "nothing written" compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def refused(root: Path, call: Callable[[], object], kind: type, *names: str) -> BaseException:
    """``call()`` raises ``kind`` whose message contains every one of ``names``; ``root`` untouched."""
    before = snapshot(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(kind) as info:
            call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert len(message.splitlines()) <= 6, message
    assert snapshot(root) == before, "a refused call changed the folder"
    return info.value


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GARBAGE = bytes(range(7, 250, 3)) * 5  # no magic number of any format
WRONG_SHAPE_DENOISER = DenoiserConfig(hidden=24, num_blocks=1, time_dim=8)


def bad_safetensors(kind: str, original: bytes, wrong_shape: bytes) -> bytes | None:
    """The bytes of a bad safetensors file of ``kind`` (None: the file is removed)."""
    return {
        "missing": None,
        "empty": b"",
        "garbage": GARBAGE,
        "truncated": original[: len(original) // 2],
        "pickle": pickled({"w": torch.zeros(3)}),
        "header-json": len(b"{not json}").to_bytes(8, "little") + b"{not json}",
        "wrong-shape": wrong_shape,
    }[kind]


SAFETENSORS_CLASSES = (
    "missing",
    "empty",
    "garbage",
    "truncated",
    "pickle",
    "header-json",
    "wrong-shape",
)
PROBLEM = {  # what the message says for each class
    "missing": "no such",
    "empty": "is empty",
    "garbage": "not a safetensors",
    "truncated": "truncated",
    "pickle": "never unpickled",
    "header-json": "header is not JSON",
    "wrong-shape": "does not fit",
}


def put(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)


def _wrong_denoiser(tmp: Path) -> bytes:
    save_module(tmp / "wide.safetensors", DigitDenoiser(WRONG_SHAPE_DENOISER))
    data = (tmp / "wide.safetensors").read_bytes()
    (tmp / "wide.safetensors").unlink()
    return data


def _wrong_classifier(tmp: Path) -> bytes:
    from msdda.digits import DigitClassifier

    save_module(tmp / "c.safetensors", DigitClassifier(ClassifierConfig(hidden=5)))
    data = (tmp / "c.safetensors").read_bytes()
    (tmp / "c.safetensors").unlink()
    return data


def _wrong_adapter(tmp: Path, folder: Path) -> bytes:
    """A valid adapter file of the folder's base, but of another rank than its metadata says."""
    base = load_digits_bundle(folder).base
    adapter = random_adapter(base, "fixed", seed=3, lora=LoraSettings(rank=3, alpha=3.0))
    meta = adapter_metadata(
        dataclasses.replace(adapter, lora=LoraSettings(rank=2, alpha=2.0)),
        weights={"legibility": 1.0},
        kind="fixed",
        kl_coef=1.0,
        seed=0,
    )
    return encode_adapter(adapter.tensors, meta)


# --- files of the weights folder, read by load_digits_bundle (a --weights-dir) -----------------

WEIGHT_FILES = {
    "base.safetensors": _wrong_denoiser,
    "classifier.safetensors": _wrong_classifier,
    "expert-legibility-fixed.safetensors": None,  # an adapter: _wrong_adapter
}


@pytest.mark.parametrize("kind", SAFETENSORS_CLASSES)
@pytest.mark.parametrize("file", list(WEIGHT_FILES))
def test_a_bad_weight_file_is_named_before_any_model_is_built(weights, tmp_path, file, kind):
    target = weights / file
    make_wrong = WEIGHT_FILES[file]
    wrong = make_wrong(tmp_path) if make_wrong else _wrong_adapter(tmp_path, weights)
    put(target, bad_safetensors(kind, target.read_bytes(), wrong))
    err = refused(
        tmp_path, lambda: load_digits_bundle(weights), InputFileError, file, PROBLEM[kind]
    )
    assert Path(err.path) == target


def test_a_corrupt_expert_is_refused_before_the_base_is_built(weights, monkeypatch):
    put(weights / "oracle-boldness0.5-legibility0.5-fixed.safetensors", GARBAGE)
    built = []
    monkeypatch.setattr(DigitDenoiser, "load_state_dict", lambda *a, **k: built.append(1))
    with pytest.raises(InputFileError, match="oracle-boldness0.5-legibility0.5-fixed"):
        load_digits_bundle(weights)
    assert built == []  # the header of the last file was checked before any model got weights


MANIFEST_CASES = {
    "missing": (None, "no manifest.json"),
    "empty": (b"", "is empty"),
    "garbage": (GARBAGE, "not text"),
    "pickle": (pickled({"format": "msdda-digits/1"}), "never unpickled"),
    "wrong-json": (b'{"format": "msdda-digits/1", ', "not valid JSON"),
    "json-list": (b"[1, 2, 3]", "not a msdda-digits/1 manifest"),
    "other-format": (b'{"format": "msdda-sweep/2"}', "not a msdda-digits/1 manifest"),
    "wrong-shape": (None, "has no 'base'"),  # a manifest without its base entry
}


#: read_manifest (and add_expert, through it) checks the format tag only; the entries
#: are the loader's, so the "wrong-shape" class applies to the loaders alone.
MANIFEST_READS = [
    (reader, case)
    for reader in ("load_digits_bundle", "read_manifest", "add_expert", "digits_domain")
    for case in MANIFEST_CASES
    if not (case == "wrong-shape" and reader in ("read_manifest", "add_expert"))
]


@pytest.mark.parametrize(("reader", "case"), MANIFEST_READS)
def test_a_bad_manifest_is_named(weights, tmp_path, case, reader):
    data, problem = MANIFEST_CASES[case]
    manifest = weights / "manifest.json"
    if case == "wrong-shape":
        content = json.loads(manifest.read_text())
        del content["base"]
        data = json.dumps(content).encode()
    put(manifest, data)
    base = DigitDenoiser(TINY_DENOISER)
    call = {
        "load_digits_bundle": lambda: load_digits_bundle(weights),
        "read_manifest": lambda: read_manifest(weights),
        "add_expert": lambda: add_expert(
            weights, base, reward="boldness", kind="fixed", kl_coef=1.0
        ),
        "digits_domain": lambda: load_domain("digits", weights_dir=str(weights)),
    }[reader]
    refused(
        tmp_path, call, InputFileError, "manifest.json" if case != "missing" else "weights", problem
    )


MANIFEST_VALUES = {  # a field of an otherwise valid manifest set to a bad value
    "guidance_scale": ("nan", "guidance_scale"),
    "legibility_temperature": (-1.0, "legibility_temperature"),
    "default_seed": (-1, "default_seed"),
    "reward_normalisation": ({"legibility": {"mean": 0, "std": 0}}, "reward_normalisation"),
    "scheduler": ([1], "'scheduler' must be an object"),
}


@pytest.mark.parametrize("key", list(MANIFEST_VALUES))
def test_a_bad_manifest_value_is_named(weights, tmp_path, key):
    value, needle = MANIFEST_VALUES[key]
    content = json.loads((weights / "manifest.json").read_text())
    content[key] = value
    (weights / "manifest.json").write_text(json.dumps(content))
    refused(tmp_path, lambda: load_digits_bundle(weights), InputFileError, "manifest.json", needle)


@pytest.mark.parametrize("entry", ["file", "config", "kl_coef", "storage"])
def test_a_bad_manifest_entry_is_named(weights, tmp_path, entry):
    content = json.loads((weights / "manifest.json").read_text())
    e = content["base"] if entry == "config" else content["experts"][0]  # adapters: no config
    e[entry] = {"file": "../outside.safetensors", "config": {"hidden": True},
                "kl_coef": True, "storage": "zip"}[entry]  # fmt: skip
    (weights / "manifest.json").write_text(json.dumps(content))
    refused(tmp_path, lambda: load_digits_bundle(weights), InputFileError, "manifest.json")


@pytest.mark.parametrize("kind", ["missing", "a file", "not a path"])
def test_a_bad_weights_folder_is_named(tmp_path, kind):
    folder = {"missing": tmp_path / "nowhere", "a file": tmp_path / "f", "not a path": 3}[kind]
    if kind == "a file":
        folder.write_text("x")
    error = TypeError if kind == "not a path" else InputFileError
    refused(
        tmp_path,
        lambda: load_digits_bundle(folder),
        error,
        "weights folder" if kind == "not a path" else str(folder),
    )


# --- single files: a module's weights, an adapter file -------------------------------------------


@pytest.mark.parametrize("kind", SAFETENSORS_CLASSES)
@pytest.mark.parametrize("reader", ["load_module_state", "read_safetensors_header"])
def test_a_bad_module_file_is_named(tmp_path, kind, reader):
    path = tmp_path / "m.safetensors"
    save_module(path, DigitDenoiser(TINY_DENOISER))
    put(path, bad_safetensors(kind, path.read_bytes(), _wrong_denoiser(tmp_path)))
    if reader == "read_safetensors_header" and kind == "wrong-shape":
        assert read_safetensors_header(path)[0]  # a valid header: only a model says it does not fit
        return
    call = {
        "load_module_state": lambda: load_module_state(path, DigitDenoiser(TINY_DENOISER)),
        "read_safetensors_header": lambda: read_safetensors_header(path),
    }[reader]
    refused(tmp_path, call, InputFileError, "m.safetensors", PROBLEM[kind])


@pytest.mark.parametrize("kind", [*SAFETENSORS_CLASSES, "full-model", "other-base"])
@pytest.mark.parametrize("reader", ["load_adapter", "read_adapter_file"])
def test_a_bad_adapter_file_is_named(weights, tmp_path, kind, reader):
    bundle = load_digits_bundle(weights)
    path = tmp_path / "a.safetensors"
    original = (weights / "expert-boldness-fixed.safetensors").read_bytes()
    if kind == "full-model":
        data, problem = _wrong_denoiser(tmp_path), "not a msdda-digits-adapter/1"
    elif kind == "other-base":
        data, problem = original, "another base"
    else:
        data, problem = (
            bad_safetensors(kind, original, _wrong_adapter(tmp_path, weights)),
            PROBLEM[kind],
        )
    path.write_bytes(b"x")
    put(path, data)
    base = bundle.base if kind != "other-base" else DigitDenoiser(TINY_DENOISER)
    if reader == "read_adapter_file" and kind in ("wrong-shape", "other-base"):
        read_adapter_file(path)  # fine on its own: only a base says it does not fit
        return
    call = {
        "load_adapter": lambda: load_adapter(path, base),
        "read_adapter_file": lambda: read_adapter_file(path),
    }[reader]
    refused(tmp_path, call, InputFileError, "a.safetensors", problem)


# --- results files: read_results, a sweep's resume, the report's input ------------------------


def _header(**extra) -> dict:
    return {"kind": "header", "format": FORMAT, "config": {}, **extra}


def _row(method="msdda", weights=(0.5, 0.5), rewards=None, seed=0) -> dict:
    return {
        "kind": "row", "method": method, "weights": None if weights is None else list(weights),
        "prompt": 0, "seed": seed, "images": 1, "rewards": rewards or {"a": 1.0, "b": 2.0},
        "seconds_per_image": 0.01, "nfe_per_image": 10,
    }  # fmt: skip


RESULTS_CASES = {
    "missing": (None, "no such results file"),
    "empty": (b"", "is empty"),
    "garbage": (GARBAGE, "not a results header"),
    "pickle": (pickled([_header()]), "never unpickled"),
    "wrong-json": (b'{"kind": "header", "format": \n', "not a results header"),
    "json-not-header": (b'[1, 2]\n', "not a results header"),
    "other-format": (json.dumps({**_header(), "format": "msdda-sweep/1"}).encode() + b"\n", "format 'msdda-sweep/1'"),
    "a manifest": (b'{"format": "msdda-digits/1", "base": {}}\n', "not a results header"),
}  # fmt: skip


#: A sweep starts a missing or empty results file (so only read_results refuses those).
RESULTS_READS = [
    (reader, case)
    for reader in ("read_results", "run_sweep", "open_results")
    for case in RESULTS_CASES
    if reader == "read_results" or case not in ("missing", "empty")
]


@pytest.mark.parametrize(("reader", "case"), RESULTS_READS)
def test_a_bad_results_file_is_named(tmp_path, case, reader):
    data, problem = RESULTS_CASES[case]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"x")
    put(path, data)
    config = SweepConfig(domain="toy", methods=("base", "msdda"), weights=simplex_grid(2),
                         seeds=(0,), images_per_prompt=1, tuning=None)  # fmt: skip
    call = {
        "read_results": lambda: read_results(path),
        "run_sweep": lambda: run_sweep(config, path),
        "open_results": lambda: open_results(path, {"config": config.to_dict()}),
    }[reader]
    refused(tmp_path, call, InputFileError, "r.jsonl", problem)


def test_a_results_folder_is_refused(tmp_path):
    (tmp_path / "r.jsonl").mkdir()
    refused(tmp_path, lambda: read_results(tmp_path / "r.jsonl"), InputFileError, "is a folder")


REPORT_CASES = {  # a readable results file the report cannot use
    "no rows": ([], {}, "no result rows"),
    "kl_coef a string": ([_row()], {"kl_coef": "0.5"}, "kl_coef"),
    "objectives not rewards": ([_row()], {"objectives": ["x", "y"]}, "not rewards of its rows"),
    "tuning record malformed": ([_row()], {"tuning": {"chosen": {"rgg": {"score": "high"}}}}, "tuning record"),
    "rows disagree": ([_row(), _row(method="base", weights=None, rewards={"a": 1.0})], {}, "same rewards"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_the_report_refuses_a_results_file_of_the_wrong_shape(tmp_path, case):
    rows, header, problem = REPORT_CASES[case]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [_header(**header), *rows]) + "\n")
    refused(tmp_path, lambda: build_report(read_results(path)), InputFileError, "r.jsonl", problem)


def test_many_bad_lines_are_one_warning_and_the_report_still_reads(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [json.dumps(_header()), json.dumps(_row())] + ["garbage"] * 50
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(read_results(path))
    assert [str(w.message) for w in caught] == [
        f"{path}: 50 bad lines skipped (first: line 3: not valid JSON)"
    ]
    assert report.skipped_lines == 50


# --- numbers ----------------------------------------------------------------------------------

HUGE = 2**64
BAD_NUMBERS = {
    "nan": math.nan,
    "inf": math.inf,
    "bool": True,
    "str": "1",
    "huge": HUGE,
    "negative": -1,
}


def expected_error(value_name: str, integer: bool) -> type:
    """What a bad value gives: a TypeError for a non-number (or a float where an int is due)."""
    if value_name in ("bool", "str"):
        return TypeError
    if integer and value_name in ("nan", "inf"):
        return TypeError
    return ValueError


def numeric_fields(cls) -> list[tuple[str, bool]]:
    """(name, is_int) of the dataclass fields that hold a number: a numeric default (bools
    excluded) or an optional number (``float | None``, default None)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is None and f.type in ("float | None", "int | None"):
            out.append((f.name, f.type.startswith("int")))
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out.append((f.name, isinstance(default, int)))
    return out


CONFIGS = (
    DemoConfig, DenoiserConfig, ClassifierConfig, LoraSettings, ClassifierTraining,
    BaseTraining, DigitsTrainConfig, AlignConfig, PairsConfig, TuningConfig, SweepConfig,
)  # fmt: skip
#: Fields that accept a negative number, or a huge one (no upper bound is meaningful).
NEGATIVE_OK = {"DigitsTrainConfig.guidance_scale", "LoraSettings.alpha"}
HUGE_OK = {
    "LoraSettings.alpha", "DigitsTrainConfig.guidance_scale", "DigitsTrainConfig.legibility_temperature",
    "DenoiserConfig.variance_bound", "ClassifierTraining.lr", "ClassifierTraining.weight_decay",
    "ClassifierTraining.noise_std", "BaseTraining.lr", "BaseTraining.weight_decay",
    "DemoConfig.kl_coef", "AlignConfig.kl_coef", "AlignConfig.lr", "AlignConfig.variance_lr", "AlignConfig.max_grad_norm",
}  # fmt: skip
CONFIG_CASES = [
    (cls, name, integer, v)
    for cls in CONFIGS
    for name, integer in numeric_fields(cls)
    for v in BAD_NUMBERS
    if not (v == "negative" and f"{cls.__name__}.{name}" in NEGATIVE_OK)
    and not (v == "huge" and f"{cls.__name__}.{name}" in HUGE_OK)
]


def test_every_config_has_numeric_fields_covered():
    covered = {(cls.__name__, name) for cls, name, _, _ in CONFIG_CASES}
    assert len(covered) >= 35  # every numeric field of every config: a new one joins by itself


@pytest.mark.parametrize(
    ("cls", "name", "integer", "value"),
    CONFIG_CASES,
    ids=[f"{c.__name__}.{n}-{v}" for c, n, _, v in CONFIG_CASES],
)
def test_a_bad_number_in_a_config_is_refused_by_name(tmp_path, cls, name, integer, value):
    bad = BAD_NUMBERS[value]
    if name == "time_dim" and value == "negative":
        bad = -2  # odd widths are refused for another reason
    refused(tmp_path, lambda: cls(**{name: bad}), expected_error(value, integer), name)


SEQUENCE_FIELDS = [  # numbers inside a config's sequences, each named with its index
    (DigitsTrainConfig, "align_seeds", lambda v: (v,), True, "align_seeds[0]"),
    (TuningConfig, "seeds", lambda v: (v,), True, "tuning seeds[0]"),
    (TuningConfig, "rgg_scales", lambda v: (v,), False, "rgg_scales[0]"),
    (TuningConfig, "code_grid", lambda v: ((v, 1),), True, "code_grid[0][0]"),
    (TuningConfig, "weights", lambda v: ((v, 0.5),), False, "tuning weights[0][0]"),
    (SweepConfig, "seeds", lambda v: (v,), True, "seeds[0]"),
    (SweepConfig, "weights", lambda v: ((v, 0.5),), False, "weights[0]"),
]
SEQUENCE_HUGE_OK = {("TuningConfig", "rgg_scales"), ("TuningConfig", "weights")}  # no upper bound
SEQUENCE_CASES = [
    (cls, field, wrap, integer, label, v)
    for cls, field, wrap, integer, label in SEQUENCE_FIELDS
    for v in BAD_NUMBERS
    if not (v == "huge" and (cls.__name__, field) in SEQUENCE_HUGE_OK)
]


@pytest.mark.parametrize(
    ("cls", "field", "wrap", "integer", "label", "value"),
    SEQUENCE_CASES,
    ids=[f"{c.__name__}.{f}-{v}" for c, f, _, _, _, v in SEQUENCE_CASES],
)
def test_a_bad_number_in_a_config_sequence_is_refused_by_name(
    tmp_path, cls, field, wrap, integer, label, value
):
    kwargs = {field: wrap(BAD_NUMBERS[value])}
    if cls is SweepConfig:
        kwargs.update(domain="toy", tuning=None)
    refused(tmp_path, lambda: cls(**kwargs), expected_error(value, integer), label)


def _tiny_policy(bundle):
    from msdda import expert_policy

    return expert_policy(bundle.reference, bundle.schedule, torch.zeros(2, dtype=torch.long))


#: (entry point, argument, is_int, call(bundle, value), values not refused)
FUNCTION_ARGS = [
    ("generate", "num_samples", True, lambda b, v: generate(3, {"boldness": 1.0}, num_samples=v, bundle=b), ()),
    ("generate", "seed", True, lambda b, v: generate(3, {"boldness": 1.0}, 2, seed=v, bundle=b), ()),
    ("generate", "kl_coef", False, lambda b, v: generate(3, {"boldness": 1.0}, 2, kl_coef=v, bundle=b), ("huge",)),
    ("generate", "prompt", True, lambda b, v: generate(v, {"boldness": 1.0}, 2, bundle=b), ()),
    ("generate", "weight of 'boldness'", False, lambda b, v: generate(3, {"boldness": v}, 2, bundle=b), ("huge",)),
    ("sample_msdda", "seed", True, lambda b, v: sample_msdda(b, torch.tensor([1]), {"boldness": 1.0}, seed=v), ()),
    ("sample_msdda", "kl_coef", False, lambda b, v: sample_msdda(b, torch.tensor([1]), {"boldness": 1.0}, kl_coef=v), ("huge",)),
    ("sample_expert", "seed", True, lambda b, v: sample_expert(b.reference, torch.tensor([1]), b.schedule, v), ()),
    ("run_policy", "num_samples", True, lambda b, v: run_policy(_tiny_policy(b), v, b.schedule), ()),
    ("torch_threads", "threads", True, lambda b, v: torch_threads(v).__enter__(), ()),
    ("load_digits_bundle", "num_inference_steps", True, lambda b, v: load_digits_bundle(b.path, num_inference_steps=v), ()),
    ("make_schedule", "num_inference_steps", True, lambda b, v: make_schedule(v), ()),
    ("bundle.expert", "seed", True, lambda b, v: b.expert("boldness", seed=v), ()),
    ("bundle.oracle", "weight of 'boldness'", False, lambda b, v: b.oracle({"boldness": v, "legibility": 0.5}), ("huge",)),
    ("reward_samples", "num_samples", True, lambda b, v: reward_samples(b, b.reference, v), ()),
    ("reward_samples", "seed", True, lambda b, v: reward_samples(b, b.reference, 2, seed=v), ()),
    ("add_expert", "kl_coef", False, lambda b, v: add_expert(b.path, b.base, reward="boldness", kind="fixed", kl_coef=v), ("huge",)),
    ("add_expert", "seed", True, lambda b, v: add_expert(b.path, b.base, reward="boldness", kind="fixed", kl_coef=1.0, seed=v), ()),
    ("GuidedDenoiser", "guidance_scale", False, lambda b, v: GuidedDenoiser(b.base, v), ("huge", "negative")),
    ("Legibility", "temperature", False, lambda b, v: Legibility(b.classifier, v), ("huge",)),
    ("RewardNormalisation", "std", False, lambda b, v: RewardNormalisation(0.0, v), ("huge",)),
    ("simplex_grid", "points", True, lambda b, v: simplex_grid(v), ()),
    ("hypervolume_2d", "reference[0]", False, lambda b, v: hypervolume_2d([(1, 1)], (v, 0)), ("huge", "negative")),
    ("hypervolume_2d", "points[0][1]", False, lambda b, v: hypervolume_2d([(1, v)], (0, 0)), ("huge", "negative")),
    ("default_reference_point", "margin", False, lambda b, v: default_reference_point([(1, 1)], v), ("huge",)),
    ("choose", "kl_coef", False, lambda b, v: choose([{"score": 1, "kl": 1}], "regularised", kl_coef=v), ("huge",)),
    ("choose", "target_kl", False, lambda b, v: choose([{"score": 1, "kl": 1}], "matched", target_kl=v), ("huge", "negative")),
    ("sample_seeds", "seed", True, lambda b, v: sample_seeds(v, 0, 2), ()),
    ("toy domain", "seed", True, lambda b, v: load_domain("toy", seed=v), ()),
]  # fmt: skip
FUNCTION_CASES = [
    (entry, arg, integer, call, v)
    for entry, arg, integer, call, ok in FUNCTION_ARGS
    for v in BAD_NUMBERS
    if v not in ok
]


@pytest.mark.parametrize(
    ("entry", "arg", "integer", "call", "value"),
    FUNCTION_CASES,
    ids=[f"{e}.{a}-{v}" for e, a, _, _, v in FUNCTION_CASES],
)
def test_a_bad_number_argument_is_refused_by_name(
    bundle, tmp_path, entry, arg, integer, call, value
):
    before = snapshot(bundle.path)
    refused(tmp_path, lambda: call(bundle, BAD_NUMBERS[value]), expected_error(value, integer), arg)
    assert snapshot(bundle.path) == before


def test_the_report_reference_point_is_checked_by_name(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [_header(), _row()]) + "\n")
    results = read_results(path)
    for bad, kind in (
        (math.nan, ValueError),
        (True, TypeError),
        ("1", TypeError),
        (math.inf, ValueError),
    ):
        refused(
            tmp_path,
            lambda bad=bad: build_report(results, reference=(bad, 0.0)),
            kind,
            "reference[0]",
        )
    refused(tmp_path, lambda: build_report(results, reference="1,2"), TypeError, "reference")
    refused(
        tmp_path,
        lambda: build_report(results, reference=(1.0, 2.0, 3.0)),
        ValueError,
        "two numbers",
    )


def test_seeds_span_the_one_documented_range(bundle):
    top = 2**63 - 1
    for s in (0, top):
        assert sample_seeds(s, 0, 1)
        assert DemoConfig(seed=s).seed == s
    a = generate(3, {"boldness": 1.0}, 2, seed=top, bundle=bundle)
    b = generate(3, {"boldness": 1.0}, 2, seed=top, bundle=bundle)
    assert torch.equal(a, b)
    for bad in (-1, top + 1):
        with pytest.raises(ValueError, match="seed"):
            generate(3, {"boldness": 1.0}, 2, seed=bad, bundle=bundle)
        with pytest.raises(ValueError, match="seed"):
            DemoConfig(seed=bad)


# --- outputs: checked before any work, ordinary permissions --------------------------------------


def _outputs(tmp_path: Path, bundle) -> dict[str, Callable[[Path], object]]:
    images = torch.rand(4, 1, 8, 8)
    report_file = tmp_path / "in.jsonl"
    report_file.write_text("\n".join(json.dumps(x) for x in [_header(), _row()]) + "\n")
    report = build_report(read_results(report_file))
    config = SweepConfig(domain="toy", methods=("base",), weights=simplex_grid(2), seeds=(0,),
                         images_per_prompt=1, tuning=None)  # fmt: skip
    return {
        "save_grid": lambda p: save_grid(images, p),
        "save_pareto_plot": lambda p: save_pareto_plot([0, 1], [1, 0], ["a", "b"], p, "x", "y"),
        "save_npy": lambda p: save_npy(np.zeros(3), p),
        "plot_pareto": lambda p: plot_pareto(report, p),
        "write_markdown": lambda p: write_markdown(report, p),
        "run_sweep": lambda p: run_sweep(config, p),
        "write_demo": lambda p: write_demo(bundle, DemoConfig(num_weights=2, samples_per_prompt=1, compare=False), p),
    }  # fmt: skip


OUTPUT_WRITERS = [
    "save_grid",
    "save_pareto_plot",
    "save_npy",
    "plot_pareto",
    "write_markdown",
    "run_sweep",
    "write_demo",
]


@pytest.mark.parametrize("where", ["under a file", "over-long name", "a folder"])
@pytest.mark.parametrize("writer", OUTPUT_WRITERS)
def test_an_unwritable_output_is_refused_before_any_work(bundle, tmp_path, writer, where):
    write = _outputs(tmp_path, bundle)[writer]
    (tmp_path / "file").write_text("x")
    target = {
        "under a file": tmp_path / "file" / "out.png",
        "over-long name": tmp_path / ("n" * 300 + ".png"),
        "a folder": tmp_path,
    }[where]
    if writer == "write_demo" and where == "a folder":
        target = tmp_path / "file"  # the demo writes a folder: a file is in the way
    refused(
        tmp_path,
        lambda: write(target),
        OutputError,
        str(target) if where != "over-long name" else "longer",
    )


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_ordinary_permissions(bundle, tmp_path, umask):
    old = os.umask(umask)
    try:
        writers = _outputs(tmp_path, bundle)
        made = []
        for name, suffix in (("save_grid", ".png"), ("save_pareto_plot", ".png"), ("save_npy", ".npy"),
                             ("plot_pareto", ".png"), ("write_markdown", ".md"), ("run_sweep", ".jsonl")):  # fmt: skip
            path = tmp_path / f"{name}{suffix}"
            writers[name](path)
            made.append(path)
        save_module(tmp_path / "m.safetensors", DigitDenoiser(TINY_DENOISER))
        made.append(tmp_path / "m.safetensors")
        folder = make_tiny_weights(
            tmp_path / "w", experts=("boldness",), kinds=("fixed",), oracle_weights=()
        )
        made += list(folder.iterdir())
        demo = tmp_path / "demo"
        writers["write_demo"](demo)
        made += list(demo.iterdir())
    finally:
        os.umask(old)
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for d in (folder, demo):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    assert not [p for p in tmp_path.rglob(".msdda-*")]  # no temporary file left behind
