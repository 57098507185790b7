"""`msdda sweep --config FILE.toml`: the whole file checked before any model loads, errors
that name the key, the shipped examples and prompt set (no model is loaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msdda.cli import app
from msdda.evaluation import SweepConfig, TuningConfig, simplex_grid
from msdda.evaluation.config import ConfigError, load_config
from msdda.evaluation.results import config_differences
from msdda.methods import METHODS, MethodSettings
from msdda.sd.sweep import parse_prompts, read_prompts, shipped_prompts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_the_digits_example_is_todays_default_sweep():
    """examples/digits.toml is what `msdda sweep RESULTS` runs with every option at its
    default, so the two resume each other's results files."""
    cli_default = SweepConfig(
        domain="digits",
        domain_options=(
            ("weights_dir", None), ("expert_kind", "fixed"),
            ("objectives", ("legibility", "boldness")),
        ),
        methods=tuple(METHODS), weights=simplex_grid(11), seeds=(0, 1), images_per_prompt=64,
        settings=MethodSettings(),
        tuning=TuningConfig(
            seeds=(10000,), rgg_scales=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0)
        ),
    )  # fmt: skip
    config = load_config(EXAMPLES / "digits.toml")
    assert config_differences(config.to_dict(), cli_default.to_dict()) == []


def test_the_paper_config_parses_without_its_weights():
    config = load_config(EXAMPLES / "sd15-paper.toml", check_files=False)
    options = dict(config.domain_options)
    assert config.domain == "sd" and len(config.weights) == 11
    assert [e["reward"] for e in options["experts"]] == ["aesthetic", "imagereward"]
    assert set(options["judges"]) == {"pickscore", "hpsv2"}
    assert options["steps"] == 50 and options["height"] == options["width"] == 512
    assert config.prompts is None and config.images_per_prompt == 1
    json.dumps(config.to_dict())  # plain data: the results header holds it
    with pytest.raises(ConfigError, match=r"\[sd\]\.base: .*local Hugging Face cache"):
        load_config(EXAMPLES / "sd15-paper.toml")  # the weights are not here


