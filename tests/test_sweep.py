"""`msdda sweep`: every method on shared noise, durable rows, resumption, fair tuning, refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msdda.cli import app
from msdda.evaluation import (
    ResultsError,
    SweepConfig,
    TuningConfig,
    choose,
    method_of,
    plan_units,
    read_results,
    row_key,
    run_sweep,
    simplex_grid,
    toy_domain,
)
from msdda.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_TUNING = TuningConfig(
    seeds=(900,), images_per_prompt=4, rgg_scales=(0.1, 1.0), code_grid=((2, 1), (2, 5))
)


@pytest.fixture(scope="module")
def toy():
    return toy_domain()


def small_config(**changes) -> SweepConfig:
    base = {
        "domain": "toy",
        "weights": simplex_grid(3),
        "seeds": (0, 1),
        "images_per_prompt": 6,
        "tuning": FAST_TUNING,
    }
    return SweepConfig(**{**base, **changes})


def keys_in_file(path: Path) -> list[tuple]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append(row_key(row))
    return rows


def comparable(rows) -> dict:
    """Rows without their timings: equal for equal seeds."""
    return {r.key: (r.rewards, r.nfe_per_image, r.drift_from_base) for r in rows}


@pytest.fixture(scope="module")
def complete(tmp_path_factory, toy):
    path = tmp_path_factory.mktemp("complete") / "results.jsonl"
    summary = run_sweep(small_config(), path, domain=toy)
    return path, summary


# --- what a sweep writes -------------------------------------------------------------------


def test_sweep_writes_one_row_per_method_weight_prompt_and_seed(complete, toy):
    path, summary = complete
    results = read_results(path)
    units = plan_units(small_config(), toy)
    # per seed: base once; the grid (3 weights) plus the toy oracles' other weights (0.25, 0.75)
    # and (0.75, 0.25): 5 weights for the 7 weighted methods and the 2 drift-matched variants
    # (rgg-matched, code-matched), and the oracle at its 3 weights
    # (the toy domain has no trained student: the student method is left out)
    runnable = {m for m, info in METHODS.items() if not info.needs_student}
    weighted = len(runnable) - 2 + 2
    assert len(units) == 2 * (1 + 5 * weighted + 3)
    assert {u.method for u in units} == runnable | {"rgg-matched", "code-matched"}
    assert {u.weights for u in units if u.method == "oracle"} == {
        (0.25, 0.75),
        (0.5, 0.5),
        (0.75, 0.25),
    }
    grid_only = plan_units(small_config(oracle_weights=False), toy)
    assert len(grid_only) == 2 * (1 + 3 * weighted + 1)
    assert len(results.rows) == len(units) == summary.rows_total == summary.rows_written
    assert len(results.keys()) == len(results.rows)
    row = results.rows[0]
    assert set(row.rewards) == {"goal_a", "goal_b"}
    assert row.seconds_per_image > 0 and row.nfe_per_image > 0 and row.images == 6
    assert all(r.base_seconds_per_image > 0 for r in results.rows)
    assert results.header["config"]["domain"] == "toy"
    assert results.header["objectives"] == ["goal_a", "goal_b"]


def test_every_method_sees_the_same_noise(complete):
    rows = {r.key: r for r in read_results(complete[0]).rows}
    for seed in (0, 1):
        for w in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
            db = rows[("db", w, "0", seed)].rewards
            fused = rows[("msdda", w, "0", seed)].rewards  # equal variances: db == msdda
            assert db == pytest.approx(fused, rel=1e-4, abs=1e-5)
        for w in ((0.0, 1.0), (1.0, 0.0)):  # one-hot weights: every mixing method is the expert
            expert = rows[("msdda", w, "0", seed)].rewards
            for m in ("rs", "db-ls"):
                assert rows[(m, w, "0", seed)].rewards == pytest.approx(expert, rel=1e-4, abs=1e-5)


def test_tuning_uses_only_tuning_seeds_and_is_recorded(complete, tmp_path, toy):
    header = read_results(complete[0]).header
    tuning = header["tuning"]
    assert tuning["seeds"] == [900] and tuning["rules"] == ["reward", "matched"]
    measured = tuning["candidates"]["rgg"]
    assert [c["rgg_scale"] for c in measured] == [0.1, 1.0]
    assert [(c["code_candidates"], c["code_block"]) for c in tuning["candidates"]["code"]] == [
        (2, 1),
        (2, 5),
    ]
    best = max(measured, key=lambda c: c["score"])["rgg_scale"]
    assert header["settings"]["rgg"]["rgg_scale"] == best
    assert tuning["chosen"]["rgg"] == {
        "rule": "reward",
        "settings": {"rgg_scale": best},
        "score": max(c["score"] for c in measured),
        "kl": next(c["kl"] for c in measured if c["rgg_scale"] == best),
        "drift": next(c["drift"] for c in measured if c["rgg_scale"] == best),
        "target_kl": None,
        "at_grid_edge": ["rgg_scale"],
    }
    other = tmp_path / "other.jsonl"  # other evaluation seeds, same tuning: same measurements
    run_sweep(small_config(seeds=(5,), methods=("base", "rgg")), other, domain=toy)
    again = read_results(other).header["tuning"]
    assert again["candidates"]["rgg"] == measured and again["match"] == tuning["match"]


def test_matched_variants_take_the_kl_closest_to_msdda(complete):
    """The header records each variant's rule; 'matched' picks the candidate whose KL to the
    base on the tuning seeds is closest to MSDDA's, and its rows sample with that choice."""
    results = read_results(complete[0])
    header = results.header
    tuning = header["tuning"]
    target = tuning["match"]["kl"]
    assert tuning["match"]["method"] == "msdda" and target > 0
    for method, fields in (("rgg", ["rgg_scale"]), ("code", ["code_candidates", "code_block"])):
        chosen = tuning["chosen"][f"{method}-matched"]
        assert chosen["rule"] == "matched" and chosen["target_kl"] == target
        closest = min(tuning["candidates"][method], key=lambda c: abs(c["kl"] - target))
        assert chosen["settings"] == {f: closest[f] for f in fields}
        settings = header["settings"][f"{method}-matched"]
        assert {f: settings[f] for f in fields} == chosen["settings"]
    rows = {r.key: r for r in results.rows}
    assert header["settings"]["code"] != header["settings"]["code-matched"]  # on the toy
    for method in ("rgg", "code"):
        same = header["settings"][method] == header["settings"][f"{method}-matched"]
        for w in ((0.0, 1.0), (0.5, 0.5)):
            a, b = rows[(method, w, "0", 0)], rows[(f"{method}-matched", w, "0", 0)]
            assert (a.per_image == b.per_image) == same


