"""The Stable Diffusion sweep on tiny SD3 and FLUX models, by config alone.

examples/tiny-flow.toml (and its FLUX twin: the same file with the paths of
examples/make_tiny_flow.py's flux/ folder) runs every method that reads no reward (base,
msdda, db, db-ls, rs) at three weights on one prompt and one seed; the family is read from
the base folder. `msdda report` reads the results; a second identical run writes equal
rows. Beside it: the flow keys of the config, the Flow-GRPO recipe config parsed without
its weights, experts with their own noise levels (MSDDA then departs from velocity mixing),
and the reward-reading methods' x0 prediction on a flow schedule.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from msdda.cli import app
from msdda.errors import InputFileError
from msdda.evaluation import read_results, run_sweep
from msdda.evaluation.config import ConfigError, load_config
from msdda.flows import FlowStepSpec
from msdda.gaussians import step_gaussian
from msdda.methods import MethodSettings, run_method
from msdda.rewards import tweedie_step_reward, tweedie_x0
from msdda.sd.families import detect_family
from msdda.sd.sweep import read_picture, sd_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHODS = {"base", "msdda", "db", "db-ls", "rs"}
runner = CliRunner()


def config_text(family: str, **changes: str) -> str:
    """examples/tiny-flow.toml on the tiny ``family`` model, with text replacements."""
    text = (
        (EXAMPLES / "tiny-flow.toml").read_text().replace("tiny-flow/sd3/", f"tiny-flow/{family}/")
    )
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny models, a config per family, and one finished sweep per family."""
    folder = tmp_path_factory.mktemp("tiny-flow")
    runpy.run_path(str(EXAMPLES / "make_tiny_flow.py"))["make_tiny_flow"](folder / "tiny-flow")
    for family in ("sd3", "flux"):
        (folder / f"{family}.toml").write_text(config_text(family))
        run_sweep(load_config(folder / f"{family}.toml"), folder / f"{family}.jsonl")
    return folder


def comparable(results) -> dict:
    """Rows without their timings and memory: equal for equal seeds."""
    return {
        r.key: (r.rewards, r.nfe_per_image, r.kl_from_base, r.drift_from_base) for r in results.rows
    }


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_expert_only_method_runs_by_config_alone(tiny, family):
    results = read_results(tiny / f"{family}.jsonl")
    assert results.header["config"]["domain_options"]["family"] == family
    assert {r.method for r in results.rows} == METHODS
    assert len(results.rows) == 1 + 4 * 3  # base once, 4 weighted methods at 3 weights
    for r in results.rows:
        assert set(r.rewards) == {"aesthetic", "clip", "pickscore"}
        assert all(torch.isfinite(torch.tensor(list(r.rewards.values()))))
        assert (r.kl_from_base == 0) == (r.method == "base")
        assert read_picture(tiny / r.image_files[0]).shape == (3, 32, 32)
    by_key = {(r.method, r.weights): r for r in results.rows}
    # equal noise levels, lambdas on the simplex: MSDDA is velocity mixing (db), and its one
    # forward per step evaluates both LoRA experts
    for w in ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0)):
        kl_msdda, kl_db = by_key["msdda", w].kl_from_base, by_key["db", w].kl_from_base
        assert kl_msdda == pytest.approx(kl_db, rel=1e-4)
    assert by_key["msdda", (0.5, 0.5)].nfe_per_image == 2 * by_key["base", None].nfe_per_image
    assert by_key["rs", (0.5, 0.5)].kl_from_base != by_key["rs", (1.0, 0.0)].kl_from_base


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_second_identical_run_writes_equal_rows(tiny, family):
    again = tiny / f"{family}-again.jsonl"
    run_sweep(load_config(tiny / f"{family}.toml"), again)
    first, second = read_results(tiny / f"{family}.jsonl"), read_results(again)
    assert comparable(first) == comparable(second)
    for a, b in zip(first.rows, second.rows, strict=True):
        assert (
            read_picture(tiny / a.image_files[0]) == read_picture(tiny / b.image_files[0])
        ).all()


