"""MSDDA Stable Diffusion pipelines on tiny random models, against diffusers' own pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from msdda.gaussians import Schedule, ddim_variance  # noqa: E402
from msdda.sd import MSDDAStableDiffusionPipeline, MSDDAStableDiffusionXLPipeline  # noqa: E402
from msdda.sd.loading import diffusers_dtype  # noqa: E402
from msdda.sd.testing import save_random_lora, save_tiny_pipeline  # noqa: E402

torch.set_num_threads(1)

PROMPT = "a red cube on a table"
STEPS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base pipeline (SD 1.x DDIM config), two full-UNet experts, LoRA experts in three formats."""
    root = tmp_path_factory.mktemp("sd")
    base = save_tiny_pipeline(root / "base")
    e1 = save_tiny_pipeline(root / "e1", unet_seed=1)
    e2 = save_tiny_pipeline(root / "e2", unet_seed=2)
    plain = StableDiffusionPipeline.from_pretrained(base)
    l1 = save_random_lora(plain.unet, root / "l1" / "aesthetic.safetensors", seed=11)
    l2 = save_random_lora(
        plain.unet,
        root / "l2",
        fmt="peft",
        seed=12,
        rank=3,
        target_modules=("to_k", "to_v", "conv1"),
    )
    te = save_random_lora(
        plain.unet, root / "te" / "te.safetensors", seed=13, text_encoder=plain.text_encoder
    )
    l3 = save_random_lora(plain.unet, root / "l3" / "style.safetensors", seed=14)
    return {
        "root": root, "base": base, "e1": e1, "e2": e2, "l1": l1, "l2": l2, "te": te, "l3": l3,
    }  # fmt: skip


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _msdda(models, experts, **kw):
    return _quiet(
        MSDDAStableDiffusionPipeline.from_pretrained(
            models["base"], experts={k: models[k] for k in experts}, **kw
        )
    )


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(pipe, *args, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    return pipe(PROMPT, *args, generator=_gen(seed), **kw).images


def _last_step_deterministic(pipe):
    """DDIM with set_alpha_to_one=True: diffusers adds no noise at the last step either."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    return pipe


@pytest.fixture(scope="module")
def fused(models):
    """Experts e1 (full UNet), l1 (LoRA file), l2 (peft folder) on the base."""
    return _msdda(models, ["e1", "l1", "l2"])


# ----------------------------------------------------------------- one expert = diffusers
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_single_full_unet_expert_reproduces_diffusers(models, eta):
    ours = _last_step_deterministic(_msdda(models, ["e1"]))
    ref = _last_step_deterministic(_quiet(StableDiffusionPipeline.from_pretrained(models["e1"])))
    np.testing.assert_allclose(_run(ours, {"e1": 1.0}, eta=eta), _run(ref, eta=eta), atol=2e-5)


def test_single_lora_expert_reproduces_diffusers_load_lora_weights(models):
    ref = _last_step_deterministic(_quiet(StableDiffusionPipeline.from_pretrained(models["base"])))
    ref.load_lora_weights(str(models["l1"]))
    ours = _last_step_deterministic(_msdda(models, ["e1", "l1", "l2"]))
    expected = _run(ref, eta=1.0)
    for mode in ("batched", "sequential", "merged"):
        ours.lora_mode = mode
        got = _run(ours, {"l1": 1.0}, eta=1.0)
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=mode)


def test_text_encoder_lora_reproduces_diffusers(models):
    ours = _last_step_deterministic(_msdda(models, ["te", "l1"]))
    assert ours.msdda_experts.has_text_lora("te") and not ours.msdda_experts.has_text_lora("l1")
    ref = _last_step_deterministic(_quiet(StableDiffusionPipeline.from_pretrained(models["base"])))
    ref.load_lora_weights(str(models["te"]))
    np.testing.assert_allclose(_run(ours, {"te": 1.0}), _run(ref, eta=1.0), atol=2e-5)


def test_diffusers_call_arguments_pass_through(models):
    """No guidance, a negative prompt, per-sample generators and two images per prompt."""
    ours = _last_step_deterministic(_msdda(models, ["e1"]))
    ref = _last_step_deterministic(_quiet(StableDiffusionPipeline.from_pretrained(models["e1"])))
    for kw in (
        {"guidance_scale": 1.0},
        {"negative_prompt": "blurry", "guidance_scale": 4.0},
    ):
        np.testing.assert_allclose(
            _run(ours, {"e1": 1.0}, **kw), _run(ref, eta=1.0, **kw), atol=2e-5
        )
    kw = {"num_images_per_prompt": 2, "num_inference_steps": STEPS, "output_type": "np"}
    a = ours(PROMPT, {"e1": 1.0}, generator=[_gen(1), _gen(2)], **kw).images
    b = ref(PROMPT, eta=1.0, generator=[_gen(1), _gen(2)], **kw).images
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_ddpm_single_expert_reproduces_diffusers(models):
    ours = _msdda(models, ["e1"])
    ours.scheduler = DDPMScheduler.from_config(ours.scheduler.config)
    ref = _quiet(StableDiffusionPipeline.from_pretrained(models["e1"]))
    ref.scheduler = DDPMScheduler.from_config(ref.scheduler.config)
    np.testing.assert_allclose(_run(ours, {"e1": 1.0}), _run(ref), atol=2e-5)


def test_only_the_last_steps_noise_differs_from_diffusers(models):
    """SD's DDIM config (set_alpha_to_one=False) adds noise at the last step; the core's loop does not."""
    ours = _msdda(models, ["e1"])
    ref = _quiet(StableDiffusionPipeline.from_pretrained(models["e1"]))
    g = _gen()
    mean = ours(
        PROMPT, {"e1": 1.0}, num_inference_steps=STEPS, generator=g, output_type="latent"
    ).images
    z = randn_tensor(mean.shape, generator=g)  # the draw diffusers makes at the last step
    schedule = Schedule.from_scheduler(ref.scheduler, STEPS)
    std = ddim_variance(*schedule.alpha_bars(schedule.timesteps[-1]), eta=1.0) ** 0.5
    theirs = ref(
        PROMPT, num_inference_steps=STEPS, eta=1.0, generator=_gen(), output_type="latent"
    ).images
    assert std > 1e-3
    torch.testing.assert_close(mean + std * z, theirs, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------- fusion properties
def test_one_hot_weights_reproduce_that_expert(models, fused):
    alone = _msdda(models, ["l2"])
    np.testing.assert_allclose(
        _run(fused, {"e1": 0.0, "l1": 0.0, "l2": 1.0}), _run(alone, {"l2": 1.0}), atol=1e-6
    )
    np.testing.assert_allclose(_run(fused, [0, 0, 1]), _run(alone, {"l2": 1.0}), atol=1e-6)


def _mix_into(unet, others):
    """Make ``unet`` return its output times w0 plus sum_k w_k other_k(same inputs)."""
    w0, rest = others[0], others[1:]

    def hook(module, args, kwargs, output):
        mix = w0 * output[0]
        for w, other in rest:
            mix = mix + w * other(*args, **kwargs)[0]
        return (mix,)

    return unet.register_forward_hook(hook, with_kwargs=True)


def test_equal_variances_fuse_to_epsilon_mixing(models, fused):
    """Same eta for all: the fused step is the DDIM step of sum_i lambda_i eps_i (docs/design.md §1),
    here with a full UNet and a LoRA batched, and the base as reference (lambda_0 = 0.4)."""
    ref = _quiet(StableDiffusionPipeline.from_pretrained(models["e1"]))
    l1 = _quiet(StableDiffusionPipeline.from_pretrained(models["base"]))
    l1.load_lora_weights(str(models["l1"]))
    base = _quiet(StableDiffusionPipeline.from_pretrained(models["base"]))
    _mix_into(ref.unet, [0.3, (0.3, l1.unet), (0.4, base.unet)])
    expected = ref(
        PROMPT, num_inference_steps=STEPS, eta=1.0, generator=_gen(), output_type="latent"
    )
    g = _gen()
    got = fused(
        PROMPT, {"e1": 0.3, "l1": 0.3}, num_inference_steps=STEPS, generator=g, output_type="latent"
    )
    # diffusers adds noise at the last step (see test_only_the_last_steps_noise_differs_from_diffusers)
    schedule = Schedule.from_scheduler(ref.scheduler, STEPS)
    std = ddim_variance(*schedule.alpha_bars(schedule.timesteps[-1]), eta=1.0) ** 0.5
    z = randn_tensor(got.images.shape, generator=g)
    torch.testing.assert_close(got.images + std * z, expected.images, atol=5e-5, rtol=1e-4)


def test_distinct_etas_weight_means_by_precision(models, fused):
    """One step (no noise): fused mean = sum lambda_i mu_i / var_i / sum lambda_i / var_i."""
    etas = {"e1": 1.0, "l1": 0.5}
    mu = {
        n: fused(
            PROMPT,
            {n: 1.0},
            num_inference_steps=1,
            eta=etas[n],
            generator=_gen(),
            output_type="latent",
        ).images
        for n in etas
    }
    got = fused(
        PROMPT,
        {"e1": 0.25, "l1": 0.75},
        num_inference_steps=1,
        expert_etas=etas,
        generator=_gen(),
        output_type="latent",
    ).images
    schedule = Schedule.from_scheduler(fused.scheduler, 1)
    var = {
        n: ddim_variance(*schedule.alpha_bars(schedule.timesteps[0]), eta=e)
        for n, e in etas.items()
    }
    lam = {"e1": 0.25, "l1": 0.75}
    precision = sum(lam[n] / var[n] for n in etas)
    expected = sum(lam[n] * mu[n] / var[n] for n in etas) / precision
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    equal_eta = 0.25 * mu["e1"] + 0.75 * mu["l1"]
    assert (got - equal_eta).abs().max() > 1e-3  # precision weighting matters here


def test_lora_modes_give_the_same_fused_images(fused):
    outs = {}
    for mode in ("batched", "sequential", "merged"):
        fused.lora_mode = mode
        outs[mode] = _run(fused, {"e1": 0.2, "l1": 0.5, "l2": 0.3})
    fused.lora_mode = "auto"
    np.testing.assert_allclose(outs["batched"], outs["sequential"], atol=2e-5)
    np.testing.assert_allclose(outs["batched"], outs["merged"], atol=2e-5)


def test_experts_order_does_not_matter(models):
    a = _msdda(models, ["l1", "l2"])
    b = _msdda(models, ["l2", "l1"])
    np.testing.assert_allclose(
        _run(a, {"l1": 0.4, "l2": 0.6}), _run(b, {"l1": 0.4, "l2": 0.6}), atol=2e-5
    )


def test_kl_coefficients_set_the_exponents(fused):
    """lambda_i = w_i beta_i / beta: beta_i = 2, beta = 1 at w = 0.5 is weight 1 at beta_i = beta."""
    a = _run(fused, {"l1": 0.5}, kl_coefs={"l1": 2.0}, kl_coef=1.0)
    b = _run(fused, {"l1": 1.0})
    np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------- outputs, dtypes
def test_output_types(fused):
    w = {"l1": 0.5, "l2": 0.5}
    pil = _run(fused, w, output_type="pil")
    assert len(pil) == 1 and pil[0].size == (32, 32)
    pt = _run(fused, w, output_type="pt")
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), _run(fused, w), atol=1e-6)
    lat = _run(fused, w, output_type="latent")
    assert lat.shape == (1, 4, 16, 16) and lat.dtype == torch.float32
    out = fused(
        PROMPT,
        w,
        num_inference_steps=2,
        generator=_gen(),
        num_images_per_prompt=2,
        return_dict=False,
    )
    assert isinstance(out, tuple) and len(out[0]) == 2


def test_bfloat16_models_fuse_in_float32(models):
    pipe = _msdda(models, ["e1", "l1"], **diffusers_dtype(torch.bfloat16))
    assert pipe.unet.dtype == torch.bfloat16
    lat = _run(pipe, {"e1": 0.5, "l1": 0.5}, output_type="latent")
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    full = _run(_msdda(models, ["e1", "l1"]), {"e1": 0.5, "l1": 0.5}, output_type="latent")
    # the same image up to bfloat16 rounding (amplified by the guidance scale 7.5)
    assert (lat - full).norm() < 0.05 * full.norm()


# -------------------------------------------------------------------------------- errors
def test_eta_zero_with_fusion_is_refused(fused):
    with pytest.raises(ValueError, match="eta = 0"):
        _run(fused, {"e1": 0.5, "l1": 0.5}, eta=0.0)
    with pytest.raises(ValueError, match="eta = 0"):
        _run(fused, {"e1": 0.5, "l1": 0.5}, expert_etas={"l1": 0.0})


def test_weights_that_do_not_match_the_experts_are_refused(fused):
    with pytest.raises(ValueError, match="unknown expert"):
        _run(fused, {"e1": 0.5, "aesthetics": 0.5})
    with pytest.raises(ValueError, match="3 experts"):
        _run(fused, [0.5, 0.5])
    with pytest.raises(ValueError, match="weights is required"):
        _run(fused, None)
    with pytest.raises(ValueError, match="non-negative"):
        _run(fused, {"e1": -0.5, "l1": 1.5})
    with pytest.raises(ValueError, match="unknown expert"):
        _run(fused, {"e1": 1.0}, expert_etas={"nope": 1.0})


def test_reference_is_needed_off_the_simplex(fused):
    with pytest.raises(ValueError, match="reference"):
        _run(fused, {"e1": 0.3, "l1": 0.3}, reference=None)
    with pytest.raises(ValueError, match="reference must be"):
        _run(fused, {"e1": 0.5, "l1": 0.5}, reference="l2")


def test_bad_call_arguments_are_refused(fused):
    with pytest.raises(ValueError, match="output_type"):
        _run(fused, {"e1": 1.0}, output_type="jpeg")
    with pytest.raises(ValueError, match="num_inference_steps"):
        _run(fused, {"e1": 1.0}, num_inference_steps=0)
    with pytest.raises(ValueError, match="lora_mode"):
        fused.lora_mode = "fast"


def test_unknown_schedulers_are_replaced_by_ddim(models, tmp_path):
    from diffusers import PNDMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(models["base"])
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pndm")
    ours = MSDDAStableDiffusionPipeline.from_pretrained(tmp_path / "pndm")
    assert isinstance(ours.scheduler, DDIMScheduler)


# -------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(models, fused, tmp_path):
    w = {"e1": 0.2, "l1": 0.5, "l2": 0.3}
    before = _run(fused, w)
    fused.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"  # a standard diffusers folder
    again = _quiet(MSDDAStableDiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert again.expert_names == ["e1", "l1", "l2"]
    np.testing.assert_allclose(_run(again, w), before, atol=1e-6)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")  # diffusers reads it too
    assert plain.unet.config.block_out_channels == fused.unet.config.block_out_channels
    fused.save_pretrained(tmp_path / "saved")  # overwriting an existing save works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folders left


# ----------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base = save_tiny_pipeline(root / "base", xl=True)
    e1 = save_tiny_pipeline(root / "e1", xl=True, unet_seed=1)
    plain = StableDiffusionXLPipeline.from_pretrained(base)
    l1 = save_random_lora(plain.unet, root / "l1" / "l1.safetensors", seed=21)
    return {"base": base, "e1": e1, "l1": l1}


def test_sdxl_single_experts_reproduce_diffusers(xl):
    ours = _quiet(
        MSDDAStableDiffusionXLPipeline.from_pretrained(
            xl["base"], experts={"e1": xl["e1"], "l1": xl["l1"]}
        )
    )
    _last_step_deterministic(ours)
    ref = _last_step_deterministic(_quiet(StableDiffusionXLPipeline.from_pretrained(xl["e1"])))
    np.testing.assert_allclose(_run(ours, {"e1": 1.0}), _run(ref, eta=1.0), atol=2e-5)
    ref = _last_step_deterministic(_quiet(StableDiffusionXLPipeline.from_pretrained(xl["base"])))
    ref.load_lora_weights(str(xl["l1"]))
    np.testing.assert_allclose(_run(ours, {"l1": 1.0}), _run(ref, eta=1.0), atol=2e-5)
    a = _run(ours, {"e1": 0.5, "l1": 0.5})
    ours.lora_mode = "sequential"
    np.testing.assert_allclose(_run(ours, {"e1": 0.5, "l1": 0.5}), a, atol=2e-5)


# ---------------------------------------------------------------- methods of the registry
METHODS = ("base", "msdda", "db", "db-ls", "rs")
MIX = {"e1": 0.2, "l1": 0.5, "l2": 0.3}  # a full UNet and two LoRAs, on the simplex


@pytest.mark.parametrize("method", METHODS)
def test_every_expert_only_method_runs_and_is_reproducible(fused, method):
    a = _run(fused, MIX, method=method)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(_run(fused, MIX, method=method), a)  # same seed, same image
    assert np.abs(_run(fused, MIX, method=method, seed=1) - a).max() > 1e-3


def test_base_is_the_reference_alone(models, fused):
    ref = _last_step_deterministic(_quiet(StableDiffusionPipeline.from_pretrained(models["base"])))
    scheduler = fused.scheduler
    _last_step_deterministic(fused)
    try:
        expected = _run(ref, eta=1.0)
        np.testing.assert_allclose(_run(fused, None, method="base"), expected, atol=2e-5)
        np.testing.assert_allclose(_run(fused, MIX, method="base"), expected, atol=2e-5)
        np.testing.assert_allclose(_run(fused, {}), expected, atol=2e-5)  # weights 0: lambda_0 = 1
    finally:
        fused.scheduler = scheduler


def test_equal_variances_make_msdda_and_db_equal(fused):
    """Same eta and fixed_small for all: the product of Gaussians is the step of the mixed
    epsilon, on the simplex and off it (the base as reference, lambda_0 = 0.4)."""
    for w in (MIX, {"e1": 0.3, "l1": 0.3}):
        msdda = _run(fused, w, output_type="latent")
        db = _run(fused, w, method="db", output_type="latent")
        torch.testing.assert_close(db, msdda, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert", ["e1", "l1"])
def test_one_hot_weights_make_rs_and_db_ls_that_expert(fused, expert):
    alone = _run(fused, {expert: 1.0})
    for method in ("rs", "db-ls", "db"):
        np.testing.assert_allclose(
            _run(fused, {expert: 1.0}, method=method), alone, atol=2e-5, err_msg=method
        )


def test_rs_of_loras_is_diffusers_weighted_adapters(models):
    """The soup of LoRA experts of one base is the base with sum_i w_i delta_i merged:
    diffusers' set_adapters with those weights."""
    ours = _msdda(models, ["l1", "l3"])
    ref = _quiet(StableDiffusionPipeline.from_pretrained(models["base"]))
    ref.load_lora_weights(str(models["l1"]), adapter_name="l1")
    ref.load_lora_weights(str(models["l3"]), adapter_name="l3")
    ref.set_adapters(["l1", "l3"], [0.3, 0.7])
    _last_step_deterministic(ours)
    _last_step_deterministic(ref)
    torch.testing.assert_close(
        _run(ours, {"l1": 0.3, "l3": 0.7}, method="rs", output_type="latent"),
        _run(ref, eta=1.0, output_type="latent"),
        atol=5e-5,
        rtol=1e-4,
    )


def test_db_ls_draws_per_image(fused):
    kw = {"num_images_per_prompt": 2, "method": "db-ls", "generator": [_gen(1), _gen(2)]}
    a = fused(PROMPT, MIX, num_inference_steps=STEPS, output_type="np", **kw).images
    kw["generator"] = [_gen(1), _gen(2)]
    b = fused(PROMPT, MIX, num_inference_steps=STEPS, output_type="np", **kw).images
    assert a.shape == (2, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("rgg", "'rgg' needs reward models"),
        ("code", "'code' needs reward models"),
        ("target", "'target' needs reward models"),
        ("oracle", "'oracle' needs an oracle"),
        ("fast", "unknown method"),
    ],
)
def test_methods_the_pipelines_cannot_run_are_refused(fused, method, message):
    with pytest.raises(ValueError, match=message):
        _run(fused, MIX, method=method)