HAND_MEASURED = [  # a hand-made tuning table: score rises with the scale, and so does the KL
    {"rgg_scale": 0.1, "score": 0.10, "kl": 0.01, "drift": 0.010},
    {"rgg_scale": 0.3, "score": 0.40, "kl": 0.10, "drift": 0.031},
    {"rgg_scale": 1.0, "score": 0.90, "kl": 0.60, "drift": 0.080},
    {"rgg_scale": 3.0, "score": 1.50, "kl": 5.00, "drift": 0.250},
]


def test_each_rule_picks_its_candidate_from_a_hand_made_table():
    assert choose(HAND_MEASURED, "reward")["rgg_scale"] == 3.0
    assert choose(HAND_MEASURED, "matched", target_kl=0.12)["rgg_scale"] == 0.3
    assert choose(HAND_MEASURED, "matched", target_kl=0.4)["rgg_scale"] == 1.0
    assert choose(HAND_MEASURED, "matched", target_kl=0.0)["rgg_scale"] == 0.1
    assert choose(HAND_MEASURED, "matched", target_kl=90.0)["rgg_scale"] == 3.0
    assert choose(HAND_MEASURED, "reward", target_kl=0.12)["rgg_scale"] == 3.0  # ignored
    # score - beta KL: beta = 1: 0.09, 0.30, 0.30, -3.5 (tie: the earlier); beta = 0.1: 1.0 wins
    assert choose(HAND_MEASURED, "regularised", kl_coef=1.0)["rgg_scale"] == 0.3
    assert choose(HAND_MEASURED, "regularised", kl_coef=0.1)["rgg_scale"] == 3.0


