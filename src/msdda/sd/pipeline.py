"""MSDDA for Stable Diffusion (1.x/2.x) and SDXL, as diffusers pipelines.

``MSDDAStableDiffusionPipeline`` is a ``StableDiffusionPipeline`` holding, beside its
base model, K experts (full UNets or LoRA adapters of the base). A call fuses the
experts' reverse steps in closed form at every step (:func:`msdda.msdda_step`):

    pipe = MSDDAStableDiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5",
        experts={"dpo": "mhdang/dpo-sd1.5-text2image-v1", "aesthetic": "path/to/lora.safetensors"},
    )
    image = pipe("a lighthouse at dusk", weights={"dpo": 0.5, "aesthetic": 0.5}).images[0]

Per step and expert: the UNet's output with classifier-free guidance (the expert's own
unconditional and conditional predictions), turned into N(mean, variance) by
:func:`msdda.step_gaussian` under the pipeline's DDIM (eta > 0) or DDPM scheduler,
then fused in float32 by the core; :func:`msdda.sample_chain` draws the next latent.
LoRA experts of the base run as one batched UNet forward (see :mod:`msdda.sd.lora`).

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
import shutil
import tempfile
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
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..experts import msdda_step
from ..fusion import Gaussian, fusion_coefficients
from ..gaussians import Schedule, StepSpec, step_gaussian
from ..sampling import sample_chain
from .registry import REFERENCE, ExpertRegistry

__all__ = [
    "MSDDAStableDiffusionPipeline",
    "MSDDAStableDiffusionXLPipeline",
    "UNetConditioning",
    "GeneratorNoise",
    "OUTPUT_TYPES",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: The ``__call__`` arguments, common to both pipelines, that choose the fusion: those of
#: ``_MSDDAMixin._fusion_plan``.
_FUSION_ARGS = (
    "weights",
    "num_inference_steps",
    "guidance_scale",
    "eta",
    "kl_coefs",
    "kl_coef",
    "reference",
    "expert_etas",
    "expert_guidance_scales",
)

#: diffusers' DDPM variance types as the core names them.
_DDPM_VARIANCE = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


@dataclass(frozen=True)
class UNetConditioning:
    """What the UNet needs beside (x_t, t) for one model's group of the batch.

    ``encoder_hidden_states`` (G, L, D) and every ``added_cond_kwargs`` tensor (G, ...)
    hold the B unconditional rows then the B conditional rows when ``cfg``, else B rows.
    """

    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None
    cfg: bool


def _concat(conds: Sequence[UNetConditioning]) -> UNetConditioning:
    ehs = torch.cat([c.encoder_hidden_states for c in conds])
    added = None
    if conds[0].added_cond_kwargs is not None:
        added = {
            k: torch.cat([c.added_cond_kwargs[k] for c in conds])
            for k in conds[0].added_cond_kwargs
        }
    return UNetConditioning(ehs, added, conds[0].cfg)


@dataclass(frozen=True)
class _FusionPlan:
    """A call's checked fusion arguments: who contributes, with which step and guidance."""

    weights: list[float]  # w_i, in expert order
    kl_coefs: list[float] | None  # beta_i, or None: all equal
    kl_coef: float | None  # target beta
    active: tuple[int, ...]  # experts with lambda_i != 0
    need_ref: bool  # lambda_0 != 0: the base UNet is the reference
    contributors: tuple[str, ...]  # active experts' names, then "base" when need_ref
    specs: dict[str, StepSpec]  # each contributor's step (prediction type, eta)
    guidance: dict[str, float]  # classifier-free guidance scale per model
    num_inference_steps: int  # reverse steps of the scheduler

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on when a contributor's scale exceeds 1."""
        return max(self.guidance[m] for m in self.contributors) > 1.0


class GeneratorNoise:
    """Step noise drawn as diffusers' schedulers draw it, from the pipeline's generator(s).

    ``randn_tensor(shape, generator, device, dtype)`` with the UNet's dtype, so a run
    with one expert sees exactly the noise ``StableDiffusionPipeline`` would; returned in
    the latents' dtype.
    """

    def __init__(self, generator, device: torch.device, dtype: torch.dtype) -> None:
        self.generator = generator
        self.device = device
        self.dtype = dtype

    def __call__(self, step_index: int, like: Tensor) -> Tensor:
        z = randn_tensor(
            tuple(like.shape), generator=self.generator, device=self.device, dtype=self.dtype
        )
        return z.to(like.dtype)


def _as_number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what} must be a number, got {v!r}")
    return float(v)


