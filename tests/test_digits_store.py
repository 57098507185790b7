"""Weights folders: safetensors + manifest round trips, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msdda import StepSpec, step_gaussian
from msdda.digits import (
    DigitDenoiser,
    GuidedDenoiser,
    add_expert,
    add_oracle,
    load_digits_bundle,
    load_module_state,
    make_schedule,
    read_manifest,
    save_module,
)
from msdda.digits.lora import merged_denoiser
from msdda.digits.store import DEFAULT_WEIGHTS_DIR, EXPERT_KINDS
from msdda.digits.testing import TINY_DENOISER, make_tiny_weights, perturbed, random_adapter
from msdda.errors import InputFileError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """Two training seeds of every expert and of fixed and learned oracles, as adapters."""
    return make_tiny_weights(
        tmp_path_factory.mktemp("seeded") / "weights",
        seeds=(0, 1),
        oracle_kinds=("fixed", "learned"),
    )


@pytest.fixture
def tiny_copy(tiny: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "weights"
    dst.mkdir()
    for f in tiny.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _inputs(b: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([999, 500, 3][:b]), torch.arange(b)


def test_module_round_trip_is_exact(tmp_path: Path) -> None:
    model = DigitDenoiser(TINY_DENOISER)
    sha = save_module(tmp_path / "m.safetensors", model)
    loaded = load_module_state(tmp_path / "m.safetensors", DigitDenoiser(TINY_DENOISER), sha)
    x, t, c = _inputs()
    torch.testing.assert_close(loaded(x, t, c), model.eval()(x, t, c), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_bundle_round_trip(tiny: Path) -> None:
    bundle = load_digits_bundle(tiny)
    assert set(bundle.experts) == {
        (n, k) for n in ("legibility", "boldness") for k in ("fixed", "learned")
    }
    assert bundle.expert("boldness", "learned").spec == StepSpec("epsilon", "learned_log")
    assert bundle.expert("boldness").spec == StepSpec("epsilon", "fixed_small")
    assert bundle.reference.spec.variance_type == "fixed_small"
    assert bundle.schedule.timesteps[0] == 980 and len(bundle.schedule.timesteps) == 50
    x, t, c = _inputs()
    again = load_digits_bundle(tiny)
    for key, expert in bundle.experts.items():
        torch.testing.assert_close(
            expert.denoiser(x, t, c), again.experts[key].denoiser(x, t, c), rtol=0, atol=0
        )
    oracle = bundle.oracle({"boldness": 0.5, "legibility": 0.5})
    assert oracle.kl_coef == 1.0
    assert set(bundle.rewards) == {"legibility", "boldness", "symmetry"}


def test_missing_experts_and_oracles_are_named(tiny: Path) -> None:
    bundle = load_digits_bundle(tiny)
    with pytest.raises(
        ValueError, match="no 'fixed' expert for reward 'symmetry'.*legibility, boldness"
    ):
        bundle.expert("symmetry")
    with pytest.raises(ValueError, match="expert kind must be one of"):
        bundle.expert("boldness", "wide")
    with pytest.raises(ValueError, match="no 'fixed' oracle for weights"):
        bundle.oracle({"legibility": 0.3, "boldness": 0.7})


def test_add_expert_replaces_and_checks(tiny_copy: Path) -> None:
    base = load_digits_bundle(tiny_copy).base
    new = perturbed(base, 0.1, 123)
    add_expert(tiny_copy, new, reward="boldness", kind="fixed", kl_coef=0.5, metrics={"x": 1})
    manifest = read_manifest(tiny_copy)
    entries = [e for e in manifest["experts"] if (e["reward"], e["kind"]) == ("boldness", "fixed")]
    assert len(entries) == 1 and entries[0]["kl_coef"] == 0.5 and entries[0]["metrics"] == {"x": 1}
    x, t, c = _inputs()
    got = load_digits_bundle(tiny_copy).expert("boldness").denoiser(x, t, c)
    torch.testing.assert_close(got, new(x, t, c), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kind='learned' needs a model with a variance head"):
        add_expert(tiny_copy, new, reward="boldness", kind="learned", kl_coef=1.0)
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        add_expert(tiny_copy, new, reward="beauty", kind="fixed", kl_coef=1.0)
    with pytest.raises(ValueError, match="kl_coef must be > 0"):
        add_expert(tiny_copy, new, reward="boldness", kind="fixed", kl_coef=0.0)
    add_oracle(
        tiny_copy, new, weights={"legibility": 0.25, "boldness": 0.75}, kind="fixed", kl_coef=1.0
    )
    assert load_digits_bundle(tiny_copy).oracle({"legibility": 0.25, "boldness": 0.75}) is not None


@pytest.mark.parametrize(
    "file", ["base.safetensors", "classifier.safetensors", "expert-boldness-learned.safetensors"]
)
def test_truncated_file_is_reported_by_name(tiny_copy: Path, file: str) -> None:
    path = tiny_copy / file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputFileError, match=rf"{file}: the weight file is truncated"):
        load_digits_bundle(tiny_copy)


def test_missing_file_is_reported_by_name(tiny_copy: Path) -> None:
    (tiny_copy / "expert-legibility-fixed.safetensors").unlink()
    with pytest.raises(
        InputFileError, match=r"expert-legibility-fixed.safetensors: no such weight file"
    ):
        load_digits_bundle(tiny_copy)


def test_invalid_safetensors_and_wrong_shapes(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / "manifest.json").read_text())
    manifest["base"].pop("sha256")  # without a checksum the format check still catches it
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    (tiny_copy / "base.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(InputFileError, match=r"base.safetensors: not a safetensors weight file"):
        load_digits_bundle(tiny_copy)
    wide = DigitDenoiser(type(TINY_DENOISER)(hidden=24, num_blocks=1, time_dim=8))
    save_module(tiny_copy / "base.safetensors", wide)
    with pytest.raises(
        InputFileError,
        match=r"base.safetensors: the weight file does not fit the model: .* has shape",
    ):
        load_digits_bundle(tiny_copy)
    deeper = DigitDenoiser(type(TINY_DENOISER)(hidden=16, num_blocks=2, time_dim=8))
    save_module(tiny_copy / "base.safetensors", deeper)
    with pytest.raises(
        InputFileError,
        match=r"base.safetensors: the weight file does not fit the model: missing keys \[\]",
    ):
        load_digits_bundle(tiny_copy)


def test_missing_or_broken_manifest(tmp_path: Path, tiny_copy: Path) -> None:
    with pytest.raises(InputFileError, match="nowhere: no such weights folder"):
        load_digits_bundle(tmp_path / "nowhere")
    with pytest.raises(InputFileError, match="no manifest.json: not a digits weights folder"):
        load_digits_bundle(tmp_path)
    manifest = json.loads((tiny_copy / "manifest.json").read_text())
    manifest["experts"][0]["reward"] = "beauty"
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="expert entry with reward 'beauty'"):
        load_digits_bundle(tiny_copy)
    (tiny_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: the manifest is not valid JSON"):
        load_digits_bundle(tiny_copy)
    (tiny_copy / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="manifest.json: not a msdda-digits/1 manifest"):
        load_digits_bundle(tiny_copy)


def test_variance_head_starts_at_fixed_small() -> None:
    torch.manual_seed(0)
    base = DigitDenoiser(TINY_DENOISER).eval()
    learned = base.with_variance_head().eval()
    x, t, c = _inputs()
    out = learned(x, t, c)
    assert out.shape == (3, 2, 8, 8)
    torch.testing.assert_close(out[:, :1], base(x, t, c), rtol=0, atol=0)
    assert bool((out[:, 1:] == 0).all())
    schedule = make_schedule()
    for step in (980, 500, 0):
        tb = torch.full((3,), step)
        fixed = step_gaussian(base(x, tb, c), x, step, schedule, StepSpec())
        free = step_gaussian(
            learned(x, tb, c), x, step, schedule, StepSpec(variance_type="learned_log")
        )
        torch.testing.assert_close(free.mean, fixed.mean)
        torch.testing.assert_close(free.variance, fixed.variance)
    with torch.no_grad():  # the head is bounded: |v| <= variance_bound
        learned.var_out.bias.fill_(1e3)
    assert learned(x, t, c)[:, 1:].abs().max() <= TINY_DENOISER.variance_bound + 1e-6


def test_denoiser_signature_and_guidance() -> None:
    torch.manual_seed(0)
    model = DigitDenoiser(TINY_DENOISER).eval()
    x, t, c = _inputs()
    with pytest.raises(ValueError, match=r"x_t must be a \(B, 1, 8, 8\)"):
        model(torch.zeros(3, 64), t, c)
    with pytest.raises(ValueError, match="cond must be a"):
        model(x, t, c.float())
    torch.testing.assert_close(GuidedDenoiser(model, 1.0)(x, t, c), model(x, t, c))
    null = model(x, t, None)
    cond = model(x, t, c)
    torch.testing.assert_close(GuidedDenoiser(model, 3.0)(x, t, c), null + 3.0 * (cond - null))


def test_seeds_are_looked_up_with_seed_0_the_default(seeded: Path) -> None:
    bundle = load_digits_bundle(seeded)
    assert bundle.seeds == (0, 1) and bundle.default_seed == 0
    assert len(bundle.all_experts) == 2 * len(bundle.experts) == 8
    assert len(bundle.all_oracles) == 2 * len(bundle.oracles) == 4
    assert {o.seed for o in bundle.oracles} == {0}
    x, t, c = _inputs()
    for kind in EXPERT_KINDS:
        default = bundle.expert("legibility", kind)
        assert bundle.expert("legibility", kind, seed=0) is default
        assert bundle.all_experts[("legibility", kind, 0)] is default
        other = bundle.expert("legibility", kind, seed=1)
        assert not torch.allclose(default.denoiser(x, t, c), other.denoiser(x, t, c))
        half = {"legibility": 0.5, "boldness": 0.5}
        assert bundle.oracle(half, kind) is bundle.oracle(half, kind, seed=0)
        assert bundle.oracle(half, kind, seed=1) is not bundle.oracle(half, kind)
    assert bundle.expert_names("learned", seed=1) == ("legibility", "boldness")
    with pytest.raises(ValueError, match=r"no 'fixed' expert of seed 2 .*seeds here: \[0, 1\]"):
        bundle.expert("legibility", seed=2)
    with pytest.raises(ValueError, match="no 'learned' oracle of seed 2 for weights"):
        bundle.oracle({"legibility": 0.5, "boldness": 0.5}, "learned", seed=2)


def test_seeds_are_recorded_and_named_on_disk(seeded: Path) -> None:
    manifest = read_manifest(seeded)
    entries = manifest["experts"] + manifest["oracles"]
    assert sorted({e["seed"] for e in entries}) == [0, 1]
    for e in entries:
        assert e["storage"] == "lora" and e["file"].endswith(
            "-seed1.safetensors" if e["seed"] == 1 else f"-{e['kind']}.safetensors"
        )
    adapter = (seeded / "expert-boldness-learned-seed1.safetensors").stat().st_size
    assert adapter < (seeded / "base.safetensors").stat().st_size


def test_an_adapter_round_trips_exactly_through_the_folder(tiny_copy: Path) -> None:
    bundle = load_digits_bundle(tiny_copy)
    adapter = random_adapter(bundle.base, "learned", seed=77)
    model = merged_denoiser(bundle.base, adapter.tensors, adapter.lora, "learned")
    entry = add_expert(
        tiny_copy, model, reward="symmetry", kind="learned", kl_coef=0.5, seed=3, adapter=adapter
    )
    assert (
        entry["storage"] == "lora" and entry["file"] == "expert-symmetry-learned-seed3.safetensors"
    )
    x, t, c = _inputs()
    got = load_digits_bundle(tiny_copy).expert("symmetry", "learned", seed=3)
    assert got.kl_coef == 0.5 and got.spec.variance_type == "learned_log"
    torch.testing.assert_close(got.denoiser(x, t, c), model(x, t, c), rtol=0, atol=0)


def test_adapters_that_do_not_belong_are_refused(tiny_copy: Path) -> None:
    bundle = load_digits_bundle(tiny_copy)
    other_base = perturbed(bundle.base, 0.1, 5)
    foreign = random_adapter(other_base, "fixed", seed=1)
    model = merged_denoiser(other_base, foreign.tensors, foreign.lora, "fixed")
    with pytest.raises(ValueError, match="trained on another base than .*base.safetensors"):
        add_expert(tiny_copy, model, reward="boldness", kind="fixed", kl_coef=1.0, adapter=foreign)
    mine = random_adapter(bundle.base, "fixed", seed=1)
    with pytest.raises(ValueError, match="the adapter does not rebuild the model"):
        add_expert(
            tiny_copy, bundle.base, reward="boldness", kind="fixed", kl_coef=1.0, adapter=mine
        )
    with pytest.raises(TypeError, match="adapter must be a LoraAdapter"):
        add_expert(tiny_copy, bundle.base, reward="boldness", kind="fixed", kl_coef=1.0, adapter={})
    with pytest.raises(ValueError, match="seed must be >= 0"):
        add_expert(tiny_copy, bundle.base, reward="boldness", kind="fixed", kl_coef=1.0, seed=-1)


def test_adapters_of_a_replaced_base_are_refused_by_name(tiny_copy: Path) -> None:
    manifest = read_manifest(tiny_copy)
    other = perturbed(load_digits_bundle(tiny_copy).base, 0.1, 5)
    manifest["base"]["sha256"] = save_module(tiny_copy / "base.safetensors", other)
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        InputFileError, match=r"expert-legibility-fixed.safetensors: is an adapter of another base"
    ):
        load_digits_bundle(tiny_copy)


def test_full_models_and_entries_without_seeds_still_load(tmp_path: Path) -> None:
    folder = make_tiny_weights(tmp_path / "old", storage="full")
    manifest = json.loads((folder / "manifest.json").read_text())
    for e in manifest["experts"] + manifest["oracles"]:
        assert e.pop("storage") == "full" and e.pop("seed") == 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_digits_bundle(folder)
    assert bundle.seeds == (0,) and set(bundle.experts) == {
        (n, k) for n in ("legibility", "boldness") for k in EXPERT_KINDS
    }
    assert bundle.all_experts[("boldness", "learned", 0)] is bundle.expert("boldness", "learned")


def test_shipped_weights_hold_every_expert_and_oracle_of_two_seeds() -> None:
    manifest = read_manifest(DEFAULT_WEIGHTS_DIR)
    rewards = ("legibility", "boldness", "symmetry")
    experts = {(e["reward"], e["kind"], e["seed"]): e for e in manifest["experts"]}
    assert set(experts) == {(r, k, s) for r in rewards for k in EXPERT_KINDS for s in (0, 1)}
    oracles = {(e["weights"]["legibility"], e["kind"], e["seed"]) for e in manifest["oracles"]}
    assert oracles == {(w, k, s) for w in (0.25, 0.5, 0.75) for k in EXPERT_KINDS for s in (0, 1)}
    for e in manifest["experts"] + manifest["oracles"]:
        assert e["storage"] == "lora" and e["training"]["seed"] == e["seed"]
    for (reward, _, _), e in experts.items():  # each expert raises its own reward, held out
        gains, se = e["metrics"]["reward_gains"], e["metrics"]["reward_gain_se"]
        assert gains[reward] > 3 * se[reward] and set(gains) >= set(rewards)


def test_shipped_manifest_records_provenance_and_quality() -> None:
    manifest = read_manifest(DEFAULT_WEIGHTS_DIR)
    for key in ("versions", "seeds", "scheduler", "reward_normalisation", "legibility_temperature"):
        assert key in manifest
    assert manifest["seeds"]["align"] == [0, 1] and manifest["default_seed"] == 0
    assert {"torch", "diffusers", "peft", "safetensors"} <= set(manifest["versions"])
    for e in manifest["experts"] + manifest["oracles"]:
        assert manifest["timings_s"][_stage(e)] > 0
    assert manifest["classifier"]["metrics"]["heldout_accuracy"] > 0.97
    assert manifest["base"]["metrics"]["samples"]["prompt_accuracy"] > 0.95
    total = sum(f.stat().st_size for f in DEFAULT_WEIGHTS_DIR.iterdir())
    assert total < 5e6  # a few MB of package data


def _stage(entry: dict) -> str:
    if "reward" in entry:
        return f"expert {entry['reward']}/{entry['kind']} seed {entry['seed']}"
    weights = ",".join(f"{n}={w:g}" for n, w in entry["training"]["weights"].items())
    return f"oracle {weights}/{entry['kind']} seed {entry['seed']}"
