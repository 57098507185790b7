"""Fair hyperparameters: rgg's scale and code's (N, B) picked on tuning seeds only, by a rule.

Each candidate setting samples every prompt on the tuning seeds (disjoint from the
evaluation seeds, checked by :class:`~msdda.evaluation.sweep.SweepConfig`) at the
tuning weights and is measured three ways: its mean weighted reward sum_i w_i r_i; its
mean path KL to the base (nats, see :func:`msdda.methods.run_method`); and its mean
drift from the base (RMS image difference from the base's image of the same noise).
A tuning rule then picks one candidate per method:

- ``reward``: the highest mean weighted reward. Nothing holds the method near the
  base, so it can buy reward by leaving the KL-regularised objective that MSDDA, the
  experts and the oracle solve (reward hacking).
- ``matched``: the KL to the base closest to MSDDA's at the same weights and seeds:
  the comparison at an equal KL budget. (Drift is not used: a search method that
  keeps another candidate than the loop's own noise lands on another image, so its
  drift is large even when its KL is small.)
- ``regularised``: the highest E[sum_i w_i r_i] - beta KL, the path-level form of
  the objective MSDDA solves, at the experts' beta.

Every rule of :attr:`TuningConfig.rules` gives the tuned methods a variant of their
own in the sweep: ``rgg`` / ``code`` for ``reward``, ``rgg-matched`` / ``code-matched``
for ``matched``, ``rgg-regularised`` ... The measurements and the choices go into the
results header.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..methods import MethodSettings, check_method
from ..validation import check_int, check_number, check_positive, check_seeds, check_sequence
from .domains import SweepDomain
from .results import ResultRow
from .units import SweepUnit, run_unit
from .variants import TUNED, TUNING_RULES, check_rule, method_of, rule_of, variant_name

__all__ = [  # TUNED ... variant_name: re-exported from .variants, their home
    "TUNED",
    "TUNING_RULES",
    "TuningConfig",
    "choose",
    "check_rule",
    "method_of",
    "rule_of",
    "sweep_methods",
    "tune_settings",
    "variant_name",
    "weighted_score",
]


@dataclass(frozen=True)
class TuningConfig:
    """Grids, rules and data of the tuning step."""

    seeds: tuple[int, ...] = (10_000,)  # tuning seeds, never evaluation seeds
    weights: tuple[tuple[float, ...], ...] | None = None  # None: equal weights 1/K
    images_per_prompt: int = 8  # images per (prompt, tuning seed)
    rules: tuple[str, ...] = ("reward", "matched")  # one variant of each tuned method per rule
    match_method: str = "msdda"  # whose KL to the base the "matched" rule matches
    rgg_scales: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0)
    code_grid: tuple[tuple[int, int], ...] = tuple(
        (n, b) for n in (2, 4, 8) for b in (1, 5, 10, 25, 50)
    )  # candidate (N, B) of code

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(check_seeds(self.seeds, "tuning seeds")))
        if self.weights is not None:
            weights = tuple(
                tuple(
                    check_number(x, f"tuning weights[{n}][{i}]", low=0.0)
                    for i, x in enumerate(check_sequence(w, f"tuning weights[{n}]"))
                )
                for n, w in enumerate(check_sequence(self.weights, "tuning weights"))
            )
            if not weights:
                raise ValueError("tuning weights must not be empty (None: equal weights)")
            object.__setattr__(self, "weights", weights)
        check_int(self.images_per_prompt, "tuning images_per_prompt", low=1, high=1_000_000)
        rules = tuple(self.rules)
        if not rules or len(set(rules)) != len(rules):
            raise ValueError(f"tuning rules must be a non-empty list without repeats, got {rules}")
        for rule in rules:
            check_rule(rule)
        object.__setattr__(self, "rules", rules)
        check_method(self.match_method)
        if self.match_method in TUNED:
            raise ValueError(
                f"match_method must be a method without tuning, got {self.match_method!r}"
            )
        scales = tuple(
            check_number(s, f"rgg_scales[{i}]", low=0.0)
            for i, s in enumerate(check_sequence(self.rgg_scales, "rgg_scales"))
        )
        if not scales:
            raise ValueError("rgg_scales must hold at least one scale")
        object.__setattr__(self, "rgg_scales", scales)
        grid = []
        for i, pair in enumerate(check_sequence(self.code_grid, "code_grid")):
            pair = check_sequence(pair, f"code_grid[{i}]")
            if len(pair) != 2:
                raise ValueError(f"code_grid[{i}] must be an (N, B) pair, got {pair!r}")
            n, b = (
                check_int(v, f"code_grid[{i}][{j}]", low=1, high=100_000)
                for j, v in enumerate(pair)
            )
            grid.append((n, b))
        if not grid:
            raise ValueError("code_grid must hold at least one (N, B) pair")
        object.__setattr__(self, "code_grid", tuple(grid))

    def tuning_weights(self, k: int) -> tuple[tuple[float, ...], ...]:
        return self.weights if self.weights is not None else ((1.0 / k,) * k,)

    def candidates(self, method: str) -> list[dict[str, Any]]:
        """The settings tried for a tuned method, as MethodSettings field values."""
        if method == "rgg":
            return [{"rgg_scale": s} for s in self.rgg_scales]
        return [{"code_candidates": n, "code_block": b} for n, b in self.code_grid]


def sweep_methods(methods: Sequence[str], tuning: TuningConfig | None) -> tuple[str, ...]:
    """The sweep's method names: a tuned method once per tuning rule, the others as given."""
    out: list[str] = []
    for m in methods:
        if m in TUNED and tuning is not None:
            out += [variant_name(m, rule) for rule in tuning.rules]
        else:
            out.append(m)
    return tuple(out)


