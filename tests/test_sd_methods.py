"""Every method on Stable Diffusion (tiny random models): runs, repeats, shares noise, and
reduces to its proposal where it should; the VAE decode the rewards read; peak memory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from msdda.measure import MEMORY_KINDS, peak_memory  # noqa: E402
from msdda.methods import METHODS as ALL_METHODS  # noqa: E402
from msdda.methods import MethodSettings, run_method  # noqa: E402
from msdda.sd import MSDDAStableDiffusionPipeline, SDConditioning  # noqa: E402
from msdda.sd.domain import run_sd_method, sd_method_context  # noqa: E402
from msdda.sd.testing import save_random_lora, save_tiny_pipeline  # noqa: E402
from msdda.sd.vae import DecodeOptions, vae_decoder  # noqa: E402

torch.set_num_threads(1)

#: every method but those needing a trained student (SD has none here: see msdda.sd.student)
METHODS = [m for m, info in ALL_METHODS.items() if not info.needs_student]

PROMPT = "a red cube on a table"
STEPS = 3
MIX = {"e1": 0.5, "l1": 0.5}
#: every method's settings small enough for seconds, large enough to search
SETTINGS = MethodSettings(rgg_scale=50.0, code_candidates=3, code_block=2, target_candidates=3)


def brightness(images, prompts):
    """Mean pixel value: a tiny differentiable reward."""
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    """Red minus green: a second tiny differentiable reward."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))


REWARDS = [brightness, redness]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Base, a full-UNet expert e1, a LoRA expert l1 and a LoRA oracle orc (tiny, random)."""
    root = tmp_path_factory.mktemp("sdm")
    base = save_tiny_pipeline(root / "base")
    e1 = save_tiny_pipeline(root / "e1", unet_seed=1)
    p = MSDDAStableDiffusionPipeline.from_pretrained(base)
    l1 = save_random_lora(p.unet, root / "l1" / "l1.safetensors", seed=11)
    orc = save_random_lora(p.unet, root / "orc" / "orc.safetensors", seed=12)
    p.load_experts({"e1": e1, "l1": l1, "orc": orc})
    p.set_progress_bar_config(disable=True)
    return p


def _kw(method: str) -> dict:
    """The call arguments every method needs (the oracle names orc, left out of the experts)."""
    if method == "oracle":
        return {"oracle": "orc", "rewards": REWARDS}
    return {"rewards": [*REWARDS, brightness]}  # orc is an expert (weight 0) otherwise


def _run(pipe, method, weights=MIX, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("method_settings", SETTINGS)
    for k, v in _kw(method).items():
        kw.setdefault(k, v)
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, weights, method=method, generator=gen, **kw).images


@pytest.fixture(scope="module")
def problem(pipe):
    return sd_method_context(pipe, REWARDS, {(0.5, 0.5): "orc"}, num_inference_steps=STEPS)


# ----------------------------------------------------------------- the pipelines' method=


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_through_the_pipeline_and_repeats(pipe, method):
    a = _run(pipe, method)
    assert a.shape == (1, 4, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(_run(pipe, method), a, rtol=0, atol=0)


def _first_step_inputs(fn) -> torch.Tensor:
    """Every row x_t that a UNet saw at the first timestep while ``fn`` ran (R, C, h, w)."""
    from diffusers import UNet2DConditionModel

    seen = []

    def hook(module, args):
        if isinstance(module, UNet2DConditionModel):
            t = args[1].flatten()[0]
            if not seen or bool(t == seen[0][1]):
                seen.append((args[0].detach().float().clone(), t))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return torch.cat([x for x, _ in seen])


def _contains_rows(rows: torch.Tensor, x_T: torch.Tensor) -> bool:
    """Every sample of x_T is exactly one of ``rows``."""
    return all(any(torch.equal(r, x) for r in rows) for x in x_T)


def test_every_method_starts_from_the_same_x_T(pipe, problem):
    x_T = _first_step_inputs(lambda: _run(pipe, "base"))[:1]
    for m in METHODS:
        assert _contains_rows(_first_step_inputs(lambda m=m: _run(pipe, m)), x_T), m
    seeds = [3, 4]

    def run(m):
        w = None if m == "base" else [0.5, 0.5]
        return run_sd_method(problem, m, w, [PROMPT, "x"], seeds, settings=SETTINGS)

    x_T = _first_step_inputs(lambda: run("base"))[:2]
    assert not torch.equal(x_T[0], x_T[1])
    for m in METHODS:
        assert _contains_rows(_first_step_inputs(lambda m=m: run(m)), x_T), m


def test_rgg_at_scale_zero_and_search_over_one_candidate_are_the_base(pipe):
    base = _run(pipe, "base")
    for schedule in ("constant", "increasing"):
        rgg = _run(
            pipe, "rgg", method_settings=MethodSettings(rgg_scale=0.0, rgg_schedule=schedule)
        )
        torch.testing.assert_close(rgg, base, rtol=0, atol=0)
    one = MethodSettings(code_candidates=1, code_block=2, target_candidates=1)
    torch.testing.assert_close(_run(pipe, "code", method_settings=one), base, rtol=0, atol=0)
    torch.testing.assert_close(_run(pipe, "target", method_settings=one), base, rtol=0, atol=0)


def test_reward_reading_methods_move_the_samples(pipe):
    base = _run(pipe, "base")
    for method in ("rgg", "code", "target"):
        assert not torch.allclose(_run(pipe, method), base), method


def test_rgg_guidance_raises_its_reward(pipe):
    """A strong gradient of the brightness alone makes the final image brighter than the base's."""
    decode = vae_decoder(pipe.vae)
    strong = MethodSettings(rgg_scale=2000.0)
    kw = {"rewards": [brightness, brightness, brightness], "method_settings": strong}
    weights = {"e1": 1.0}
    guided = decode(_run(pipe, "rgg", weights, **kw))
    assert brightness(guided, None) > brightness(decode(_run(pipe, "base")), None) + 1e-3


