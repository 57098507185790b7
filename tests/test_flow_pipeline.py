"""SD3 and FLUX pipelines on tiny models: fused flow steps, LoRA experts, loading, refusals.

The tiny transformers, VAE and flow scheduler are built from configs with random weights
(msdda.sd.flow_testing) and saved as diffusers saves them; prompts are embeddings.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from msdda.errors import InputFileError  # noqa: E402
from msdda.flows import FlowStepSpec, flow_step_gaussian  # noqa: E402
from msdda.sd.families import detect_family  # noqa: E402
from msdda.sd.flow_pipeline import MSDDAFluxPipeline, MSDDAStableDiffusion3Pipeline  # noqa: E402
from msdda.sd.flow_testing import (  # noqa: E402
    save_flow_lora,
    save_tiny_flow_pipeline,
    tiny_flux_prompt,
    tiny_sd3_prompt,
)

STEPS = 3
SIZE = 32  # pixels: 16 x 16 latents with the tiny VAE


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """Saved tiny pipelines: SD3 and FLUX bases, full-transformer experts, LoRA experts."""
    root = tmp_path_factory.mktemp("flow")
    out = {
        "sd3": save_tiny_flow_pipeline(root / "sd3"),
        "sd3_a": save_tiny_flow_pipeline(root / "sd3_a", transformer_seed=1),
        "sd3_b": save_tiny_flow_pipeline(root / "sd3_b", transformer_seed=2),
        "sd3_shift1": save_tiny_flow_pipeline(root / "sd3_s1", transformer_seed=3, shift=1.0),
        "flux": save_tiny_flow_pipeline(root / "flux", family="flux"),
        "flux_a": save_tiny_flow_pipeline(root / "flux_a", family="flux", transformer_seed=1),
    }
    sd3 = MSDDAStableDiffusion3Pipeline.from_pretrained(out["sd3"]).transformer
    out["lora_a"] = save_flow_lora(sd3, root / "lora_a", seed=1)  # peft, as Flow-GRPO's
    out["lora_b"] = save_flow_lora(sd3, root / "lora_b", seed=2, rank=4)
    out["lora_file"] = save_flow_lora(sd3, root / "l.safetensors", fmt="diffusers", seed=3)
    flux = MSDDAFluxPipeline.from_pretrained(out["flux"]).transformer
    out["flux_lora_a"] = save_flow_lora(flux, root / "flux_lora_a", seed=4)
    out["flux_lora_b"] = save_flow_lora(
        flux, root / "fl_b.safetensors", fmt="diffusers", family="flux", seed=5
    )
    return out


def _sd3(disk, experts, **kw):
    return MSDDAStableDiffusion3Pipeline.from_pretrained(
        disk["sd3"], experts={k: disk[v] for k, v in experts.items()}, **kw
    )


def _flux(disk, experts, **kw):
    return MSDDAFluxPipeline.from_pretrained(
        disk["flux"], experts={k: disk[v] for k, v in experts.items()}, **kw
    )


def _run(pipe, weights, *, seed=0, prompt=None, **kw):
    prompt = prompt or (
        tiny_flux_prompt(2) if isinstance(pipe, MSDDAFluxPipeline) else tiny_sd3_prompt(2)
    )
    kw.setdefault("num_inference_steps", STEPS)
    out = pipe(
        weights=weights,
        **prompt,
        height=SIZE,
        width=SIZE,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return out.images


def _own_sampler(pipe, transformer, velocity, spec, *, seed=0, steps=STEPS, mu=None):
    """An expert's own stochastic sampler written from the formulas: x_T and step noise from
    the generator as diffusers draws them, the step Gaussian of msdda.flows, no noise after
    the last step. ``velocity(transformer, x, t)`` runs the model as its pipeline does."""
    g = torch.Generator().manual_seed(seed)
    sched = pipe.scheduler
    if mu is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).numpy(), mu=mu)
    sigmas = sched.sigmas.double()
    x = randn_tensor((2, 4, 16, 16), generator=g, dtype=torch.float32)
    for i, t in enumerate(sched.timesteps):
        v = velocity(transformer, x, t)
        step = flow_step_gaussian(
            v, x, float(sigmas[i]), float(sigmas[i + 1]), spec, sigma_max=float(sigmas[1])
        )
        if i == steps - 1:
            return step.mean
        x = step.mean + step.variance.sqrt() * randn_tensor(x.shape, generator=g)
    return x


def _sd3_velocity(prompt, scale):
    def run(model, x, t):
        x_in = torch.cat([x, x])
        out = model(
            hidden_states=x_in,
            timestep=t.expand(4),
            encoder_hidden_states=torch.cat(
                [prompt["negative_prompt_embeds"], prompt["prompt_embeds"]]
            ),
            pooled_projections=torch.cat(
                [prompt["negative_pooled_prompt_embeds"], prompt["pooled_prompt_embeds"]]
            ),
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return run


def test_one_sd3_expert_at_weight_one_is_its_own_sde_sampler(disk):
    pipe = _sd3(disk, {"a": "sd3_a"})
    got = _run(pipe, {"a": 1.0}, guidance_scale=4.5, noise_level=0.7)
    expert = pipe.msdda_experts.get("a").unet
    prompt = tiny_sd3_prompt(2)
    want = _own_sampler(pipe, expert, _sd3_velocity(prompt, 4.5), FlowStepSpec("sde", 0.7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = _own_sampler(
        pipe, pipe.transformer, _sd3_velocity(prompt, 4.5), FlowStepSpec("sde", 0.7)
    )
    assert (got - other).abs().max() > 1e-3  # the expert, not the base


def test_one_flux_expert_is_its_own_sampler_with_its_distilled_guidance(disk):
    pipe = _flux(disk, {"a": "flux_a"})
    got = _run(pipe, {"a": 1.0}, guidance_scale=3.5, step_rule="cps", noise_level=0.5)
    prompt = tiny_flux_prompt(2)
    ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)

    def velocity(model, x, t):
        packed = pipe._pack_latents(x, 2, 4, 16, 16)
        out = model(
            hidden_states=packed,
            timestep=t.expand(2) / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=prompt["pooled_prompt_embeds"],
            encoder_hidden_states=prompt["prompt_embeds"],
            txt_ids=torch.zeros(6, 3),
            img_ids=ids,
            return_dict=False,
        )[0]
        return pipe._unpack_latents(out, 16, 16, 1)

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    expert = pipe.msdda_experts.get("a").unet
    want = _own_sampler(pipe, expert, velocity, FlowStepSpec("cps", 0.5), mu=mu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_lora_experts_equal_per_adapter_forwards(disk):
    """One forward over [expert a, expert b, base] groups equals each adapter's own forward
    through peft's PeftModel, loaded from the folder as Flow-GRPO loads its LoRAs."""
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    pipe = _sd3(disk, {"a": "lora_a", "b": "lora_b"})
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 1000.0)
    prompt = tiny_sd3_prompt(2)
    kw = dict(
        encoder_hidden_states=prompt["prompt_embeds"],
        pooled_projections=prompt["pooled_prompt_embeds"],
        return_dict=False,
    )
    bank = pipe.msdda_experts.bank
    with torch.no_grad(), bank.route([0, 1, None]):
        batched = pipe.transformer(
            hidden_states=torch.cat([x] * 3),
            timestep=torch.cat([t] * 3),
            **{k: torch.cat([v] * 3) if torch.is_tensor(v) else v for k, v in kw.items()},
        )[0].chunk(3)
    for i, name in enumerate(["lora_a", "lora_b"]):
        base = SD3Transformer2DModel.from_pretrained(disk["sd3"] / "transformer")
        own = PeftModel.from_pretrained(base, str(disk[name]))  # as Flow-GRPO loads its LoRAs
        with torch.no_grad():
            want = own(hidden_states=x, timestep=t, **kw)[0]
        torch.testing.assert_close(batched[i], want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base = pipe.transformer(hidden_states=x, timestep=t, **kw)[0]
    torch.testing.assert_close(batched[2], base, rtol=1e-5, atol=1e-6)
    assert (batched[0] - base).abs().max() > 1e-4


def test_lora_modes_agree_and_one_hot_weights_give_that_expert(disk):
    pipe = _sd3(disk, {"a": "lora_a", "b": "lora_b", "f": "lora_file"})
    w = {"a": 0.5, "b": 0.3, "f": 0.2}
    fused = _run(pipe, w)
    pipe.lora_mode = "merged"
    torch.testing.assert_close(_run(pipe, w), fused, rtol=1e-4, atol=1e-5)
    pipe.lora_mode = "batched"
    one_hot = _run(pipe, {"a": 0.0, "b": 1.0})
    alone = _run(_sd3(disk, {"b": "lora_b"}), {"b": 1.0})
    torch.testing.assert_close(one_hot, alone, rtol=1e-5, atol=1e-6)
    assert (one_hot - fused).abs().max() > 1e-4


def test_flux_lora_experts_in_one_forward_with_their_own_guidance(disk):
    pipe = _flux(disk, {"a": "flux_lora_a", "b": "flux_lora_b"})
    kw = dict(expert_guidance_scales={"a": 2.0, "b": 5.0})
    batched = _run(pipe, {"a": 0.6, "b": 0.4}, **kw)
    pipe.lora_mode = "sequential"
    torch.testing.assert_close(
        _run(pipe, {"a": 0.6, "b": 0.4}, **kw), batched, rtol=1e-4, atol=1e-5
    )
    same = _run(pipe, {"a": 0.6, "b": 0.4})
    assert (same - batched).abs().max() > 1e-5  # the guidance values reach the model


def test_equal_noise_levels_on_the_simplex_is_velocity_mixing(disk):
    pipe = _sd3(disk, {"a": "sd3_a", "b": "sd3_b"})
    w = {"a": 0.7, "b": 0.3}
    torch.testing.assert_close(_run(pipe, w), _run(pipe, w, method="db"), rtol=1e-5, atol=1e-6)
    distinct = _run(pipe, w, expert_noise_levels={"b": 0.3})
    assert (
        distinct - _run(pipe, w, method="db", expert_noise_levels={"b": 0.3})
    ).abs().max() > 1e-5


@pytest.mark.parametrize("method", ["base", "msdda", "db", "db-ls", "rs"])
def test_every_expert_only_method_runs_on_sd3_lora_experts(disk, method):
    pipe = _sd3(disk, {"a": "lora_a", "b": "lora_b"})
    out = _run(pipe, {"a": 0.5, "b": 0.5}, method=method, num_inference_steps=2)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(out, _run(pipe, {"a": 0.5, "b": 0.5}, method=method, num_inference_steps=2))


def test_kl_coef_off_the_experts_uses_the_reference(disk):
    pipe = _sd3(disk, {"a": "lora_a", "b": "lora_b"})
    w = {"a": 0.5, "b": 0.5}
    stronger = _run(pipe, w, kl_coefs={"a": 1.0, "b": 1.0}, kl_coef=0.8)  # lambda_0 < 0
    assert (stronger - _run(pipe, w)).abs().max() > 1e-5
    with pytest.raises(ValueError, match="reference"):
        _run(pipe, w, kl_coefs={"a": 1.0, "b": 1.0}, kl_coef=0.8, reference=None)


def test_save_and_load_round_trip(disk, tmp_path):
    pipe = _sd3(disk, {"full": "sd3_a", "lora": "lora_a"})
    w = {"full": 0.4, "lora": 0.6}
    want = _run(pipe, w)
    pipe.save_pretrained(tmp_path / "saved")
    assert detect_family(tmp_path / "saved") == "sd3"
    back = MSDDAStableDiffusion3Pipeline.from_pretrained(tmp_path / "saved")
    assert back.expert_names == ["full", "lora"]
    torch.testing.assert_close(_run(back, w), want, rtol=1e-5, atol=1e-6)


def test_output_types(disk):
    pipe = _sd3(disk, {"a": "lora_a"})
    prompt = tiny_sd3_prompt(1)
    common = dict(height=SIZE, width=SIZE, num_inference_steps=2)
    assert pipe(**prompt, **common, output_type="np").images.shape == (1, SIZE, SIZE, 3)
    pt = pipe(**prompt, **common, output_type="pt").images
    assert pt.shape == (1, 3, SIZE, SIZE) and 0 <= pt.min() <= pt.max() <= 1
    assert pipe(**prompt, **common).images[0].size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="output_type"):
        pipe(**prompt, **common, output_type="jpeg")