def test_report_on_a_flow_sweep(tiny):
    out = tiny / "sd3-report"
    result = runner.invoke(app, ["report", str(tiny / "sd3.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "pareto.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## Where MSDDA stands" in text and "## Latency and memory" in text


def test_experts_with_their_own_noise_levels_are_fused_by_precision(tiny):
    text = config_text(
        "sd3", **{'reward = "clip"': 'reward = "clip"\nnoise_level = 0.9\nstep_rule = "cps"'}
    )
    (tiny / "levels.toml").write_text(text)
    options = dict(load_config(tiny / "levels.toml").domain_options)
    sd = sd_sweep(**options)
    specs = [e.spec for e in sd.context.experts]
    assert specs == [FlowStepSpec("sde", 0.7), FlowStepSpec("cps", 0.9)]
    cond = sd.condition(["a lighthouse on a rocky point"])
    msdda, db = (run_method(m, sd.context, (0.5, 0.5), cond, [0]) for m in ("msdda", "db"))
    assert (msdda.samples - db.samples).abs().max() > 1e-3  # no longer velocity mixing
    with pytest.raises(ValueError, match="rs needs experts with one StepSpec"):
        run_method("rs", sd.context, (0.5, 0.5), cond, [0])


def test_reward_reading_methods_run_on_flow_models(tiny):
    sd = sd_sweep(**dict(load_config(tiny / "flux.toml").domain_options))
    ctx, cond = sd.context, sd.condition(["a fox", "a cat"])
    # x0 of a flow model is the step Gaussian's pred_x0, x - sigma v, at every key
    x = torch.randn(2, *ctx.sample_shape, generator=torch.Generator().manual_seed(0))
    ref = ctx.reference
    for t in ctx.schedule.timesteps:
        v = ref.denoiser(x, torch.full((2,), t), cond)
        g = step_gaussian(v, x, t, ctx.schedule, ref.spec)
        x0 = tweedie_x0(ref.denoiser, x, t, cond, ctx.schedule, "flow")
        assert torch.allclose(x0, g.pred_x0, atol=1e-6)
    with pytest.raises(ValueError, match="'flow' on a flow schedule"):
        tweedie_step_reward(lambda i, p: i.mean((1, 2, 3)), ref.denoiser, ctx.schedule)
    base = run_method("base", ctx, None, cond, [0, 1])
    settings = MethodSettings(rgg_scale=5.0, code_candidates=2, code_block=1, target_candidates=2)
    for method in ("rgg", "code", "target"):
        run = run_method(method, ctx, (0.5, 0.5), cond, [0, 1], settings=settings)
        assert torch.isfinite(run.samples).all()
        assert (run.samples - base.samples).abs().max() > 1e-3  # the rewards steered it


SD_NOISE, EXPERT_NOISE = "noise_level = 0.7          # the", "noise_level = 0.7          # per"
EXPERT_RULE = 'step_rule = "sde"          # rs'


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("sd3", {SD_NOISE: "eta = 1.0 #"},
         r"\[sd\]\.eta does not apply to a sd3 model: .*noise_level and step_rule"),
        ("sd3", {'step_rule = "sde"          # sde': 'step_rule = "ode" #'},
         r"\[sd\]\.step_rule must be one of sde, cps, dance"),
        ("flux", {EXPERT_NOISE: "noise_level = 1.5 #", EXPERT_RULE: 'step_rule = "cps" #'},
         r"\[experts\.aesthetic\]: noise_level of rule 'cps' must be .* in \[0, 1\]"),
        ("sd3", {EXPERT_NOISE: "noise_level = 0.0 #"},
         r"\[experts\.aesthetic\]\.noise_level = 0 is a deterministic step .*msdda"),
        ("flux", {'# family = "sd3"': 'family = "sd3"'},
         r"\[sd\]\.family is 'sd3', but the base is a flux pipeline"),
        ("sd3", {SD_NOISE: "guidance_rescale = 0.7 #"},
         r"\[sd\]\.guidance_rescale does not apply to a sd3 model"),
    ],
)  # fmt: skip
def test_bad_flow_keys_are_refused_naming_the_key(tiny, family, changes, message):
    (tiny / "bad.toml").write_text(config_text(family, **changes))
    with pytest.raises(ConfigError, match=message):
        load_config(tiny / "bad.toml")


def test_flow_keys_are_refused_for_an_sd_model(tmp_path):
    text = (EXAMPLES / "tiny-sd.toml").read_text().replace("eta = 1.0 ", "noise_level = 0.7 ")
    (tmp_path / "sd.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"\[sd\]\.noise_level does not apply to a sd model"):
        load_config(tmp_path / "sd.toml", check_files=False)


def test_the_flow_grpo_recipe_config_parses_without_its_weights():
    config = load_config(EXAMPLES / "sd35-flow-grpo.toml", check_files=False)
    options = dict(config.domain_options)
    assert options["family"] == "sd3" and "eta" not in options
    assert (options["steps"], options["guidance"]) == (40, 4.5)
    assert (options["noise_level"], options["step_rule"]) == (0.7, "sde")
    assert [e["name"] for e in options["experts"]] == ["geneval", "ocr", "pickscore"]
    assert len(config.weights) == 7 and all(len(w) == 3 for w in config.weights)
    assert set(config.methods) >= METHODS
    with pytest.raises(ConfigError, match=r"\[sd\]\.base: .*local Hugging Face cache"):
        load_config(EXAMPLES / "sd35-flow-grpo.toml")  # the weights are not here


def test_a_model_index_holding_a_list_is_refused_naming_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(InputFileError, match=r"model_index\.json.*holds a list"):
        detect_family(tmp_path)