def weighted_score(
    rows: Sequence[ResultRow], objectives: Sequence[str], weights: Sequence[float]
) -> float:
    """Mean over rows of sum_i w_i r_i (rows of equal image counts)."""
    return sum(
        sum(w * r.rewards[n] for w, n in zip(weights, objectives, strict=True)) for r in rows
    ) / len(rows)


def choose(
    measured: Sequence[Mapping[str, Any]],
    rule: str,
    *,
    target_kl: float | None = None,
    kl_coef: float | None = None,
) -> Mapping[str, Any]:
    """The candidate ``rule`` picks from measured candidates (each with "score" and "kl").

    ``reward``: the highest score; ``matched``: the KL closest to ``target_kl``;
    ``regularised``: the highest score - kl_coef * kl. Ties go to the earlier candidate.
    """
    check_rule(rule)
    if not measured:
        raise ValueError("no measured candidates to choose from")
    if rule == "reward":
        return max(measured, key=lambda c: c["score"])
    if rule == "matched":
        if target_kl is None:
            raise ValueError("the 'matched' rule needs a finite target KL, got None")
        target_kl = check_number(target_kl, "target_kl (of the 'matched' rule)")
        return min(measured, key=lambda c: abs(c["kl"] - target_kl))
    if kl_coef is None:
        raise ValueError("the 'regularised' rule needs a KL coefficient > 0, got None")
    kl_coef = check_positive(kl_coef, "kl_coef (of the 'regularised' rule)")
    return max(measured, key=lambda c: c["score"] - kl_coef * c["kl"])