class _MSDDAMixin:
    """Expert management and the fused sampling loop shared by the SD and SDXL pipelines."""

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
        try:
            pipe = super().from_pretrained(base, **kwargs)
        except OSError as err:
            raise ValueError(
                f"could not load the base pipeline {base!r} offline: {err}. Pass a local folder, "
                f"or download it first with `hf download {base}`"
            ) from err
        if not isinstance(pipe.scheduler, (DDIMScheduler, DDPMScheduler)):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.lora_mode = lora_mode
        folder = Path(base)
        if not folder.is_dir():
            from .loading import resolve_hub_id

            folder = resolve_hub_id(base, cache_dir=kwargs.get("cache_dir"))
        saved = ExpertRegistry.read_manifest(folder)
        if saved is not None:
            pipe.load_experts(saved[0])
            if lora_mode == "auto":
                pipe.lora_mode = saved[1]
        if experts:
            pipe.load_experts(experts, cache_dir=kwargs.get("cache_dir"))
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the base as a standard diffusers folder, plus every expert and a manifest.

        Written to a temporary folder first and moved into place, so nothing is left
        half-written. ``from_pretrained(save_directory)`` loads the experts back.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(tmp, **kwargs)
            index = tmp / "model_index.json"
            data = json.loads(index.read_text())
            data["_class_name"] = self._diffusers_class.__name__
            index.write_text(json.dumps(data, indent=2, sort_keys=True))
            self.msdda_experts.save(self, tmp)
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self.msdda_experts.to(self.unet.device, self.unet.dtype)
        return self

    # ---------------------------------------------------------- arguments
    def _weights(self, weights) -> list[float]:
        names = self.expert_names
        if not names:
            raise ValueError(
                "the pipeline has no experts: load some with from_pretrained(experts=...)"
            )
        if weights is None:
            if len(names) == 1:
                return [1.0]
            raise ValueError(
                f"weights is required with {len(names)} experts: give {{name: weight}} for {names}"
            )
        if isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in names]
            if unknown:
                raise ValueError(
                    f"weights names unknown expert(s) {unknown}; the experts are {names}"
                )
            out = []
            for n in names:
                v = _as_number(weights.get(n, 0.0), f"weights[{n!r}]")
                if not (v >= 0 and v < float("inf")):
                    raise ValueError(f"weights[{n!r}] = {v} must be a non-negative finite number")
                out.append(v)
            return out
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(
                f"weights must be a mapping {{name: weight}} or a sequence, got {type(weights).__name__}"
            )
        if len(weights) != len(names):
            raise ValueError(
                f"weights has {len(weights)} entries for {len(names)} experts {names}; give one per "
                "expert, or a mapping {name: weight}"
            )
        return [_as_number(v, f"weights[{i}]") for i, v in enumerate(weights)]

    def _per_expert(self, values, default: float, what: str) -> dict[str, float]:
        names = self.expert_names
        out = {n: default for n in [*names, REFERENCE]}
        if values is None:
            return out
        if not isinstance(values, Mapping):
            raise TypeError(
                f"{what} must be a mapping {{expert name: value}}, got {type(values).__name__}"
            )
        for k, v in values.items():
            if k not in out:
                raise ValueError(f"{what} names unknown expert {k!r}; the experts are {names}")
            out[k] = _as_number(v, f"{what}[{k!r}]")
        return out

    def _kl_coefs(self, kl_coefs, weights: list[float]) -> list[float] | None:
        names = self.expert_names
        if kl_coefs is None:
            return None
        if not isinstance(kl_coefs, Mapping):
            if isinstance(kl_coefs, Sequence) and not isinstance(kl_coefs, (str, bytes)):
                if len(kl_coefs) != len(names):
                    raise ValueError(
                        f"kl_coefs has {len(kl_coefs)} entries for {len(names)} experts"
                    )
                return [_as_number(v, f"kl_coefs[{i}]") for i, v in enumerate(kl_coefs)]
            raise TypeError(
                f"kl_coefs must be a mapping {{name: beta}}, got {type(kl_coefs).__name__}"
            )
        unknown = [k for k in kl_coefs if k not in names]
        if unknown:
            raise ValueError(f"kl_coefs names unknown expert(s) {unknown}; the experts are {names}")
        out = []
        for n, w in zip(names, weights, strict=True):
            if n in kl_coefs:
                out.append(_as_number(kl_coefs[n], f"kl_coefs[{n!r}]"))
            elif w != 0:
                raise ValueError(f"kl_coefs has no entry for expert {n!r} (weight {w})")
            else:
                out.append(1.0)
        return out

    def _step_spec(self, prediction_type: str, eta: float) -> StepSpec:
        if isinstance(self.scheduler, DDPMScheduler):
            vt = self.scheduler.config.variance_type
            if vt not in _DDPM_VARIANCE:
                raise ValueError(f"DDPMScheduler variance_type {vt!r} is not supported")
            return StepSpec(prediction_type, _DDPM_VARIANCE[vt], eta)
        return StepSpec(prediction_type, "fixed_small", eta)

    # -------------------------------------------------------------- models
    def _text_routes(self, member: str) -> list[tuple[Any, int]]:
        """(text bank, slot) pairs that encode prompts for ``member``'s own text encoders."""
        reg = self.msdda_experts
        if member == REFERENCE or reg.get(member).kind != "lora" or not reg.has_text_lora(member):
            return []
        return [(bank, bank.index(member)) for bank in reg.text_banks.values()]

    def _conditioning_for(self, member: str, encode: Callable[[], UNetConditioning], cache: dict):
        routes = self._text_routes(member)
        key = member if routes else REFERENCE
        if key not in cache:
            with ExitStack() as stack:
                for bank, slot in routes:
                    stack.enter_context(bank.route([slot]))
                cache[key] = encode()
        return cache[key]

    def _forward(self, unet, x: Tensor, t: int, conds: Sequence[UNetConditioning], route=None):
        """One UNet forward over len(conds) groups; returns each group's raw output."""
        cond = _concat(conds)
        reps = len(conds) * (2 if cond.cfg else 1)
        x_in = torch.cat([x.to(unet.dtype)] * reps)
        t_in = torch.tensor(int(t), dtype=torch.long, device=x.device)
        with ExitStack() as stack:
            if route is not None:
                stack.enter_context(self.msdda_experts.bank.route(route))
            out = unet(
                x_in,
                t_in,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )[0]
        return list(out.chunk(len(conds)))

    def _member_outputs(
        self,
        members: Sequence[str],
        x: Tensor,
        t: int,
        conds: Mapping[str, UNetConditioning],
        guidance: Mapping[str, float],
        guidance_rescale: float,
    ) -> dict[str, Tensor]:
        """Each member's model output after its own classifier-free guidance."""
        reg = self.msdda_experts
        mode = reg.execution
        shared: list[tuple[str, int | None]] = []  # one batched forward of the base UNet
        alone: list[tuple[str, Any, list[int] | None]] = []  # one forward each
        for m in members:
            if m == REFERENCE:
                shared.append((m, None))
                continue
            e = reg.get(m)
            if e.kind == "unet":
                alone.append((m, e.unet, None))
            elif mode == "batched":
                shared.append((m, reg.bank.index(m)))
            elif mode == "sequential":
                alone.append((m, self.unet, [reg.bank.index(m)]))
            else:
                alone.append((m, reg.merged_unet(self, m), None))
        raw: dict[str, Tensor] = {}
        if shared:
            route = [slot for _, slot in shared]
            route = None if all(s is None for s in route) else route
            outs = self._forward(self.unet, x, t, [conds[m] for m, _ in shared], route)
            raw.update({m: o for (m, _), o in zip(shared, outs, strict=True)})
        for m, unet, route in alone:
            raw[m] = self._forward(unet, x, t, [conds[m]], route)[0]
        result = {}
        for m in members:
            out = raw[m]
            if conds[m].cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance[m] * (cond - uncond)
                if guidance_rescale > 0:
                    out = rescale_noise_cfg(out, cond, guidance_rescale=guidance_rescale)
            result[m] = out
        return result

    # ------------------------------------------------------------ sampling
    def _fusion_plan(
        self,
        *,
        weights,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        kl_coefs,
        kl_coef: float | None,
        reference: str | None,
        expert_etas,
        expert_guidance_scales,
    ) -> _FusionPlan:
        """Check a call's fusion arguments and work out who contributes, with what step."""
        names = self.expert_names
        w = self._weights(weights)
        gs = _as_number(guidance_scale, "guidance_scale")
        eta = _as_number(eta, "eta")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        etas = self._per_expert(expert_etas, eta, "expert_etas")
        if any(v < 0 for v in etas.values()):
            raise ValueError(f"expert_etas must be >= 0, got {expert_etas}")
        guidance = self._per_expert(expert_guidance_scales, gs, "expert_guidance_scales")
        betas = self._kl_coefs(kl_coefs, w)
        if reference not in (REFERENCE, None):
            raise ValueError(
                f"reference must be {REFERENCE!r} (the base UNet) or None, got {reference!r}"
            )
        if not isinstance(self.scheduler, (DDIMScheduler, DDPMScheduler)):
            raise TypeError(
                "the scheduler must be a DDIMScheduler or DDPMScheduler, got "
                f"{type(self.scheduler).__name__}"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive int, got {num_inference_steps!r}"
            )
        coefs = fusion_coefficients(w, betas, kl_coef, num_experts=len(names))
        active = tuple(i for i, lam in enumerate(coefs.lambdas) if lam != 0.0)
        need_ref = coefs.lambda0 != 0.0
        if need_ref and reference is None:
            raise ValueError(
                f"lambda_0 = {coefs.lambda0:.6g} != 0 (weights off the simplex or kl_coef differing "
                "from the experts'), which needs the reference model: pass reference='base'"
            )
        contributors = tuple(names[i] for i in active) + ((REFERENCE,) if need_ref else ())
        if isinstance(self.scheduler, DDIMScheduler) and len(contributors) > 1:
            zero = [m for m in contributors if etas[m] == 0]
            if zero:
                raise ValueError(
                    f"eta = 0 (for {zero}) makes every DDIM step deterministic (variance 0), so the "
                    f"steps of {list(contributors)} cannot be fused; use eta > 0 (eta = 1 is DDPM-like)"
                )
        base_pred = self.scheduler.config.get("prediction_type", "epsilon")
        specs = {
            m: self._step_spec(
                base_pred if m == REFERENCE else self.msdda_experts.get(m).prediction_type, etas[m]
            )
            for m in contributors
        }
        return _FusionPlan(
            w, betas, kl_coef, active, need_ref, contributors, specs, guidance, num_inference_steps
        )

    def _plan_call(self, call_args: Mapping[str, Any]) -> _FusionPlan:
        """:meth:`_fusion_plan` of a ``__call__``'s arguments, read by name from its ``locals()``."""
        return self._fusion_plan(**{k: call_args[k] for k in _FUSION_ARGS})

    def _run_chain(
        self,
        plan: _FusionPlan,
        x_T: Tensor,
        encode: Callable[[], UNetConditioning],
        generator,
        guidance_rescale: float,
        callback: Callable[[int, int, Tensor], None] | None,
    ) -> Tensor:
        """The fused reverse chain from ``x_T`` (B, C, h, w), with a progress bar.

        ``encode()`` gives the prompt's conditioning through the text encoders as they
        stand (called once per distinct set of text adapters). Returns the final latents
        (B, C, h, w), float32.
        """
        names = self.expert_names
        schedule = Schedule.from_scheduler(self.scheduler, plan.num_inference_steps)
        cache: dict[str, UNetConditioning] = {}
        conds = {m: self._conditioning_for(m, encode, cache) for m in plan.contributors}
        ref_tail = [REFERENCE] if plan.need_ref else []
        stash: dict[str, Any] = {}

        def evaluate(members: Sequence[str], x_t: Tensor, t: int) -> dict[str, Gaussian]:
            outs = self._member_outputs(members, x_t, t, conds, plan.guidance, guidance_rescale)
            return {m: step_gaussian(outs[m], x_t, t, schedule, plan.specs[m]) for m in members}

        def joint(x_t: Tensor, t: int, active_idx: Sequence[int]) -> list[Gaussian]:
            """The active experts' steps, and the reference's, from one evaluation."""
            g = evaluate([names[i] for i in active_idx] + ref_tail, x_t, t)
            if plan.need_ref:
                stash["ref"] = (x_t, t, g[REFERENCE])
            return [g[names[i]] for i in active_idx]

        def reference_step(x_t: Tensor, t: int) -> Gaussian:
            hit = stash.pop("ref", None)
            if hit is not None and hit[0] is x_t and hit[1] == t:
                return hit[2]
            return evaluate([REFERENCE], x_t, t)[REFERENCE]

        if len(plan.contributors) == 1:  # lambda = 1: its own step, nothing to fuse
            if plan.need_ref:
                policy = reference_step
            else:

                def policy(x_t: Tensor, t: int) -> Gaussian:
                    return joint(x_t, t, plan.active)[0]

        else:
            policy = msdda_step(
                joint,
                plan.weights,
                kl_coefs=plan.kl_coefs,
                kl_coef=plan.kl_coef,
                reference=reference_step if plan.need_ref else None,
                num_experts=len(names),
            )
        noise = GeneratorNoise(generator, x_T.device, self.unet.dtype)
        bar, step_done = self._progress(plan.num_inference_steps, callback)
        with bar, torch.no_grad():
            return sample_chain(policy, x_T.float(), schedule.timesteps, noise, callback=step_done)

    def _check_common(self, output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("guidance-distilled UNets (time_cond_proj_dim) are not supported")

    def _progress(self, n: int, callback):
        """A progress bar over ``n`` steps, and a step callback that advances it, then calls
        ``callback`` (if any)."""
        bar = self.progress_bar(total=n)

        def step_done(i: int, t: int, x: Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i, t, x)

        return bar, step_done

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: Tensor | None) -> int:
        """Prompts in the call: one string, a list, or the rows of ``prompt_embeds``."""
        if isinstance(prompt, str):
            return 1
        if prompt is not None:
            return len(prompt)
        return prompt_embeds.shape[0]


