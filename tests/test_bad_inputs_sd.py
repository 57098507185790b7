"""Bad inputs to the Stable Diffusion side: one clear error, before any model is built.

Four families, each generated from classes, on the tiny SD models of
:mod:`msdda.sd.testing` saved in the real formats:

- files: every safetensors file a pipeline reads (the base's UNet, text encoder and VAE,
  an expert's UNet, a LoRA file, a peft folder's weights) x garbage bytes / truncated /
  empty / corrupt header / pickle-only; every JSON config x not JSON; configs naming
  another class or architecture; LoRAs that do not fit the base (other shapes, a rank
  that differs between the factors, a factor missing, layers the base lacks): one
  :class:`~msdda.errors.InputFileError` naming the file, raised before the base pipeline
  is loaded (its header or config already shows the problem), nothing written;
- numbers: every numeric argument of the pipelines' ``__call__`` and of
  :func:`msdda.sd.cli.generate_sd` x NaN, infinity, ``True``, ``"1"``, huge and negative:
  a ``TypeError`` (not a number) or ``ValueError`` (out of range) naming the argument;
- outputs: unwritable (under a file), over-long and folder outputs of ``generate_sd``: an
  :class:`~msdda.errors.OutputError` before any loading;
- the command: the file classes through ``msdda generate --base ... --expert ...``: exit
  code 2, at most 6 lines, no traceback, nothing written; and ``import msdda.sd`` prints
  nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import DiffusionPipeline, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from msdda.cli import app  # noqa: E402
from msdda.errors import InputFileError, OutputError  # noqa: E402
from msdda.sd import MSDDAStableDiffusionPipeline  # noqa: E402
from msdda.sd.cli import generate_sd  # noqa: E402
from msdda.sd.testing import (  # noqa: E402
    TinySDConfig,
    save_random_lora,
    save_tiny_pipeline,
    tiny_sd_components,
    tiny_unet,
)

torch.set_num_threads(1)
runner = CliRunner()
MAX_LINES = 6


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_sd")
    base = save_tiny_pipeline(root / "base")
    unet = StableDiffusionPipeline.from_pretrained(base).unet
    return {
        "root": root,
        "base": base,
        "expert": save_tiny_pipeline(root / "expert", unet_seed=1),
        "lora": save_random_lora(unet, root / "lora" / "style.safetensors", seed=1),
        "peft": save_random_lora(unet, root / "peft", fmt="peft", seed=2),
    }


class Built(AssertionError):
    """A model was loaded where the files should have been refused first."""


@pytest.fixture
def unbuilt(monkeypatch):
    """Loading the base pipeline (the first model a call builds) raises :class:`Built`."""

    def built(*args, **kwargs):
        raise Built("the base pipeline was loaded before the bad file was refused")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(built))


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------- bad files
def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _corrupt_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\xff" * 32 + data[40:])


def _pickle_only(path: Path) -> Path:
    """The weights as a pickle (never unpickled) instead of safetensors."""
    torch.save({"weight": torch.zeros(2)}, path.with_suffix(".bin"))
    path.unlink()
    return path.with_suffix(".bin")


SAFETENSORS_CLASSES: dict[str, Callable] = {
    "garbage": _garbage,
    "truncated": _truncated,
    "empty": _empty,
    "corrupt-header": _corrupt_header,
    "pickle-only": _pickle_only,
}

#: The safetensors files a call reads: (which copy, its path inside, the expert given).
WEIGHT_FILES = {
    "base unet": ("base", "unet/diffusion_pytorch_model.safetensors", "lora"),
    "base text encoder": ("base", "text_encoder/model.safetensors", "lora"),
    "base vae": ("base", "vae/diffusion_pytorch_model.safetensors", "lora"),
    "expert unet": ("expert", "unet/diffusion_pytorch_model.safetensors", "expert"),
    "lora file": ("lora", "style.safetensors", "lora"),
    "peft weights": ("peft", "adapter_model.safetensors", "peft"),
}


def _copies(disk, tmp_path: Path, which: str) -> tuple[Path, Path]:
    """(base folder, expert path) for a call, the ``which`` one (base, expert, lora, peft)
    copied to ``tmp_path`` so it can be spoilt; the expert is the LoRA file otherwise."""
    copy = tmp_path / which
    shutil.copytree(disk[which].parent if which == "lora" else disk[which], copy)
    base = copy if which == "base" else disk["base"]
    expert = {"lora": copy / "style.safetensors", "peft": copy, "expert": copy}
    return base, expert.get(which, disk["lora"])


def _refused(disk, tmp_path, base: Path, expert: Path, named: Path) -> InputFileError:
    """The call's one InputFileError, naming ``named``, with ``tmp_path`` unchanged."""
    before = _tree(tmp_path)
    with pytest.raises(InputFileError) as info:
        MSDDAStableDiffusionPipeline.from_pretrained(base, experts={"style": expert})
    assert str(named) in str(info.value), info.value
    assert str(info.value).count("\n") == 0
    assert _tree(tmp_path) == before
    return info.value


