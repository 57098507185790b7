"""`msdda report`: hypervolume, Pareto plot and markdown summary of a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from msdda.cli import app
from msdda.evaluation.aggregate import DRIFT_FLAG, build_report, standings
from msdda.evaluation.hypervolume import default_reference_point, hypervolume_2d, pareto_front
from msdda.evaluation.render import markdown
from msdda.evaluation.results import FORMAT, read_results

# --- hypervolume -------------------------------------------------------------------------------


def test_hypervolume_of_a_hand_checkable_staircase():
    # rectangles from (0, 0): 3 x 1, then 2 x (2 - 1), then 1 x (3 - 2)
    assert hypervolume_2d([(3, 1), (2, 2), (1, 3)], (0, 0)) == pytest.approx(6.0)
    assert hypervolume_2d([(3, 1), (2, 2), (1, 3), (1, 1), (2, 0.5)], (0, 0)) == pytest.approx(6.0)
    # from (1, 1) only (2, 2) adds area (1 x 1): the others lie on the reference's lines
    assert hypervolume_2d([(3, 1), (2, 2), (1, 3)], (1, 1)) == pytest.approx(1.0)
    assert hypervolume_2d([(-1, 5), (5, -1)], (0, 0)) == 0.0  # not better than the reference
    assert hypervolume_2d([], (0, 0)) == 0.0
    assert pareto_front([(3, 1), (1, 1), (2, 2), (2, 1)]) == [(3, 1), (2, 2)]


@given(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=12),
    st.tuples(st.floats(-5, 5), st.floats(-5, 5)),
)
def test_hypervolume_properties(points, extra):
    ref = (-6.0, -6.0)
    hv = hypervolume_2d(points, ref)
    box = max(x - ref[0] for x, _ in points) * max(y - ref[1] for _, y in points)
    assert 0 <= hv <= box + 1e-9
    assert hypervolume_2d([*points, extra], ref) >= hv - 1e-9  # adding a point never shrinks it
    assert hypervolume_2d(pareto_front(points), ref) == pytest.approx(hv)  # only the front counts


def test_default_reference_point_lies_below_every_point():
    assert default_reference_point([(0, 1), (2, 3)]) == pytest.approx((-0.2, 0.8))
    assert default_reference_point([(1, 1)]) == pytest.approx((0.9, 0.9))


# --- the report on a small results file ----------------------------------------------------------


def row(method, weights, a, b, seconds, nfe, seed=0, prompt=0, per_image=None):
    per_image = per_image or {"r_a": [a, a], "r_b": [b, b]}
    return {
        "kind": "row",
        "method": method,
        "weights": weights,
        "prompt": prompt,
        "seed": seed,
        "images": 2,
        "rewards": {"r_a": a, "r_b": b},
        "rewards_std": {"r_a": 0.0, "r_b": 0.0},
        "per_image": per_image,
        "seconds_per_image": seconds,
        "nfe_per_image": nfe,
    }


def write_results(path: Path, rows, extra_lines=(), **header_changes) -> Path:
    header = {
        "kind": "header",
        "format": FORMAT,
        "config": {
            "domain": "hand",
            "methods": ["base", "rs", "msdda"],
            "weights": [[0, 1], [0.5, 0.5], [1, 0]],
            "seeds": [0],
        },
        "objectives": ["r_a", "r_b"],
        "rewards": ["r_a", "r_b"],
        "prompts": [0],
        "settings": {},
    }
    header.update(header_changes)
    lines = [json.dumps(header)] + [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


HAND_ROWS = [
    row("base", None, 1.0, 1.0, 0.010, 50),
    row("msdda", [0.0, 1.0], 1.0, 4.0, 0.020, 50),
    row(
        "msdda", [0.5, 0.5], 3.0, 3.0, 0.020, 100, per_image={"r_a": [2.0, 4.0], "r_b": [3.0, 3.0]}
    ),
    row("msdda", [1.0, 0.0], 4.0, 1.0, 0.020, 50),
    row("rs", [0.0, 1.0], 1.0, 3.0, 0.010, 50),
    row("rs", [0.5, 0.5], 2.0, 2.0, 0.010, 50, per_image={"r_a": [2.0, 2.0], "r_b": [1.0, 3.0]}),
    row("rs", [1.0, 0.0], 3.0, 1.0, 0.010, 50),
]


def test_report_numbers_on_a_hand_checkable_file(tmp_path):
    rep = build_report(
        read_results(write_results(tmp_path / "r.jsonl", HAND_ROWS)), reference=(0, 0)
    )
    s = {x.method: x for x in rep.summaries}
    assert [x.method for x in rep.summaries] == ["base", "rs", "msdda"]
    # msdda front (1,4) (3,3) (4,1) from (0,0): 4x1 + 3x(3-1) + 1x(4-3) = 11
    assert s["msdda"].hypervolume == pytest.approx(11.0)
    # rs front (1,3) (2,2) (3,1): 3x1 + 2x1 + 1x1 = 6; base: the single box 1 x 1
    assert s["rs"].hypervolume == pytest.approx(6.0)
    assert s["base"].hypervolume == pytest.approx(1.0)
    assert s["msdda"].weighted_half == pytest.approx(3.0)
    assert s["rs"].weighted_half == pytest.approx(2.0)
    assert s["base"].weighted_half == pytest.approx(1.0)
    # paired per image: msdda (2.5, 3.5) - rs (1.5, 2.5) = (1, 1)
    assert s["rs"].msdda_gain == pytest.approx(1.0) and s["rs"].msdda_gain_se == pytest.approx(0.0)
    assert s["msdda"].time_vs_base == pytest.approx(2.0)
    assert s["msdda"].nfe_vs_base == pytest.approx((50 + 100 + 50) / 3 / 50)
    assert s["rs"].time_vs_base == pytest.approx(1.0)
    text = markdown(rep)
    assert "| msdda | 3 | 11.0000 | 3.000 ± 0.500 |" in text  # per image (2.5, 3.5): SE 0.5
    assert "reference point (r_a, r_b) = (0.0000, 0.0000)" in text


def test_time_relative_to_base_is_matched_per_batch_when_recorded(tmp_path):
    rows = [dict(r) for r in HAND_ROWS]
    for r, base_time in zip(rows, (0.010, 0.010, 0.040, 0.010, 0.005, 0.005, 0.005), strict=True):
        r["base_seconds_per_image"] = base_time  # the machine got busier, then quieter
    rep = build_report(read_results(write_results(tmp_path / "r.jsonl", rows)))
    s = {x.method: x for x in rep.summaries}
    assert s["msdda"].time_vs_base == pytest.approx((2.0 + 0.5 + 2.0) / 3)
    assert s["rs"].time_vs_base == pytest.approx(2.0)
    assert s["base"].time_vs_base == pytest.approx(1.0)


def test_report_cli_writes_png_and_markdown(tmp_path):
    path = write_results(tmp_path / "r.jsonl", HAND_ROWS, extra_lines=["{not json"])
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 bad line skipped (line 9: not valid JSON)" in result.output
    png = (tmp_path / "out" / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![Pareto fronts](pareto.png)" in md and "| rs |" in md and "1 line(s) skipped" in md
    ref = default_reference_point([(1, 1), (1, 4), (3, 3), (4, 1), (1, 3), (2, 2), (3, 1)])
    assert f"({ref[0]:.4f}, {ref[1]:.4f})" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files


def test_report_cli_refuses_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "row"}\n')
    result = runner.invoke(app, ["report", str(bad)])
    assert result.exit_code == 2 and "not a results header" in result.output
    only_header = write_results(tmp_path / "empty.jsonl", [])
    result = runner.invoke(app, ["report", str(only_header)])
    assert result.exit_code == 2 and "no result rows" in result.output
    result = runner.invoke(app, ["report", str(only_header), "--reference", "1,2,3"])
    assert result.exit_code == 2 and "two numbers" in result.output


# --- where MSDDA stands: a baseline against MSDDA at equal weights ------------------------------


def half_row(method, r_a, r_b, r_c, kl, drift, seconds=0.02, weights=(0.5, 0.5)):
    """A row at equal weights with per-image rewards (two images), its KL, drift and base time."""
    per_image = {"r_a": r_a, "r_b": r_b, "r_c": r_c}
    out = row(method, None if weights is None else list(weights), 0, 0, seconds, 50)
    out["per_image"] = per_image
    out["rewards"] = {n: sum(v) / len(v) for n, v in per_image.items()}
    out["kl_from_base"] = kl
    out["drift_from_base"] = drift
    out["base_seconds_per_image"] = 0.01
    return out


STANDING_ROWS = [
    half_row("base", [1, 1], [1, 1], [1, 1], 0.0, 0.0, seconds=0.01, weights=None),
    half_row("rgg", [5, 7], [4, 4], [0, 0.5], 2.0, 0.10),  # reward hacking: 4x MSDDA's KL
    half_row("rgg-matched", [2, 4], [2, 4], [1, 1], 0.6, 0.06),
    half_row("code-matched", [2, 4], [3, 3], [1, 1], 0.4, 0.15),  # far in drift, not in KL
    half_row("target", [2, 4], [3, 3], [1, 1], 1.5, 0.15),  # 3x, but its KL is an upper bound
    half_row("msdda", [2, 4], [3, 3], [1, 1], 0.5, 0.05),
]


def settings(scale):
    return {"rgg_scale": scale, "rgg_schedule": "constant", "code_candidates": 2, "code_block": 50}


def standing_report(tmp_path, rows=STANDING_ROWS):
    path = write_results(
        tmp_path / "s.jsonl",
        rows,
        rewards=["r_a", "r_b", "r_c"],
        settings={"rgg": settings(3.0), "rgg-matched": settings(0.3)},
        kl_coef=1.0,
    )
    return build_report(read_results(path), reference=(0, 0))


def test_where_msdda_stands_against_each_baseline(tmp_path):
    by = {st.method: st for st in standings(standing_report(tmp_path))}
    assert list(by) == ["base", "rgg", "rgg-matched", "code-matched", "target"]
    rgg, matched, base, code = by["rgg"], by["rgg-matched"], by["base"], by["code-matched"]
    # weighted at (0.5, 0.5): msdda (2.5, 3.5), rgg (4.5, 5.5), rgg-matched (2, 4), base (1, 1)
    assert (rgg.gain, rgg.gain_se) == pytest.approx((-2.0, 0.0))
    assert (matched.gain, matched.gain_se) == pytest.approx((0.0, 0.5))
    assert (base.gain, base.gain_se) == pytest.approx((2.0, 0.5))
    # held out r_c: msdda (1, 1) - rgg (0, 0.5) = (1, 0.5)
    assert rgg.held_out["r_c"] == pytest.approx((0.75, 0.25))
    assert matched.held_out["r_c"] == pytest.approx((0.0, 0.0))
    # flags go by KL: rgg 4x MSDDA's; code-matched drifts 3x as far but has 0.8x the KL
    assert rgg.kl_ratio == pytest.approx(4.0) and rgg.flagged
    assert matched.kl_ratio == pytest.approx(1.2) and not matched.flagged
    assert code.drift_ratio == pytest.approx(3.0) and code.kl_ratio == pytest.approx(0.8)
    assert not code.flagged and not base.flagged
    assert by["target"].kl_ratio == pytest.approx(3.0) and not by["target"].kl_exact
    assert not by["target"].flagged and rgg.kl_exact
    assert 1.2 < DRIFT_FLAG < 3.0
    # weighted reward - beta KL, beta = 1: rgg 5 - 2, rgg-matched 3 - 0.6
    assert rgg.regularised == pytest.approx(3.0) and matched.regularised == pytest.approx(2.4)
    assert rgg.rule == "reward" and matched.rule == "matched" and base.rule is None
    assert rgg.hyperparameters == {"rgg_scale": 3.0, "rgg_schedule": "constant"}
    assert rgg.time_vs_base == pytest.approx(2.0)
    assert rgg.hypervolume == pytest.approx(6 * 4)  # the single point (6, 4) from (0, 0)


def test_the_markdown_states_where_msdda_stands_and_flags_reward_hacking(tmp_path):
    text = markdown(standing_report(tmp_path))
    section = text[text.index("## Where MSDDA stands") : text.index("## Every method")]
    assert "reward - beta KL (MSDDA 2.500)" in section
    assert "| rgg | rgg_scale = 3.0, rgg_schedule = constant (reward) |" in section
    assert (
        "| -2.000 ± 0.000 (baseline higher) | +0.750 ± 0.250 | **4.00x** (flagged) | 2.00x "
        "| 3.000 | 2.00 |" in section
    )
    assert "| rgg-matched | rgg_scale = 0.3, rgg_schedule = constant (matched) |" in section
    assert "| +0.000 ± 0.500 (no clear difference) | +0.000 ± 0.000 | 1.20x | 1.20x |" in section
    assert "- **rgg** has 4.0x MSDDA's KL to the base (2.0000 vs 0.5000)" in section
    assert "**rgg-matched** has" not in section and "**code-matched** has" not in section
    assert "| <= 3.00x | 3.00x |" in section and "**target** has" not in section
    assert "path-level objective" not in section  # MSDDA 3 - 0.5 > base 1 - 0


def test_the_markdown_says_when_msdda_is_below_the_base_on_the_path_level_objective(tmp_path):
    rows = [dict(r) for r in STANDING_ROWS]
    rows[-1] = {**rows[-1], "kl_from_base": 2.5}  # MSDDA: 3 - 2.5 < base: 1 - 0
    text = markdown(standing_report(tmp_path, rows))
    assert "reward - beta KL, MSDDA (0.500) is below the base (1.000)" in text


def test_without_kl_in_the_rows_the_flags_go_by_drift(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "kl_from_base"} for r in STANDING_ROWS]
    by = {st.method: st for st in standings(standing_report(tmp_path, rows))}
    assert by["code-matched"].flagged and by["rgg"].flagged is False  # 3x and 2x the drift
    assert by["rgg"].kl is None and by["rgg"].regularised is None


def test_without_msdda_there_is_no_standing_section(tmp_path):
    rows = [r for r in STANDING_ROWS if r["method"] != "msdda"]
    rep = build_report(read_results(write_results(tmp_path / "n.jsonl", rows)))
    assert standings(rep) == [] and "Where MSDDA stands" not in markdown(rep)
