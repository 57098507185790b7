"""The report of a sweep: Pareto plot, hypervolumes, weighted reward at w = 0.5, costs.

Rewards are averaged over prompts, seeds and images per (method, weights). Each
method's front is its points over the weight grid (``base``: one point); its
hypervolume is measured from one reference point shared by every method and stated
in the report. Comparisons at w = 0.5 are paired: every method sampled the same
prompts from the same noise, so MSDDA - method is averaged image by image.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..methods import METHODS, MethodInfo, weight_key
from .hypervolume import default_reference_point, hypervolume_2d
from .results import Results
from .tuning import TUNING_RULES, method_of, rule_of

__all__ = [
    "DRIFT_FLAG",
    "MethodPoint",
    "MethodSummary",
    "Report",
    "Standing",
    "build_report",
    "regularised_objective",
    "standings",
    "plot_pareto",
    "write_markdown",
]


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


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _se(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def aggregate(results: Results) -> list[MethodPoint]:
    """One point per (method, weights): rewards averaged over prompts, seeds and images."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results.rows:
        w = None if row["weights"] is None else weight_key(row["weights"])
        groups[(row["method"], w)].append(row)
    points = []
    for (method, w), rows in groups.items():
        rows = sorted(rows, key=lambda r: (repr(r["prompt"]), r["seed"]))
        images = sum(int(r.get("images", 1)) for r in rows)
        names = list(rows[0]["rewards"])
        rewards = {
            n: math.fsum(r["rewards"][n] * r.get("images", 1) for r in rows) / images for n in names
        }
        per_image = {n: [x for r in rows for x in r.get("per_image", {}).get(n, [])] for n in names}
        drifts = [r["drift_from_base"] for r in rows if "drift_from_base" in r]
        kls = [r["kl_from_base"] for r in rows if "kl_from_base" in r]
        ratios = [
            r["seconds_per_image"] / r["base_seconds_per_image"]
            for r in rows
            if r.get("base_seconds_per_image")
        ]
        points.append(
            MethodPoint(
                method,
                w,
                rewards,
                per_image,
                images,
                _mean([r["seconds_per_image"] for r in rows]),
                _mean([r["nfe_per_image"] for r in rows]),
                _mean(drifts) if len(drifts) == len(rows) else None,
                _mean(kls) if len(kls) == len(rows) else None,
                _mean(ratios) if len(ratios) == len(rows) else None,
            )
        )
    return points


def _info(name: str) -> MethodInfo | None:
    """The sampling method behind a results' method name ('rgg-matched': rgg), None if unknown."""
    try:
        return METHODS[method_of(name)]
    except ValueError:
        return None


def _rule(name: str) -> str | None:
    """The tuning rule of a results' method name, None if untuned or unknown."""
    try:
        return rule_of(name)
    except ValueError:
        return None


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


def build_report(results: Results, reference: Sequence[float] | None = None) -> Report:
    """Summaries of every method in ``results`` (see the module docstring)."""
    if not results.rows:
        raise ValueError(f"{results.path} has no result rows")
    header = results.header
    objectives = tuple(header.get("objectives") or list(results.rows[0]["rewards"])[:2])
    rewards = tuple(header.get("rewards") or results.rows[0]["rewards"])
    k = len(objectives)
    half = (1.0 / k,) * k
    points = aggregate(results)
    by_method: dict[str, list[MethodPoint]] = defaultdict(list)
    for p in points:
        by_method[p.method].append(p)
    listed = header.get("methods") or header.get("config", {}).get("methods", [])
    order = [m for m in listed if m in by_method]
    order += [m for m in by_method if m not in order]
    ref_point = None
    if k == 2:
        xy = [(p.rewards[objectives[0]], p.rewards[objectives[1]]) for p in points]
        ref_point = tuple(reference) if reference is not None else default_reference_point(xy)
    base = by_method.get("base", [None])[0]
    msdda_half = _at(by_method.get("msdda", []), half)
    summaries = []
    for m in order:
        pts = sorted(by_method[m], key=lambda p: p.weights or (-1.0,))
        hv = None
        if ref_point is not None:
            xy = [(p.rewards[objectives[0]], p.rewards[objectives[1]]) for p in pts]
            hv = hypervolume_2d(xy, ref_point)
        at_half = _at(pts, half)
        values = _weighted(at_half, objectives, half) if at_half else []
        gain = gain_se = None
        if msdda_half is not None and at_half is not None and m != "msdda":
            gain, gain_se = paired_difference(msdda_half, at_half, objectives, half) or (None, None)
        sec = _mean([p.seconds_per_image for p in pts])
        nfe = _mean([p.nfe_per_image for p in pts])
        summaries.append(
            MethodSummary(
                method=m,
                points=tuple(pts),
                hypervolume=hv,
                weighted_half=_mean(values) if values else None,
                weighted_half_se=_se(values) if values else None,
                msdda_gain=gain,
                msdda_gain_se=gain_se,
                drift_half=at_half.drift_from_base if at_half else None,
                kl_half=at_half.kl_from_base if at_half else None,
                seconds_per_image=sec,
                nfe_per_image=nfe,
                time_vs_base=_time_ratio(pts, base),
                nfe_vs_base=nfe / base.nfe_per_image if base else None,
            )
        )
    return Report(
        results.path,
        header,
        objectives,
        rewards,
        half,
        ref_point,
        tuple(summaries),
        len(results.skipped),
    )


