"""The numbers of a sweep's report: summaries per method and weight, hypervolumes, standings.

Rewards are averaged over prompts, seeds and images per (method, weights). Each
method's front is its points over the weight grid (``base``: one point); its
hypervolume is measured from one reference point shared by every method and stated
in the report. Comparisons at equal weights are paired: every method sampled the
same prompts from the same noise, so MSDDA - method is averaged image by image.
:mod:`.render` draws and writes these records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..methods import weight_key
from ..validation import check_number, check_sequence
from .hypervolume import default_reference_point, hypervolume_2d
from .results import ResultRow, Results, ResultsError
from .variants import known_rule, method_info

__all__ = [
    "DRIFT_FLAG",
    "MethodPoint",
    "MethodSummary",
    "Report",
    "Standing",
    "build_report",
    "method_points",
    "paired_difference",
    "recorded_hyperparameters",
    "regularised_objective",
    "standings",
]

#: a baseline whose KL to the base (drift, where no KL was measured) exceeds this many
#: times MSDDA's at equal weights is flagged: not comparable at equal KL
DRIFT_FLAG = 2.0


@dataclass(frozen=True)
class MethodPoint:
    """A method at one weight vector, averaged over its rows."""

    method: str
    weights: tuple[float, ...] | None
    rewards: dict[str, float]  # mean per reward
    per_image: dict[str, list[float]]  # per-image rewards, in (prompt, seed, index) order
    images: int
    seconds_per_image: float
    nfe_per_image: float
    drift_from_base: float | None  # mean RMS image difference from the base's, same noise
    kl_from_base: float | None  # mean path KL to the base (nats)
    time_vs_base: float | None  # mean over rows of time / the base's time on the same batch
    peak_memory_bytes: int | None = None  # the largest peak memory of its rows, where recorded


@dataclass(frozen=True)
class MethodSummary:
    method: str
    points: tuple[MethodPoint, ...]  # sorted by the first weight
    hypervolume: float | None  # None when there are not 2 objectives
    weighted_half: float | None  # mean sum_i w_i r_i at equal weights
    weighted_half_se: float | None  # its standard error over images
    msdda_gain: float | None  # paired mean of (MSDDA - this method) at equal weights
    msdda_gain_se: float | None
    drift_half: float | None  # drift from the base at equal weights
    kl_half: float | None  # path KL to the base at equal weights (nats)
    seconds_per_image: float
    nfe_per_image: float
    time_vs_base: float | None
    nfe_vs_base: float | None
    peak_memory_bytes: int | None = None  # the largest of its points', where recorded


@dataclass(frozen=True)
class Report:
    path: Path
    header: dict
    objectives: tuple[str, ...]
    rewards: tuple[str, ...]
    half: tuple[float, ...]  # the equal weights
    reference: tuple[float, float] | None
    summaries: tuple[MethodSummary, ...]
    skipped_lines: int
    #: the two rewards of the Pareto plot and the hypervolumes (None: not 2 objectives)
    axes: tuple[str, str] | None = None
    memory_kinds: tuple[str, ...] = ()  # what the rows' peak memory is (msdda.measure)


@dataclass(frozen=True)
class Standing:
    """MSDDA against one baseline at equal weights, computed from the results."""

    method: str
    rule: str | None  # tuning rule of the baseline (None: untuned)
    hyperparameters: dict  # the settings fields the baseline reads
    hypervolume: float | None
    gain: float | None  # paired MSDDA - baseline, weighted reward
    gain_se: float | None
    held_out: dict[str, tuple[float, float]]  # reward not optimised -> paired (mean, se)
    kl: float | None  # path KL to the base (nats)
    kl_ratio: float | None  # kl / MSDDA's
    kl_exact: bool  # False: kl is an upper bound (db-ls, target), never flagged
    drift: float | None  # drift from the base
    drift_ratio: float | None  # drift / MSDDA's
    regularised: float | None  # weighted reward - beta * kl
    time_vs_base: float | None
    flagged: bool  # exact kl_ratio (else drift_ratio) > DRIFT_FLAG


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _se(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _mean_if_all(values: Sequence[float | None]) -> float | None:
    """The mean of ``values`` when every one is known, else None."""
    if any(v is None for v in values):
        return None
    return _mean(values)


def _max_if_any(values: Sequence[int | None]) -> int | None:
    """The largest of the known ``values``, None when none is known."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _point(method: str, weights: tuple[float, ...] | None, rows: list[ResultRow]) -> MethodPoint:
    """The rows of one (method, weights), averaged (rewards weighted by image counts)."""
    rows = sorted(rows, key=lambda r: (repr(r.prompt), r.seed))
    images = sum(int(r.images) for r in rows)
    names = list(rows[0].rewards)
    return MethodPoint(
        method,
        weights,
        {n: math.fsum(r.rewards[n] * r.images for r in rows) / images for n in names},
        {n: [x for r in rows for x in r.per_image.get(n, ())] for n in names},
        images,
        _mean([r.seconds_per_image for r in rows]),
        _mean([r.nfe_per_image for r in rows]),
        _mean_if_all([r.drift_from_base for r in rows]),
        _mean_if_all([r.kl_from_base for r in rows]),
        _mean_if_all(
            [
                r.seconds_per_image / r.base_seconds_per_image if r.base_seconds_per_image else None
                for r in rows
            ]
        ),
        _max_if_any([r.peak_memory_bytes for r in rows]),
    )


