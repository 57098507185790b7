"""LoRA adapters of the digits base: peft's merge without peft, and the adapter file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msdda.digits import DigitDenoiser, save_module
from msdda.digits.lora import (
    ADAPTER_FORMAT,
    LoraSettings,
    adapter_keys,
    adapter_metadata,
    base_fingerprint,
    encode_adapter,
    lora_delta,
    merge_lora_state,
    merged_denoiser,
    read_adapter_file,
)
from msdda.digits.testing import TINY_DENOISER, TINY_LORA, random_adapter


@pytest.fixture(scope="module")
def base() -> DigitDenoiser:
    torch.manual_seed(0)
    return DigitDenoiser(TINY_DENOISER).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([999, 500, 20, 0]), torch.arange(4)


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_the_merge_is_peft_merge_and_unload_exactly(base, kind) -> None:
    from peft import get_peft_model_state_dict

    from msdda.digits.lora import peft_lora_model as _lora_model

    torch.manual_seed(1)
    peft_model = _lora_model(base, kind, TINY_LORA)
    with torch.no_grad():  # trained-looking factors (peft starts with B = 0)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    start = base.with_variance_head() if kind == "learned" else base
    assert {k: tuple(v.shape) for k, v in adapter.items()} == adapter_keys(start, TINY_LORA, kind)
    expected = peft_model.merge_and_unload().eval()
    merged = merged_denoiser(base, adapter, TINY_LORA, kind)
    for key, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert merged.config.variance_head == (kind == "learned")
    assert not any(p.requires_grad for p in merged.parameters())


def test_merged_weight_is_w_plus_scaled_b_times_a() -> None:
    w, bias = torch.randn(5, 3), torch.randn(5)
    a, b = torch.randn(2, 3), torch.randn(5, 2)
    state = {"fc.weight": w, "fc.bias": bias, "head.weight": torch.zeros(4, 3)}
    adapter = {
        "base_model.model.fc.lora_A.weight": a,
        "base_model.model.fc.lora_B.weight": b,
        "base_model.model.head.weight": torch.ones(4, 3),
    }
    merged = merge_lora_state(state, adapter, scaling=0.5)
    torch.testing.assert_close(merged["fc.weight"], w + 0.5 * b @ a)
    torch.testing.assert_close(lora_delta(a, b, 0.5), 0.5 * b @ a)
    assert merged["fc.bias"] is bias and torch.equal(merged["head.weight"], torch.ones(4, 3))
    assert torch.equal(state["head.weight"], torch.zeros(4, 3))  # the input is left alone


def test_a_zero_adapter_is_the_base(base) -> None:
    adapter = {k: torch.zeros(s) for k, s in adapter_keys(base, TINY_LORA, "fixed").items()}
    x, t, c = _inputs()
    torch.testing.assert_close(
        merged_denoiser(base, adapter, TINY_LORA, "fixed")(x, t, c), base(x, t, c)
    )


def test_adapters_that_do_not_fit_are_refused(base) -> None:
    good = random_adapter(base, "learned", seed=3).tensors
    key = "base_model.model.inp.lora_A.weight"
    cases = [
        ({k: v for k, v in good.items() if k != key}, "missing keys"),
        ({**good, "base_model.model.extra.lora_A.weight": torch.zeros(2, 2)}, "unexpected keys"),
        ({**good, key: torch.zeros(3, 64)}, "has shape"),
        ({**good, key: torch.full((2, 64), float("nan"))}, "not finite"),
    ]
    for adapter, message in cases:
        with pytest.raises(ValueError, match=f"adapter does not fit the model: .*{message}"):
            merged_denoiser(base, adapter, TINY_LORA, "learned")
    with pytest.raises(ValueError, match="unexpected keys .*var_out"):
        merged_denoiser(base, good, TINY_LORA, "fixed")  # a learned adapter is not a fixed one
    with pytest.raises(ValueError, match="kind must be one of"):
        merged_denoiser(base, good, TINY_LORA, "wide")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="bad LoRA settings"):
        merged_denoiser(base, good, {"rank": 2}, "learned")


def test_the_fingerprint_tells_bases_apart(base) -> None:
    twin = DigitDenoiser(TINY_DENOISER)
    twin.load_state_dict(base.state_dict())
    assert base_fingerprint(twin) == base_fingerprint(base)
    with torch.no_grad():
        twin.out.bias[0] += 1e-6
    assert base_fingerprint(twin) != base_fingerprint(base)


def test_adapter_file_round_trip_and_refusals(base, tmp_path: Path) -> None:
    adapter = random_adapter(base, "learned", seed=4)
    meta = adapter_metadata(
        adapter, weights={"legibility": 0.25, "boldness": 0.75}, kind="learned", kl_coef=2.0, seed=1
    )
    data = encode_adapter(adapter.tensors, meta)
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    import hashlib

    tensors, info = read_adapter_file(path, hashlib.sha256(data).hexdigest())
    assert all(torch.equal(tensors[k], v) for k, v in adapter.tensors.items())
    assert info == {
        "weights": {"legibility": 0.25, "boldness": 0.75},
        "kind": "learned",
        "kl_coef": 2.0,
        "lora": TINY_LORA,
        "seed": 1,
        "base": base_fingerprint(base),
    }
    with pytest.raises(
        ValueError, match=r"a.safetensors: the adapter file is corrupt: its sha256 differs"
    ):
        read_adapter_file(path, "0" * 64)
    with pytest.raises(
        ValueError, match=r"nope.safetensors: no such weight file \(the file is missing\)"
    ):
        read_adapter_file(tmp_path / "nope.safetensors", what="weight file")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.safetensors: not a safetensors adapter file"):
        read_adapter_file(tmp_path / "junk.safetensors")
    save_module(tmp_path / "full.safetensors", base)
    with pytest.raises(ValueError, match=rf"full.safetensors: not a {ADAPTER_FORMAT} adapter file"):
        read_adapter_file(tmp_path / "full.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(
        encode_adapter(adapter.tensors, {**meta, "seed": "x"})
    )
    with pytest.raises(ValueError, match="bad.safetensors: the adapter file has bad metadata"):
        read_adapter_file(tmp_path / "bad.safetensors")


def test_the_adapter_keys_are_the_core_lora_format() -> None:
    from msdda.lora import factors_from_peft_state, merge_lora, peft_lora_keys, peft_saved_modules

    a, b = torch.randn(2, 3), torch.randn(5, 2)
    down, up = peft_lora_keys("blocks.0.fc")
    assert (down, up) == (
        "base_model.model.blocks.0.fc.lora_A.weight",
        "base_model.model.blocks.0.fc.lora_B.weight",
    )
    head = torch.ones(4)
    state = {down: a, up: b, "base_model.model.head.bias": head}
    factors = factors_from_peft_state(state, 0.5)
    assert list(factors) == ["blocks.0.fc"] and factors["blocks.0.fc"].scale == 0.5
    assert peft_saved_modules(state) == {"head.bias": head}
    w = torch.randn(5, 3)
    merged = merge_lora({"blocks.0.fc.weight": w}, factors)
    torch.testing.assert_close(merged["blocks.0.fc.weight"], w + 0.5 * b @ a)
    with pytest.raises(ValueError, match="needs both"):
        factors_from_peft_state({down: a}, 1.0)
    with pytest.raises(ValueError, match="not a peft adapter key"):
        factors_from_peft_state({"fc.lora_A.weight": a}, 1.0)
    with pytest.raises(ValueError, match="has no weight"):
        merge_lora({}, factors)
    with pytest.raises(ValueError, match="has shape"):
        merge_lora({"blocks.0.fc.weight": torch.zeros(3, 5)}, factors)
