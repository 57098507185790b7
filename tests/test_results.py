"""Result rows as typed records: the JSON-lines format read and written exactly as before."""

from __future__ import annotations

import json
import warnings

import pytest

from msdda.evaluation.results import FORMAT, ResultRow, read_results, row_key

# a row as `msdda sweep` writes it (format msdda-sweep/2), key order included
SWEEP_LINE = json.dumps(
    {
        "kind": "row",
        "method": "rgg-matched",
        "weights": [0.25, 0.75],
        "prompt": 3,
        "seed": 1,
        "images": 2,
        "rewards": {"legibility": 0.5, "boldness": -0.25},
        "rewards_std": {"legibility": 0.1, "boldness": 0.0},
        "per_image": {"legibility": [0.4, 0.6], "boldness": [-0.25, -0.25]},
        "seconds_per_image": 0.0125,
        "nfe_per_image": 50.0,
        "reward_evals_per_image": 49.0,
        "drift_from_base": 0.03,
        "kl_from_base": 0.7,
        "base_seconds_per_image": 0.01,
    }
)


def test_a_sweep_row_round_trips_byte_for_byte():
    row = ResultRow.from_json(json.loads(SWEEP_LINE))
    assert json.dumps(row.to_json()) == SWEEP_LINE
    assert row.weights == (0.25, 0.75) and row.per_image["boldness"] == (-0.25, -0.25)
    assert row.kl_from_base == 0.7 and row.rewards["legibility"] == 0.5
    assert row.key == ("rgg-matched", (0.25, 0.75), "3", 1) == row_key(json.loads(SWEEP_LINE))


def test_a_row_without_the_optional_fields_reads_with_defaults():
    obj = {
        "kind": "row",
        "method": "base",
        "weights": None,
        "prompt": 0,
        "seed": 0,
        "rewards": {"a": 1.0},
        "seconds_per_image": 0.01,
        "nfe_per_image": 50,
        "an_unknown_field": "ignored",
    }
    row = ResultRow.from_json(obj)
    assert row.images == 1 and row.per_image == {} and row.rewards_std == {}
    assert row.drift_from_base is None and row.kl_from_base is None
    written = row.to_json()
    assert "kl_from_base" not in written and "reward_evals_per_image" not in written
    assert written["weights"] is None and written["nfe_per_image"] == 50  # an int stays an int


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": "header"}, "not a result row"),
        ({"rewards": None}, "rewards must be finite numbers by name"),
        ({"rewards": {"a": float("nan")}}, "rewards must be finite numbers by name"),
        ({"per_image": {"a": "xy"}}, "per_image must be lists of finite numbers by name"),
        ({"weights": ["a", 1]}, "bad key fields"),
        ({"seed": "s"}, "bad key fields"),
    ],
)
def test_bad_rows_are_refused_with_the_reason(change, reason):
    with pytest.raises(ValueError, match=reason):
        ResultRow.from_json({**json.loads(SWEEP_LINE), **change})


def test_a_row_missing_a_field_is_skipped_with_a_warning_naming_it(tmp_path):
    header = {"kind": "header", "format": FORMAT, "config": {}}
    incomplete = {k: v for k, v in json.loads(SWEEP_LINE).items() if k != "nfe_per_image"}
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(map(json.dumps, [header, incomplete])) + "\n" + SWEEP_LINE + "\n")
    with pytest.warns(
        UserWarning, match=r"1 bad line skipped \(line 2: row without \['nfe_per_image'\]\)"
    ):
        results = read_results(path)
    assert [r.method for r in results.rows] == ["rgg-matched"]
    assert results.skipped == ((2, "row without ['nfe_per_image']"),)


def test_many_bad_lines_are_counted_in_one_warning(tmp_path):
    header = {"kind": "header", "format": FORMAT, "config": {}}
    lines = [json.dumps(header), SWEEP_LINE] + ["{not json"] * 37 + [SWEEP_LINE]  # + a repeat
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = read_results(path)
    assert [str(w.message) for w in caught] == [
        f"{path}: 38 bad lines skipped (first: line 3: not valid JSON)"
    ]
    assert len(results.rows) == 1 and len(results.skipped) == 38
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_results(path, warn=False)
    assert caught == []


def test_a_rewrite_refuses_a_file_that_grew_since_it_was_read(tmp_path):
    """A rescore never overwrites rows a sweep appended while it was scoring."""
    from msdda.evaluation.results import ResultsError, rewrite_results

    header = {"kind": "header", "format": FORMAT, "config": {}}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(header) + "\n" + SWEEP_LINE + "\n")
    size = path.stat().st_size
    rows = read_results(path).rows
    with open(path, "a") as f:  # a sweep appends a row meanwhile
        f.write(SWEEP_LINE.replace('"seed": 1', '"seed": 2') + "\n")
    before = path.read_bytes()
    with pytest.raises(ResultsError, match="changed while it was being rescored"):
        rewrite_results(path, header, rows, expected_size=size)
    assert path.read_bytes() == before
    rewrite_results(path, header, read_results(path).rows, expected_size=path.stat().st_size)
    assert len(read_results(path).rows) == 2