def method_points(results: Results) -> list[MethodPoint]:
    """One point per (method, weights): rewards averaged over prompts, seeds and images."""
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for row in results.rows:
        w = None if row.weights is None else weight_key(row.weights)
        groups[(row.method, w)].append(row)
    return [_point(method, w, rows) for (method, w), rows in groups.items()]


def _weighted(point: MethodPoint, objectives, weights) -> list[float]:
    cols = [point.per_image.get(n, []) for n in objectives]
    if not cols or any(len(c) != len(cols[0]) for c in cols) or not cols[0]:
        return []
    return [
        math.fsum(w * c[i] for w, c in zip(weights, cols, strict=True)) for i in range(len(cols[0]))
    ]


def paired_difference(
    a: MethodPoint, b: MethodPoint, names: Sequence[str], weights: Sequence[float]
) -> tuple[float, float] | None:
    """Mean and standard error over images of sum_i w_i r_i of ``a`` minus that of ``b``.

    Paired image by image (same prompts, seeds and noise); None without per-image values.
    """
    xs, ys = _weighted(a, names, weights), _weighted(b, names, weights)
    if not xs or len(xs) != len(ys):
        return None
    diffs = [x - y for x, y in zip(xs, ys, strict=True)]
    return _mean(diffs), _se(diffs)


def _at(points: Sequence[MethodPoint], weights) -> MethodPoint | None:
    key = weight_key(weights)
    for p in points:
        if p.weights is None or p.weights == key:
            return p
    return None


def _time_ratio(points: Sequence[MethodPoint], base: MethodPoint | None) -> float | None:
    """Time per image relative to the base: matched per batch when the rows have it."""
    if all(p.time_vs_base is not None for p in points):
        return _mean([p.time_vs_base for p in points])
    if base is None:
        return None
    return _mean([p.seconds_per_image for p in points]) / base.seconds_per_image