def test_families_are_detected_from_saved_folders(disk):
    assert detect_family(disk["sd3"]) == "sd3" and detect_family(disk["flux"]) == "flux"


def test_offline_only_a_missing_hub_id_says_how_to_download(tmp_path):
    with pytest.raises(ValueError, match="hf download"):
        MSDDAStableDiffusion3Pipeline.from_pretrained("nobody/no-such-model", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- refusals


def test_a_deterministic_step_cannot_be_fused(disk):
    pipe = _sd3(disk, {"a": "lora_a", "b": "lora_b"})
    with pytest.raises(ValueError, match="noise_level = 0"):
        _run(pipe, {"a": 0.5, "b": 0.5}, noise_level=0.0)
    with pytest.raises(ValueError, match="noise_level = 0"):
        _run(pipe, {"a": 0.5, "b": 0.5}, expert_noise_levels={"b": 0.0})
    assert torch.isfinite(_run(pipe, {"a": 1.0}, noise_level=0.0)).all()  # one model: the ODE


def test_bad_noise_level_and_rule_are_refused(disk):
    pipe = _sd3(disk, {"a": "lora_a"})
    with pytest.raises(ValueError, match="noise_level"):
        _run(pipe, {"a": 1.0}, noise_level=-0.1)
    with pytest.raises(ValueError, match="noise_level"):
        _run(pipe, {"a": 1.0}, step_rule="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="rule"):
        _run(pipe, {"a": 1.0}, step_rule="ode")


def test_an_expert_with_other_sigmas_is_refused(disk):
    with pytest.raises(InputFileError, match="shift"):
        _sd3(disk, {"a": "sd3_shift1"})


def test_a_base_or_expert_of_another_family_is_refused(disk):
    with pytest.raises(ValueError, match="flux pipeline"):
        MSDDAStableDiffusion3Pipeline.from_pretrained(disk["flux"])
    with pytest.raises(ValueError, match="sd3 pipeline"):
        MSDDAFluxPipeline.from_pretrained(disk["sd3"])
    with pytest.raises(InputFileError, match="FluxTransformer2DModel"):
        _sd3(disk, {"a": "flux_a"})
    with pytest.raises(InputFileError, match="does not fit"):
        _sd3(disk, {"a": "flux_lora_a"})


def test_missing_or_pickle_only_weights_are_refused(disk, tmp_path):
    folder = tmp_path / "expert"
    shutil.copytree(disk["sd3_a"] / "transformer", folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputFileError, match="missing weight file"):
        MSDDAStableDiffusion3Pipeline.from_pretrained(disk["sd3"], experts={"a": folder})
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputFileError, match="pickle"):
        MSDDAStableDiffusion3Pipeline.from_pretrained(disk["sd3"], experts={"a": folder})
    peft = tmp_path / "peft"
    shutil.copytree(disk["lora_a"], peft)
    (peft / "adapter_model.safetensors").unlink()
    with pytest.raises(InputFileError, match="adapter_model.safetensors"):
        MSDDAStableDiffusion3Pipeline.from_pretrained(disk["sd3"], experts={"a": peft})
    index = json.loads((disk["sd3"] / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]


def test_generate_detects_sd3_and_reads_text_prompts(disk, tmp_path):
    """``msdda generate``'s runner picks the SD3 pipeline from model_index.json; --eta is the
    flow sampler's noise level there."""
    from PIL import Image

    from msdda.sd.cli import generate_sd

    base = save_tiny_flow_pipeline(tmp_path / "sd3_text", text_encoders=True)
    out = generate_sd(
        base=str(base),
        experts={"a": str(disk["lora_a"]), "b": str(disk["lora_b"])},
        weights={"a": 0.5, "b": 0.5},
        prompt="a red bus",
        out=tmp_path / "blend.png",
        steps=2,
        guidance_scale=4.5,
        eta=0.7,
    )
    assert Image.open(out).size == (SIZE, SIZE)  # the tiny SD3 default size
    with pytest.raises(ValueError, match="noise_level = 0"):
        generate_sd(
            base=str(base),
            experts={"a": str(disk["lora_a"]), "b": str(disk["lora_b"])},
            weights={"a": 0.5, "b": 0.5},
            prompt="a red bus",
            out=tmp_path / "zero.png",
            steps=2,
            eta=0.0,
        )
    assert not (tmp_path / "zero.png").exists()
