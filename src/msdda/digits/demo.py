"""The digits demo: MSDDA over a sweep of preference weights, from legibility to boldness.

For each weight w (legibility w, boldness 1 - w) every digit is sampled
``samples_per_prompt`` times from the same seeded noise, through the core's
:func:`msdda.msdda_step` over the experts' :func:`msdda.expert_policy` and
:func:`msdda.sample_chain`. The base and, where shipped, the oracles are measured on
the same noise for comparison. Outputs: a table of rows, ``pareto.png``,
``samples-w<w>.png`` per weight and ``results.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import OutputError, check_output_path, writing
from ..io import atomic_dir, atomic_write_text
from ..validation import check_int, check_positive, check_seed
from .bundle import DigitsBundle
from .data import NUM_CLASSES
from .plots import save_grid, save_pareto_plot
from .rewards import REWARDS
from .sampling import sample_expert, sample_msdda
from .store import check_expert_kind

__all__ = [
    "DemoConfig",
    "DemoRow",
    "MethodRow",
    "PRESETS",
    "weight_grid",
    "evaluate_images",
    "load_preset",
    "compare_methods",
    "run_demo",
    "write_demo",
]

#: Demo presets (``msdda demo --preset NAME``): experts and an oracle trained in a setting of
#: ``benchmarks/bench_exactness.py``, stored as adapters of the shipped base in ``presets/NAME``.
PRESETS: dict[str, str] = {
    "beta0.25": "beta = 0.25 LoRA experts (far from the base): db and rs gain a little more "
    "reward than MSDDA by leaving the base further; MSDDA is higher on reward - beta KL",
}
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

#: The methods :func:`compare_methods` runs at w = (0.5, 0.5), on the same noise.
COMPARED = ("msdda", "db", "rs", "oracle")

#: The most weights and images per digit a demo runs (every weight samples 10 digits).
MAX_WEIGHTS = 1001
MAX_SAMPLES_PER_PROMPT = 100_000

#: ``progress(label, step, total)`` after every reverse step of every run.
DemoProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoConfig:
    """What ``msdda demo`` runs."""

    num_weights: int = 11  # weights w = 0, 1/(n-1), ..., 1 on legibility (boldness 1 - w)
    samples_per_prompt: int = 100  # images per digit and weight
    seed: int = 0  # noise seed, shared by every weight and method
    expert_kind: str = "fixed"  # "fixed" or "learned" variance experts
    kl_coef: float | None = None  # target beta (None: the experts' common beta)
    objectives: tuple[str, str] = ("legibility", "boldness")  # w on the first, 1 - w on the second
    compare: bool = True  # also run the base and the shipped oracles on the same noise
    methods: bool = False  # also compare msdda, db, rs, oracle at w = 0.5 (reward, KL)

    def __post_init__(self) -> None:
        check_int(self.num_weights, "num_weights", low=2, high=MAX_WEIGHTS)
        check_int(self.samples_per_prompt, "samples_per_prompt", low=1, high=MAX_SAMPLES_PER_PROMPT)
        check_seed(self.seed, "seed")
        check_expert_kind(self.expert_kind, "expert_kind")
        if self.kl_coef is not None:
            check_positive(self.kl_coef, "kl_coef")
        objectives = tuple(self.objectives) if not isinstance(self.objectives, str) else ()
        if len(objectives) != 2 or len(set(objectives)) != 2:
            raise ValueError(
                f"objectives must be two distinct reward names, got {self.objectives!r}"
            )
        for name in objectives:
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
        object.__setattr__(self, "objectives", objectives)
        if not isinstance(self.compare, bool):
            raise TypeError(f"compare must be a bool, got {self.compare!r}")
        if not isinstance(self.methods, bool):
            raise TypeError(f"methods must be a bool, got {self.methods!r}")


@dataclass(frozen=True)
class MethodRow:
    """One method at w = (0.5, 0.5): weighted reward, path KL and the regularised objective."""

    method: str
    weighted_reward: float  # mean of 0.5 r_1 + 0.5 r_2 (standardised)
    kl: float  # mean path KL to the base (nats)
    objective: float  # weighted_reward - beta * kl
    objective_minus_msdda: float  # paired, image by image (0 for msdda)
    objective_minus_msdda_se: float
    reward_minus_msdda: float
    reward_minus_msdda_se: float
    num_images: int


@dataclass(frozen=True)
class DemoRow:
    """One method at one weight: mean standardised rewards, accuracy and speed."""

    method: str  # "msdda", "base" or "oracle"
    weight: float | None  # weight on the first objective (None for the base)
    rewards: dict[str, float]  # mean standardised reward by name
    raw_rewards: dict[str, float]  # mean raw reward by name
    accuracy: float  # fraction classified as the prompted digit
    seconds_per_image: float  # wall time of the sampling chain per image
    num_images: int


def weight_grid(n: int) -> list[float]:
    """``n`` evenly spaced weights from 0 to 1, rounded to 1e-9."""
    return [round(i / (n - 1), 9) for i in range(n)]


@torch.no_grad()
def evaluate_images(
    bundle: DigitsBundle, images: Tensor, prompts: Tensor
) -> tuple[dict, dict, float]:
    """(mean standardised rewards, mean raw rewards, prompted-digit accuracy) of images."""
    std = {n: float(r(images, prompts).mean()) for n, r in bundle.rewards.items()}
    raw = {n: float(r(images, prompts).mean()) for n, r in bundle.raw_rewards.items()}
    acc = float((bundle.classifier(images).argmax(1) == prompts).float().mean())
    return std, raw, acc


def _row(bundle, method, weight, images, prompts, seconds) -> DemoRow:
    std, raw, acc = evaluate_images(bundle, images, prompts)
    n = int(images.shape[0])
    return DemoRow(method, weight, std, raw, acc, seconds / n, n)


def load_preset(bundle: DigitsBundle, name: str) -> DigitsBundle:
    """``bundle`` with the experts and oracles of preset ``name`` in place of its own.

    Raises:
        ValueError: an unknown preset name.
        InputFileError: a preset file is missing, corrupt, or of another base (retrain
            it with ``benchmarks/bench_exactness.py --save-preset``).
    """
    from ..errors import InputFileError, reading
    from ..experts import Expert
    from .align import load_adapter
    from .bundle import Oracle, expert_spec
    from .models import GuidedDenoiser

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    folder = PRESETS_DIR / name
    with reading(folder / "preset.json", "demo preset"):
        meta = json.loads((folder / "preset.json").read_text())
    experts, oracles = {}, []
    for entry in meta["models"]:
        model, info = load_adapter(folder / entry["file"], bundle.base)
        if bundle.guidance_scale != 1.0:
            model = GuidedDenoiser(model, bundle.guidance_scale)
        kind, weights = info["kind"], info["weights"]
        expert = Expert(model, expert_spec(kind), info["kl_coef"], f"{name}/{entry['file']}")
        if len(weights) == 1:
            experts[(next(iter(weights)), kind)] = expert
        else:
            oracles.append(Oracle(weights, kind, expert, 0))
    if not experts:
        raise InputFileError(folder / "preset.json", "the preset has no experts")
    return replace(
        bundle,
        experts=experts,
        oracles=tuple(oracles),
        all_experts={(r, k, 0): e for (r, k), e in experts.items()},
        all_oracles=tuple(oracles),
    )


@torch.no_grad()
def compare_methods(bundle: DigitsBundle, cfg: DemoConfig) -> list[MethodRow]:
    """MSDDA, db, rs and (if shipped) the oracle at w = (0.5, 0.5) on the same prompts and noise.

    Each image's weighted reward and path KL to the base (:func:`msdda.methods.run_method`);
    the objective is reward - beta KL, what experts, oracle and MSDDA maximise.
    """
    from ..methods import run_method
    from .data import decode
    from .sampling import method_context

    first, second = cfg.objectives
    ctx = method_context(bundle, cfg.objectives, cfg.expert_kind, kl_coef=cfg.kl_coef)
    try:
        ctx = replace(
            ctx, oracles={(0.5, 0.5): bundle.oracle({first: 0.5, second: 0.5}, cfg.expert_kind)}
        )
    except ValueError:  # no oracle of these weights: compare the fusions only
        pass
    beta = ctx.target_kl_coef()
    prompts = torch.arange(NUM_CLASSES).repeat_interleave(cfg.samples_per_prompt)
    seeds = [cfg.seed * 1_000_003 + i for i in range(prompts.shape[0])]
    per: dict[str, tuple[Tensor, Tensor]] = {}
    for method in COMPARED:
        if method == "oracle" and not ctx.oracles:
            continue
        run = run_method(method, ctx, (0.5, 0.5), prompts, seeds, measure_kl=True)
        images = decode(run.samples)
        r = 0.5 * bundle.rewards[first](images, prompts) + 0.5 * bundle.rewards[second](
            images, prompts
        )
        per[method] = (r.double(), run.kl)
    return [_method_row(m, r, kl, per["msdda"], beta) for m, (r, kl) in per.items()]


def _method_row(method: str, r: Tensor, kl: Tensor, msdda, beta: float) -> MethodRow:
    def mean_se(x: Tensor) -> tuple[float, float]:
        se = float(x.std() / x.numel() ** 0.5) if x.numel() > 1 else 0.0
        return float(x.mean()), se

    d_r = mean_se(r - msdda[0])
    d_j = mean_se((r - beta * kl) - (msdda[0] - beta * msdda[1]))
    return MethodRow(
        method,
        float(r.mean()),
        float(kl.mean()),
        float((r - beta * kl).mean()),
        d_j[0],
        d_j[1],
        d_r[0],
        d_r[1],
        int(r.numel()),
    )


def _grid(images: Tensor, spp: int, path: Path, title: str) -> None:
    cols = min(spp, 10)
    per_digit = images.reshape(NUM_CLASSES, spp, *images.shape[1:])[:, :cols]
    save_grid(per_digit.reshape(-1, *images.shape[1:]), path, ncols=cols, title=title)


def run_demo(
    bundle: DigitsBundle,
    cfg: DemoConfig,
    out_dir: Path,
    progress: DemoProgress | None = None,
) -> list[DemoRow]:
    """Run the sweep, writing sample grids into the existing folder ``out_dir``; returns rows."""
    first, second = cfg.objectives
    for name in cfg.objectives:  # fail before any sampling if an expert is missing
        bundle.expert(name, cfg.expert_kind)
    prompts = torch.arange(NUM_CLASSES).repeat_interleave(cfg.samples_per_prompt)
    steps = len(bundle.schedule.timesteps)
    rows: list[DemoRow] = []

    def run(label: str, sample) -> tuple[Tensor, float]:
        cb = (lambda i, t, x: progress(label, i + 1, steps)) if progress else None
        t0 = time.perf_counter()
        images = sample(cb)
        return images, time.perf_counter() - t0

    if cfg.compare:
        images, sec = run(
            "base",
            lambda cb: sample_expert(bundle.reference, prompts, bundle.schedule, cfg.seed, cb),
        )
        rows.append(_row(bundle, "base", None, images, prompts, sec))
        _grid(images, cfg.samples_per_prompt, out_dir / "samples-base.png", "base")
    for w in weight_grid(cfg.num_weights):
        weights = {first: w, second: round(1.0 - w, 9)}
        images, sec = run(
            f"msdda w={w:.2f}",
            lambda cb, weights=weights: sample_msdda(
                bundle,
                prompts,
                weights,
                seed=cfg.seed,
                kl_coef=cfg.kl_coef,
                expert_kind=cfg.expert_kind,
                callback=cb,
            ),
        )
        rows.append(_row(bundle, "msdda", w, images, prompts, sec))
        title = f"MSDDA {first} {w:.2f} / {second} {1 - w:.2f} ({cfg.expert_kind})"
        _grid(images, cfg.samples_per_prompt, out_dir / f"samples-w{w:.2f}.png", title)
    if cfg.compare:
        for oracle in bundle.oracles:
            if set(oracle.weights) != {first, second} or oracle.kind != cfg.expert_kind:
                continue
            w = oracle.weights[first]
            images, sec = run(
                f"oracle w={w:.2f}",
                lambda cb, e=oracle.expert: sample_expert(
                    e, prompts, bundle.schedule, cfg.seed, cb
                ),
            )
            rows.append(_row(bundle, "oracle", w, images, prompts, sec))
    return rows


def write_demo(
    bundle: DigitsBundle,
    cfg: DemoConfig,
    out_dir: Path,
    progress: DemoProgress | None = None,
) -> list[DemoRow]:
    """:func:`run_demo` plus ``pareto.png`` and ``results.json``, published atomically.

    Everything is written to a staging folder beside ``out_dir`` and swapped in at the
    end (:func:`msdda.io.atomic_dir`), so ``out_dir`` (which must not exist, or be an
    empty folder) appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if not isinstance(bundle, DigitsBundle):
        raise TypeError(f"bundle must be a DigitsBundle, got {type(bundle).__name__}")
    if not isinstance(cfg, DemoConfig):
        raise TypeError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    if not out_dir.parent.is_dir():
        raise OutputError(out_dir, f"the folder {out_dir.parent} does not exist")
    check_output_path(out_dir, directory=True)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(out_dir, "it already exists and is not an empty folder")
    with writing(out_dir), atomic_dir(out_dir) as stage:
        rows = run_demo(bundle, cfg, stage, progress)
        first, second = cfg.objectives
        msdda = [r for r in rows if r.method == "msdda"]
        extra = {}
        for r in rows:
            if r.method == "base":
                extra["base"] = (r.rewards[first], r.rewards[second])
            elif r.method == "oracle":
                extra[f"oracle w={r.weight:.2f}"] = (r.rewards[first], r.rewards[second])
        save_pareto_plot(
            [r.rewards[first] for r in msdda],
            [r.rewards[second] for r in msdda],
            [f"{r.weight:.1f}" for r in msdda],
            stage / "pareto.png",
            xlabel=f"{first} (standardised)",
            ylabel=f"{second} (standardised)",
            title=f"MSDDA digits, {cfg.expert_kind} experts, {cfg.samples_per_prompt} samples per digit, seed {cfg.seed}",
            extra=extra,
        )
        payload = {
            "config": asdict(cfg),
            "weights_folder": str(bundle.path),
            "rows": [asdict(r) for r in rows],
        }
        if cfg.methods:
            payload["methods"] = [asdict(r) for r in compare_methods(bundle, cfg)]
        atomic_write_text(stage / "results.json", json.dumps(payload, indent=2) + "\n")
    return rows