def test_the_regularised_rule_maximises_reward_minus_beta_kl(tmp_path, toy):
    tuning = dataclasses.replace(FAST_TUNING, rules=("regularised",))
    path = tmp_path / "reg.jsonl"
    run_sweep(small_config(methods=("base", "rgg"), tuning=tuning), path, domain=toy)
    header = read_results(path).header
    beta = toy.context.target_kl_coef()
    assert header["kl_coef"] == header["tuning"]["kl_coef"] == beta
    measured = header["tuning"]["candidates"]["rgg"]
    best = max(measured, key=lambda c: c["score"] - beta * c["kl"])
    assert header["methods"] == ["base", "rgg-regularised"]
    assert header["settings"]["rgg-regularised"]["rgg_scale"] == best["rgg_scale"]
    assert "match" not in header["tuning"]  # nothing to match: MSDDA was not sampled


def test_an_unknown_tuning_rule_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown tuning rule 'closest'; known: reward"):
        TuningConfig(rules=("reward", "closest"))
    with pytest.raises(ValueError, match="unknown tuning rule 'closest'"):
        choose(HAND_MEASURED, "closest")
    with pytest.raises(ValueError, match="unknown tuning rule 'closest'"):
        method_of("rgg-closest")
    with pytest.raises(ValueError, match="needs a finite target KL"):
        choose(HAND_MEASURED, "matched")
    with pytest.raises(ValueError, match="needs a KL coefficient > 0"):
        choose(HAND_MEASURED, "regularised")
    with pytest.raises(ValueError, match="without repeats"):
        TuningConfig(rules=("matched", "matched"))
    with pytest.raises(ValueError, match="match_method must be a method without tuning"):
        TuningConfig(match_method="rgg")
    assert method_of("rgg-matched") == "rgg" and method_of("db-ls") == "db-ls"
    with pytest.raises(ValueError, match="unknown method 'rgg-reward'"):
        method_of("rgg-reward")  # the reward-tuned variant is plain 'rgg'


def test_resuming_with_another_tuning_rule_is_refused(complete, tmp_path, toy):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(complete[0].read_bytes())
    before = path.read_bytes()
    reward_only = dataclasses.replace(FAST_TUNING, rules=("reward",))
    with pytest.raises(ResultsError, match=r"another configuration .*tuning\.rules"):
        run_sweep(small_config(tuning=reward_only), path, domain=toy)
    assert path.read_bytes() == before


# --- resumption ------------------------------------------------------------------------------


def test_resume_after_a_cut_last_line_loses_and_duplicates_nothing(complete, tmp_path, toy):
    full = complete[0].read_text()
    lines = full.splitlines(keepends=True)
    cut = "".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2]  # killed mid-write
    path = tmp_path / "cut.jsonl"
    path.write_text(cut)
    with pytest.warns(UserWarning, match=rf"1 bad line skipped \(line {len(lines) - 2}: cut short"):
        assert len(read_results(path).rows) == len(lines) - 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_sweep(small_config(), path, domain=toy)
    assert summary.rows_written == 3
    keys = keys_in_file(path)
    assert len(keys) == len(set(keys)) == len(lines) - 1
    assert comparable(read_results(path).rows) == comparable(read_results(complete[0]).rows)
    assert run_sweep(small_config(), path, domain=toy).units_run == 0  # nothing left to do