def test_oracle_is_sampling_with_the_oracle_model(pipe):
    alone = _run(pipe, "msdda", {"orc": 1.0}, rewards=None)
    torch.testing.assert_close(_run(pipe, "oracle"), alone, rtol=0, atol=0)
    e1 = pipe.msdda_experts.get("e1").unet  # a UNet given directly
    as_unet = _run(pipe, "oracle", {"l1": 1.0, "orc": 0.0}, oracle=e1, rewards=None)
    torch.testing.assert_close(as_unet, _run(pipe, "msdda", {"e1": 1.0}), rtol=0, atol=0)


def test_rewards_see_the_prompt_of_each_sample(pipe):
    seen = []

    def spy(images, prompts):
        seen.append(list(prompts))
        return images.mean(dim=(1, 2, 3))

    pipe(
        ["a cat", "a dog"],
        MIX,
        method="code",
        rewards=[spy, spy, spy],
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        output_type="latent",
        method_settings=MethodSettings(code_candidates=3, code_block=2),
        generator=torch.Generator().manual_seed(0),
    )
    one = ["a cat", "a cat", "a dog", "a dog"]
    assert seen and all(p == one * 3 for p in seen)  # 3 candidates, copy-major


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"method": "rgg", "rewards": None}, ValueError, "'rgg' needs reward models"),
        ({"method": "code", "rewards": None}, ValueError, "'code' needs reward models"),
        ({"method": "target", "rewards": None}, ValueError, "'target' needs reward models"),
        ({"method": "rgg", "rewards": REWARDS}, ValueError, "rewards has 2 entries for 3 experts"),
        ({"method": "rgg", "rewards": [brightness, 1, 2]}, TypeError, r"rewards\[1\] must be"),
        ({"method": "rgg", "rewards": brightness}, TypeError, "rewards must be a sequence"),
        ({"method": "oracle", "oracle": None}, ValueError, "'oracle' needs an oracle"),
        ({"method": "oracle", "oracle": "nope"}, ValueError, "oracle 'nope' is not a loaded"),
        ({"method": "oracle", "oracle": 3}, TypeError, "name of a loaded expert or a diffusers"),
        ({"method": "msdda", "oracle": "orc"}, ValueError, "read by method 'oracle' only"),
        ({"method": "rgg", "method_settings": {"rgg_scale": 1}}, TypeError, "MethodSettings"),
    ],
)
def test_methods_refuse_what_they_cannot_run(pipe, kw, error, message):
    method = kw.pop("method")
    if "oracle" in kw:
        kw["rewards"] = None
    with pytest.raises(error, match=message):
        _run(pipe, method, **kw)


# ------------------------------------------------------------ the sweep's problem