def _summary(
    method: str,
    points: list[MethodPoint],
    objectives: tuple[str, ...],
    half: tuple[float, ...],
    ref_point: tuple[float, float] | None,
    base: MethodPoint | None,
    msdda_half: MethodPoint | None,
    axes: tuple[str, str] | None = None,
) -> MethodSummary:
    """One method's summary from its points (sorted here by weight); its hypervolume on
    ``axes`` (default: the two objectives) from ``ref_point``."""
    pts = sorted(points, key=lambda p: p.weights or (-1.0,))
    hv = None
    if ref_point is not None:
        a, b = axes or (objectives[0], objectives[1])
        hv = hypervolume_2d([(p.rewards[a], p.rewards[b]) for p in pts], ref_point)
    at_half = _at(pts, half)
    values = _weighted(at_half, objectives, half) if at_half else []
    gain = gain_se = None
    if msdda_half is not None and at_half is not None and method != "msdda":
        gain, gain_se = paired_difference(msdda_half, at_half, objectives, half) or (None, None)
    nfe = _mean([p.nfe_per_image for p in pts])
    return MethodSummary(
        method=method,
        points=tuple(pts),
        hypervolume=hv,
        weighted_half=_mean(values) if values else None,
        weighted_half_se=_se(values) if values else None,
        msdda_gain=gain,
        msdda_gain_se=gain_se,
        drift_half=at_half.drift_from_base if at_half else None,
        kl_half=at_half.kl_from_base if at_half else None,
        seconds_per_image=_mean([p.seconds_per_image for p in pts]),
        nfe_per_image=nfe,
        time_vs_base=_time_ratio(pts, base),
        nfe_vs_base=nfe / base.nfe_per_image if base else None,
        peak_memory_bytes=_max_if_any([p.peak_memory_bytes for p in pts]),
    )


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_header(results: Results) -> None:
    """Refuse (:class:`ResultsError`) a header whose fields the report reads are malformed."""
    h, path = results.header, results.path
    names = set(results.rows[0].rewards)
    if any(set(r.rewards) != names for r in results.rows):
        rescored = list(h.get("rescored") or {})
        hint = (
            f" (rows sampled after `msdda rescore` added {rescored} lack them: rescore again)"
            if isinstance(h.get("rescored"), dict) and rescored
            else ""
        )
        raise ResultsError(path, f"its rows do not all report the same rewards{hint}")
    for key in ("objectives", "rewards", "methods"):
        value = h.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise ResultsError(path, f"the header's {key!r} is not a list of names")
    for key in ("objectives", "rewards"):
        missing = [n for n in h.get(key) or [] if n not in names]
        if missing:
            raise ResultsError(path, f"the header's {key} {missing} are not rewards of its rows")
    if h.get("objectives") is not None and not h["objectives"]:
        raise ResultsError(path, "the header lists no objectives")
    if h.get("kl_coef") is not None and not _is_number(h["kl_coef"]):
        raise ResultsError(path, f"the header's kl_coef {h['kl_coef']!r} is not a number")
    for key in ("settings", "tuning"):
        if h.get(key) is not None and not isinstance(h[key], dict):
            raise ResultsError(path, f"the header's {key!r} is not an object")
    tuning = h.get("tuning") or {}
    records = dict(tuning.get("chosen") or {})
    if tuning.get("match"):
        records["match"] = tuning["match"]
    for name, c in records.items():
        if not isinstance(c, dict) or not all(
            _is_number(c.get(k)) for k in ("score", "kl", "drift")
        ):
            raise ResultsError(path, f"the header's tuning record of {name!r} is malformed")
        if name != "match" and not (
            isinstance(c.get("settings"), dict)
            and isinstance(c.get("rule"), str)
            and (c.get("target_kl") is None or _is_number(c["target_kl"]))
            and isinstance(c.get("at_grid_edge", []), list)
        ):
            raise ResultsError(path, f"the header's tuning record of {name!r} is malformed")


def _axes(axes, rewards: Sequence[str], objectives: Sequence[str]) -> tuple[str, str] | None:
    """Two distinct reward names (default: the objectives when there are two)."""
    if axes is None:
        return (objectives[0], objectives[1]) if len(objectives) == 2 else None
    items = check_sequence(axes, "axes")
    if len(items) != 2 or items[0] == items[1]:
        raise ValueError(f"axes must be two distinct reward names, got {items}")
    unknown = [a for a in items if a not in rewards]
    if unknown:
        raise ValueError(f"axes {unknown} are not rewards of the results; known: {list(rewards)}")
    return (items[0], items[1])