def test_rs_and_base_refusals(models, fused):
    with pytest.raises(ValueError, match="one guidance scale"):
        _run(fused, MIX, method="rs", expert_guidance_scales={"l1": 3.0})
    with pytest.raises(ValueError, match="method 'base' samples the reference"):
        _run(fused, MIX, method="base", reference=None)
    te = _msdda(models, ["te", "l1"])
    with pytest.raises(ValueError, match="text encoder"):
        _run(te, {"te": 0.5, "l1": 0.5}, method="rs")
    a = _run(te, {"te": 0.5, "l1": 0.5}, method="db")  # own conditioning per member
    assert np.isfinite(a).all()


@pytest.mark.parametrize("method", ["msdda", "db", "rs", "base"])
def test_sdxl_runs_the_methods(xl, method):
    pipe = _quiet(
        MSDDAStableDiffusionXLPipeline.from_pretrained(
            xl["base"], experts={"e1": xl["e1"], "l1": xl["l1"]}
        )
    )
    a = _run(pipe, {"e1": 0.5, "l1": 0.5}, method=method)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(_run(pipe, {"e1": 0.5, "l1": 0.5}, method=method), a)
    if method == "db":
        msdda = _run(pipe, {"e1": 0.5, "l1": 0.5}, output_type="latent")
        db = _run(pipe, {"e1": 0.5, "l1": 0.5}, method="db", output_type="latent")
        torch.testing.assert_close(db, msdda, atol=1e-5, rtol=1e-5)