def test_problem_runs_every_method_with_kl_nfe_memory(problem):
    assert problem.expert_names == ("e1", "l1")  # the oracle is not an expert
    runs = {
        m: run_sd_method(
            problem,
            m,
            None if m == "base" else [0.5, 0.5],
            [PROMPT, "a dog"],
            [1, 2],
            settings=SETTINGS,
            measure_kl=True,
        )
        for m in METHODS
    }
    for m, r in runs.items():
        assert r.samples.shape == (2, 4, 16, 16) and torch.isfinite(r.samples).all(), m
        assert r.kl.shape == (2,) and (r.kl >= 0).all(), m
        assert r.peak_memory_kind in MEMORY_KINDS and r.peak_memory_bytes > 0, m
    assert torch.equal(runs["base"].kl, torch.zeros(2, dtype=torch.float64))
    assert runs["base"].nfe_per_image == STEPS
    assert runs["msdda"].nfe_per_image == 2 * STEPS  # two experts per step
    assert (runs["msdda"].kl > 0).all()
    assert runs["code"].reward_rows > 0 and runs["base"].reward_rows == 0
    zero = run_sd_method(
        problem,
        "rgg",
        [0.5, 0.5],
        [PROMPT, "a dog"],
        [1, 2],
        settings=MethodSettings(rgg_scale=0.0),
        measure_kl=True,
    )
    assert torch.equal(zero.kl, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(zero.samples, runs["base"].samples, rtol=0, atol=0)


def test_problem_same_seeds_same_samples_and_per_sample_noise(problem):
    cond = problem.condition([PROMPT, "a dog"])
    assert isinstance(cond, SDConditioning) and cond.prompts == (PROMPT, "a dog")
    a = run_method("msdda", problem.context, [0.5, 0.5], cond, [5, 6])
    b = run_method("msdda", problem.context, [0.5, 0.5], cond, [5, 6])
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    alone = run_method("msdda", problem.context, [0.5, 0.5], problem.condition(["a dog"]), [6])
    torch.testing.assert_close(alone.samples[0], a.samples[1], rtol=1e-5, atol=1e-5)


def test_problem_oracle_matches_the_pipeline_oracle_model(pipe, problem):
    r = run_sd_method(problem, "oracle", [0.5, 0.5], [PROMPT], [7])
    direct = sd_method_context(pipe, experts=["orc"], num_inference_steps=STEPS)
    o = run_sd_method(direct, "msdda", [1.0], [PROMPT], [7])  # one Gaussian's product: round-off
    torch.testing.assert_close(r.samples, o.samples, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="no oracle for weights"):
        run_sd_method(problem, "oracle", [1.0, 0.0], [PROMPT], [7])


def test_problem_refusals(pipe, problem):
    with pytest.raises(ValueError, match="rewards has 1 entries for 2 experts"):
        sd_method_context(pipe, [brightness], experts=["e1", "l1"], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="oracle 'nope' is not a loaded expert"):
        sd_method_context(pipe, REWARDS, {(0.5, 0.5): "nope"})
    with pytest.raises(ValueError, match="weights"):
        sd_method_context(pipe, REWARDS, {(0.5, 0.6): "orc"})
    with pytest.raises(TypeError, match="prompts must be a non-empty sequence"):
        problem.condition("one string")
    with pytest.raises(ValueError, match="needs the objective rewards"):
        run_sd_method(sd_method_context(pipe, experts=["e1"]), "rgg", [1.0], [PROMPT], [0])


# ---------------------------------------------------------------- the VAE decode


def test_decode_is_the_pipelines_decode(pipe):
    gen = torch.Generator().manual_seed(0)
    latents = _run(pipe, "msdda")
    images = pipe(PROMPT, MIX, num_inference_steps=STEPS, output_type="pt", generator=gen).images
    torch.testing.assert_close(vae_decoder(pipe.vae)(latents), images, rtol=1e-5, atol=1e-5)


def test_decode_options_keep_values_and_gradients(pipe):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = vae_decoder(pipe.vae)

    def grad(decode):
        x = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(brightness(decode(x), None).sum(), x)
        return decode(z), g

    ref_img, ref_grad = grad(plain)
    for opts in (DecodeOptions(slicing=True), DecodeOptions(checkpointing=True)):
        img, g = grad(vae_decoder(pipe.vae, opts))
        torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, ref_grad, rtol=1e-4, atol=1e-7)
    img64, _ = grad(vae_decoder(pipe.vae, DecodeOptions(dtype=torch.float64)))
    assert img64.dtype == torch.float32 and pipe.vae.dtype == torch.float32  # VAE not changed
    torch.testing.assert_close(img64, ref_img, rtol=1e-4, atol=1e-5)
    half, _ = grad(vae_decoder(pipe.vae, DecodeOptions(scale=0.5)))
    assert half.shape == (2, 3, 16, 16) and ref_img.shape == (2, 3, 32, 32)
    tiled, _ = grad(vae_decoder(pipe.vae, DecodeOptions(tiling=True)))
    assert tiled.shape == ref_img.shape and tiled.min() >= 0 and tiled.max() <= 1
    with pytest.raises(ValueError, match="scale"):
        DecodeOptions(scale=0)
    with pytest.raises(TypeError, match="slicing must be a bool"):
        DecodeOptions(slicing=1)


# ---------------------------------------------------------------- peak memory


def test_peak_memory_sees_a_large_allocation():
    import mmap

    with peak_memory("cpu") as big:  # 64 MiB of fresh pages, whatever the allocator keeps
        block = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1
        block.close()
    assert big.kind in MEMORY_KINDS and big.bytes >= 64 * 2**20
    with peak_memory(torch.device("cpu")) as small:
        pass
    if small.kind == "process_peak_rss":  # resettable: the second peak is below the first
        assert small.bytes < big.bytes
    with pytest.raises(ValueError, match="device"):
        with peak_memory("nonsense"):
            pass