def at_grid_edge(chosen: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fields whose chosen value is the smallest or largest of the (varied) grid."""
    edge = []
    for key in chosen:
        values = {c[key] for c in candidates}
        if len(values) > 1 and chosen[key] in (min(values), max(values)):
            edge.append(key)
    return edge


Progress = Callable[[str, int, int], None]


def _measure(
    method: str,
    settings: MethodSettings,
    domain: SweepDomain,
    tuning: TuningConfig,
    prompts: Sequence[Any],
) -> dict[str, float]:
    """Mean weighted reward, KL to the base and drift from it over the tuning weights and seeds."""
    weights = tuning.tuning_weights(domain.context.num_objectives)
    sums = {"score": 0.0, "kl": 0.0, "drift": 0.0}
    for w in weights:
        for seed in tuning.seeds:
            unit = SweepUnit(method, w, seed)
            rows = run_unit(
                unit, domain, prompts, tuning.images_per_prompt, settings, companion=True
            )
            sums["score"] += weighted_score(rows, domain.objectives, w)
            sums["kl"] += math.fsum(r.kl_from_base for r in rows) / len(rows)
            sums["drift"] += math.fsum(r.drift_from_base for r in rows) / len(rows)
    n = len(weights) * len(tuning.seeds)
    return {key: v / n for key, v in sums.items()}


def _pick(
    method: str,
    measured: Sequence[Mapping[str, Any]],
    rules: Sequence[str],
    settings: MethodSettings,
    *,
    target_kl: float | None,
    kl_coef: float | None,
) -> tuple[dict[str, MethodSettings], dict[str, dict]]:
    """Each rule's choice among a method's measured candidates: settings and record by name."""
    out, record = {}, {}
    for rule in rules:
        best = choose(measured, rule, target_kl=target_kl, kl_coef=kl_coef)
        picked = {key: best[key] for key in TUNED[method]}
        name = variant_name(method, rule)
        out[name] = replace(settings, **picked)
        record[name] = {
            "rule": rule,
            "settings": picked,
            "score": best["score"],
            "kl": best["kl"],
            "drift": best["drift"],
            "target_kl": target_kl if rule == "matched" else None,
            "at_grid_edge": at_grid_edge(picked, measured),
        }
    return out, record


def _counter(progress: Progress | None, total: int) -> Callable[[str], None]:
    """A ``step(what)`` that reports ``what`` as the next of ``total`` tuning steps."""
    done = 0

    def step(what: str) -> None:
        nonlocal done
        if progress:
            progress(f"tuning {what}", done, total)
        done += 1

    return step


def tune_settings(
    domain: SweepDomain,
    tuning: TuningConfig,
    methods: Sequence[str],
    prompts: Sequence[Any],
    settings: MethodSettings,
    *,
    progress: Progress | None = None,
) -> tuple[dict[str, MethodSettings], dict]:
    """Tune the ``methods`` that have hyperparameters, once per rule.

    Returns the settings of every tuned variant by sweep name ('rgg', 'rgg-matched',
    ...) and the record for the results header: each candidate's score, KL and drift,
    the match method's, and per variant its rule, choice and whether it sits at the
    edge of its grid.
    """
    k = domain.context.num_objectives
    tune_weights = tuning.tuning_weights(k)
    for w in tune_weights:
        if len(w) != k or any(x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
            raise ValueError(f"tuning weights {list(w)} must be K = {k} weights on the simplex")
    tuned = [m for m in methods if m in TUNED]
    kl_coef = domain.context.target_kl_coef() if "regularised" in tuning.rules else None
    record: dict[str, Any] = {
        **asdict(tuning),
        "weights": [list(w) for w in tune_weights],
        "kl_coef": kl_coef,
        "candidates": {},
        "chosen": {},
    }
    total = sum(len(tuning.candidates(m)) for m in tuned) + int("matched" in tuning.rules)
    step = _counter(progress, total)
    target = None
    if tuned and "matched" in tuning.rules:
        step(f"{tuning.match_method} (KL to match)")
        match = _measure(tuning.match_method, settings, domain, tuning, prompts)
        record["match"] = {"method": tuning.match_method, **match}
        target = match["kl"]
    out: dict[str, MethodSettings] = {}
    for method in tuned:
        measured = []
        for cand in tuning.candidates(method):
            step(f"{method} {cand}")
            trial = replace(settings, **cand)
            measured.append({**cand, **_measure(method, trial, domain, tuning, prompts)})
        record["candidates"][method] = measured
        picked, chosen = _pick(
            method, measured, tuning.rules, settings, target_kl=target, kl_coef=kl_coef
        )
        out.update(picked)
        record["chosen"].update(chosen)
    return out, record
