"""``msdda check`` end to end: the exactness testbed as a command with an exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from msdda.cli import app
from msdda.testbed import DEFAULT_CASES

runner = CliRunner()
SMALL = ["--samples", "16", "--steps", "10"]


def test_check_passes_and_prints_every_case_and_the_bound():
    result = runner.invoke(app, ["check", *SMALL])
    assert result.exit_code == 0, result.output
    for case in DEFAULT_CASES:
        assert case.name in result.output
    assert "(bound 1e-09): ok" in result.output
    assert "NO" not in result.output


def test_check_fails_with_an_impossible_bound():
    result = runner.invoke(app, ["check", *SMALL, "--bound", "0"])
    assert result.exit_code == 1
    assert "FAIL" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_bad_option_is_one_clear_error_without_traceback():
    result = runner.invoke(app, ["check", "--samples", "0"])
    assert result.exit_code == 2
    assert "--samples" in result.output
    assert "Traceback" not in result.output


def test_the_installed_console_script_runs_check():
    script = Path(sys.executable).with_name("msdda")
    proc = subprocess.run(
        [str(script), "check", "--samples", "8", "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout.splitlines()[-1]
