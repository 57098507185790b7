"""What the digits app computes, without any web framework: one request in, one outcome out.

A :class:`DigitsRequest` is what the controls say (a digit, one preference weight per
objective, the target KL coefficient, the experts' variance kind, how many images, the
seed, an optional baseline). :meth:`DigitsEngine.run` samples MSDDA, and the baseline on
the same per-sample noise, through the methods registry's one call
(:func:`msdda.methods.run_method`), measures the objectives on the batch, and draws the
batch's point over the precomputed front of ``msdda demo``. A setting the mathematics
refuses (every weight 0, an extrapolation too strong for the experts' variances) comes
back as :attr:`DigitsOutcome.message`, never as an exception.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..digits.bundle import DigitsBundle
from ..digits.data import check_prompts, decode
from ..digits.demo import DemoConfig, evaluate_images, run_demo
from ..digits.plots import image_grid, save_pareto_plot
from ..digits.sampling import method_context, torch_threads
from ..digits.store import check_expert_kind
from ..errors import InputFileError, reading
from ..fusion import FusionCoefficients, simplex_form
from ..methods import run_method
from ..validation import check_int, check_number, check_positive, check_seed
from .common import refusal

__all__ = [
    "OBJECTIVES",
    "BASELINES",
    "MAX_APP_SAMPLES",
    "DigitsRequest",
    "DigitsOutcome",
    "DigitsEngine",
    "grid_picture",
    "read_demo_front",
]

#: The shipped objectives, one slider each (K = 3), in weight order.
OBJECTIVES: tuple[str, ...] = ("legibility", "boldness", "symmetry")

#: Baselines the side-by-side view runs on MSDDA's noise ("none": MSDDA alone).
BASELINES: tuple[str, ...] = ("none", "db", "rs", "base")

#: The most images one request draws.
MAX_APP_SAMPLES = 256

#: The demo's front is drawn on these two objectives (the demo sweeps between them).
FRONT_AXES: tuple[str, str] = ("legibility", "boldness")


@dataclass(frozen=True)
class DigitsRequest:
    """What the controls of the digits app say."""

    digit: int  # the prompt, 0-9
    weights: tuple[float, ...]  # w_i >= 0, one per objective of OBJECTIVES
    kl_coef: float = 1.0  # target beta: lambda_i = w_i beta_i / beta
    expert_kind: str = "fixed"  # experts' variance: "fixed" or "learned"
    num_samples: int = 16  # images of the digit
    seed: int = 0  # noise seed (per-sample seeds derived from it and the digit)
    baseline: str = "none"  # a method of BASELINES run on the same noise

    def __post_init__(self) -> None:
        check_prompts(self.digit, "digit")
        object.__setattr__(self, "digit", int(self.digit))
        if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
            raise TypeError(f"weights must be {len(OBJECTIVES)} numbers, got {self.weights!r}")
        if len(self.weights) != len(OBJECTIVES):
            raise ValueError(
                f"weights must hold one weight per objective {list(OBJECTIVES)}, "
                f"got {len(self.weights)}"
            )
        weights = tuple(
            check_number(w, f"weight of {n!r}", low=0.0)
            for n, w in zip(OBJECTIVES, self.weights, strict=True)
        )
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "kl_coef", check_positive(self.kl_coef, "kl_coef"))
        check_expert_kind(self.expert_kind, "expert_kind")
        check_int(self.num_samples, "num_samples", low=1, high=MAX_APP_SAMPLES)
        check_seed(self.seed)
        if self.baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}"
            )

    @property
    def named_weights(self) -> dict[str, float]:
        return dict(zip(OBJECTIVES, self.weights, strict=True))


@dataclass(frozen=True)
class DigitsOutcome:
    """What one request produced. Pictures are (H, W, 3) uint8 arrays, None when refused."""

    lambdas: dict[str, float]  # lambda_i by objective and "lambda_0" (the reference); {} if refused
    message: str = ""  # why the setting was refused; "" when it ran
    grid: np.ndarray | None = None  # MSDDA's images
    baseline_grid: np.ndarray | None = None  # the baseline's images on the same noise
    front: np.ndarray | None = None  # the batch's point over the demo's front
    rewards: dict[str, float] = field(default_factory=dict)  # MSDDA: mean standardised rewards
    baseline_rewards: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # MSDDA's sampling time

    @property
    def refused(self) -> bool:
        return bool(self.message)


def grid_picture(images: torch.Tensor, scale: int = 6, ncols: int | None = None) -> np.ndarray:
    """(N, 1, h, w) images in [0, 1] tiled (:func:`msdda.digits.plots.image_grid`), each
    pixel ``scale`` x ``scale``: an (H, W, 3) uint8 array."""
    n = int(images.shape[0])
    grid = image_grid(images, ncols or math.ceil(math.sqrt(n)))
    big = np.kron(np.clip(grid, 0.0, 1.0), np.ones((scale, scale), dtype=np.float32))
    return np.repeat((big * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def _picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def read_demo_front(path: str | Path) -> dict[str, list[tuple[float, float, float]]]:
    """The MSDDA rows of a ``msdda demo`` results.json: {kind: [(w, x, y) on FRONT_AXES]}.

    Raises:
        InputFileError: naming the file when it is missing, unreadable, not JSON, or not a
            demo's results.
    """
    path = Path(path)
    with reading(path, "demo results file (results.json of msdda demo)"):
        raw = path.read_bytes()
    x, y = FRONT_AXES
    try:
        payload = json.loads(raw.decode("utf-8"))
        kind = check_expert_kind(payload["config"]["expert_kind"], "config.expert_kind")
        rows = [
            (
                check_number(r["weight"], "weight"),
                check_number(r["rewards"][x], x),
                check_number(r["rewards"][y], y),
            )
            for r in payload["rows"]
            if r["method"] == "msdda"
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputFileError(path, f"not the results.json of msdda demo ({err!r})") from None
    if not rows:
        raise InputFileError(path, "holds no MSDDA rows (not the results.json of msdda demo)")
    return {kind: rows}


class DigitsEngine:
    """The shipped digits models behind the app (one bundle, loaded once).

    ``front_samples``: images per digit and weight of the demo front computed for an
    expert kind the first time it is asked for (0: no front); ``fronts`` overrides it with
    precomputed fronts ({kind: [(w, legibility, boldness)]}, :func:`read_demo_front`).
    """

    def __init__(
        self,
        bundle: DigitsBundle,
        *,
        front_samples: int = 20,
        fronts: Mapping[str, list[tuple[float, float, float]]] | None = None,
        threads: int | None = 1,
    ) -> None:
        if not isinstance(bundle, DigitsBundle):
            raise TypeError(f"bundle must be a DigitsBundle, got {type(bundle).__name__}")
        self.bundle = bundle
        self.front_samples = check_int(front_samples, "front_samples", low=0, high=10_000)
        self.threads = threads
        self._fronts: dict[str, list[tuple[float, float, float]]] = dict(fronts or {})
        for name in OBJECTIVES:
            for kind in ("fixed", "learned"):
                bundle.expert(name, kind)  # say now what is missing, not at the first request

    def coefficients(self, request: DigitsRequest) -> FusionCoefficients:
        """lambda_i = w_i beta_i / beta and lambda_0 for the request's sliders."""
        ctx = method_context(self.bundle, OBJECTIVES, request.expert_kind, kl_coef=request.kl_coef)
        return ctx.coefficients(request.weights)

    def front(self, kind: str) -> list[tuple[float, float, float]]:
        """The demo's front for ``kind``: (w on legibility, legibility, boldness) per weight."""
        if kind not in self._fronts and self.front_samples > 0:
            cfg = DemoConfig(samples_per_prompt=self.front_samples, expert_kind=kind, compare=False)
            with (
                tempfile.TemporaryDirectory(prefix="msdda-app-") as tmp,
                torch_threads(self.threads),
            ):
                rows = run_demo(self.bundle, cfg, Path(tmp))
            x, y = FRONT_AXES
            self._fronts[kind] = [(r.weight, r.rewards[x], r.rewards[y]) for r in rows]
        return self._fronts.get(kind, [])

    def run(self, request: DigitsRequest) -> DigitsOutcome:
        """MSDDA (and the baseline) for ``request``; a refused setting gives a message."""
        if not isinstance(request, DigitsRequest):
            raise TypeError(f"request must be a DigitsRequest, got {type(request).__name__}")
        message = refusal(request.weights)
        if message:
            return DigitsOutcome({}, message)
        coefs = self.coefficients(request)
        lambdas = {**dict(zip(OBJECTIVES, coefs.lambdas, strict=True)), "lambda_0": coefs.lambda0}
        try:
            with torch_threads(self.threads):
                images, seconds, rewards = self._sample("msdda", request)
                other = (None, 0.0, {})
                if request.baseline != "none":
                    other = self._sample(request.baseline, request)
        except ValueError as err:  # the core refuses the setting (e.g. precision <= 0)
            return DigitsOutcome(lambdas, f"Refused: {err}")
        return DigitsOutcome(
            lambdas,
            grid=grid_picture(images),
            baseline_grid=None if other[0] is None else grid_picture(other[0]),
            front=self._front_picture(request, rewards, other[2]),
            rewards=rewards,
            baseline_rewards=other[2],
            seconds=seconds,
        )

    def _sample(self, method: str, request: DigitsRequest):
        """(images in [0, 1], seconds, mean standardised rewards) of one method."""
        from ..evaluation.units import sample_seeds

        weights, kl_coef = simplex_form(request.weights, request.kl_coef)
        ctx = method_context(self.bundle, OBJECTIVES, request.expert_kind, kl_coef=kl_coef)
        seeds = sample_seeds(request.seed, request.digit, request.num_samples)
        cond = torch.full((request.num_samples,), request.digit, dtype=torch.long)
        run = run_method(method, ctx, None if method == "base" else weights, cond, seeds)
        images = decode(run.samples)
        rewards, _, _ = evaluate_images(self.bundle, images, cond)
        return images, run.seconds, rewards

    def _front_picture(self, request, rewards, baseline_rewards) -> np.ndarray | None:
        front = self.front(request.expert_kind)
        x, y = FRONT_AXES
        extra = {f"now: MSDDA, digit {request.digit}": (rewards[x], rewards[y])}
        if baseline_rewards:
            extra[f"now: {request.baseline}"] = (baseline_rewards[x], baseline_rewards[y])
        if not front:
            front = [(float("nan"), rewards[x], rewards[y])]
        with tempfile.TemporaryDirectory(prefix="msdda-app-") as tmp:
            path = Path(tmp) / "front.png"
            save_pareto_plot(
                [p[1] for p in front],
                [p[2] for p in front],
                ["" if math.isnan(p[0]) else f"{p[0]:.1f}" for p in front],
                path,
                xlabel=f"{x} (standardised)",
                ylabel=f"{y} (standardised)",
                title=f"demo front ({request.expert_kind}, all digits; w on {x}) and this batch",
                extra=extra,
            )
            return _picture(path)