#: a baseline whose KL to the base (drift, where no KL was measured) exceeds this many
#: times MSDDA's at equal weights is flagged: not comparable at equal KL
DRIFT_FLAG = 2.0


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


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def regularised_objective(summary: MethodSummary, kl_coef: float | None) -> float | None:
    """E[sum_i w_i r_i] - beta KL(path || base path) at equal weights, where both are known."""
    if summary.weighted_half is None or summary.kl_half is None or kl_coef is None:
        return None
    return summary.weighted_half - kl_coef * summary.kl_half


def standings(report: Report) -> list[Standing]:
    """MSDDA against every other method of ``report`` (empty without MSDDA at equal weights)."""
    by_method = {s.method: s for s in report.summaries}
    msdda = by_method.get("msdda")
    msdda_half = _at(msdda.points, report.half) if msdda else None
    if msdda_half is None:
        return []
    held_out = [n for n in report.rewards if n not in report.objectives]
    beta = report.header.get("kl_coef")
    out = []
    for s in report.summaries:
        if s.method == "msdda":
            continue
        at_half = _at(s.points, report.half)
        pairs = {}
        for n in held_out:
            d = paired_difference(msdda_half, at_half, [n], [1.0]) if at_half else None
            if d is not None:
                pairs[n] = d
        kl_ratio = _ratio(s.kl_half, msdda.kl_half)
        drift_ratio = _ratio(s.drift_half, msdda.drift_half)
        info = _info(s.method)
        exact = info is not None and not info.kl_is_bound
        ratio = (kl_ratio if exact else None) if msdda.kl_half is not None else drift_ratio
        out.append(
            Standing(
                method=s.method,
                rule=_rule(s.method),
                hyperparameters=_hyperparameters(report.header, s.method),
                hypervolume=s.hypervolume,
                gain=s.msdda_gain,
                gain_se=s.msdda_gain_se,
                held_out=pairs,
                kl=s.kl_half,
                kl_ratio=kl_ratio,
                kl_exact=exact,
                drift=s.drift_half,
                drift_ratio=drift_ratio,
                regularised=regularised_objective(s, beta),
                time_vs_base=s.time_vs_base,
                flagged=ratio is not None and ratio > DRIFT_FLAG,
            )
        )
    return out


