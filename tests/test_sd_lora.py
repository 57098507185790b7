"""LoRA experts of one base UNet in one batched forward (msdda.lora, re-exported by msdda.sd.lora)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402

from msdda.lora import LoRABank, LoRAFactors, extract_lora_factors, lora_delta_weight  # noqa: E402
from msdda.sd.testing import random_lora, tiny_unet  # noqa: E402

torch.set_num_threads(1)

TARGETS_A = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in")  # linear + conv layers
TARGETS_B = ("to_q", "to_v", "conv2", "time_emb_proj", "proj_in")  # other layers, other rank


@pytest.fixture(scope="module")
def experts():
    """A base UNet, and two LoRA experts of it (different ranks and layers) as peft models."""
    base = tiny_unet()
    a = copy.deepcopy(base)
    random_lora(a, rank=2, alpha=4.0, target_modules=TARGETS_A, seed=1)
    b = copy.deepcopy(base)
    random_lora(b, rank=3, alpha=3.0, target_modules=TARGETS_B, seed=2)
    fa = extract_lora_factors(a, "default")
    fb = extract_lora_factors(b, "default")
    return base, a, b, fa, fb


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ehs = torch.randn(batch, 7, 16, generator=g)
    return x, ehs


def _run(unet, x, ehs, t=500):
    with torch.no_grad():
        return unet(x, torch.tensor(t), encoder_hidden_states=ehs).sample


def test_factors_are_read_for_every_adapted_layer(experts):
    base, a, _, fa, fb = experts
    n_a = sum(isinstance(m, LoraLayer) for m in a.modules())
    assert len(fa) == n_a > 0
    assert any(f.is_conv for f in fa.values()) and any(not f.is_conv for f in fa.values())
    assert {f.rank for f in fa.values()} == {2} and {f.rank for f in fb.values()} == {3}
    assert all(f.scale == pytest.approx(2.0) for f in fa.values())


def test_batched_forward_equals_each_adapter_alone(experts):
    """Groups [A, base, B, A] in one forward = each peft model on its own group."""
    base, a, b, fa, fb = experts
    unet = copy.deepcopy(base)
    bank = LoRABank(["A", "B"], [fa, fb], unet)
    x, ehs = _inputs(8)
    with bank.route([0, None, 1, 0]):
        joint = _run(unet, x, ehs)
    expected = torch.cat(
        [
            _run(a, x[:2], ehs[:2]),
            _run(base, x[2:4], ehs[2:4]),
            _run(b, x[4:6], ehs[4:6]),
            _run(a, x[6:], ehs[6:]),
        ]
    )
    torch.testing.assert_close(joint, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[:2], _run(base, x[:2], ehs[:2]), atol=1e-3)


def test_hooks_are_inert_outside_a_route_and_removable(experts):
    base, _, _, fa, fb = experts
    unet = copy.deepcopy(base)
    bank = LoRABank(["A", "B"], [fa, fb], unet)
    x, ehs = _inputs(2)
    torch.testing.assert_close(_run(unet, x, ehs), _run(base, x, ehs), rtol=0, atol=0)
    with bank.route([None]):
        torch.testing.assert_close(_run(unet, x, ehs), _run(base, x, ehs), rtol=0, atol=0)
    assert set(unet.state_dict()) == set(base.state_dict())  # the model's state is untouched
    bank.remove()
    with bank.route([0]):
        torch.testing.assert_close(_run(unet, x, ehs), _run(base, x, ehs), rtol=0, atol=0)


def test_merged_weights_equal_the_adapter(experts):
    base, a, _, fa, fb = experts
    bank = LoRABank(["A", "B"], [fa, fb], copy.deepcopy(base))
    merged = copy.deepcopy(base)
    merged.load_state_dict(bank.merged_state_dict(base, "A"))
    x, ehs = _inputs(2)
    torch.testing.assert_close(_run(merged, x, ehs), _run(a, x, ehs), rtol=1e-4, atol=1e-5)


def test_delta_weight_is_scaled_low_rank_product():
    down, up = torch.randn(2, 5), torch.randn(3, 2)
    f = LoRAFactors(down, up, 0.5)
    torch.testing.assert_close(lora_delta_weight(f), 0.5 * up @ down)


def test_route_rejects_bad_groups(experts):
    base, _, _, fa, fb = experts
    bank = LoRABank(["A", "B"], [fa, fb], copy.deepcopy(base))
    with pytest.raises(ValueError, match="not an expert index"):
        with bank.route([0, 2]):
            pass
    with pytest.raises(ValueError, match="empty"):
        with bank.route([]):
            pass
    with pytest.raises(ValueError, match="no LoRA expert named 'C'"):
        bank.index("C")


def test_bank_rejects_factors_for_missing_layers_and_duplicate_names(experts):
    base, _, _, fa, _ = experts
    with pytest.raises(ValueError, match="does not have"):
        LoRABank(["A"], [{"no.such.layer": next(iter(fa.values()))}], copy.deepcopy(base))
    with pytest.raises(ValueError, match="unique"):
        LoRABank(["A", "A"], [fa, fa], copy.deepcopy(base))


def test_dora_adapters_are_refused(experts):
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(experts[0])
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"], use_dora=True), model)
    with pytest.raises(ValueError, match="DoRA"):
        extract_lora_factors(model, "default")


def test_bank_counts_adapter_bytes(experts):
    base, _, _, fa, fb = experts
    bank = LoRABank(["A", "B"], [fa, fb], copy.deepcopy(base))
    n = sum(f.down.numel() + f.up.numel() for fs in (fa, fb) for f in fs.values())
    assert bank.nbytes > 4 * n  # the factors, and their stacked copies
    assert bank.nbytes < sum(p.numel() * 4 for p in base.parameters())
