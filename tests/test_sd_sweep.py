"""The Stable Diffusion sweep end to end on tiny random models and tiny random reward models.

Every method, three weights, two prompts, two seeds, from examples/tiny-sd.toml (made
smaller: 2 steps, no tuning); killed once in a subprocess and resumed, its rows equal an
uninterrupted run's; `msdda report` writes the plot, the image grid and the markdown;
`msdda rescore` adds a judge column from the PNGs.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msdda.cli import app
from msdda.evaluation import ResultsError, build_report, markdown, read_results, run_sweep
from msdda.evaluation.config import load_config
from msdda.methods import METHODS
from msdda.sd.sweep import read_picture

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def small_config_text() -> str:
    """examples/tiny-sd.toml with 2 steps and no tuning."""
    text = (EXAMPLES / "tiny-sd.toml").read_text()
    text = text.replace("steps = 4 ", "steps = 2 ")
    return "tuning = false\n" + text[: text.index("[tuning]")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with the tiny models and the small config; the uninterrupted sweep in it."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    runpy.run_path(str(EXAMPLES / "make_tiny_sd.py"))["make_tiny_sd"](folder / "tiny")
    (folder / "tiny-sd.toml").write_text(small_config_text())
    config = load_config(folder / "tiny-sd.toml")
    summary = run_sweep(config, folder / "complete.jsonl")
    return folder, config, summary


def comparable(results) -> dict:
    """Rows without their timings and memory: equal for equal seeds."""
    return {
        r.key: (r.rewards, r.per_image, r.nfe_per_image, r.kl_from_base, r.drift_from_base)
        for r in results.rows
    }


def test_every_method_writes_one_row_and_one_png_per_image(tiny):
    folder, config, summary = tiny
    results = read_results(folder / "complete.jsonl")
    assert {r.method for r in results.rows} == {m for m in METHODS if not METHODS[m].needs_student}
    # per seed and prompt: base once, 7 weighted methods at 3 weights, the oracle at (0.5, 0.5)
    assert len(results.rows) == summary.rows_total == 2 * 2 * (1 + 7 * 3 + 1)
    assert results.header["objectives"] == ["aesthetic", "clip"]
    assert results.header["judges"] == ["pickscore"] and results.header["images"]
    for r in results.rows:
        assert r.images == 1 and set(r.rewards) == {"aesthetic", "clip", "pickscore"}
        assert r.peak_memory_bytes > 0 and r.peak_memory_kind and r.nfe_per_image > 0
        assert (r.kl_from_base == 0) == (r.method == "base")
        (png,) = r.image_files
        image = read_picture(folder / png)
        assert image.shape == (3, 32, 32)
    files = [r.image_files[0] for r in results.rows]
    assert len(set(files)) == len(files)


def test_resume_after_a_kill_loses_and_duplicates_nothing(tiny):
    folder, config, _ = tiny
    path = folder / "killed.jsonl"
    cmd = [sys.executable, "-c", "from msdda.cli import app; app()", "sweep", str(path),
           "--config", str(folder / "tiny-sd.toml")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = read_results(folder / "complete.jsonl")
    partial = len(read_results(path, warn=False).rows)
    assert 7 <= partial < len(complete.rows)
    summary = run_sweep(load_config(folder / "tiny-sd.toml"), path)
    assert summary.rows_written == len(complete.rows) - partial
    resumed = read_results(path)
    keys = [json.loads(line)["method"] for line in path.read_text().splitlines()[1:]]
    assert len(keys) == len(resumed.rows) == len(complete.rows)  # no line twice, none bad
    assert comparable(resumed) == comparable(complete)
    for a, b in zip(sorted(resumed.rows, key=repr), sorted(complete.rows, key=repr), strict=True):
        pa, pb = folder / a.image_files[0], folder / b.image_files[0]
        assert pa != pb and (read_picture(pa) == read_picture(pb)).all()


def test_a_changed_config_is_refused(tiny):
    folder, config, _ = tiny
    text = (folder / "tiny-sd.toml").read_text().replace("seeds = [0, 1]", "seeds = [0, 2]")
    (folder / "changed.toml").write_text(text)
    before = (folder / "complete.jsonl").read_bytes()
    with pytest.raises(ResultsError, match=r"another configuration .*seeds"):
        run_sweep(load_config(folder / "changed.toml"), folder / "complete.jsonl")
    assert (folder / "complete.jsonl").read_bytes() == before


def test_report_writes_the_plot_the_grid_and_the_markdown(tiny):
    folder, _, _ = tiny
    out = folder / "report"
    result = runner.invoke(app, ["report", str(folder / "complete.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "pareto.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    for needle in ("## Where MSDDA stands", "## Latency and memory", "](grid.png)", "pickscore"):
        assert needle in text
    results = read_results(folder / "complete.jsonl")
    judged = build_report(results, axes=("aesthetic", "pickscore"))  # any two rewards
    assert judged.axes == ("aesthetic", "pickscore") and judged.reference is not None
    assert "hypervolume reference point (aesthetic, pickscore)" in markdown(judged)
    with pytest.raises(ValueError, match="not rewards of the results"):
        build_report(results, axes=("aesthetic", "legibility"))


def test_rescore_adds_a_judge_column_from_the_pngs(tiny):
    folder, _, _ = tiny
    path = folder / "rescored.jsonl"
    shutil.copy(folder / "complete.jsonl", path)
    weights = str(folder / "tiny" / "judge-pickscore")
    args = ["rescore", str(path), "--judge", "pickscore", "--judge-weights", weights]
    refused = runner.invoke(app, args)  # the sweep's own column is never replaced
    assert refused.exit_code == 2 and "--column" in refused.output
    result = runner.invoke(app, [*args, "--column", "pick-again"])
    assert result.exit_code == 0, result.output
    rescored = read_results(path)
    assert rescored.header["judges"] == ["pickscore", "pick-again"]
    assert rescored.header["rewards"][-1] == "pick-again"
    for r in rescored.rows:  # the PNGs hold exactly the images the sweep scored
        assert r.rewards["pick-again"] == pytest.approx(r.rewards["pickscore"], abs=1e-4)
    complete = read_results(folder / "complete.jsonl")
    assert [r.key for r in rescored.rows] == [r.key for r in complete.rows]


def test_rescore_refuses_missing_pngs_and_changes_nothing(tiny):
    folder, _, _ = tiny
    path = folder / "complete.jsonl"
    victim = folder / read_results(path).rows[3].image_files[0]
    kept = victim.read_bytes()
    victim.unlink()
    before = path.read_bytes()
    try:
        result = runner.invoke(app, ["rescore", str(path), "--judge", "clipscore"])
    finally:
        victim.write_bytes(kept)
    assert result.exit_code == 2
    assert "1 image(s) missing" in result.output and "Traceback" not in result.output
    assert path.read_bytes() == before
