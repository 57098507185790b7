"""MSDDA for Stable Diffusion (1.x/2.x) and SDXL, as diffusers pipelines.

``MSDDAStableDiffusionPipeline`` is a ``StableDiffusionPipeline`` holding, beside its
base model, K experts (full UNets or LoRA adapters of the base). A call fuses the
experts' reverse steps in closed form at every step (:func:`msdda.msdda_step`), or
samples with another method of the registry (``method="db"``, ``"rs"``, ...):

    pipe = MSDDAStableDiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5",
        experts={"dpo": "mhdang/dpo-sd1.5-text2image-v1", "aesthetic": "path/to/lora.safetensors"},
    )
    image = pipe("a lighthouse at dusk", weights={"dpo": 0.5, "aesthetic": 0.5}).images[0]

A call is: check the arguments once (:func:`msdda.sd.plan.plan_sampling`), encode the
prompt, build the method's step policy through :func:`msdda.methods.build_policy` over
the experts as msdda experts (:func:`msdda.sd.domain.method_context`: each UNet with its
own classifier-free guidance, LoRA experts of the base in one batched forward, see
:mod:`msdda.sd.denoisers`), run :func:`msdda.sample_chain`, decode. SD and SDXL share
that body; SDXL adds its conditioning (two text encoders, micro-conditioning) and its
decoding.

Noise is drawn as diffusers draws it: the initial latents by ``prepare_latents`` and,
at each step but the last, ``randn_tensor(shape, generator, device, unet dtype)``, in
that order. So one expert with weight 1 reproduces ``StableDiffusionPipeline`` with the
same generator and eta, except that no noise is added at the last step (the core's
loop returns the last step's mean; diffusers' DDIM adds noise there when
``set_alpha_to_one=False``, as in SD 1.x configs, and DDPM adds noise of variance 1e-20).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from torch import Tensor

from ..errors import reading
from ..gaussians import Schedule
from ..io import atomic_dir
from ..methods import MethodSettings
from ..sampling import GeneratorNoise, NoiseTape, sample_chain
from ..validation import check_int, check_sequence
from .denoisers import SDConditioning, UNetConditioning
from .domain import generator_seeds, method_context, method_names, step_policy
from .plan import SamplingPlan, SamplingRequest, plan_sampling
from .registry import REFERENCE, ExpertRegistry

__all__ = [
    "MSDDAStableDiffusionPipeline",
    "MSDDAStableDiffusionXLPipeline",
    "UNetConditioning",
    "GeneratorNoise",
    "OUTPUT_TYPES",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: The largest image side (height, width, SDXL's sizes), in pixels, and the most images
#: per prompt a call accepts.
MAX_SIDE = 2**16
MAX_IMAGES = 2**16


@dataclass(frozen=True, kw_only=True)
class PromptRequest:
    """A call's prompt arguments, as in ``StableDiffusionPipeline.__call__``."""

    prompt: str | list[str] | None
    negative_prompt: str | list[str] | None
    prompt_embeds: Tensor | None
    negative_prompt_embeds: Tensor | None
    num_images_per_prompt: int
    clip_skip: int | None

    def __post_init__(self) -> None:
        check_int(self.num_images_per_prompt, "num_images_per_prompt", low=1, high=MAX_IMAGES)
        if self.clip_skip is not None:
            check_int(self.clip_skip, "clip_skip", low=0, high=MAX_SIDE)

    @property
    def num_images(self) -> int:
        """Images in the call: prompts (one string, a list, or rows of ``prompt_embeds``)
        times ``num_images_per_prompt``."""
        if isinstance(self.prompt, str):
            prompts = 1
        elif self.prompt is not None:
            prompts = len(self.prompt)
        else:
            prompts = self.prompt_embeds.shape[0]
        return prompts * self.num_images_per_prompt

    @property
    def per_sample_prompts(self) -> tuple[str, ...] | None:
        """The prompt of each image, in the batch's order (prompt-major, as diffusers repeats
        ``num_images_per_prompt``); None when the prompts came as embeddings."""
        if self.prompt is None:
            return None
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return tuple(p for p in prompts for _ in range(self.num_images_per_prompt))