def build_report(
    results: Results,
    reference: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
) -> Report:
    """Summaries of every method in ``results`` (see the module docstring).

    ``reference`` is the hypervolume reference point: two finite numbers (None: below
    every point by 10% of their range). ``axes`` are the two rewards of the Pareto plot
    and the hypervolumes: any two reported rewards (objectives or held out; default the
    two objectives, and no hypervolume for K != 2 without them).
    """
    if not isinstance(results, Results):
        raise TypeError(f"results must be Results (read_results), got {type(results).__name__}")
    if reference is not None:
        items = check_sequence(reference, "reference")
        if len(items) != 2:
            raise ValueError(f"reference must be two numbers (x, y), got {len(items)}")
        reference = tuple(check_number(v, f"reference[{i}]") for i, v in enumerate(items))
    if not results.rows:
        raise ResultsError(results.path, "the results file has no result rows")
    _check_header(results)
    header = results.header
    objectives = tuple(header.get("objectives") or list(results.rows[0].rewards)[:2])
    rewards = tuple(header.get("rewards") or results.rows[0].rewards)
    axes = _axes(axes, rewards, objectives)
    k = len(objectives)
    half = (1.0 / k,) * k
    points = method_points(results)
    by_method: dict[str, list[MethodPoint]] = defaultdict(list)
    for p in points:
        by_method[p.method].append(p)
    listed = header.get("methods") or header.get("config", {}).get("methods", [])
    order = [m for m in listed if m in by_method]
    order += [m for m in by_method if m not in order]
    ref_point = None
    if axes is not None:
        xy = [(p.rewards[axes[0]], p.rewards[axes[1]]) for p in points]
        ref_point = tuple(reference) if reference is not None else default_reference_point(xy)
    base = by_method.get("base", [None])[0]
    msdda_half = _at(by_method.get("msdda", []), half)
    summaries = tuple(
        _summary(m, by_method[m], objectives, half, ref_point, base, msdda_half, axes)
        for m in order
    )
    return Report(
        results.path,
        header,
        objectives,
        rewards,
        half,
        ref_point,
        summaries,
        len(results.skipped),
        axes,
        tuple(sorted({r.peak_memory_kind for r in results.rows if r.peak_memory_kind})),
    )


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def regularised_objective(summary: MethodSummary, kl_coef: float | None) -> float | None:
    """E[sum_i w_i r_i] - beta KL(path || base path) at equal weights, where both are known."""
    if summary.weighted_half is None or summary.kl_half is None or kl_coef is None:
        return None
    return summary.weighted_half - kl_coef * summary.kl_half


def recorded_hyperparameters(header: dict, method: str) -> dict:
    """The settings fields ``method`` reads, as recorded in the results header."""
    info, recorded = method_info(method), header.get("settings") or {}
    settings = recorded.get(method) if isinstance(recorded.get(method), dict) else {}
    return {k: settings[k] for k in (info.parameters if info else ()) if k in settings}


def _standing(
    report: Report, s: MethodSummary, msdda: MethodSummary, msdda_half: MethodPoint
) -> Standing:
    """MSDDA against the baseline ``s`` at equal weights."""
    at_half = _at(s.points, report.half)
    pairs = {}
    for n in (n for n in report.rewards if n not in report.objectives):  # held out
        d = paired_difference(msdda_half, at_half, [n], [1.0]) if at_half else None
        if d is not None:
            pairs[n] = d
    kl_ratio = _ratio(s.kl_half, msdda.kl_half)
    drift_ratio = _ratio(s.drift_half, msdda.drift_half)
    info = method_info(s.method)
    exact = info is not None and not info.kl_is_bound
    ratio = (kl_ratio if exact else None) if msdda.kl_half is not None else drift_ratio
    return Standing(
        method=s.method,
        rule=known_rule(s.method),
        hyperparameters=recorded_hyperparameters(report.header, s.method),
        hypervolume=s.hypervolume,
        gain=s.msdda_gain,
        gain_se=s.msdda_gain_se,
        held_out=pairs,
        kl=s.kl_half,
        kl_ratio=kl_ratio,
        kl_exact=exact,
        drift=s.drift_half,
        drift_ratio=drift_ratio,
        regularised=regularised_objective(s, report.header.get("kl_coef")),
        time_vs_base=s.time_vs_base,
        flagged=ratio is not None and ratio > DRIFT_FLAG,
    )


def standings(report: Report) -> list[Standing]:
    """MSDDA against every other method of ``report`` (empty without MSDDA at equal weights)."""
    msdda = next((s for s in report.summaries if s.method == "msdda"), None)
    msdda_half = _at(msdda.points, report.half) if msdda else None
    if msdda_half is None:
        return []
    return [
        _standing(report, s, msdda, msdda_half) for s in report.summaries if s.method != "msdda"
    ]
