"""Digits experts and oracles (msdda.digits.align) on a tiny random domain: fast, no shipped weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msdda import Expert
from msdda.digits import (
    ClassifierConfig,
    DenoiserConfig,
    DigitClassifier,
    DigitDenoiser,
    RewardNormalisation,
    make_rewards,
    make_schedule,
    standardise,
)
from msdda.digits.align import (
    ORACLE_WEIGHTS,
    AlignConfig,
    LoraSettings,
    PairsConfig,
    apply_adapter,
    collect_digit_pairs,
    evaluate_rewards,
    train_expert,
    train_experts_and_oracles,
    train_oracle,
)
from msdda.digits.bundle import DigitsBundle, expert_spec

PAIRS = PairsConfig(num_chains=200, skip_last=2, batch_size=200)
FAST = AlignConfig(
    num_steps=40,
    batch_size=512,
    lr=1e-2,
    variance_lr=1e-2,
    eval_samples=0,
    lora=LoraSettings(rank=2, alpha=2.0),
)


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    base = DigitDenoiser(DenoiserConfig(hidden=32, num_blocks=1, time_dim=16)).eval()
    classifier = DigitClassifier(ClassifierConfig(hidden=16)).eval()
    raw = make_rewards(classifier, temperature=1.0)
    # boldness differences between actions are small: a small std makes the tilt visible
    stats = {
        "legibility": RewardNormalisation(0.0, 1.0),
        "boldness": RewardNormalisation(0.5, 0.01),
        "symmetry": RewardNormalisation(0.0, 0.05),
    }
    return DigitsBundle(
        path=Path("tiny"),
        manifest={},
        schedule=make_schedule(8),
        guidance_scale=1.0,
        base=base,
        reference=Expert(base, expert_spec("fixed"), 1.0, "base"),
        classifier=classifier,
        raw_rewards=raw,
        rewards=standardise(raw, stats),
    )


@pytest.fixture(scope="module")
def pairs(bundle):
    return collect_digit_pairs(bundle, PAIRS, seed=0)


@pytest.fixture(scope="module")
def bold(bundle, pairs):
    return train_expert(bundle, "boldness", "fixed", pairs=pairs, config=FAST)


@pytest.fixture(scope="module")
def bold_learned(bundle, pairs):
    return train_expert(bundle, "boldness", "learned", pairs=pairs, config=FAST)


def test_pairs_are_scored_by_every_standardised_reward_with_prompts_cycling(pairs, bundle):
    assert set(pairs.reward_names) == set(bundle.rewards)
    assert len(pairs) == 200 * 6  # 8 steps, the last 2 left out
    assert torch.equal(pairs.cond[:20], torch.arange(20) % 10)


def test_an_expert_raises_its_own_reward_over_the_base(bundle, bold):
    got = evaluate_rewards(bundle, bold.expert, num_samples=300, seed=1)
    base = evaluate_rewards(bundle, bundle.reference, num_samples=300, seed=1)
    assert got["boldness"] > base["boldness"] + 0.5  # standardised units
    assert bold.metrics["kl_per_state"] > 0
    assert bold.metrics["train_implicit_accuracy"] > 0.6


def test_a_fixed_expert_has_no_variance_head_and_a_learned_one_has(bold, bold_learned):
    assert not bold.model.config.variance_head and bold.expert.spec.variance_type == "fixed_small"
    assert (
        bold_learned.model.config.variance_head
        and bold_learned.expert.spec.variance_type == "learned_log"
    )
    offsets = bold_learned.metrics["log_variance_offset"]
    assert offsets["max_abs"] > 0  # the head trained
    assert offsets["max_abs"] <= bold_learned.model.config.variance_bound


def test_the_adapter_rebuilds_the_merged_model(bundle, bold, bold_learned):
    x = torch.randn(6, 1, 8, 8)
    t = torch.tensor([900, 700, 500, 300, 100, 0])
    c = torch.arange(6)
    for m in (bold, bold_learned):
        rebuilt = apply_adapter(bundle.base, m.adapter, m.training["config"]["lora"], m.kind)
        torch.testing.assert_close(rebuilt(x, t, c), m.model(x, t, c))
        assert not torch.allclose(m.model(x, t, c)[:, :1], bundle.base(x, t, c))


def test_the_base_is_left_untouched(bundle, bold, bold_learned):
    torch.manual_seed(0)
    fresh = DigitDenoiser(DenoiserConfig(hidden=32, num_blocks=1, time_dim=16))
    for (name, p), q in zip(
        bundle.base.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_an_oracle_records_its_weights(bundle, pairs):
    m = train_oracle(
        bundle, {"legibility": 0.5, "boldness": 0.5}, "fixed", pairs=pairs, config=FAST
    )
    assert m.weights == {"legibility": 0.5, "boldness": 0.5}
    assert m.training["weights"] == m.weights and m.kl_coef == 1.0


def test_every_expert_and_oracle_of_a_seed(bundle):
    seen = []
    models = train_experts_and_oracles(
        bundle,
        seed=1,
        rewards=("symmetry",),
        oracle_weights=({"symmetry": 0.3, "boldness": 0.7},),
        kinds=("fixed",),
        config=AlignConfig(num_steps=4, eval_samples=0),
        pairs_config=PairsConfig(num_chains=20, skip_last=2),
        progress=lambda label, s, n, loss: seen.append(label),
    )
    assert [m.weights for m in models] == [{"symmetry": 1.0}, {"symmetry": 0.3, "boldness": 0.7}]
    assert {"expert symmetry/fixed", "oracle 0.3*symmetry+0.7*boldness/fixed"} == set(seen)
    assert ORACLE_WEIGHTS[1] == {"legibility": 0.5, "boldness": 0.5}


def test_refusals(bundle, pairs):
    with pytest.raises(ValueError, match="unknown reward"):
        train_expert(bundle, "beauty", pairs=pairs, config=FAST)
    with pytest.raises(ValueError, match="kind"):
        train_expert(bundle, "boldness", "medium", pairs=pairs, config=FAST)
    with pytest.raises(ValueError, match="all 0"):
        train_oracle(bundle, {"legibility": 0.0, "boldness": 0.0}, pairs=pairs, config=FAST)
    with pytest.raises(ValueError, match="non-negative"):
        train_oracle(bundle, {"legibility": -1.0}, pairs=pairs, config=FAST)
    with pytest.raises(TypeError, match="DigitsBundle"):
        train_expert("bundle", "boldness")
    with pytest.raises(TypeError, match="PairSet"):
        train_expert(bundle, "boldness", pairs="pairs", config=FAST)


def test_an_adapter_file_round_trips_and_is_small(tmp_path, bundle, bold_learned):
    from msdda.digits.align import load_adapter, save_adapter

    path = tmp_path / "bold.safetensors"
    save_adapter(path, bold_learned)
    model, info = load_adapter(path, bundle.base)
    assert info["weights"] == {"boldness": 1.0} and info["kind"] == "learned" and info["seed"] == 0
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([900, 500, 100, 0]), torch.arange(4)
    torch.testing.assert_close(model(x, t, c), bold_learned.model(x, t, c))
    assert path.stat().st_size < sum(p.numel() * 4 for p in bundle.base.parameters())


def test_a_bad_adapter_file_is_refused_by_name(tmp_path, bundle, bold):
    from msdda.digits.align import load_adapter, save_adapter

    with pytest.raises(ValueError, match="missing"):
        load_adapter(tmp_path / "nope.safetensors", bundle.base)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_adapter(junk, bundle.base)
    good = tmp_path / "bold.safetensors"
    save_adapter(good, bold)
    other = DigitDenoiser(DenoiserConfig(hidden=32, num_blocks=1, time_dim=16))
    with pytest.raises(ValueError, match="another base"):
        load_adapter(good, other)


# Training options of issue 15: beta, schedule length, full fine-tune vs LoRA, DDIM eta.


def test_a_smaller_beta_moves_the_expert_further_from_the_base(bundle, pairs):
    far = train_expert(bundle, "boldness", pairs=pairs, config=replace(FAST, kl_coef=0.25))
    near = train_expert(bundle, "boldness", pairs=pairs, config=FAST)
    assert far.kl_coef == 0.25 and far.expert.kl_coef == 0.25
    assert far.metrics["kl_per_state"] > 2 * near.metrics["kl_per_state"]


def test_a_full_fine_tune_trains_every_weight_and_has_no_adapter(bundle, pairs, tmp_path):
    from msdda.digits.align import save_adapter

    full = train_expert(
        bundle, "boldness", pairs=pairs, config=replace(FAST, adapter="full", lr=3e-3)
    )
    assert full.lora_adapter is None and full.adapter == {}
    assert full.training["config"]["adapter"] == "full"
    changed = [
        name
        for name, p in full.model.state_dict().items()
        if not torch.equal(p, bundle.base.state_dict()[name])
    ]
    assert any(name.endswith("bias") for name in changed)  # a LoRA leaves biases alone
    assert full.metrics["kl_per_state"] > 0
    with pytest.raises(ValueError, match="full fine-tune"):
        save_adapter(tmp_path / "full.safetensors", full)
    with pytest.raises(ValueError, match="AlignConfig.adapter"):
        AlignConfig(adapter="half")


def test_a_shorter_schedule_trains_on_its_own_steps_with_a_variance_free_to_move(bundle):
    from msdda.digits.align import sampler_bundle, variance_offsets

    short = sampler_bundle(bundle, 4)
    assert len(short.schedule.timesteps) == 4 and short.schedule.sampler == "ddpm"
    pairs = collect_digit_pairs(short, PairsConfig(num_chains=100, skip_last=1), seed=0)
    assert sorted(pairs.step_indices.unique().tolist()) == [0, 1, 2]
    moved = {}
    for lr in (1e-5, 3e-2):
        config = replace(FAST, kl_coef=0.25, variance_lr=lr)
        m = train_expert(short, "boldness", "learned", pairs=pairs, config=config)
        moved[lr] = variance_offsets(m.expert, pairs)["mean_abs"]
    assert moved[3e-2] > 10 * moved[1e-5]


def test_a_ddim_sampler_gives_each_expert_its_own_eta(bundle):
    from msdda.digits.align import model_spec, sampler_bundle
    from msdda.gaussians import ddim_variance

    half = sampler_bundle(bundle, 4, eta=0.5)
    assert half.schedule.sampler == "ddim" and half.reference.spec.eta == 0.5
    pairs = collect_digit_pairs(half, PairsConfig(num_chains=50, skip_last=1), seed=0)
    t, prev = half.schedule.timesteps[1], half.schedule.prev_timesteps[1]
    abar = half.schedule.alphas_cumprod
    want = ddim_variance(float(abar[t]), float(abar[prev]), 0.5)
    got = pairs.reference_variance[pairs.step_indices == 1]
    torch.testing.assert_close(got, torch.full_like(got, want), rtol=1e-5, atol=0.0)
    m = train_expert(half, "boldness", pairs=pairs, config=FAST)
    assert m.expert.spec.eta == 0.5 and m.expert.spec == model_spec(half, "fixed")
    with pytest.raises(ValueError, match="eta"):
        model_spec(half, "learned")
    with pytest.raises(ValueError, match="eta"):
        sampler_bundle(bundle, 4, eta=0.0)


def test_a_full_fine_tune_is_stored_in_full_and_loads_back(tmp_path):
    from msdda.digits import load_digits_bundle
    from msdda.digits.catalog import add_expert
    from msdda.digits.testing import make_tiny_weights

    folder = make_tiny_weights(tmp_path / "w", experts=(), kinds=(), oracle_weights=())
    tiny = load_digits_bundle(folder)
    pairs = collect_digit_pairs(tiny, PairsConfig(num_chains=20, skip_last=2), seed=0)
    config = replace(FAST, adapter="full", kl_coef=0.5, num_steps=5)
    m = train_expert(tiny, "legibility", "learned", pairs=pairs, config=config)
    add_expert(
        folder, m.model, reward="legibility", kind="learned", kl_coef=m.kl_coef,
        adapter=m.lora_adapter, metrics=m.metrics, training=m.training,
    )  # fmt: skip
    loaded = load_digits_bundle(folder).expert("legibility", "learned")
    assert loaded.kl_coef == 0.5
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([900, 400, 0]), torch.arange(3)
    torch.testing.assert_close(loaded.denoiser(x, t, c), m.model(x, t, c))