def test_resume_after_a_kill(tmp_path, complete):
    """A sweep killed (SIGKILL) in a subprocess, started again, ends with every row exactly once."""
    path = tmp_path / "killed.jsonl"
    cmd = [
        sys.executable, "-c", "from msdda.cli import app; app()", "sweep", str(path), "--domain", "toy", "--grid", "3",
        "--seeds", "0,1", "--images", "6", "--tune-seeds", "900", "--tune-images", "4",
        "--rgg-scales", "0.1,1", "--code-grid", "2x1,2x5", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(keys_in_file(path))
    assert 5 <= partial < len(read_results(complete[0]).rows)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = keys_in_file(path)
    assert len(keys) == len(set(keys))
    assert comparable(read_results(path).rows) == comparable(read_results(complete[0]).rows)


def test_a_corrupt_line_is_skipped_with_a_warning_naming_it(complete, tmp_path, toy):
    lines = complete[0].read_text().splitlines(keepends=True)
    lines[4] = '{"kind": "row", "method": "rs", "weig\n'
    path = tmp_path / "corrupt.jsonl"
    path.write_text("".join(lines))
    with pytest.warns(UserWarning, match=r"1 bad line skipped \(line 5: not valid JSON\)"):
        results = read_results(path)
    assert len(results.rows) == len(lines) - 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_sweep(small_config(), path, domain=toy)
    assert summary.rows_written == 1  # the lost row is sampled again, nothing else
    keys = keys_in_file(path)
    assert len(keys) == len(set(keys)) == len(lines) - 1


# --- refusals --------------------------------------------------------------------------------


def test_a_results_file_from_another_configuration_is_refused(complete, tmp_path, toy):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(complete[0].read_bytes())
    before = path.read_bytes()
    with pytest.raises(ResultsError, match=r"another configuration .*seeds"):
        run_sweep(small_config(seeds=(0, 2)), path, domain=toy)
    with pytest.raises(ResultsError, match=r"another configuration .*images_per_prompt"):
        run_sweep(small_config(images_per_prompt=7), path, domain=toy)
    assert path.read_bytes() == before


def test_bad_sweep_configurations_are_refused(toy, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'dpo'"):
        small_config(methods=("base", "dpo"))
    with pytest.raises(ValueError, match="'rgg-matched' is 'rgg' tuned by the 'matched' rule"):
        small_config(methods=("base", "rgg-matched"))
    with pytest.raises(ValueError, match="outside the simplex"):
        small_config(weights=((0.5, 0.6),))
    with pytest.raises(ValueError, match="outside the simplex"):
        small_config(weights=((0.5, 0.5), (1.5, 0.5)))
    with pytest.raises(ValueError, match=r"weights\[0\]\[1\] must be >= 0"):
        small_config(weights=((1.5, -0.5),))
    with pytest.raises(ValueError, match="tune on separate seeds"):
        small_config(seeds=(900,))
    with pytest.raises(ValueError, match="K = 2"):
        run_sweep(small_config(weights=((0.2, 0.3, 0.5),)), tmp_path / "k.jsonl", domain=toy)
    with pytest.raises(ValueError, match=r"points \(of a weight grid\) must be >= 2"):
        simplex_grid(1)
    assert not (tmp_path / "k.jsonl").exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.jsonl"
    for args, needle in (
        (["--tune-rules", "reward,closest"], "unknown tuning rule 'closest'"),
        (["--methods", "base,dpo"], "unknown method 'dpo'"),
        (["--weights", "0.5,0.6"], "outside the simplex"),
        (["--seeds", "10000"], "separate seeds"),
        (["--domain", "mnist"], "unknown domain 'mnist'"),
    ):
        result = runner.invoke(app, ["sweep", str(out), "--domain", "toy", *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_digits_sweep_and_report_end_to_end(tmp_path):
    """The default domain: the shipped digits base, experts and oracles, every method, both
    tuning rules (on one-point grids, to stay fast)."""
    out = tmp_path / "digits.jsonl"
    args = ["sweep", str(out), "--prompts", "3", "--images", "2", "--grid", "2", "--seeds", "0"]
    tune = ["--tune-seeds", "7", "--tune-images", "1", "--rgg-scales", "0.1", "--code-grid", "2x25"]
    fast = ["--target-m", "2", "--threads", "1"]
    result = CliRunner().invoke(app, args + tune + fast)
    assert result.exit_code == 0, result.output
    results = read_results(out)
    assert results.header["identity"]["domain"] == "digits"
    assert set(results.header["rewards"]) >= {"legibility", "boldness", "symmetry"}
    methods = {r.method for r in results.rows}
    expected = set(METHODS) | {"rgg-matched", "code-matched"}
    expected -= set() if results.header["oracle_weights"] else {"oracle"}
    expected -= set() if "students_sha256" in results.header["identity"] else {"student"}
    assert methods == expected
    for r in results.rows:  # 50 steps; MSDDA evaluates only the experts with a nonzero weight
        if r.method == "msdda":
            assert r.nfe_per_image == (50 if 0.0 in r.weights else 100)
        if r.method in ("base", "rs", "oracle"):
            assert r.nfe_per_image == 50
        assert r.kl_from_base >= 0 and (r.kl_from_base == 0) == (r.method == "base")
    report = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "rep" / "pareto.png").exists()
    assert "## Where MSDDA stands" in (tmp_path / "rep" / "report.md").read_text()
