"""Fair hyperparameters: rgg's scale and code's (N, B) picked on tuning seeds only.

Each candidate setting samples every prompt on the tuning seeds (disjoint from the
evaluation seeds, checked by :class:`~msdda.evaluation.sweep.SweepConfig`) at the
tuning weights; the one with the highest mean weighted reward sum_i w_i r_i wins.
The scores and the choice go into the results header.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ..methods import MethodSettings

if TYPE_CHECKING:
    from .domains import SweepDomain

__all__ = ["TuningConfig", "tune_settings", "weighted_score"]


@dataclass(frozen=True)
class TuningConfig:
    """Grids and data of the tuning step."""

    seeds: tuple[int, ...] = (10_000,)  # tuning seeds, never evaluation seeds
    weights: tuple[tuple[float, ...], ...] | None = None  # None: equal weights 1/K
    images_per_prompt: int = 8  # images per (prompt, tuning seed)
    rgg_scales: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)  # candidate rgg scales
    code_grid: tuple[tuple[int, int], ...] = ((2, 1), (2, 5), (4, 1), (4, 5), (4, 10))  # (N, B)

    def __post_init__(self) -> None:
        seeds = tuple(self.seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"tuning seeds must be a non-empty list of ints, got {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)
        if self.weights is not None:
            object.__setattr__(
                self, "weights", tuple(tuple(float(x) for x in w) for w in self.weights)
            )
        n = self.images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"tuning images_per_prompt must be a positive int, got {n!r}")
        scales = tuple(float(s) for s in self.rgg_scales)
        if not scales or not all(math.isfinite(s) and s >= 0 for s in scales):
            raise ValueError(f"rgg_scales must be non-negative numbers, got {list(scales)}")
        object.__setattr__(self, "rgg_scales", scales)
        grid = tuple((int(n), int(b)) for n, b in self.code_grid)
        if not grid or not all(n >= 1 and b >= 1 for n, b in grid):
            raise ValueError(f"code_grid must hold (N, B) pairs of positive ints, got {list(grid)}")
        object.__setattr__(self, "code_grid", grid)

    def tuning_weights(self, k: int) -> tuple[tuple[float, ...], ...]:
        return self.weights if self.weights is not None else ((1.0 / k,) * k,)


def weighted_score(
    rows: Sequence[dict], objectives: Sequence[str], weights: Sequence[float]
) -> float:
    """Mean over rows of sum_i w_i r_i (rows of equal image counts)."""
    return sum(
        sum(w * r["rewards"][n] for w, n in zip(weights, objectives, strict=True)) for r in rows
    ) / len(rows)


def _candidates(tuning: TuningConfig, methods: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    if "rgg" in methods:
        out["rgg"] = [{"rgg_scale": s} for s in tuning.rgg_scales]
    if "code" in methods:
        out["code"] = [{"code_candidates": n, "code_block": b} for n, b in tuning.code_grid]
    return out


def tune_settings(
    domain: SweepDomain,
    tuning: TuningConfig,
    methods: Sequence[str],
    prompts: Sequence[Any],
    settings: MethodSettings,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[MethodSettings, dict]:
    """Tune the hyperparameters of the ``methods`` that have any; returns (settings, record)."""
    from .sweep import SweepUnit, run_unit

    k = domain.context.num_objectives
    tune_weights = tuning.tuning_weights(k)
    for w in tune_weights:
        if len(w) != k or any(x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
            raise ValueError(f"tuning weights {list(w)} must be K = {k} weights on the simplex")
    record: dict[str, Any] = {**asdict(tuning), "weights": [list(w) for w in tune_weights]}
    jobs = _candidates(tuning, methods)
    total = sum(len(c) for c in jobs.values())
    done = 0
    for method, candidates in jobs.items():
        scores = []
        for cand in candidates:
            if progress:
                progress(f"tuning {method} {cand}", done, total)
            trial = replace(settings, **cand)
            score = 0.0
            for w in tune_weights:
                for seed in tuning.seeds:
                    unit = SweepUnit(method, w, seed)
                    rows = run_unit(unit, domain, prompts, tuning.images_per_prompt, trial)
                    score += weighted_score(rows, domain.objectives, w)
            scores.append({**cand, "score": score / (len(tune_weights) * len(tuning.seeds))})
            done += 1
        best = max(scores, key=lambda s: s["score"])
        chosen = {key: best[key] for key in candidates[0]}
        settings = replace(settings, **chosen)
        edge = [
            key for key in chosen
            if chosen[key] in (min(c[key] for c in candidates), max(c[key] for c in candidates))
            and len({c[key] for c in candidates}) > 1
        ]  # fmt: skip
        record[method] = {"scores": scores, "chosen": chosen, "at_grid_edge": edge}
    return settings, record
