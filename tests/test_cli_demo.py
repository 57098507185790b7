"""``msdda demo`` end to end on a reduced sweep of the shipped weights, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msdda.cli import app

runner = CliRunner()
SMALL = ["--num-weights", "3", "--samples-per-prompt", "2"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = runner.invoke(app, ["demo", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_writes_table_plots_and_results(demo_run) -> None:
    out, output = demo_run
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "pareto.png",
        "results.json",
        "samples-base.png",
        "samples-w0.00.png",
        "samples-w0.50.png",
        "samples-w1.00.png",
    ]
    assert str(out) in output.replace("\n", "")
    for col in ("legibility", "boldness", "accuracy", "ms / image"):
        assert col in output
    rows = json.loads((out / "results.json").read_text())["rows"]
    msdda = [r for r in rows if r["method"] == "msdda"]
    assert [r["weight"] for r in msdda] == [0.0, 0.5, 1.0]
    assert all(r["num_images"] == 20 and 0 <= r["accuracy"] <= 1 for r in rows)
    # moving the weight from boldness to legibility lowers boldness
    assert msdda[0]["rewards"]["boldness"] > msdda[2]["rewards"]["boldness"]
    assert {r["method"] for r in rows} >= {"base", "msdda", "oracle"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_numbers(demo_run, tmp_path: Path) -> None:
    out, _ = demo_run
    result = runner.invoke(app, ["demo", *SMALL, "--no-compare", "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    first = [
        r for r in json.loads((out / "results.json").read_text())["rows"] if r["method"] == "msdda"
    ]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["rows"]
    strip = lambda rows: [(r["weight"], r["rewards"], r["accuracy"]) for r in rows]  # noqa: E731
    assert strip(again) == strip(first)


def _refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["demo", *args])
    assert result.exit_code != 0
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_demo_refusals(demo_run, tmp_path: Path) -> None:
    out, _ = demo_run
    _refused([*SMALL, "--out", str(out)], "already exists and is not an empty folder")
    _refused([*SMALL, "--out", str(tmp_path / "no" / "run")], "does not exist")
    _refused(
        [*SMALL, "--expert-kind", "wide", "--out", str(tmp_path / "x")], "--expert-kind must be"
    )
    _refused(
        [*SMALL, "--weights-dir", str(tmp_path), "--out", str(tmp_path / "y")], "no manifest.json"
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
