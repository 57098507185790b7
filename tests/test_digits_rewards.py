"""The digits rewards: what each one measures, on hand-made and real images."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda.digits import (
    REWARDS,
    DigitClassifier,
    Legibility,
    RewardNormalisation,
    StandardisedReward,
    boldness,
    decode,
    encode,
    fit_normalisation,
    load_digit_data,
    load_digits_bundle,
    make_reward,
    standardise,
    symmetry,
)
from msdda.digits.testing import TINY_CLASSIFIER

BLANK = torch.zeros(1, 1, 8, 8)
FULL = torch.ones(1, 1, 8, 8)


def test_registry_holds_the_three_rewards() -> None:
    assert set(REWARDS) == {"legibility", "boldness", "symmetry"}
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        make_reward("beauty")
    with pytest.raises(ValueError, match="needs a classifier"):
        make_reward("legibility")


def test_boldness_is_ink_coverage() -> None:
    assert boldness(BLANK, None).item() == 0.0
    assert boldness(FULL, None).item() == 1.0
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1.0
    assert boldness(half, None).item() == pytest.approx(0.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_symmetry_is_maximal_for_mirror_images(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    left = torch.rand(1, 1, 8, 4, generator=g)
    mirrored = torch.cat([left, left.flip(-1)], dim=-1)
    assert symmetry(mirrored, None).item() == 0.0
    asymmetric = mirrored.clone()
    asymmetric[..., 0] = 1.0 - asymmetric[..., 7] + 0.5  # break the mirror on one column
    assert symmetry(asymmetric.clamp(0, 1), None).item() < 0.0


def test_symmetry_of_a_one_sided_image() -> None:
    img = torch.zeros(1, 1, 8, 8)
    img[..., :4] = 1.0  # left half inked: every pixel differs from its mirror
    assert symmetry(img, None).item() == pytest.approx(-1.0)


def test_rewards_refuse_bad_images() -> None:
    with pytest.raises(ValueError, match=r"images must be a \(B, 1, 8, 8\)"):
        boldness(torch.zeros(2, 64), None)
    with pytest.raises(ValueError, match="images"):
        symmetry(torch.zeros(2, 3, 8, 8), None)


def test_legibility_is_a_differentiable_log_probability() -> None:
    torch.manual_seed(0)
    reward = Legibility(DigitClassifier(TINY_CLASSIFIER), temperature=2.0)
    images = torch.rand(4, 1, 8, 8, requires_grad=True)
    prompts = torch.tensor([0, 3, 7, 9])
    r = reward(images, prompts)
    assert r.shape == (4,) and bool((r <= 0).all())
    # the probabilities of the ten digits sum to one
    total = sum(reward(images, torch.full((4,), d)).exp() for d in range(10))
    torch.testing.assert_close(total, torch.ones(4))
    r.sum().backward()
    assert images.grad is not None and bool(torch.isfinite(images.grad).all())
    assert images.grad.abs().sum() > 0


def test_legibility_refuses_bad_prompts_and_temperatures() -> None:
    reward = Legibility(DigitClassifier(TINY_CLASSIFIER), temperature=1.0)
    with pytest.raises(ValueError, match="digits 0-9"):
        reward(torch.rand(2, 1, 8, 8), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="prompts has 1 entries for 2 images"):
        reward(torch.rand(2, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="temperature"):
        Legibility(DigitClassifier(TINY_CLASSIFIER), temperature=0.0)


def test_shipped_legibility_prefers_the_true_digit() -> None:
    bundle = load_digits_bundle()
    held = load_digit_data("heldout")
    images = decode(held.images)
    legibility = bundle.rewards["legibility"]
    true = legibility(images, held.labels)
    wrong = legibility(images, (held.labels + 1) % 10)
    assert bool((true > wrong).float().mean() > 0.95)
    assert true.mean() - wrong.mean() > 1.0  # in standard deviations of base samples


def test_shipped_rewards_are_standardised_on_base_samples() -> None:
    bundle = load_digits_bundle()
    for name, reward in bundle.rewards.items():
        stats = bundle.manifest["reward_normalisation"][name]
        x = torch.rand(3, 1, 8, 8)
        prompts = torch.tensor([1, 2, 3])
        expected = (bundle.raw_rewards[name](x, prompts) - stats["mean"]) / stats["std"]
        torch.testing.assert_close(reward(x, prompts), expected)
    # the tempered legibility is not saturated on base samples
    samples = bundle.manifest["base"]["metrics"]["samples"]
    assert samples["tempered_prob_frac_above_0.99"] < 0.05


def test_normalisation_fitted_on_samples_standardises_them() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 8, 8, generator=g)
    prompts = torch.randint(0, 10, (64,), generator=g)
    raw = {"boldness": boldness, "symmetry": symmetry}
    std = standardise(raw, fit_normalisation(raw, images, prompts))
    for reward in std.values():
        r = reward(images, prompts).double()
        assert abs(r.mean().item()) < 1e-5 and abs(r.std().item() - 1) < 1e-5
    with pytest.raises(ValueError, match="no normalisation recorded"):
        standardise(raw, {"boldness": RewardNormalisation(0.0, 1.0)})
    with pytest.raises(ValueError, match="std must be > 0"):
        RewardNormalisation(0.0, 0.0)
    assert isinstance(std["boldness"], StandardisedReward)


def test_decode_maps_model_space_to_images() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    torch.testing.assert_close(decode(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    img = torch.rand(5)
    torch.testing.assert_close(decode(encode(img)), img)
    data = load_digit_data("all")
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
