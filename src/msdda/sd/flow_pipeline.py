"""MSDDA for flow-matching models: Stable Diffusion 3 and FLUX, as diffusers pipelines.

``MSDDAStableDiffusion3Pipeline`` and ``MSDDAFluxPipeline`` are built exactly as the
Stable Diffusion pipelines (:mod:`msdda.sd.pipeline`): the same expert registry (full
transformers, or LoRA adapters of the base's transformer run in one batched forward),
the same checked plan, the methods registry (``msdda``, ``base``, ``db`` = velocity
mixing, ``db-ls``, ``rs``), the one sampling loop. What differs is the step: each model's
velocity becomes a Gaussian step of the stochastic flow sampler its expert was trained
with (:class:`msdda.flows.FlowStepSpec`: ``step_rule`` ``"sde"`` Flow-GRPO, ``"cps"``
coefficients-preserving, ``"dance"`` DanceGRPO; ``noise_level`` a, per expert with
``expert_noise_levels``), on the sigmas of the pipeline's
``FlowMatchEulerDiscreteScheduler`` (SD3's static shift, FLUX's resolution-dependent
``mu``), and the guidance: SD3 applies each expert's classifier-free guidance scale,
FLUX-dev feeds each expert its own distilled guidance value::

    pipe = MSDDAStableDiffusion3Pipeline.from_pretrained(
        "stabilityai/stable-diffusion-3.5-medium",
        experts={"geneval": "jieliu/SD3.5M-FlowGRPO-GenEval",
                 "ocr": "jieliu/SD3.5M-FlowGRPO-Text"},
    )
    image = pipe("a red bus", weights={"geneval": 0.5, "ocr": 0.5}).images[0]

Noise is drawn as diffusers draws it (``randn_tensor`` from the call's generator: x_T, then
one z per step but the last). FLUX's chain runs on the unpacked latents (B, C, h, w); the
transformer is given them packed into 2x2 patches, as diffusers' ``FluxPipeline`` does.
Prompts can be given as embeddings (``prompt_embeds`` ...), so the text encoders are
optional: a folder saved without them loads with them set to None.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from torch import Tensor

from ..gaussians import Schedule
from ..methods import MethodSettings
from .denoisers import SDConditioning
from .families import FLOW_DEFAULTS, detect_family, pipeline_folder
from .flow_denoisers import TransformerConditioning, with_member_guidance
from .pipeline import OutputRequest, PromptRequest, _MSDDAMixin
from .plan import SamplingPlan, SamplingRequest
from .registry import REFERENCE

__all__ = ["MSDDAStableDiffusion3Pipeline", "MSDDAFluxPipeline", "FLOW_DEFAULTS"]


@dataclass(frozen=True, kw_only=True)
class SD3PromptRequest(PromptRequest):
    """SD3's prompt arguments: three text encoders' prompts and pooled embeddings."""

    prompt_2: str | list[str] | None
    prompt_3: str | list[str] | None
    negative_prompt_2: str | list[str] | None
    negative_prompt_3: str | list[str] | None
    pooled_prompt_embeds: Tensor | None
    negative_pooled_prompt_embeds: Tensor | None
    max_sequence_length: int


@dataclass(frozen=True, kw_only=True)
class FluxPromptRequest(PromptRequest):
    """FLUX's prompt arguments: the CLIP and T5 prompts, pooled embeddings."""

    prompt_2: str | list[str] | None
    pooled_prompt_embeds: Tensor | None
    max_sequence_length: int


