"""``msdda train`` (digits training) and its old hidden spelling ``msdda toy train``."""

from __future__ import annotations

from typer.testing import CliRunner

from msdda.cli import app
from msdda.digits import DigitsTrainConfig, ToyTrainConfig

runner = CliRunner()


def test_train_help_works() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--out", "--align", "--threads", "--seed", "--beta", "--adapter"):
        assert option in result.output


def test_toy_train_is_a_hidden_alias_of_train() -> None:
    listed = runner.invoke(app, ["--help"]).output
    assert "train" in listed and "toy" not in listed
    result = runner.invoke(app, ["toy", "train", "--help"])
    assert result.exit_code == 0, result.output
    assert "--seed" in result.output
    assert ToyTrainConfig is DigitsTrainConfig


def test_train_refuses_a_bad_beta_or_adapter_before_any_work(tmp_path) -> None:
    for args, message in (
        (["--beta", "0"], "--beta"),
        (["--beta", "nan"], "--beta"),
        (["--adapter", "half"], "--adapter"),
    ):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "w"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not (tmp_path / "w").exists()
