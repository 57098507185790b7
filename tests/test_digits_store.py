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
from msdda.digits.store import DEFAULT_WEIGHTS_DIR
from msdda.digits.testing import TINY_DENOISER, make_tiny_weights, perturbed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights")


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
    with pytest.raises(ValueError, match="kl_coef must be positive"):
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
    with pytest.raises(ValueError, match=rf"weight file .*{file} is corrupt"):
        load_digits_bundle(tiny_copy)


def test_missing_file_is_reported_by_name(tiny_copy: Path) -> None:
    (tiny_copy / "expert-legibility-fixed.safetensors").unlink()
    with pytest.raises(ValueError, match=r"expert-legibility-fixed.safetensors is missing"):
        load_digits_bundle(tiny_copy)


def test_invalid_safetensors_and_wrong_shapes(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / "manifest.json").read_text())
    manifest["base"].pop("sha256")  # without a checksum the format check still catches it
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    (tiny_copy / "base.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match=r"base.safetensors is not a valid safetensors file"):
        load_digits_bundle(tiny_copy)
    wide = DigitDenoiser(type(TINY_DENOISER)(hidden=24, num_blocks=1, time_dim=8))
    save_module(tiny_copy / "base.safetensors", wide)
    with pytest.raises(ValueError, match=r"base.safetensors does not fit the model: .* has shape"):
        load_digits_bundle(tiny_copy)
    deeper = DigitDenoiser(type(TINY_DENOISER)(hidden=16, num_blocks=2, time_dim=8))
    save_module(tiny_copy / "base.safetensors", deeper)
    with pytest.raises(
        ValueError, match=r"base.safetensors does not fit the model: missing keys \[\]"
    ):
        load_digits_bundle(tiny_copy)


def test_missing_or_broken_manifest(tmp_path: Path, tiny_copy: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_digits_bundle(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no manifest.json in"):
        load_digits_bundle(tmp_path)
    manifest = json.loads((tiny_copy / "manifest.json").read_text())
    manifest["experts"][0]["reward"] = "beauty"
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="expert entry with reward 'beauty'"):
        load_digits_bundle(tiny_copy)
    (tiny_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is not valid JSON"):
        load_digits_bundle(tiny_copy)
    (tiny_copy / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="is not a msdda-digits/1 manifest"):
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


def test_shipped_manifest_records_provenance_and_quality() -> None:
    manifest = read_manifest(DEFAULT_WEIGHTS_DIR)
    for key in ("versions", "seeds", "scheduler", "reward_normalisation", "legibility_temperature"):
        assert key in manifest
    assert manifest["classifier"]["metrics"]["heldout_accuracy"] > 0.97
    assert manifest["base"]["metrics"]["samples"]["prompt_accuracy"] > 0.95
    total = sum(f.stat().st_size for f in DEFAULT_WEIGHTS_DIR.iterdir())
    assert total < 20e6  # a few MB of package data