def _null_components(folder) -> list[str]:
    """Components a saved pipeline folder records as absent (``[null, null]``)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return []
    data = json.loads(index.read_text())
    return [k for k, v in data.items() if isinstance(v, list) and v == [None, None]]


class _FlowMixin(_MSDDAMixin):
    """What SD3 and FLUX share beyond the SD body: the transformer, the flow scheduler,
    loading folders saved without text encoders, and refusing another family's base."""

    _backbone_name = "transformer"
    _msdda_schedulers = (FlowMatchEulerDiscreteScheduler,)
    _family = ""  # the family (msdda.sd.families) a base must be
    _timestep_divisor = 1.0  # the transformer reads t / this (FLUX: 1000)
    _packed = False  # the transformer reads 2x2-packed latents (FLUX)
    _max_shift = 1.16  # the dynamic shift's default max_shift (diffusers' per pipeline)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As :meth:`MSDDAStableDiffusionPipeline.from_pretrained`; also refuses a base of
        another model family, and loads components saved as absent (no text encoders) as None."""
        kwargs.setdefault("local_files_only", True)
        folder = pipeline_folder(pretrained_model_name_or_path, cache_dir=kwargs.get("cache_dir"))
        family = detect_family(folder)
        if family != cls._family:
            raise ValueError(
                f"base {str(pretrained_model_name_or_path)!r} is a {family} pipeline; "
                f"{cls.__name__} runs {cls._family} (msdda generate picks the pipeline itself)"
            )
        for name in _null_components(folder):
            kwargs.setdefault(name, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _flow_call(self, prompt_cls: type[PromptRequest], args: Mapping[str, Any]) -> Any:
        """``__call__``'s arguments (its ``locals()``) as the shared body takes them: the noise
        level plays DDIM's eta (0: deterministic), with the step rule beside it."""

        def pick(cls, **extra):
            return cls(**{f.name: args[f.name] for f in fields(cls) if f.name in args}, **extra)

        sampling = pick(
            SamplingRequest,
            eta=args["noise_level"],
            expert_etas=args["expert_noise_levels"],
            guidance_rescale=0.0,
        )
        return self._generate(pick(prompt_cls), sampling, pick(OutputRequest))

    def _schedule(self, plan: SamplingPlan, x_T: Tensor) -> Schedule:
        """The call's flow schedule: the scheduler's sigmas for ``plan.num_inference_steps``,
        shifted by ``mu`` from the latents' size when the scheduler shifts dynamically."""
        return Schedule.from_scheduler(
            self.scheduler, plan.num_inference_steps, **self._timestep_kwargs(plan, x_T)
        )

    def _image_seq_len(self, x_T: Tensor) -> int:
        h, w = x_T.shape[-2:]
        return (h // 2) * (w // 2)

    def _timestep_kwargs(self, plan: SamplingPlan, x_T: Tensor) -> dict:
        if not self.scheduler.config.get("use_dynamic_shifting", False):
            return {}
        cfg = self.scheduler.config
        mu = calculate_shift(
            self._image_seq_len(x_T),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", self._max_shift),
        )
        return {"mu": mu}

    def _latents_dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The (C, h, w) of the chain's latents for ``height`` x ``width`` images."""
        f = self.vae_scale_factor
        return self.transformer.config.in_channels, int(height) // f, int(width) // f

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
        """As the SD pipelines'; the transformer reads the schedule's timesteps, so without
        ``schedule`` the call's own for this image size is used."""
        if schedule is None:
            shape = self._latent_shape(height, width)
            schedule = self._schedule(plan, torch.zeros((1, *shape)))
        return super().encode_conditioning(
            prompts, plan=plan, names=names, height=height, width=width, schedule=schedule
        )

    def _conditioning(
        self,
        plan: SamplingPlan,
        encode: Callable[[], TransformerConditioning],
        names: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> SDConditioning:
        """The shared conditioning, with each member's distilled guidance value where the
        transformer reads one (FLUX-dev)."""
        cond = super()._conditioning(plan, encode, names, prompts)
        if not self.transformer.config.get("guidance_embeds", False):
            return cond
        count = len(self.expert_names if names is None else names)
        return with_member_guidance(cond, plan.guidance, range(count))

    def _conditioning_of(
        self, batched: dict[str, Tensor], cfg: bool, schedule: Schedule, **shared: Tensor
    ) -> TransformerConditioning:
        return TransformerConditioning(
            batched,
            cfg,
            schedule.model_timesteps,
            shared,
            timestep_divisor=self._timestep_divisor,
            packed=self._packed,
        )

    def _decode(self, x0: Tensor, output_type: str, generator, device) -> tuple:
        """(images,) as the diffusers pipeline returns them: the VAE decode of
        x0 / scaling_factor + shift_factor."""
        if output_type == "latent":
            return (x0,)
        cfg = self.vae.config
        latents = x0.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (self.image_processor.postprocess(image, output_type=output_type),)


class MSDDAStableDiffusion3Pipeline(_FlowMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 with MSDDA: K experts' flow steps fused in closed form.

    Build with :meth:`from_pretrained` (``experts={name: path or hub id}``: full
    transformers, or LoRAs such as Flow-GRPO's peft folders), call with ``weights``. The
    base transformer is the reference p_ref when the fusion needs one.
    """

    _diffusers_class = StableDiffusion3Pipeline
    _output_class = StableDiffusion3PipelineOutput
    _family = "sd3"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 4.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        noise_level: float = FLOW_DEFAULTS["noise_level"],
        step_rule: str = FLOW_DEFAULTS["step_rule"],
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
        expert_noise_levels: Mapping[str, float] | None = None,
        expert_guidance_scales: Mapping[str, float] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        callback: Callable[[int, int, Tensor], None] | None = None,
        method: str = "msdda",
        rewards: Sequence[Callable[[Tensor, Any], Tensor]] | None = None,
        oracle: Any = None,
        method_settings: MethodSettings | None = None,
    ):
        """Generate images from the experts' fused flow steps (or another method's).

        Args:
            prompt ... max_sequence_length: as in ``StableDiffusion3Pipeline``.
            weights, kl_coefs, kl_coef, reference, method, rewards, oracle, method_settings:
                as in :meth:`msdda.sd.MSDDAStableDiffusionPipeline.__call__`.
            guidance_scale: classifier-free guidance of each expert's velocity (> 1 enables
                it); ``expert_guidance_scales`` overrides per expert (``"base"``: the reference).
            noise_level: the stochastic sampler's noise level a (Flow-GRPO: 0.7; 0 is the
                deterministic ODE step, which MSDDA cannot fuse); ``expert_noise_levels``
                overrides per expert: experts trained at other noise levels have other
                variances, and are weighted by precision.
            step_rule: the sampler the experts were trained with: ``"sde"`` (Flow-GRPO),
                ``"cps"`` (coefficients-preserving; noise_level <= 1) or ``"dance"`` (DanceGRPO).
            callback: called as ``callback(i, t, latents)`` after every step (t: the loop's key).

        Returns:
            ``StableDiffusion3PipelineOutput`` with ``.images``, or a tuple.
        """
        return self._flow_call(SD3PromptRequest, locals())

    # ---------------------------------------------------------------- hooks
    def _prompt_request(self, prompts: list[str]) -> SD3PromptRequest:
        """Per-sample prompts, one image each, as a call's prompt arguments."""
        return SD3PromptRequest(
            prompt=prompts, negative_prompt=None, prompt_embeds=None,
            negative_prompt_embeds=None, num_images_per_prompt=1, clip_skip=None,
            prompt_2=None, prompt_3=None, negative_prompt_2=None, negative_prompt_3=None,
            pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
            max_sequence_length=256,
        )  # fmt: skip

    def _default_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _check_prompt(self, p: SD3PromptRequest, height: int, width: int) -> None:
        self.check_inputs(
            p.prompt, p.prompt_2, p.prompt_3, height, width, p.negative_prompt,
            p.negative_prompt_2, p.negative_prompt_3, p.prompt_embeds, p.negative_prompt_embeds,
            p.pooled_prompt_embeds, p.negative_pooled_prompt_embeds,
            max_sequence_length=p.max_sequence_length,
        )  # fmt: skip

    def _initial_latents(self, prompt: PromptRequest, height: int, width: int, device, out):
        return self.prepare_latents(
            prompt.num_images,
            self.transformer.config.in_channels,
            height,
            width,
            self._latents_dtype(),
            device,
            out.generator,
            out.latents,
        )

    def _image_seq_len(self, x_T: Tensor) -> int:
        p = self.transformer.config.patch_size
        return (x_T.shape[-2] // p) * (x_T.shape[-1] // p)

    def _encode(
        self, p: SD3PromptRequest, cfg: bool, device, height: int, width: int, schedule: Schedule
    ) -> TransformerConditioning:
        pos, neg, pooled, neg_pooled = self.encode_prompt(
            prompt=p.prompt,
            prompt_2=p.prompt_2,
            prompt_3=p.prompt_3,
            device=device,
            num_images_per_prompt=p.num_images_per_prompt,
            do_classifier_free_guidance=cfg,
            negative_prompt=p.negative_prompt,
            negative_prompt_2=p.negative_prompt_2,
            negative_prompt_3=p.negative_prompt_3,
            prompt_embeds=p.prompt_embeds,
            negative_prompt_embeds=p.negative_prompt_embeds,
            pooled_prompt_embeds=p.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=p.negative_pooled_prompt_embeds,
            clip_skip=p.clip_skip,
            max_sequence_length=p.max_sequence_length,
        )
        if cfg:
            pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        batched = {"encoder_hidden_states": pos.to(device), "pooled_projections": pooled.to(device)}
        return self._conditioning_of(batched, cfg, schedule)


class MSDDAFluxPipeline(_FlowMixin, FluxPipeline):
    """FLUX.1 with MSDDA: K experts' flow steps fused in closed form at every step.

    ``guidance_scale`` is FLUX-dev's distilled guidance value (the transformer's guidance
    embedding; ignored by FLUX-schnell), ``expert_guidance_scales`` sets it per expert: all
    LoRA experts still run in one forward, each group with its own value. There is no
    classifier-free guidance (no negative prompt).
    """

    _diffusers_class = FluxPipeline
    _output_class = FluxPipelineOutput
    _family = "flux"
    _timestep_divisor = 1000.0
    _packed = True
    _max_shift = 1.15

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        noise_level: float = FLOW_DEFAULTS["noise_level"],
        step_rule: str = FLOW_DEFAULTS["step_rule"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        kl_coefs: Mapping[str, float] | None = None,
        kl_coef: float | None = None,
        reference: str | None = REFERENCE,
        expert_noise_levels: Mapping[str, float] | None = None,
        expert_guidance_scales: Mapping[str, float] | None = None,
        max_sequence_length: int = 512,
        callback: Callable[[int, int, Tensor], None] | None = None,
        method: str = "msdda",
        rewards: Sequence[Callable[[Tensor, Any], Tensor]] | None = None,
        oracle: Any = None,
        method_settings: MethodSettings | None = None,
    ):
        """Generate images from the experts' fused flow steps (or another method's).

        Arguments as in :meth:`MSDDAStableDiffusion3Pipeline.__call__` and ``FluxPipeline``,
        except ``guidance_scale``: the distilled guidance value. ``latents`` are packed, as
        ``FluxPipeline`` takes them; ``output_type="latent"`` returns the unpacked
        (B, C, h, w) latents.

        Returns:
            ``FluxPipelineOutput`` with ``.images``, or a tuple.
        """
        no_negative = dict(negative_prompt=None, negative_prompt_embeds=None, clip_skip=None)
        return self._flow_call(FluxPromptRequest, {**locals(), **no_negative})

    # ---------------------------------------------------------------- hooks
    def _prompt_request(self, prompts: list[str]) -> FluxPromptRequest:
        """Per-sample prompts, one image each, as a call's prompt arguments."""
        return FluxPromptRequest(
            prompt=prompts, negative_prompt=None, prompt_embeds=None,
            negative_prompt_embeds=None, num_images_per_prompt=1, clip_skip=None,
            prompt_2=None, pooled_prompt_embeds=None, max_sequence_length=512,
        )  # fmt: skip

    def _default_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _check_prompt(self, p: FluxPromptRequest, height: int, width: int) -> None:
        self.check_inputs(
            p.prompt, p.prompt_2, height, width, prompt_embeds=p.prompt_embeds,
            pooled_prompt_embeds=p.pooled_prompt_embeds, max_sequence_length=p.max_sequence_length,
        )  # fmt: skip

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.vae_scale_factor * 2
        return 2 * (int(height) // s), 2 * (int(width) // s)

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The unpacked (C, h, w) the chain runs on (the transformer reads 4C packed)."""
        return self.transformer.config.in_channels // 4, *self._latent_size(height, width)

    def _initial_latents(self, prompt: PromptRequest, height: int, width: int, device, out):
        """x_T drawn as ``FluxPipeline`` draws it, unpacked to (B, C, h, w)."""
        packed, _ = self.prepare_latents(
            prompt.num_images,
            self.transformer.config.in_channels // 4,
            height,
            width,
            self._latents_dtype(),
            device,
            out.generator,
            out.latents,
        )
        h, w = self._latent_size(height, width)
        return self._unpack_latents(packed, h, w, 1)

    def _encode(
        self, p: FluxPromptRequest, cfg: bool, device, height: int, width: int, schedule: Schedule
    ) -> TransformerConditioning:
        """The T5 and pooled CLIP embeddings, and the text and image position ids."""
        pos, pooled, text_ids = self.encode_prompt(
            prompt=p.prompt,
            prompt_2=p.prompt_2,
            device=device,
            num_images_per_prompt=p.num_images_per_prompt,
            prompt_embeds=p.prompt_embeds,
            pooled_prompt_embeds=p.pooled_prompt_embeds,
            max_sequence_length=p.max_sequence_length,
        )
        h, w = self._latent_size(height, width)
        image_ids = self._prepare_latent_image_ids(pos.shape[0], h // 2, w // 2, device, pos.dtype)
        batched = {"encoder_hidden_states": pos.to(device), "pooled_projections": pooled.to(device)}
        return self._conditioning_of(batched, False, schedule, txt_ids=text_ids, img_ids=image_ids)

    def _timestep_kwargs(self, plan: SamplingPlan, x_T: Tensor) -> dict:
        """FluxPipeline's sigmas: linspace(1, 1/N, N), shifted by ``mu`` from the image size."""
        n = plan.num_inference_steps
        kwargs = super()._timestep_kwargs(plan, x_T)
        if not self.scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
        return kwargs