@dataclass(frozen=True, kw_only=True)
class XLPromptRequest(PromptRequest):
    """SDXL's prompt arguments: a second text encoder's prompts and micro-conditioning."""

    prompt_2: str | list[str] | None
    negative_prompt_2: str | list[str] | None
    pooled_prompt_embeds: Tensor | None
    negative_pooled_prompt_embeds: Tensor | None
    original_size: tuple[int, int] | None
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int] | None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("original_size", 1), ("crops_coords_top_left", 0), ("target_size", 1)):
            size = getattr(self, name)
            if size is not None:
                pair = check_sequence(size, name)
                if len(pair) != 2:
                    raise ValueError(f"{name} must be a pair (height, width), got {size!r}")
                for i, v in enumerate(pair):
                    check_int(v, f"{name}[{i}]", low=low, high=MAX_SIDE)


@dataclass(frozen=True, kw_only=True)
class OutputRequest:
    """A call's image size, initial noise and output arguments."""

    height: int | None
    width: int | None
    generator: torch.Generator | list[torch.Generator] | None

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, low=1, high=MAX_SIDE)

    latents: Tensor | None
    output_type: str
    return_dict: bool
    callback: Callable[[int, int, Tensor], None] | None


def _check_clip_skip(clip_skip: int | None, text_encoder) -> None:
    """``clip_skip`` skips fewer layers than the text encoder has."""
    layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    if clip_skip is not None and layers is not None:
        check_int(clip_skip, "clip_skip", low=0, high=layers - 1)