@pytest.mark.parametrize("kind", list(SAFETENSORS_CLASSES))
@pytest.mark.parametrize("file", list(WEIGHT_FILES))
def test_a_bad_weight_file_is_named_before_any_model_is_built(disk, tmp_path, unbuilt, file, kind):
    which, inner, _ = WEIGHT_FILES[file]
    base, expert = _copies(disk, tmp_path, which)
    target = tmp_path / which / inner
    spoilt = SAFETENSORS_CLASSES[kind](target) or target
    named = spoilt.parent if kind == "pickle-only" and which != "lora" else spoilt
    if kind == "pickle-only" and which == "lora":
        expert = spoilt  # a .bin file given as the LoRA
    err = _refused(disk, tmp_path, base, expert, named)
    if kind == "pickle-only":
        assert "pickle" in str(err)


def _not_json(path: Path) -> None:
    path.write_text('{"_class_name": "UNet2DConditionModel", ')


def _set(**changes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


#: JSON files a call reads x what is wrong: (which copy, path inside, edit, words).
CONFIG_CASES = {
    "index not json": ("base", "model_index.json", _not_json, "not readable"),
    "base unet config not json": ("base", "unet/config.json", _not_json, "not readable"),
    "text encoder config not json": ("base", "text_encoder/config.json", _not_json, "readable"),
    "scheduler config not json": (
        "base", "scheduler/scheduler_config.json", _not_json, "not readable",
    ),
    "base unet names another class": (
        "base", "unet/config.json", _set(_class_name="UNet2DModel"), "UNet2DModel",
    ),
    "base unet config of other sizes": (
        "base", "unet/config.json", _set(block_out_channels=[8, 24]), "do not fit",
    ),
    "text encoder config of other sizes": (
        "base", "text_encoder/config.json", _set(hidden_size=24), "do not fit",
    ),
    "expert config not json": ("expert", "unet/config.json", _not_json, "not readable"),
    "expert names another class": (
        "expert", "unet/config.json", _set(_class_name="UNet2DModel"), "UNet2DModel",
    ),
    "expert of another architecture": (
        "expert", "unet/config.json", _set(block_out_channels=[8, 24]), "block_out_channels",
    ),
    "expert scheduler not json": (
        "expert", "scheduler/scheduler_config.json", _not_json, "not readable",
    ),
    "expert of other noise tables": (
        "expert", "scheduler/scheduler_config.json", _set(beta_end=0.02), "noise tables",
    ),
    "peft config not json": ("peft", "adapter_config.json", _not_json, "not readable"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_config_is_named_before_any_model_is_built(disk, tmp_path, unbuilt, case):
    which, inner, edit, words = CONFIG_CASES[case]
    base, expert = _copies(disk, tmp_path, which)
    edit(tmp_path / which / inner)
    named = tmp_path / which / inner
    if "do not fit" in words:
        named = named.parent  # the weights of the folder do not fit its config
    err = _refused(disk, tmp_path, base, expert, named)
    assert words in str(err)


# --------------------------------------------------------------------------- misfit LoRAs
def _rank_mismatch(state: dict) -> dict:
    key = next(k for k in state if ".lora_B." in k)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    return state


def _factor_missing(state: dict) -> dict:
    del state[next(k for k in state if ".lora_B." in k)]
    return state


def _foreign_layers(state: dict) -> dict:
    """Keys of a deeper UNet (another architecture): a third down block."""
    return {k.replace("down_blocks.1.", "down_blocks.3."): v for k, v in state.items()}


MISFITS = {
    "rank differs between factors": (_rank_mismatch, "rank"),
    "a factor is missing": (_factor_missing, "other factor"),
    "layers of another architecture": (_foreign_layers, "not in the base"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_lora_that_does_not_fit_is_named_before_any_model_is_built(disk, tmp_path, unbuilt, case):
    edit, words = MISFITS[case]
    path = tmp_path / "misfit.safetensors"
    save_file(edit(load_file(disk["lora"])), path)
    err = _refused(disk, tmp_path, disk["base"], path, path)
    assert words in str(err) and "does not fit" in str(err)


def test_a_lora_of_other_shapes_is_named_before_any_model_is_built(disk, tmp_path, unbuilt):
    path = save_random_lora(
        tiny_unet(TinySDConfig(block_out_channels=(8, 24))), tmp_path / "w.safetensors"
    )
    err = _refused(disk, tmp_path, disk["base"], path, path)
    assert "do not fit its weight" in str(err) and "more)" in str(err)


def test_a_misfit_lora_on_a_built_pipeline_leaves_it_clean(disk, tmp_path):
    pipe = MSDDAStableDiffusionPipeline.from_pretrained(disk["base"])
    path = save_random_lora(
        tiny_unet(TinySDConfig(block_out_channels=(8, 24))), tmp_path / "w.safetensors"
    )
    with pytest.raises(InputFileError, match="does not fit"):
        pipe.load_experts({"w": path})
    assert pipe.expert_names == []
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())


# --------------------------------------------------------------------------- numbers
#: Values that are not numbers, or not in any useful range: what each must raise.
BAD = {
    "nan": (math.nan, ValueError),
    "inf": (math.inf, ValueError),
    "bool": (True, TypeError),
    "str": ("1", TypeError),
    "huge": (2**1100, ValueError),
    "negative": (-1, ValueError),
}
INT_BAD = {**BAD, "nan": (math.nan, TypeError), "inf": (math.inf, TypeError)}

#: Every numeric argument of the pipeline call: (how it is given, value classes refused).
CALL_ARGS = {
    "num_inference_steps": (lambda v: {"num_inference_steps": v}, INT_BAD),
    "height": (lambda v: {"height": v}, INT_BAD),
    "width": (lambda v: {"width": v}, INT_BAD),
    "num_images_per_prompt": (lambda v: {"num_images_per_prompt": v}, INT_BAD),
    "clip_skip": (lambda v: {"clip_skip": v}, INT_BAD),
    "guidance_scale": (lambda v: {"guidance_scale": v}, BAD),
    "eta": (lambda v: {"eta": v}, BAD),
    "guidance_rescale": (lambda v: {"guidance_rescale": v}, BAD),
    "kl_coef": (lambda v: {"kl_coef": v}, BAD),
    "weights": (lambda v: {"weights": {"style": v, "dpo": 0.5}}, BAD),
    "kl_coefs": (lambda v: {"kl_coefs": {"style": v, "dpo": 1.0}}, BAD),
    "expert_etas": (lambda v: {"expert_etas": {"style": v}}, BAD),
    "expert_guidance_scales": (lambda v: {"expert_guidance_scales": {"style": v}}, BAD),
}
#: Negative values that mean something: a guidance scale below 1 turns guidance off.
ALLOWED = {("guidance_scale", "negative"), ("expert_guidance_scales", "negative")}


def _number_cases(args):
    for arg, (_, classes) in args.items():
        for kind, (value, error) in classes.items():
            if (arg, kind) not in ALLOWED:
                yield pytest.param(arg, value, error, id=f"{arg}-{kind}")


@pytest.fixture(scope="module")
def pipe(disk):
    p = MSDDAStableDiffusionPipeline(**tiny_sd_components())
    p.load_experts({"style": disk["lora"], "dpo": disk["expert"]})
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize(("arg", "value", "error"), list(_number_cases(CALL_ARGS)))
def test_a_bad_number_in_the_call_is_refused_naming_it(pipe, monkeypatch, arg, value, error):
    import msdda.sd.pipeline as pipeline

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before the argument was refused")

    monkeypatch.setattr(pipeline, "sample_chain", sampled)
    given = CALL_ARGS[arg][0](value)
    kwargs = {"weights": {"style": 0.5, "dpo": 0.5}, "num_inference_steps": 2, **given}
    with pytest.raises(error) as info:
        pipe("a red cube", output_type="latent", **kwargs)
    assert arg in str(info.value), info.value


def test_the_call_accepts_the_good_numbers(pipe):
    out = pipe(
        "a red cube",
        {"style": 0.5, "dpo": 0.5},
        num_inference_steps=2,
        height=32,
        width=32,
        num_images_per_prompt=1,
        guidance_scale=-1.0,  # below 1: no guidance
        output_type="latent",
    )
    assert torch.isfinite(out.images).all()


GENERATE_ARGS = {
    "num_samples": (lambda v: {"num_samples": v}, INT_BAD),
    "seed": (lambda v: {"seed": v}, {**INT_BAD, "huge": (2**64, ValueError)}),
    "steps": (lambda v: {"steps": v}, INT_BAD),
    "guidance_scale": (lambda v: {"guidance_scale": v}, BAD),
    "eta": (lambda v: {"eta": v}, BAD),
    "kl_coef": (lambda v: {"kl_coef": v}, BAD),
}


@pytest.mark.parametrize(("arg", "value", "error"), list(_number_cases(GENERATE_ARGS)))
def test_a_bad_number_of_generate_is_refused_before_loading(
    disk, tmp_path, unbuilt, arg, value, error
):
    out = tmp_path / "img.png"
    with pytest.raises(error) as info:
        generate_sd(**_generate_args(disk, out), **GENERATE_ARGS[arg][0](value))
    assert arg in str(info.value), info.value
    assert list(tmp_path.iterdir()) == []


def _generate_args(disk, out) -> dict:
    return dict(
        base=str(disk["base"]),
        experts={"style": str(disk["lora"])},
        weights={"style": 1.0},
        prompt="a red cube",
        out=out,
    )


# --------------------------------------------------------------------------- outputs
OUTPUTS = {
    "unwritable (its folder is a file)": (
        lambda t: (t / "f").write_text("") or t / "f" / "img.png", "not a folder",
    ),
    "over-long name": (lambda t: t / ("x" * 300 + ".png"), "longer than"),
    "a folder": (lambda t: (t / "dir.png").mkdir() or t / "dir.png", "is a folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_a_bad_output_is_refused_before_loading(disk, tmp_path, unbuilt, case):
    make, words = OUTPUTS[case]
    out = make(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match=words):
        generate_sd(**_generate_args(disk, out))
    assert _tree(tmp_path) == before


# --------------------------------------------------------------------------- the command
def _cli_case(disk, tmp_path, name: str) -> tuple[list[str], Path]:
    """argv of ``msdda generate --base ...`` for one bad-file case, and the file to name."""
    if name in WEIGHT_FILES:
        which, inner, _ = WEIGHT_FILES[name]
        base, expert = _copies(disk, tmp_path, which)
        named = tmp_path / which / inner
        _garbage(named)
    elif name in CONFIG_CASES:
        which, inner, edit, _ = CONFIG_CASES[name]
        base, expert = _copies(disk, tmp_path, which)
        named = tmp_path / which / inner
        edit(named)
    else:  # a LoRA that does not fit: other shapes
        base, named = disk["base"], tmp_path / "wide.safetensors"
        expert = save_random_lora(tiny_unet(TinySDConfig(block_out_channels=(8, 24))), named)
    argv = ["generate", "--base", str(base), "--expert", f"style={expert}", "--prompt", "cube",
            "--weight", "style=1", "--steps", "1", "--out", str(tmp_path / "img.png")]  # fmt: skip
    return argv, named


CLI_CASES = [*WEIGHT_FILES, "expert of another architecture", "base unet names another class",
             "peft config not json", "misfit lora"]  # fmt: skip


@pytest.mark.parametrize("name", CLI_CASES)
def test_the_command_refuses_a_bad_file_in_one_short_message(disk, tmp_path, unbuilt, name):
    argv, named = _cli_case(disk, tmp_path, name)
    before = _tree(tmp_path)
    result = runner.invoke(app, argv)
    assert not isinstance(result.exception, Built), result.output
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    output = result.output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= MAX_LINES, output
    assert named.name in output.replace("\n", "")
    assert _tree(tmp_path) == before


def test_the_command_refuses_an_unwritable_output_before_loading(disk, tmp_path, unbuilt):
    out = tmp_path / ("x" * 300 + ".png")
    argv = ["generate", "--base", str(disk["base"]), "--expert", f"style={disk['lora']}",
            "--prompt", "cube", "--weight", "style=1", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "longer than" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_suite_covers_enough_cases():
    files = len(WEIGHT_FILES) * len(SAFETENSORS_CLASSES) + len(CONFIG_CASES) + len(MISFITS) + 1
    numbers = len(list(_number_cases(CALL_ARGS))) + len(list(_number_cases(GENERATE_ARGS)))
    assert files + numbers + len(OUTPUTS) + len(CLI_CASES) >= 50


# --------------------------------------------------------------------------- importing
def test_importing_prints_nothing():
    """``import msdda``, the commands (what ``msdda --help`` loads) and the SD side, in one
    fresh interpreter: nothing on stdout or stderr."""
    code = "import msdda, msdda.cli, msdda.sd, msdda.sd.pipeline, msdda.sd.cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_the_import_filter_keeps_other_notices():
    import logging

    import msdda.sd  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("`XImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]