@pytest.fixture
def sd_files(tmp_path):
    """A folder with stand-ins for the files a config names (never loaded here)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    return tmp_path


GOOD = """
domain = "sd"
methods = ["base", "msdda"]
weights = [[1.0, 0.0], [0.5, 0.5]]
seeds = [0]
[sd]
base = "base"
steps = 4
[experts.aesthetic]
path = "a.safetensors"
reward = "aes"
[experts.clip]
path = "b.safetensors"
reward = "clip"
[rewards.aes]
model = "aesthetic"
[rewards.clip]
model = "clipscore"
[judges.pick]
model = "pickscore"
"""


def write(folder: Path, text: str) -> Path:
    path = folder / "c.toml"
    path.write_text(text)
    return path


def test_a_good_sd_config_becomes_plain_options(sd_files):
    config = load_config(write(sd_files, GOOD))
    options = dict(config.domain_options)
    assert options["base"] == str((sd_files / "base").resolve())
    assert [e["name"] for e in options["experts"]] == ["aesthetic", "clip"]
    assert options["experts"][0]["path"] == str((sd_files / "a.safetensors").resolve())
    assert options["judges"] == {"pick": {"model": "pickscore"}}
    assert config.tuning is not None and config.images_per_prompt == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("steps = 4", "steps = 0"), r"\[sd\]\.steps must be >= 1"),
        (("steps = 4", 'steps = "four"'), r"\[sd\]\.steps must be an integer"),
        (("steps = 4", "colour = 1"), r"\[sd\]: unknown key\(s\) colour"),
        (('path = "a.safetensors"', 'path = "gone.safetensors"'),
         r"\[experts\.aesthetic\]\.path: no such file or folder"),
        (('reward = "aes"', 'reward = "beauty"'), r"\[experts\.aesthetic\]\.reward: 'beauty'"),
        (('model = "aesthetic"', 'model = "vila"'), r"\[rewards\.aes\]\.model must be one of"),
        (('reward = "clip"', 'reward = "aes"'), r"objective of several experts"),
        (("[judges.pick]", "[rewards.pick]"), r"\['pick'\] score no expert's objective"),
        (("seeds = [0]", "seeds = [-1]"), r"seeds\[0\] must be >= 0"),
        (("[0.5, 0.5]]", "[0.5, 0.25, 0.25]]"), r"weights\[1\] has 3 entries for 2 experts"),
        (('domain = "sd"', 'domain = "sd"\ngrid = 3'), "either weights or grid"),
        (('domain = "sd"', 'domain = "sd"\nimages = 3'), r"the config: unknown key\(s\) images"),
        (('domain = "sd"', 'domain = "sd"\n[digits]\nexpert_kind = "fixed"'),
         r"\[digits\] does not apply to domain 'sd'"),
        (('domain = "sd"', 'domain = "sd"\nprompts = "missing.txt"'), "prompts: .*missing.txt"),
        (('methods = ["base", "msdda"]', 'methods = ["base", "dpo"]'), "unknown method 'dpo'"),
        (("steps = 4", "steps = 4\n[sd.decode]\nscale = 2.0"), r"\[sd\.decode\]\.scale must be"),
        (("[experts.aesthetic]", "[experts.base]"), r"\[experts\.base\]: the names 'base'"),
        (('domain = "sd"', 'domain = "sd" "x"'), "not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_config_is_refused_naming_the_key(sd_files, change, message):
    old, new = change
    assert old in GOOD
    path = write(sd_files, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))


def test_prompt_files_one_per_line_or_json_lines(tmp_path):
    (tmp_path / "p.txt").write_text("# animals\na fox\n\n  an owl  \n")
    assert read_prompts(tmp_path / "p.txt") == ("a fox", "an owl")
    (tmp_path / "p.jsonl").write_text('"a fox"\n{"prompt": "an owl", "category": "birds"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ("a fox", "an owl")
    with pytest.raises(ValueError, match="line 3: repeats the prompt 'a fox'"):
        parse_prompts("a fox\nan owl\na fox\n")
    with pytest.raises(ValueError, match="line 1: each line must be a JSON string or an object"):
        parse_prompts('{"text": "a fox"}\n', json_lines=True)
    (tmp_path / "p.csv").write_text("a fox\n")
    with pytest.raises(ValueError, match=r"p\.csv: a prompts file must end in \.txt or \.jsonl"):
        read_prompts(tmp_path / "p.csv")


def test_the_shipped_prompt_set():
    prompts = shipped_prompts()
    assert 50 <= len(prompts) <= 100 and len(set(prompts)) == len(prompts)


def test_the_cli_refuses_a_bad_config_and_options_beside_one(sd_files):
    out = sd_files / "r.jsonl"
    bad = write(sd_files, GOOD.replace("steps = 4", "steps = 0"))
    result = runner.invoke(app, ["sweep", str(out), "--config", str(bad)])
    assert result.exit_code == 2 and "[sd].steps must be >= 1" in result.output
    good = write(sd_files, GOOD)
    result = runner.invoke(app, ["sweep", str(out), "--config", str(good), "--seeds", "3"])
    assert result.exit_code == 2 and "--seeds cannot be combined with --config" in result.output
    result = runner.invoke(app, ["sweep", str(out), "--domain", "sd"])
    assert result.exit_code == 2 and "--config" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_the_executor_options_may_be_given_beside_a_config(tmp_path):
    """--executor and --ray-* choose where units run, not what the sweep is: allowed with --config."""
    out = tmp_path / "r.jsonl"
    args = ["sweep", str(out), "--config", str(EXAMPLES / "digits.toml")]
    result = CliRunner().invoke(app, [*args, "--executor", "dask"])
    assert result.exit_code == 2 and "executor must be one of local, ray" in result.output
    result = CliRunner().invoke(app, [*args, "--grid", "3"])
    assert result.exit_code == 2 and "--grid cannot be combined with --config" in result.output
    assert not out.exists()