def _atomic_target(path: Path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a plain file's mode, not mkstemp's private 0600
    return Path(tmp)


def _draw_fronts(ax, report: Report, summaries, a: str, b: str, reference: bool) -> None:
    markers = "o*sD^v<>Pph"
    for s in summaries:
        i = [x.method for x in report.summaries].index(s.method)
        xs = [p.rewards[a] for p in s.points]
        ys = [p.rewards[b] for p in s.points]
        color = f"C{i % 10}"
        style = {"marker": markers[i % len(markers)], "label": s.method, "color": color}
        if _rule(s.method) == "matched":
            style["linestyle"] = "--"
        if s.method == "base":
            ax.scatter(xs, ys, s=160, zorder=5, **{**style, "color": "black"})
        elif s.method == "oracle":
            ax.scatter(xs, ys, s=70, zorder=6, edgecolors="black", **style)
        else:
            main = s.method == "msdda"
            ax.plot(xs, ys, linewidth=2.4 if main else 1.2, markersize=7 if main else 5,
                    zorder=4 if main else 3, **style)  # fmt: skip
    if reference and report.reference is not None:
        ax.scatter(*report.reference, marker="x", color="grey", label="hypervolume reference")
    ax.set_xlabel(f"{a} (mean)")
    ax.set_ylabel(f"{b} (mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)


def plot_pareto(report: Report, path: str | Path) -> Path:
    """The Pareto plot (first two objectives) as a PNG, written atomically.

    Left: every method. Right: a zoom on the methods that never read a reward while
    sampling, with ``target`` (the exact step-level optimum they aim at), ``base`` and
    the baselines tuned to MSDDA's KL (``-matched``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a, b = report.objectives[0], report.objectives[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    _draw_fronts(left, report, report.summaries, a, b, reference=True)
    zoom = [
        s
        for s in report.summaries
        if s.method == "target"
        or _rule(s.method) == "matched"
        or ((info := _info(s.method)) is not None and not info.needs_rewards)
    ]
    _draw_fronts(right, report, zoom, a, b, reference=False)
    weights = report.header.get("weights") or report.header.get("config", {}).get("weights", [])
    domain = report.header.get("config", {}).get("domain", "?")
    left.set_title(f"{domain}: every method over {len(weights)} weights")
    right.set_title("zoom: no reward access, KL-matched baselines, target, base")
    fig.tight_layout()
    tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _fmt(x: float | None, spec: str = ".3f", se: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    out = format(x, spec)
    if se is not None and not math.isnan(se):
        out += f" ± {se:{spec.lstrip('+')}}"
    return out


def _weights(w) -> str:
    return "-" if w is None else "(" + ", ".join(f"{x:.2f}" for x in w) + ")"


def _hyperparameters(header: dict, method: str) -> dict:
    """The settings fields ``method`` reads, as recorded in the results header."""
    info, recorded = _info(method), header.get("settings") or {}
    settings = recorded.get(method) if isinstance(recorded.get(method), dict) else {}
    return {k: settings[k] for k in (info.parameters if info else ()) if k in settings}


def _tuning_lines(tuning: dict) -> list[str]:
    chosen = tuning.get("chosen") or {}
    if not chosen:
        return []
    lines = [
        f"- tuned on seeds {tuning.get('seeds')} (disjoint from evaluation seeds) at weights "
        f"{tuning.get('weights')}, by rule: "
        + "; ".join(f"{r} = {TUNING_RULES.get(r, '?')}" for r in tuning.get("rules", []))
    ]
    match = tuning.get("match")
    if match:
        lines.append(
            f"- {match['method']} on the tuning seeds: weighted reward {match['score']:.3f}, "
            f"KL to base {match['kl']:.4f} (what the matched rule matches), drift "
            f"{match['drift']:.4f}"
        )
    for name, c in chosen.items():
        picked = ", ".join(f"{k} = {v}" for k, v in c["settings"].items())
        line = (
            f"- {name} ({c['rule']}): {picked}; tuning weighted reward {c['score']:.3f}, "
            f"KL {c['kl']:.4f}"
            + (f" (target {c['target_kl']:.4f})" if c.get("target_kl") is not None else "")
            + f", drift {c['drift']:.4f}"
        )
        if c.get("at_grid_edge"):
            line += f"; note: {', '.join(c['at_grid_edge'])} at the edge of its grid" + (
                ": the weighted reward was still rising there"
                if c["rule"] == "reward"
                else ": the grid may hold no better choice"
            )
        lines.append(line)
    return lines


def _header_lines(report: Report) -> list[str]:
    h, cfg = report.header, report.header.get("config", {})
    images = sorted({p.images for s in report.summaries for p in s.points})
    used = {s.method: _hyperparameters(h, s.method) for s in report.summaries}
    lines = [
        f"- results: `{report.path}` ({sum(len(s.points) for s in report.summaries)} points"
        + (f", {report.skipped_lines} line(s) skipped" if report.skipped_lines else "")
        + ")",
        f"- objectives: {', '.join(report.objectives)}; rewards reported: {', '.join(report.rewards)}",
        f"- weights: {len(h.get('weights') or cfg.get('weights', []))} points; "
        f"prompts: {h.get('prompts')}; "
        f"seeds: {cfg.get('seeds')}; images per point: {images}",
        f"- hyperparameters used: { ({m: v for m, v in used.items() if v}) }",
    ]
    lines += _tuning_lines(h.get("tuning") or {})
    if report.reference is not None:
        lines.append(
            f"- hypervolume reference point ({report.objectives[0]}, {report.objectives[1]}) = "
            f"({report.reference[0]:.4f}, {report.reference[1]:.4f})"
        )
    lines.append(
        f"- threads: {h.get('threads')}, torch {h.get('torch')}; time per image is wall time of "
        "the whole batch's chain over its size, and time / base its ratio to a base chain run "
        "on the same batch just before (same machine load); NFE counts denoiser rows (rgg's "
        "backward pass is not counted); drift is the RMS difference of each image from the "
        "base's image of the same noise (all methods share prompts, x_T and step noise); KL is "
        "the path KL to the base in nats (sum over steps of the step KL given the state: exact "
        "for Gaussian steps and for code's best-of-N choices, an upper bound for db-ls and "
        "target)"
    )
    return lines


def _verdict(gain: float | None, se: float | None) -> str:
    if gain is None or se is None or math.isnan(se):
        return ""
    if abs(gain) <= 2 * se:
        return "no clear difference"
    return "MSDDA higher" if gain > 0 else "baseline higher"


def _times(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else f"{x:{spec}}x"


def _standing_lines(report: Report) -> list[str]:
    table = standings(report)
    if not table:
        return []
    msdda = next(s for s in report.summaries if s.method == "msdda")
    beta = report.header.get("kl_coef")
    held_out = [n for n in report.rewards if n not in report.objectives]
    w = _weights(report.half)
    measure = "KL" if msdda.kl_half is not None else "drift"
    lines = [
        "## Where MSDDA stands",
        "",
        "MSDDA, the experts and the oracle solve the KL-regularised objective "
        f"max E[sum_i w_i r_i] - beta KL(p || p_ref) (beta = {beta}); reward-tuned baselines "
        f"(rgg, code) are held to no such budget. A baseline whose {measure} to the base at "
        f"w = {w} exceeds {DRIFT_FLAG:g}x MSDDA's is flagged: it buys reward by leaving the "
        "base (reward hacking) and is not comparable at equal KL. `-matched` baselines were "
        "tuned to MSDDA's KL instead of to reward. Drift (same-noise image distance) is shown "
        "too, but search methods (code, target) re-draw noise and so drift far even at small "
        "KL. KL marked <= is an upper bound (db-ls, target) and is not flagged. Differences "
        "are MSDDA - baseline, paired image by image, ± one standard error.",
        "",
        f"| baseline | hyperparameters | hypervolume (MSDDA {_fmt(msdda.hypervolume, '.3f')}) "
        f"| weighted reward at w = {w} "
        + "".join(f"| {n} (held out) " for n in held_out)
        + f"| KL / MSDDA's ({_fmt(msdda.kl_half, '.3f')} nats) "
        f"| drift / MSDDA's ({_fmt(msdda.drift_half, '.4f')}) "
        f"| reward - beta KL (MSDDA {_fmt(regularised_objective(msdda, beta), '.3f')}) "
        f"| time / base (MSDDA {_fmt(msdda.time_vs_base, '.2f')}) |",
        "|---|---|---|---|" + "---|" * len(held_out) + "---|---|---|---|",
    ]
    for st in table:
        params = ", ".join(f"{k} = {v}" for k, v in st.hyperparameters.items()) or "-"
        if st.rule:
            params += f" ({st.rule})"
        verdict = _verdict(st.gain, st.gain_se)
        held = "".join(
            f"| {_fmt(st.held_out[n][0], '+.3f', st.held_out[n][1]) if n in st.held_out else 'n/a'} "
            for n in held_out
        )
        kl, drift = _times(st.kl_ratio), _times(st.drift_ratio)
        if st.kl_ratio is not None and not st.kl_exact:
            kl = f"<= {kl}"
        if st.flagged and measure == "KL":
            kl = f"**{kl}** (flagged)"
        elif st.flagged:
            drift = f"**{drift}** (flagged)"
        lines.append(
            f"| {st.method} | {params} | {_fmt(st.hypervolume, '.3f')} "
            f"| {_fmt(st.gain, '+.3f', st.gain_se)}{f' ({verdict})' if verdict else ''} "
            f"{held}| {kl} | {drift} | {_fmt(st.regularised, '.3f')} "
            f"| {_fmt(st.time_vs_base, '.2f')} |"
        )
    flagged = [st for st in table if st.flagged]
    lines.append("")
    for st in flagged:
        ratio, mine, theirs = (
            (st.kl_ratio, st.kl, msdda.kl_half)
            if measure == "KL"
            else (st.drift_ratio, st.drift, msdda.drift_half)
        )
        lines.append(
            f"- **{st.method}** has {ratio:.1f}x MSDDA's {measure} to the base ({mine:.4f} vs "
            f"{theirs:.4f}): its reward is bought outside the KL budget (reward hacking); not "
            "comparable at equal KL."
        )
    if not flagged:
        lines.append(f"- no baseline exceeds {DRIFT_FLAG:g}x MSDDA's {measure} to the base.")
    base = next((st for st in table if st.method == "base"), None)
    mine = regularised_objective(msdda, beta)
    if base is not None and base.regularised is not None and mine is not None:
        if mine < base.regularised:
            lines.append(
                f"- on the path-level objective reward - beta KL, MSDDA ({mine:.3f}) is below "
                f"the base ({base.regularised:.3f}): the step-level optimum spends KL at every "
                "step, more than its final reward gains back at this beta."
            )
    lines.append("")
    return lines


def markdown(report: Report, plot_name: str | None = None) -> str:
    """The markdown summary of ``report``."""
    lines = [f"# Sweep report: {report.header.get('config', {}).get('domain', '?')}", ""]
    lines += _header_lines(report) + [""]
    if plot_name:
        lines += [f"![Pareto fronts]({plot_name})", ""]
    lines += _standing_lines(report)
    w = _weights(report.half)
    lines += ["## Every method", ""]
    lines += [
        f"| method | weights | hypervolume | weighted reward at w = {w} | MSDDA - method at {w} "
        f"(paired) | KL to base at {w} | drift from base at {w} | ms / image | time / base "
        "| NFE / image | NFE / base | reads rewards |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.summaries:
        info = _info(s.method)
        reads = "?" if info is None else ("yes" if info.needs_rewards else "no")
        lines.append(
            f"| {s.method} | {len(s.points)} | {_fmt(s.hypervolume, '.4f')} "
            f"| {_fmt(s.weighted_half, '.3f', s.weighted_half_se)} "
            f"| {_fmt(s.msdda_gain, '+.3f', s.msdda_gain_se)} | {_fmt(s.kl_half, '.4f')} "
            f"| {_fmt(s.drift_half, '.4f')} "
            f"| {s.seconds_per_image * 1e3:.3f} "
            f"| {_fmt(s.time_vs_base, '.2f')} | {s.nfe_per_image:.0f} | {_fmt(s.nfe_vs_base, '.2f')} "
            f"| {reads} |"
        )
    lines += ["", "## Mean rewards per method and weight", ""]
    lines += [
        "| method | weights | " + " | ".join(report.rewards) + " | images |",
        "|---|---|" + "---|" * len(report.rewards) + "---|",
    ]
    for s in report.summaries:
        for p in s.points:
            vals = " | ".join(_fmt(p.rewards.get(n), "+.3f") for n in report.rewards)
            lines.append(f"| {s.method} | {_weights(p.weights)} | {vals} | {p.images} |")
    lines.append("")
    return "\n".join(lines)


def write_markdown(report: Report, path: str | Path, plot_name: str | None = None) -> Path:
    """Write :func:`markdown` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(markdown(report, plot_name))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
