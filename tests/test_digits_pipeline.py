"""``train_all`` (what ``msdda train`` runs), on a tiny configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from msdda.cli.train import gains_table
from msdda.digits import load_digits_bundle
from msdda.digits.align import AlignConfig, PairsConfig
from msdda.digits.pipeline import DigitsTrainConfig, train_all
from msdda.digits.sampling import torch_threads
from msdda.digits.testing import TINY_CLASSIFIER, TINY_DENOISER
from msdda.digits.train import BaseTraining, ClassifierTraining


@pytest.fixture(autouse=True)
def _one_thread():
    """The digits models are tiny: one torch thread is fastest, and robust on shared cores."""
    with torch_threads(1):
        yield


TINY = DigitsTrainConfig(
    classifier=ClassifierTraining(model=TINY_CLASSIFIER, steps=30),
    base=BaseTraining(model=TINY_DENOISER, steps=30, warmup=5),
    normalisation_samples_per_prompt=3,
    align=False,
)


def test_train_all_writes_a_loadable_reproducible_folder(tmp_path: Path) -> None:
    stages: list[str] = []
    manifest = train_all(tmp_path / "a", TINY, lambda s, i, n, loss: stages.append(s))
    assert stages[0] == "classifier" and "base" in stages and stages[-1] == "normalisation"
    bundle = load_digits_bundle(tmp_path / "a")
    assert bundle.experts == {} and bundle.oracles == ()
    assert manifest["seeds"]["base"] == 0 and "torch" in manifest["versions"]
    assert set(manifest["reward_normalisation"]) == {"legibility", "boldness", "symmetry"}
    train_all(tmp_path / "b", TINY)
    for name in ("base.safetensors", "classifier.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging left


def test_a_failed_run_leaves_the_old_folder_untouched(tmp_path: Path) -> None:
    train_all(tmp_path / "w", TINY)
    before = {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir()}

    def explode(stage: str, step: int, total: int, loss: float) -> None:
        if stage == "base" and step == 10:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_all(tmp_path / "w", TINY, explode)
    assert {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_train_all_trains_every_expert_and_oracle_of_every_seed_as_adapters(
    tmp_path: Path,
) -> None:
    cfg = DigitsTrainConfig(
        classifier=TINY.classifier,
        base=TINY.base,
        normalisation_samples_per_prompt=3,
        experts=(("boldness", "fixed"), ("legibility", "learned")),
        oracle_weights=((("legibility", 0.5), ("boldness", 0.5)),),
        align_seeds=(0, 3),
        align_config=AlignConfig(num_steps=2, batch_size=16, eval_samples=20),
        pairs_config=PairsConfig(num_chains=10, batch_size=10),
    )
    stages: list[str] = []
    manifest = train_all(tmp_path / "w", cfg, lambda s, i, n, loss: stages.append(s))
    expected = [(r, k, s) for s in (0, 3) for r, k in cfg.experts]
    assert [(e["reward"], e["kind"], e["seed"]) for e in manifest["experts"]] == expected
    assert [(e["kind"], e["seed"]) for e in manifest["oracles"]] == [
        (k, s) for s in (0, 3) for k in ("fixed", "learned")
    ]
    assert manifest["seeds"]["align"] == [0, 3] and manifest["default_seed"] == 0
    assert "peft" in manifest["versions"]
    for e in manifest["experts"] + manifest["oracles"]:
        assert e["storage"] == "lora" and e["training"]["seed"] == e["seed"]
        metrics = e["metrics"]
        assert set(metrics["reward_gains"]) == {"legibility", "boldness", "symmetry", "accuracy"}
        gains = metrics["reward_gains"]
        rewards, base = metrics["rewards"], metrics["base_rewards"]
        assert gains["boldness"] == pytest.approx(rewards["boldness"] - base["boldness"])
    assert {"pairs seed 0", "pairs seed 3", "expert boldness/fixed seed 3"} <= set(stages)
    bundle = load_digits_bundle(tmp_path / "w")
    assert bundle.seeds == (0, 3)
    assert bundle.expert("legibility", "learned", seed=3).spec.variance_type == "learned_log"
    assert bundle.oracle({"legibility": 0.5, "boldness": 0.5}, "learned", seed=3).kl_coef == 1.0
    on_disk = json.loads((tmp_path / "w" / "manifest.json").read_text())
    timings = on_disk["timings_s"]
    assert timings["expert boldness/fixed seed 3"] > 0 and timings["total"] > 0
    table = Console(record=True, width=200)
    table.print(gains_table(on_disk))
    text = table.export_text()
    assert text.count("boldness ") >= 2 and "legibility=0.5,boldness=0.5" in text


def test_train_all_refuses_a_file_as_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        train_all(tmp_path / "f", TINY)
    with pytest.raises(ValueError, match="does not exist"):
        train_all(tmp_path / "no" / "w", TINY)
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        DigitsTrainConfig(experts=(("beauty", "fixed"),))
    with pytest.raises(ValueError, match="align_seeds must be distinct"):
        DigitsTrainConfig(align_seeds=(1, 1))
    with pytest.raises(ValueError, match=r"align_seeds\[1\] must be >= 0"):
        DigitsTrainConfig(align_seeds=(0, -1))
    with pytest.raises(ValueError, match="oracle kinds must be in"):
        DigitsTrainConfig(oracle_kinds=("wide",))


@pytest.mark.parametrize("command", [["train"], ["toy", "train"]])  # toy train: the old name
def test_train_cli_refusals(tmp_path: Path, monkeypatch, command: list[str]) -> None:
    from typer.testing import CliRunner

    from msdda.cli import app

    runner = CliRunner()
    (tmp_path / "f").write_text("x")
    for args, message in [
        (["--out", str(tmp_path / "f")], "exists and is not a folder"),
        (["--out", str(tmp_path / "no" / "w")], "does not exist"),
        (["--out", str(tmp_path / "w"), "--seed", "2", "--seed", "2"], "must be distinct"),
    ]:
        result = runner.invoke(app, [*command, *args])
        assert result.exit_code != 0 and message in result.output.replace("\n", " ")
        assert "Traceback" not in result.output
    import msdda.digits

    monkeypatch.setitem(sys.modules, "msdda.digits.align", None)  # as if peft were missing
    monkeypatch.delattr(msdda.digits, "align")
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "w")])
    assert result.exit_code != 0 and "pass --no-align" in result.output.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