class MSDDAStableDiffusionPipeline(_MSDDAMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with MSDDA: K experts fused in closed form at every step.

    Build with :meth:`from_pretrained` (``experts={name: path or hub id}``), call with
    ``weights={name: w}``. The base UNet plays the reference model p_ref when the
    fusion needs one (weights off the simplex, or ``kl_coef`` differing from the
    experts' ``kl_coefs``).
    """

    _diffusers_class = StableDiffusionPipeline

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
    ):
        """Generate images from the experts' fused steps.

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
            eta: DDIM eta (> 0 required when more than one model contributes);
                ``expert_etas`` overrides per expert, giving distinct variances.
            kl_coefs, kl_coef: the experts' KL coefficients beta_i and the target beta:
                lambda_i = w_i beta_i / beta, lambda_0 = 1 - sum lambda_i.
            reference: ``"base"``: the base UNet is p_ref when lambda_0 != 0; None forbids it.
            callback: called as ``callback(i, t, latents)`` after every step.

        Returns:
            ``StableDiffusionPipelineOutput`` with ``.images`` (PIL list, (B, H, W, 3) array,
            (B, 3, H, W) tensor in [0, 1], or float32 latents), or a tuple.
        """
        self._check_common(output_type)
        if not height or not width:
            size = self.unet.config.sample_size
            size = size if isinstance(size, int) else size[0]
            height = height or size * self.vae_scale_factor
            width = width or size * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        num_images = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        plan = self._plan_call(locals())
        cfg = plan.cfg

        def encode() -> UNetConditioning:
            pos, neg = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                cfg,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                clip_skip=clip_skip,
            )
            return UNetConditioning(torch.cat([neg, pos]) if cfg else pos, None, cfg)

        x_T = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype,
            device,
            generator,
            latents,
        )
        x0 = self._run_chain(plan, x_T, encode, generator, guidance_rescale, callback)
        if output_type == "latent":
            image, nsfw = x0, None
        else:
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
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nsfw)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


class MSDDAStableDiffusionXLPipeline(_MSDDAMixin, StableDiffusionXLPipeline):
    """SDXL with MSDDA: as :class:`MSDDAStableDiffusionPipeline`, with SDXL's two text
    encoders and micro-conditioning (``original_size``, ``crops_coords_top_left``,
    ``target_size``)."""

    _diffusers_class = StableDiffusionXLPipeline

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
    ):
        """Generate images from the experts' fused steps; arguments as in
        :meth:`MSDDAStableDiffusionPipeline.__call__` and ``StableDiffusionXLPipeline``.

        Returns:
            ``StableDiffusionXLPipelineOutput`` with ``.images``, or a tuple.
        """
        self._check_common(output_type)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            None,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        num_images = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        plan = self._plan_call(locals())
        cfg = plan.cfg

        def encode() -> UNetConditioning:
            pos, neg, pooled, neg_pooled = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                clip_skip=clip_skip,
            )
            proj = (
                int(pooled.shape[-1])
                if self.text_encoder_2 is None
                else self.text_encoder_2.config.projection_dim
            )
            time_ids = self._get_add_time_ids(
                original_size,
                crops_coords_top_left,
                target_size,
                dtype=pos.dtype,
                text_encoder_projection_dim=proj,
            )
            if cfg:
                pos = torch.cat([neg, pos])
                pooled = torch.cat([neg_pooled, pooled])
                time_ids = torch.cat([time_ids, time_ids])
            added = {
                "text_embeds": pooled.to(device),
                "time_ids": time_ids.to(device).repeat(num_images, 1),
            }
            return UNetConditioning(pos.to(device), added, cfg)

        x_T = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            self.unet.dtype,
            device,
            generator,
            latents,
        )
        x0 = self._run_chain(plan, x_T, encode, generator, guidance_rescale, callback)
        if output_type == "latent":
            image = x0
        else:
            image = self._decode_xl(x0)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

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
