"""What the Stable Diffusion app computes, without any web framework.

The pipeline (:func:`msdda.sd.cli.load_pipeline`, the one ``msdda generate --base``
loads) is built once; an :class:`SDRequest` is what the controls say, and
:meth:`SDEngine.run` calls the pipeline for MSDDA and, on a generator seeded alike (the
same initial and step noise), for the chosen baseline. Progress is reported after every
step; a request stops at the next step when ``should_stop()`` says so (a newer request
or the Stop button), with :class:`Cancelled`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..fusion import fusion_coefficients
from ..validation import check_int, check_number, check_positive, check_seed
from .common import refusal

__all__ = ["SD_BASELINES", "MAX_SD_SAMPLES", "SDRequest", "SDOutcome", "SDEngine", "Cancelled"]

#: Baselines the side-by-side view runs on MSDDA's noise ("none": MSDDA alone).
SD_BASELINES: tuple[str, ...] = ("none", "db", "rs", "base")

#: The most images one request draws.
MAX_SD_SAMPLES = 16

#: ``progress(fraction done, description)``
Progress = Callable[[float, str], None]


class Cancelled(Exception):
    """A request stopped before its end (superseded by a newer one, or the Stop button)."""


@dataclass(frozen=True)
class SDRequest:
    """What the controls of the Stable Diffusion app say."""

    prompt: str
    weights: tuple[float, ...]  # w_i >= 0, one per expert in the pipeline's order
    negative_prompt: str = ""
    kl_coef: float = 1.0  # target beta (the experts' beta_i are 1)
    steps: int = 25  # DDIM steps
    guidance_scale: float = 7.5  # classifier-free guidance of every model
    size: int = 512  # image height = width, pixels (a multiple of 8)
    eta: float = 1.0  # DDIM eta (> 0 to fuse)
    num_samples: int = 1
    seed: int = 0  # seeds the CPU generator of the initial and step noise
    baseline: str = "none"  # a method of SD_BASELINES run on the same noise

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-empty text")
        if not isinstance(self.negative_prompt, str):
            raise TypeError("negative_prompt must be a text")
        if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
            raise TypeError(f"weights must be a sequence of numbers, got {self.weights!r}")
        weights = tuple(
            check_number(w, f"weights[{i}]", low=0.0) for i, w in enumerate(self.weights)
        )
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "kl_coef", check_positive(self.kl_coef, "kl_coef"))
        check_int(self.steps, "steps", low=1, high=1000)
        check_number(self.guidance_scale, "guidance_scale", low=0.0)
        size = check_int(self.size, "size", low=8, high=4096)
        if size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        check_number(self.eta, "eta", low=0.0)
        check_int(self.num_samples, "num_samples", low=1, high=MAX_SD_SAMPLES)
        check_seed(self.seed)
        if self.baseline not in SD_BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(SD_BASELINES)}, got {self.baseline!r}"
            )


@dataclass(frozen=True)
class SDOutcome:
    """What one request produced; pictures are (H, W, 3) uint8 arrays, None when refused."""

    lambdas: dict[str, float]  # lambda_i by expert name and "lambda_0"; {} when refused early
    message: str = ""  # why the request was refused or stopped; "" when it ran
    grid: np.ndarray | None = None
    baseline_grid: np.ndarray | None = None


class SDEngine:
    """A loaded MSDDA Stable Diffusion pipeline behind the app."""

    def __init__(self, pipeline) -> None:
        names = list(getattr(pipeline, "expert_names", []) or [])
        if not names:
            raise ValueError("the pipeline has no experts: load it with experts={name: path}")
        self.pipeline = pipeline
        self.names = names

    @classmethod
    def load(cls, base: str | os.PathLike, experts: Mapping[str, str | os.PathLike]) -> SDEngine:
        """The pipeline ``msdda generate --base BASE --expert NAME=PATH ...`` would load."""
        from ..sd.cli import load_pipeline

        return cls(load_pipeline(base, experts))

    @property
    def default_size(self) -> int:
        """The base UNet's native image side, pixels."""
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    def lambdas(self, request: SDRequest) -> dict[str, float]:
        """lambda_i = w_i / beta (every beta_i is 1) and lambda_0, by expert name."""
        coefs = fusion_coefficients(
            request.weights, [1.0] * len(self.names), request.kl_coef, num_experts=len(self.names)
        )
        return {**dict(zip(self.names, coefs.lambdas, strict=True)), "lambda_0": coefs.lambda0}

    def run(
        self,
        request: SDRequest,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> SDOutcome:
        """MSDDA (and the baseline) for ``request``; a refused or stopped one gives a message."""
        if not isinstance(request, SDRequest):
            raise TypeError(f"request must be an SDRequest, got {type(request).__name__}")
        if len(request.weights) != len(self.names):
            raise ValueError(f"weights must hold one weight per expert {self.names}")
        message = refusal(request.weights)
        if message:
            return SDOutcome({}, message)
        lambdas = self.lambdas(request)
        methods = ["msdda"] + ([request.baseline] if request.baseline != "none" else [])
        grids = []
        try:
            for k, method in enumerate(methods):
                grids.append(self._call(request, method, k, len(methods), progress, should_stop))
        except Cancelled:
            return SDOutcome(lambdas, "Stopped: a newer request or the Stop button ended it.")
        except ValueError as err:
            return SDOutcome(lambdas, f"Refused: {err}")
        return SDOutcome(lambdas, grid=grids[0], baseline_grid=grids[1] if len(grids) > 1 else None)

    def _call(self, request, method, k, n, progress, should_stop) -> np.ndarray:
        from ..sd.cli import image_grid

        def step_done(i: int, t: int, x) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled
            if progress is not None:
                done = (k + (i + 1) / request.steps) / n
                progress(done, f"{method}: step {i + 1} of {request.steps}")

        images = self.pipeline(
            request.prompt,
            dict(zip(self.names, request.weights, strict=True)),
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            height=request.size,
            width=request.size,
            eta=request.eta,
            kl_coef=request.kl_coef,
            num_images_per_prompt=request.num_samples,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="pil",
            callback=step_done,
            method=method,
        ).images
        picture = images[0] if len(images) == 1 else image_grid(images)
        return np.asarray(picture.convert("RGB")).copy()
