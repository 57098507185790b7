"""Sampling the digits domain: MSDDA over the experts, through the core's one loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msdda import expert_policy
from msdda.digits import (
    boldness,
    check_weights,
    generate,
    load_digits_bundle,
    msdda_policy,
    sample_expert,
    sample_msdda,
)
from msdda.digits.sampling import torch_threads
from msdda.digits.testing import make_tiny_weights


@pytest.fixture(autouse=True)
def _one_thread():
    """The digits models are tiny: one torch thread is fastest, and robust on shared cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_digits_bundle(make_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights"))


def _state(b: int = 4):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([0, 3, 7, 9][:b])


def test_generate_is_reproducible_and_in_range(bundle) -> None:
    w = {"legibility": 0.3, "boldness": 0.7}
    a = generate(7, w, num_samples=6, seed=0, bundle=bundle)
    b = generate(7, w, num_samples=6, seed=0, bundle=bundle)
    c = generate(7, w, num_samples=6, seed=1, bundle=bundle)
    assert a.shape == (6, 1, 8, 8)
    assert bool((a >= 0).all() and (a <= 1).all())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_one_hot_weights_sample_that_expert(bundle) -> None:
    prompts = torch.tensor([1, 2, 3, 4])
    fused = sample_msdda(bundle, prompts, {"legibility": 1.0, "boldness": 0.0}, seed=3)
    alone = sample_expert(bundle.expert("legibility"), prompts, bundle.schedule, seed=3)
    torch.testing.assert_close(fused, alone, rtol=1e-5, atol=1e-5)


def test_fixed_variance_experts_mix_their_means(bundle) -> None:
    x, prompts = _state()
    step = msdda_policy(bundle, prompts, {"legibility": 0.3, "boldness": 0.7})
    leg = expert_policy(bundle.expert("legibility"), bundle.schedule, prompts)
    bold = expert_policy(bundle.expert("boldness"), bundle.schedule, prompts)
    for t in (980, 400, 20):
        got = step(x, t)
        want = 0.3 * leg(x, t).mean + 0.7 * bold(x, t).mean
        torch.testing.assert_close(got.mean, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.variance, leg(x, t).variance)


def test_learned_variances_weight_by_precision(bundle) -> None:
    x, prompts = _state()
    step = msdda_policy(
        bundle, prompts, {"legibility": 0.5, "boldness": 0.5}, expert_kind="learned"
    )
    a = expert_policy(bundle.expert("legibility", "learned"), bundle.schedule, prompts)(x, 500)
    b = expert_policy(bundle.expert("boldness", "learned"), bundle.schedule, prompts)(x, 500)
    assert not torch.allclose(a.variance, b.variance)
    precision = 0.5 / a.variance + 0.5 / b.variance
    got = step(x, 500)
    torch.testing.assert_close(got.variance, 1 / precision)
    torch.testing.assert_close(
        got.mean, (0.5 * a.mean / a.variance + 0.5 * b.mean / b.variance) / precision
    )


def test_a_target_beta_other_than_the_experts_uses_the_base(bundle) -> None:
    x, prompts = _state()
    # lambda_i = w_i * beta_i / beta = 0.25 each, lambda_0 = 0.5 on the reference
    step = msdda_policy(bundle, prompts, {"legibility": 0.5, "boldness": 0.5}, kl_coef=2.0)
    parts = [
        expert_policy(e, bundle.schedule, prompts)(x, 600).mean
        for e in (bundle.expert("legibility"), bundle.expert("boldness"), bundle.reference)
    ]
    want = 0.25 * parts[0] + 0.25 * parts[1] + 0.5 * parts[2]
    torch.testing.assert_close(step(x, 600).mean, want, rtol=1e-5, atol=1e-6)


def test_bad_requests_are_refused(bundle) -> None:
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        generate(3, {"beauty": 1.0}, 2, bundle=bundle)
    with pytest.raises(ValueError, match="no 'fixed' expert for reward 'symmetry'"):
        generate(3, {"symmetry": 1.0}, 2, bundle=bundle)
    with pytest.raises(ValueError, match="weight of 'boldness' must be a non-negative"):
        generate(3, {"boldness": -1.0}, 2, bundle=bundle)
    with pytest.raises(ValueError, match="prompt must be a digit 0-9, got 10"):
        generate(10, {"boldness": 1.0}, 2, bundle=bundle)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate(3, {"boldness": 1.0}, 0, bundle=bundle)
    with pytest.raises(ValueError, match="expert_kind must be one of"):
        generate(3, {"boldness": 1.0}, 2, expert_kind="wide", bundle=bundle)
    with pytest.raises(ValueError, match="kl_coef must be > 0"):
        generate(3, {"boldness": 1.0}, 2, kl_coef=-1.0, bundle=bundle)


def test_shipped_weights_trade_legibility_for_boldness() -> None:
    shipped = load_digits_bundle()
    prompts = torch.arange(10).repeat_interleave(5)
    base = sample_expert(shipped.reference, prompts, shipped.schedule, seed=0)
    accuracy = (shipped.classifier(base).argmax(1) == prompts).float().mean()
    assert accuracy >= 0.85  # recognisable digits
    bold = sample_msdda(shipped, prompts, {"legibility": 0.0, "boldness": 1.0}, seed=0)
    legible = sample_msdda(shipped, prompts, {"legibility": 1.0, "boldness": 0.0}, seed=0)
    leg = shipped.rewards["legibility"]
    assert boldness(bold, prompts).mean() > boldness(legible, prompts).mean()
    assert leg(legible, prompts).mean() > leg(bold, prompts).mean()


def test_weights_folder_path_is_a_path(bundle) -> None:
    assert isinstance(bundle.path, Path)


def test_check_weights_keeps_the_order_as_floats_and_knows_only_the_available_names() -> None:
    assert check_weights({"boldness": 1, "legibility": 0.5}) == {"boldness": 1.0, "legibility": 0.5}
    assert list(check_weights({"legibility": 1, "boldness": 2})) == ["legibility", "boldness"]
    with pytest.raises(ValueError, match="unknown reward 'legibility'; known rewards: boldness"):
        check_weights({"legibility": 1.0}, available=("boldness",))
    for bad in ({}, [("boldness", 1.0)]):
        with pytest.raises(ValueError, match="non-empty mapping"):
            check_weights(bad)
    for w, error in ((float("inf"), ValueError), (float("nan"), ValueError), (-1, ValueError),
                     (True, TypeError), ("1", TypeError)):  # fmt: skip
        with pytest.raises(error, match="non-negative finite number"):
            check_weights({"boldness": w})