class _MSDDAMixin:
    """Expert management and the one sampling body shared by the SD and SDXL pipelines.

    A pipeline class gives the hooks :meth:`_default_size`, :meth:`_check_prompt`,
    :meth:`_latents_dtype`, :meth:`_encode` and :meth:`_decode`, and ``_output_class``;
    flow-matching pipelines (:mod:`msdda.sd.flow_pipeline`) also :meth:`_initial_latents`
    and :meth:`_schedule`, and name their network in ``_backbone_name``.
    """

    _backbone_name = "unet"  # the pipeline attribute holding the network experts share
    _msdda_schedulers: tuple = (DDIMScheduler, DDPMScheduler)  # others become the first

    @property
    def msdda_backbone(self):
        """The denoising network the experts share: the UNet, or a flow model's transformer."""
        return getattr(self, self._backbone_name)

    # ------------------------------------------------------------- experts
    @property
    def msdda_experts(self) -> ExpertRegistry:
        reg = self.__dict__.get("_msdda_registry")
        if reg is None:
            reg = ExpertRegistry()
            self.__dict__["_msdda_registry"] = reg
        return reg

    @property
    def expert_names(self) -> list[str]:
        """The experts' names, in the order weights given as a sequence follow."""
        return self.msdda_experts.names

    @property
    def lora_mode(self) -> str:
        return self.msdda_experts.lora_mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        self.msdda_experts.lora_mode = mode

    def load_experts(
        self,
        experts: Mapping[str, str | os.PathLike],
        *,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """Load ``{name: path or hub id}``: full UNets (pipeline or UNet folders) or LoRAs.

        Hub ids are read from the local HF cache only. Raises ValueError for unknown
        files, missing weights, or an expert whose architecture or noise tables differ
        from the base's.
        """
        self.msdda_experts.load(self, experts, cache_dir=cache_dir)

    def add_expert_unet(self, name: str, unet, prediction_type: str | None = None) -> None:
        """Add a full-UNet expert already in memory."""
        self.msdda_experts.add_unet(self, name, unet, prediction_type)

    def remove_expert(self, name: str) -> None:
        self.msdda_experts.remove(self, name)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        experts: Mapping[str, str | os.PathLike] | None = None,
        lora_mode: str = "auto",
        **kwargs,
    ):
        """Load the base pipeline as diffusers does, then its experts.

        Args:
            pretrained_model_name_or_path: a local pipeline folder or a hub id in the local
                HF cache (``local_files_only`` defaults to True here).
            experts: ``{name: path or hub id}``; full UNets or LoRA adapters. Experts saved
                with :meth:`save_pretrained` beside the base are loaded first.
            lora_mode: how LoRA experts run: ``auto``, ``batched``, ``sequential``, ``merged``.
            kwargs: as for ``DiffusionPipeline.from_pretrained`` (``torch_dtype``,
                ``cache_dir``, ``scheduler``, ...). A scheduler other than DDIM/DDPM is
                replaced by a ``DDIMScheduler`` with the same config.
        """
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        if experts is not None and not isinstance(experts, Mapping):
            raise TypeError(
                f"experts must be a mapping {{name: path or hub id}}, got {type(experts).__name__}"
            )
        base = os.fspath(pretrained_model_name_or_path)
        folder, prepared, saved_mode = cls._check_files(base, experts or {}, kwargs)
        with reading(folder, "Stable Diffusion pipeline"):
            pipe = super().from_pretrained(base, **kwargs)
        if not isinstance(pipe.scheduler, cls._msdda_schedulers):
            pipe.scheduler = cls._msdda_schedulers[0].from_config(pipe.scheduler.config)
        pipe.lora_mode = lora_mode
        if saved_mode is not None and lora_mode == "auto":
            pipe.lora_mode = saved_mode
        pipe.msdda_experts.install(pipe, prepared)
        return pipe

    @classmethod
    def _check_files(cls, base: str, experts: Mapping, kwargs: dict) -> tuple:
        """Every file of the base and of the experts (saved beside it first, then
        ``experts``) checked before any model is built: (folder, prepared experts, the
        saved lora_mode or None)."""
        from .loading import check_pipeline_folder, resolve_hub_id

        folder = Path(base).expanduser()
        if not folder.is_dir():
            folder = resolve_hub_id(base, cache_dir=kwargs.get("cache_dir"))
        view = check_pipeline_folder(
            folder, variant=kwargs.get("variant"), given=kwargs, backbone=cls._backbone_name
        )
        saved = ExpertRegistry.read_manifest(folder)
        wanted = dict(saved[0]) if saved is not None else {}
        for name in experts:
            if name in wanted:
                raise ValueError(f"an expert named {name!r} is already loaded (saved with {base})")
        wanted.update(experts)
        prepared = ExpertRegistry().prepare(wanted, view, cls, cache_dir=kwargs.get("cache_dir"))
        return folder, prepared, saved[1] if saved is not None else None

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the base as a standard diffusers folder, plus every expert and a manifest.

        Written to a temporary folder swapped into place (:func:`msdda.io.atomic_dir`), so
        nothing is left half-written. ``from_pretrained(save_directory)`` loads the
        experts back.
        """
        with atomic_dir(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)
            index = tmp / "model_index.json"
            data = json.loads(index.read_text())
            data["_class_name"] = self._diffusers_class.__name__
            index.write_text(json.dumps(data, indent=2, sort_keys=True))
            self.msdda_experts.save(self, tmp)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self.msdda_experts.to(self.msdda_backbone.device, self.msdda_backbone.dtype)
        return self

    # ------------------------------------------------------------ sampling
    def _generate(self, prompt: PromptRequest, request: SamplingRequest, out: OutputRequest) -> Any:
        """The body of both pipelines' ``__call__``: check, encode, sample, decode."""
        if out.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {out.output_type!r}")
        if self.msdda_backbone.config.get("time_cond_proj_dim") is not None:
            raise ValueError("guidance-distilled UNets (time_cond_proj_dim) are not supported")
        height = out.height or self._default_size()
        width = out.width or self._default_size()
        self._check_prompt(prompt, height, width)
        names = method_names(self, [] if request.oracle is None else [request.oracle])
        preds = [self.msdda_experts.get(n).prediction_type for n in names]
        plan = plan_sampling(request, names, preds, self.scheduler)
        device = self._execution_device
        x_T = self._initial_latents(prompt, height, width, device, out)
        schedule = self._schedule(plan, x_T)
        cond = self._conditioning(
            plan,
            lambda: self._encode(prompt, plan.cfg, device, height, width, schedule),
            names,
            prompt.per_sample_prompts,
        )
        x0 = self._sample(
            plan, schedule, cond, x_T, out.generator, out.callback, names=names, request=request
        )
        result = self._decode(x0, out.output_type, out.generator, device)
        self.maybe_free_model_hooks()
        return self._output_class(*result) if out.return_dict else result

    def _conditioning(
        self,
        plan: SamplingPlan,
        encode: Callable[[], UNetConditioning],
        names: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> SDConditioning:
        """The prompt encoded by the text encoders as they stand, and again for each evaluated
        expert (member i: ``names[i]``, default the loaded experts) with text-encoder
        adapters, through its adapters; carrying the per-sample ``prompts`` rewards read."""
        reg = self.msdda_experts
        names = reg.names if names is None else names
        own = {}
        for m in plan.members:
            if m is None or not reg.has_text_lora(names[m]):
                continue
            with ExitStack() as stack:
                for bank in reg.text_banks.values():
                    stack.enter_context(bank.route([bank.index(names[m])]))
                own[m] = encode()
        return SDConditioning(encode(), own, None if prompts is None else tuple(prompts))

    def encode_conditioning(
        self,
        prompts: Sequence[str],
        *,
        plan: SamplingPlan,
        names: Sequence[str],
        height: int,
        width: int,
        schedule: Schedule | None = None,
    ) -> SDConditioning:
        """One row per prompt of ``prompts``, encoded for ``plan``'s members (``names[i]``
        for member i), carrying the prompts (see :func:`msdda.sd.domain.sd_method_context`)."""
        request = self._prompt_request(list(prompts))
        self._check_prompt(request, height, width)
        device = self._execution_device
        return self._conditioning(
            plan,
            lambda: self._encode(request, plan.cfg, device, height, width, schedule),
            names,
            request.per_sample_prompts,
        )

    def _initial_latents(
        self, prompt: PromptRequest, height: int, width: int, device, out
    ) -> Tensor:
        """x_T (B, C, h, w) as the diffusers pipeline draws it (or ``out.latents``)."""
        return self.prepare_latents(
            prompt.num_images,
            self.unet.config.in_channels,
            height,
            width,
            self._latents_dtype(),
            device,
            out.generator,
            out.latents,
        )

    def _schedule(self, plan: SamplingPlan, x_T: Tensor) -> Schedule:
        """The call's schedule, read from the pipeline's scheduler."""
        return Schedule.from_scheduler(self.scheduler, plan.num_inference_steps)

    def _sample(
        self,
        plan: SamplingPlan,
        schedule: Schedule,
        cond: SDConditioning,
        x_T: Tensor,
        generator,
        callback: Callable[[int, int, Tensor], None] | None,
        *,
        names: Sequence[str] | None = None,
        request: SamplingRequest | None = None,
    ) -> Tensor:
        """The chain of ``plan.method`` from ``x_T`` (B, C, h, w), with a progress bar, over
        the experts ``names`` (default all) with the request's rewards and oracle;
        returns the final latents (B, C, h, w), float32."""
        oracle = None if request is None else request.oracle
        ctx = method_context(
            self,
            plan,
            schedule,
            tuple(x_T.shape[1:]),
            names=names,
            rewards=() if request is None or request.rewards is None else request.rewards,
            oracles=None if plan.method != "oracle" else {plan.weights: oracle},
        )
        noise = NoiseTape(GeneratorNoise(generator, x_T.device, self.msdda_backbone.dtype))
        policy = step_policy(plan, ctx, cond, seeds=generator_seeds(generator), noise=noise)
        bar = self.progress_bar(total=plan.num_inference_steps)

        def step_done(i: int, t: int, x: Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i, t, x)

        with bar, torch.no_grad():
            return sample_chain(policy, x_T.float(), schedule.timesteps, noise, callback=step_done)


class MSDDAStableDiffusionPipeline(_MSDDAMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with MSDDA: K experts fused in closed form at every step.

    Build with :meth:`from_pretrained` (``experts={name: path or hub id}``), call with
    ``weights={name: w}``. The base UNet plays the reference model p_ref when the
    fusion needs one (weights off the simplex, or ``kl_coef`` differing from the
    experts' ``kl_coefs``).
    """

    _diffusers_class = StableDiffusionPipeline
    _output_class = StableDiffusionPipelineOutput
    _family = "sd"  # msdda.sd.families

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        kl_coefs: Mapping[str, float] | None = None,
        kl_coef: float | None = None,
        reference: str | None = REFERENCE,
        expert_etas: Mapping[str, float] | None = None,
        expert_guidance_scales: Mapping[str, float] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback: Callable[[int, int, Tensor], None] | None = None,
        method: str = "msdda",
        rewards: Sequence[Callable[[Tensor, Any], Tensor]] | None = None,
        oracle: Any = None,
        method_settings: MethodSettings | None = None,
    ):
        """Generate images from the experts' fused steps (or another method's).

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
            num_images_per_prompt, generator, latents, output_type, return_dict,
            guidance_rescale, clip_skip: as in ``StableDiffusionPipeline``.
            weights: preference weights ``{expert name: w >= 0}`` (experts left out get 0),
                or one per expert in :attr:`expert_names` order; default 1 for a single expert.
            num_inference_steps: reverse steps of the DDIM/DDPM scheduler.
            guidance_scale: classifier-free guidance applied to each expert's own
                predictions (> 1 enables it); ``expert_guidance_scales`` overrides per expert
                (the key ``"base"`` for the reference).
            eta: DDIM eta (> 0 required when MSDDA fuses more than one model);
                ``expert_etas`` overrides per expert, giving distinct variances.
            kl_coefs, kl_coef: the experts' KL coefficients beta_i and the target beta:
                lambda_i = w_i beta_i / beta, lambda_0 = 1 - sum lambda_i.
            reference: ``"base"``: the base UNet is p_ref when lambda_0 != 0; None forbids it.
            callback: called as ``callback(i, t, latents)`` after every step.
            method: ``"msdda"`` (the fusion), or ``"base"`` (the base UNet alone), ``"db"``
                (Diffusion Blend), ``"db-ls"`` (one expert drawn per step) or ``"rs"``
                (rewarded soup: one UNet with the weighted average of the parameters), ``"rgg"``
                (reward gradient guidance through the VAE), ``"code"`` (best of N blockwise),
                ``"target"`` (per-step importance resampling), or ``"oracle"``. Every method
                runs on the one loop and sees the same noise for the same generator(s).
            rewards: the objectives rgg, code and target read: one callable per expert (expert
                order), ``(images (B, 3, H, W) in [0, 1], prompts list[str]) -> (B,)``,
                differentiable in the images for rgg.
            oracle: for method ``"oracle"``: the model trained on the weighted reward at
                these weights, the name of an expert loaded with :meth:`load_experts` (it is
                then left out of the experts the weights name) or a UNet of the base's
                architecture; sampled with the base's guidance scale.
            method_settings: a :class:`msdda.methods.MethodSettings` (rgg scale and schedule,
                code candidates and block, target candidates); default its defaults.

        Returns:
            ``StableDiffusionPipelineOutput`` with ``.images`` (PIL list, (B, H, W, 3) array,
            (B, 3, H, W) tensor in [0, 1], or float32 latents), or a tuple.
        """
        return self._generate(
            PromptRequest(
                prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
            ),
            SamplingRequest(
                weights=weights, method=method, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, eta=eta, kl_coefs=kl_coefs, kl_coef=kl_coef,
                reference=reference, expert_etas=expert_etas,
                expert_guidance_scales=expert_guidance_scales, guidance_rescale=guidance_rescale,
                rewards=rewards, oracle=oracle, method_settings=method_settings,
            ),
            OutputRequest(
                height=height, width=width, generator=generator, latents=latents,
                output_type=output_type, return_dict=return_dict, callback=callback,
            ),
        )  # fmt: skip

    # ---------------------------------------------------------------- hooks
    def _prompt_request(self, prompts: list[str]) -> PromptRequest:
        """Per-sample prompts, one image each, as a call's prompt arguments."""
        return PromptRequest(
            prompt=prompts, negative_prompt=None, prompt_embeds=None,
            negative_prompt_embeds=None, num_images_per_prompt=1, clip_skip=None,
        )  # fmt: skip

    def _default_size(self) -> int:
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def _check_prompt(self, p: PromptRequest, height: int, width: int) -> None:
        _check_clip_skip(p.clip_skip, self.text_encoder)
        self.check_inputs(
            p.prompt, height, width, None, p.negative_prompt, p.prompt_embeds,
            p.negative_prompt_embeds,
        )  # fmt: skip

    def _latents_dtype(self) -> torch.dtype:
        return self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype

    def _encode(
        self, p: PromptRequest, cfg: bool, device, height: int, width: int, schedule: Schedule
    ) -> UNetConditioning:
        pos, neg = self.encode_prompt(
            p.prompt,
            device,
            p.num_images_per_prompt,
            cfg,
            p.negative_prompt,
            prompt_embeds=p.prompt_embeds,
            negative_prompt_embeds=p.negative_prompt_embeds,
            clip_skip=p.clip_skip,
        )
        return UNetConditioning(torch.cat([neg, pos]) if cfg else pos, None, cfg)

    def _decode(self, x0: Tensor, output_type: str, generator, device) -> tuple:
        """(images, nsfw flags) as ``StableDiffusionPipeline`` returns them."""
        if output_type == "latent":
            return x0, None
        image = self.vae.decode(
            x0.to(self.vae.dtype) / self.vae.config.scaling_factor,
            return_dict=False,
            generator=generator,
        )[0]
        image, nsfw = self.run_safety_checker(image, device, self.unet.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        image = self.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=denorm
        )
        return image, nsfw


class MSDDAStableDiffusionXLPipeline(_MSDDAMixin, StableDiffusionXLPipeline):
    """SDXL with MSDDA: as :class:`MSDDAStableDiffusionPipeline`, with SDXL's two text
    encoders and micro-conditioning (``original_size``, ``crops_coords_top_left``,
    ``target_size``)."""

    _diffusers_class = StableDiffusionXLPipeline
    _output_class = StableDiffusionXLPipelineOutput
    _family = "sdxl"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        kl_coefs: Mapping[str, float] | None = None,
        kl_coef: float | None = None,
        reference: str | None = REFERENCE,
        expert_etas: Mapping[str, float] | None = None,
        expert_guidance_scales: Mapping[str, float] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback: Callable[[int, int, Tensor], None] | None = None,
        method: str = "msdda",
        rewards: Sequence[Callable[[Tensor, Any], Tensor]] | None = None,
        oracle: Any = None,
        method_settings: MethodSettings | None = None,
    ):
        """Generate images from the experts' fused steps (or another method's); arguments
        as in :meth:`MSDDAStableDiffusionPipeline.__call__` and ``StableDiffusionXLPipeline``.

        Returns:
            ``StableDiffusionXLPipelineOutput`` with ``.images``, or a tuple.
        """
        return self._generate(
            XLPromptRequest(
                prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                target_size=target_size,
            ),
            SamplingRequest(
                weights=weights, method=method, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, eta=eta, kl_coefs=kl_coefs, kl_coef=kl_coef,
                reference=reference, expert_etas=expert_etas,
                expert_guidance_scales=expert_guidance_scales, guidance_rescale=guidance_rescale,
                rewards=rewards, oracle=oracle, method_settings=method_settings,
            ),
            OutputRequest(
                height=height, width=width, generator=generator, latents=latents,
                output_type=output_type, return_dict=return_dict, callback=callback,
            ),
        )  # fmt: skip

    # ---------------------------------------------------------------- hooks
    def _prompt_request(self, prompts: list[str]) -> XLPromptRequest:
        """Per-sample prompts, one image each, as a call's prompt arguments."""
        return XLPromptRequest(
            prompt=prompts, negative_prompt=None, prompt_embeds=None,
            negative_prompt_embeds=None, num_images_per_prompt=1, clip_skip=None,
            prompt_2=None, negative_prompt_2=None, pooled_prompt_embeds=None,
            negative_pooled_prompt_embeds=None, original_size=None,
            crops_coords_top_left=(0, 0), target_size=None,
        )  # fmt: skip

    def _default_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _check_prompt(self, p: XLPromptRequest, height: int, width: int) -> None:
        _check_clip_skip(p.clip_skip, self.text_encoder)
        self.check_inputs(
            p.prompt, p.prompt_2, height, width, None, p.negative_prompt, p.negative_prompt_2,
            p.prompt_embeds, p.negative_prompt_embeds, p.pooled_prompt_embeds,
            p.negative_pooled_prompt_embeds,
        )  # fmt: skip

    def _latents_dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _encode(
        self, p: XLPromptRequest, cfg: bool, device, height: int, width: int, schedule: Schedule
    ) -> UNetConditioning:
        """Both text encoders' embeddings and the micro-conditioning ``added_cond_kwargs``."""
        pos, neg, pooled, neg_pooled = self.encode_prompt(
            prompt=p.prompt,
            prompt_2=p.prompt_2,
            device=device,
            num_images_per_prompt=p.num_images_per_prompt,
            do_classifier_free_guidance=cfg,
            negative_prompt=p.negative_prompt,
            negative_prompt_2=p.negative_prompt_2,
            prompt_embeds=p.prompt_embeds,
            negative_prompt_embeds=p.negative_prompt_embeds,
            pooled_prompt_embeds=p.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=p.negative_pooled_prompt_embeds,
            clip_skip=p.clip_skip,
        )
        te2 = self.text_encoder_2
        time_ids = self._get_add_time_ids(
            p.original_size or (height, width),
            p.crops_coords_top_left,
            p.target_size or (height, width),
            dtype=pos.dtype,
            text_encoder_projection_dim=int(pooled.shape[-1])
            if te2 is None
            else te2.config.projection_dim,
        )
        if cfg:
            pos = torch.cat([neg, pos])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        added = {
            "text_embeds": pooled.to(device),
            "time_ids": time_ids.to(device).repeat(p.num_images, 1),
        }
        return UNetConditioning(pos.to(device), added, cfg)

    def _decode(self, x0: Tensor, output_type: str, generator, device) -> tuple:
        """(images,) as ``StableDiffusionXLPipeline`` returns them (watermarked if it does)."""
        if output_type == "latent":
            return (x0,)
        image = self._decode_xl(x0)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return (self.image_processor.postprocess(image, output_type=output_type),)

    def _decode_xl(self, latents: Tensor) -> Tensor:
        """The VAE decode of ``StableDiffusionXLPipeline`` (float32 VAE when it would overflow)."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.upcast_vae()
        dtype = next(iter(self.vae.post_quant_conv.parameters())).dtype
        latents = latents.to(dtype)
        cfg = self.vae.config
        mean = getattr(cfg, "latents_mean", None)
        std = getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return image
