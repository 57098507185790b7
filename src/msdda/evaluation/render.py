"""The report of a sweep drawn and written: the Pareto PNG and the markdown summary.

Everything shown is computed in :mod:`.aggregate`; this module only formats it.
Both files are written atomically (:mod:`msdda.io`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import check_output_path, reading, writing
from ..io import atomic_path, atomic_write_text
from .aggregate import (
    DRIFT_FLAG,
    MethodSummary,
    Report,
    Standing,
    recorded_hyperparameters,
    regularised_objective,
    standings,
)
from .variants import TUNING_RULES, known_rule, method_info

__all__ = ["markdown", "plot_pareto", "plot_image_grid", "write_markdown"]


def _draw_fronts(ax, report: Report, summaries, a: str, b: str, reference: bool) -> None:
    markers = "o*sD^v<>Pph"
    for s in summaries:
        i = [x.method for x in report.summaries].index(s.method)
        xs = [p.rewards[a] for p in s.points]
        ys = [p.rewards[b] for p in s.points]
        color = f"C{i % 10}"
        style = {"marker": markers[i % len(markers)], "label": s.method, "color": color}
        if known_rule(s.method) == "matched":
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
    """The Pareto plot (``report.axes``, else the first and last objectives) as a PNG,
    written atomically.

    Left: every method. Right: a zoom on the methods that never read a reward while
    sampling, with ``target`` (the exact step-level optimum they aim at), ``base`` and
    the baselines tuned to MSDDA's KL (``-matched``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report (build_report), got {type(report).__name__}")
    path = check_output_path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    a, b = report.axes or (report.objectives[0], report.objectives[-1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    _draw_fronts(left, report, report.summaries, a, b, reference=True)
    zoom = [
        s
        for s in report.summaries
        if s.method == "target"
        or known_rule(s.method) == "matched"
        or ((info := method_info(s.method)) is not None and not info.needs_rewards)
    ]
    _draw_fronts(right, report, zoom, a, b, reference=False)
    weights = report.header.get("weights") or report.header.get("config", {}).get("weights", [])
    domain = report.header.get("config", {}).get("domain", "?")
    left.set_title(f"{domain}: every method over {len(weights)} weights")
    right.set_title("zoom: no reward access, KL-matched baselines, target, base")
    fig.tight_layout()
    try:
        with writing(path), atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _grid_cells(report: Report, rows, max_prompts: int):
    """The grid's seed, prompts (key, text), columns (weights), methods and cell files."""
    seed = min(r.seed for r in rows)
    listed = report.header.get("prompts") or []
    order = [*listed, *(r.prompt for r in rows if r.prompt not in listed)]
    seen = [p for p in order if any(r.prompt == p and r.seed == seed for r in rows)]
    prompts = list(dict.fromkeys((repr(p), str(p)) for p in seen))[:max_prompts]
    keys = {k for k, _ in prompts}
    cells: dict[tuple, str] = {}
    for r in rows:
        if r.seed == seed and repr(r.prompt) in keys:
            cells[(repr(r.prompt), r.method, r.weights)] = r.image_files[0]
    weights = sorted({w for (_, _, w) in cells if w is not None}) or [None]
    methods = [s.method for s in report.summaries if any(k[1] == s.method for k in cells)]
    return seed, prompts, weights, methods, cells


def _draw_cell(ax, image_path: Path | None, title: str | None, label: str | None) -> None:
    import matplotlib.image as mpimg

    ax.set_xticks([])
    ax.set_yticks([])
    if image_path is not None:
        with reading(image_path, "image of the results"):
            ax.imshow(mpimg.imread(image_path))
    else:
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=7)
    if label is not None:
        ax.set_ylabel(label, fontsize=7)


def plot_image_grid(
    report: Report, rows, path: str | Path, *, max_prompts: int = 2, cell_inches: float = 1.3
) -> Path | None:
    """The image grid as a PNG, written atomically: for the first ``max_prompts`` prompts
    and the first seed, one line per method and one column per weight (a weight-free
    method such as ``base`` repeated in every column). None (nothing written) when the
    rows saved no images. ``rows`` are the results' rows (their ``image_files``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.image_files]
    if not rows:
        return None
    path = check_output_path(path)
    seed, prompts, weights, methods, cells = _grid_cells(report, rows, max_prompts)
    size = (cell_inches * len(weights) + 1.0, (cell_inches * len(methods) + 0.5) * len(prompts))
    fig = plt.figure(figsize=size, dpi=100, layout="constrained")
    subfigures = fig.subfigures(len(prompts), 1, squeeze=False)[:, 0]
    for sub, (key, text) in zip(subfigures, prompts, strict=True):
        sub.suptitle(f"{text[:100]} (seed {seed})", fontsize=8)
        axes = sub.subplots(len(methods), len(weights), squeeze=False)
        for i, method in enumerate(methods):
            for j, w in enumerate(weights):
                f = cells.get((key, method, w)) or cells.get((key, method, None))
                _draw_cell(
                    axes[i][j],
                    None if f is None else report.path.parent / f,
                    ("-" if w is None else _weights(w)) if i == 0 else None,
                    method if j == 0 else None,
                )
    try:
        with writing(path), atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
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


def _chosen_line(name: str, c: dict) -> str:
    """One tuned variant's choice, as recorded in the header's tuning record."""
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
    return line


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
    return lines + [_chosen_line(name, c) for name, c in chosen.items()]


def _header_lines(report: Report) -> list[str]:
    h, cfg = report.header, report.header.get("config", {})
    images = sorted({p.images for s in report.summaries for p in s.points})
    used = {s.method: recorded_hyperparameters(h, s.method) for s in report.summaries}
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
    if h.get("judges"):
        lines.append(
            f"- judges (held out: rewards no method reads, reported beside): "
            f"{', '.join(h['judges'])}"
            + (f"; added later by `msdda rescore`: {', '.join(h['rescored'])}"
               if isinstance(h.get("rescored"), dict) and h["rescored"] else "")
        )  # fmt: skip
    if report.reference is not None:
        a, b = report.axes or report.objectives[:2]
        lines.append(
            f"- hypervolume reference point ({a}, {b}) = "
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


def _standing_head(report: Report, msdda: MethodSummary, measure: str) -> list[str]:
    """The section's title, its explanation and the table's head."""
    beta = report.header.get("kl_coef")
    held_out = [n for n in report.rewards if n not in report.objectives]
    w = _weights(report.half)
    return [
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


def _standing_row(st: Standing, held_out: Sequence[str], measure: str) -> str:
    """One baseline's row of the standings table."""
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
    return (
        f"| {st.method} | {params} | {_fmt(st.hypervolume, '.3f')} "
        f"| {_fmt(st.gain, '+.3f', st.gain_se)}{f' ({verdict})' if verdict else ''} "
        f"{held}| {kl} | {drift} | {_fmt(st.regularised, '.3f')} "
        f"| {_fmt(st.time_vs_base, '.2f')} |"
    )


def _standing_notes(
    report: Report, table: Sequence[Standing], msdda: MethodSummary, measure: str
) -> list[str]:
    """The flagged baselines, and MSDDA against the base on reward - beta KL."""
    lines = []
    flagged = [st for st in table if st.flagged]
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
    mine = regularised_objective(msdda, report.header.get("kl_coef"))
    if base is not None and base.regularised is not None and mine is not None:
        if mine < base.regularised:
            lines.append(
                f"- on the path-level objective reward - beta KL, MSDDA ({mine:.3f}) is below "
                f"the base ({base.regularised:.3f}): the step-level optimum spends KL at every "
                "step, more than its final reward gains back at this beta."
            )
    return lines


def _standing_lines(report: Report) -> list[str]:
    table = standings(report)
    if not table:
        return []
    msdda = next(s for s in report.summaries if s.method == "msdda")
    held_out = [n for n in report.rewards if n not in report.objectives]
    measure = "KL" if msdda.kl_half is not None else "drift"
    lines = _standing_head(report, msdda, measure)
    lines += [_standing_row(st, held_out, measure) for st in table]
    lines.append("")
    lines += _standing_notes(report, table, msdda, measure)
    lines.append("")
    return lines


def _method_lines(report: Report) -> list[str]:
    """The table of every method: hypervolume, equal-weight numbers and costs."""
    w = _weights(report.half)
    lines = [
        "## Every method",
        "",
        f"| method | weights | hypervolume | weighted reward at w = {w} | MSDDA - method at {w} "
        f"(paired) | KL to base at {w} | drift from base at {w} | ms / image | time / base "
        "| NFE / image | NFE / base | reads rewards |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.summaries:
        info = method_info(s.method)
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
    return lines


def _reward_lines(report: Report) -> list[str]:
    """The table of mean rewards per method and weight."""
    lines = [
        "## Mean rewards per method and weight",
        "",
        "| method | weights | " + " | ".join(report.rewards) + " | images |",
        "|---|---|" + "---|" * len(report.rewards) + "---|",
    ]
    for s in report.summaries:
        for p in s.points:
            vals = " | ".join(_fmt(p.rewards.get(n), "+.3f") for n in report.rewards)
            lines.append(f"| {s.method} | {_weights(p.weights)} | {vals} | {p.images} |")
    return lines


def _memory(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _cost_lines(report: Report) -> list[str]:
    """Latency and memory per method (only where the rows record peak memory)."""
    if all(s.peak_memory_bytes is None for s in report.summaries):
        return []
    base = next((s for s in report.summaries if s.method == "base"), None)
    kinds = report.memory_kinds
    lines = [
        "## Latency and memory",
        "",
        "Time per image is the chain's wall time over the batch size; time / base is its ratio "
        "to a base chain sampled on the same batch just before (same machine load); NFE counts "
        "denoiser rows per image. Peak memory is the largest over the method's rows of its "
        f"chain's peak ({', '.join(kinds) or 'kind not recorded'}: cuda_max_allocated is the "
        "most bytes held by tensors on the GPU; process_peak_rss the peak resident memory of "
        "the whole process, models included, on a CPU).",
        "",
        "| method | ms / image | time / base | NFE / image | peak memory (MiB) | memory / base |",
        "|---|---|---|---|---|---|",
    ]
    for s in report.summaries:
        ratio = None
        if base is not None and base.peak_memory_bytes and s.peak_memory_bytes is not None:
            ratio = s.peak_memory_bytes / base.peak_memory_bytes
        lines.append(
            f"| {s.method} | {s.seconds_per_image * 1e3:.1f} | {_fmt(s.time_vs_base, '.2f')} "
            f"| {s.nfe_per_image:.0f} | {_memory(s.peak_memory_bytes)} | {_fmt(ratio, '.2f')} |"
        )
    return lines + [""]


def markdown(report: Report, plot_name: str | None = None, grid_name: str | None = None) -> str:
    """The markdown summary of ``report`` (with the plot and the image grid, when named)."""
    lines = [f"# Sweep report: {report.header.get('config', {}).get('domain', '?')}", ""]
    lines += _header_lines(report) + [""]
    if plot_name:
        lines += [f"![Pareto fronts]({plot_name})", ""]
    if grid_name:
        lines += [
            f"![The same prompt and seed across methods (rows) and weights (columns)]({grid_name})",
            "",
        ]
    lines += _standing_lines(report)
    lines += _method_lines(report) + [""]
    lines += _cost_lines(report)
    lines += _reward_lines(report) + [""]
    return "\n".join(lines)


def write_markdown(
    report: Report, path: str | Path, plot_name: str | None = None, grid_name: str | None = None
) -> Path:
    """Write :func:`markdown` to ``path`` atomically."""
    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report (build_report), got {type(report).__name__}")
    path = check_output_path(path)
    text = markdown(report, plot_name, grid_name)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path
