"""``msdda generate``: digits to PNG and .npy, the Stable Diffusion hand-off, and refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from msdda.cli import app
from msdda.digits.store import DEFAULT_WEIGHTS_DIR

runner = CliRunner()
SEVENS = [
    "--domain",
    "digits",
    "--prompt",
    "7",
    "--weight",
    "legibility=0.3",
    "--weight",
    "boldness=0.7",
]


def _run(args: list[str]):
    return runner.invoke(app, ["generate", *args])


def _refused(args: list[str], message: str) -> None:
    result = _run(args)
    assert result.exit_code != 0, result.output
    assert message in result.output.replace("\n", " "), result.output
    assert "Traceback" not in result.output


def test_png_grid(tmp_path: Path) -> None:
    out = tmp_path / "sevens.png"
    result = _run([*SEVENS, "--num-samples", "16", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 16 samples of digit 7" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sevens.png"]


def test_npy_samples_are_reproducible(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.npy" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1), strict=True):
        result = _run([*SEVENS, "--num-samples", "8", "--seed", str(seed), "--out", str(path)])
        assert result.exit_code == 0, result.output
    a, b, c = (np.load(p) for p in paths)
    assert a.shape == (8, 8, 8) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_kl_coef_and_learned_experts(tmp_path: Path) -> None:
    out = tmp_path / "s.npy"
    args = [*SEVENS, "--num-samples", "4", "--out", str(out)]
    assert _run([*args, "--kl-coef", "2.0"]).exit_code == 0  # lambda_0 = 0.5: the base joins
    strong = np.load(out)
    assert _run([*args, "--expert-kind", "learned"]).exit_code == 0
    learned = np.load(out)
    assert not np.array_equal(strong, learned)


def test_refusals(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "x.png")]
    _refused(["--prompt", "7", "--weight", "beauty=1", *out], "unknown reward 'beauty'")
    _refused(["--prompt", "12", "--weight", "boldness=1", *out], "--prompt must be a digit 0-9")
    _refused(["--prompt", "seven", "--weight", "boldness=1", *out], "--prompt must be a digit 0-9")
    _refused(["--prompt", "7", "--weight", "boldness", *out], "--weight must look like NAME=VALUE")
    _refused(["--prompt", "7", "--weight", "boldness=-1", *out], "must be a non-negative")
    _refused(["--prompt", "7", "--weight", "boldness=x", *out], "the weight must be a number")
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--weight", "boldness=2", *out], "given twice"
    )
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--expert-kind", "wide", *out], "--expert-kind"
    )
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--kl-coef", "0", *out], "--kl-coef must be"
    )
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--domain", "faces", *out], "--domain must be"
    )
    _refused(["--prompt", "7", "--weight", "boldness=1", "--out", str(tmp_path)], "is a folder")
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--out", str(tmp_path / "no" / "x.png")],
        "does not exist",
    )
    _refused(
        ["--prompt", "7", "--weight", "boldness=1", "--out", str(tmp_path / "x.jpg")],
        ".png or .npy",
    )
    _refused(
        ["--domain", "digits", "--base", "sd", "--prompt", "a cat", "--weight", "a=1", *out],
        "--domain and --base are mutually exclusive",
    )
    assert list(tmp_path.iterdir()) == []  # nothing written by a refused command


def test_corrupt_weights_are_named(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in DEFAULT_WEIGHTS_DIR.iterdir():
        (weights / f.name).write_bytes(f.read_bytes())
    broken = weights / "expert-boldness-fixed.safetensors"
    broken.write_bytes(broken.read_bytes()[:1000])
    out = tmp_path / "x.npy"
    args = [*SEVENS, "--weights-dir", str(weights), "--out", str(out)]
    _refused(args, "expert-boldness-fixed.safetensors: the weight file is truncated")
    broken.unlink()
    _refused(args, "expert-boldness-fixed.safetensors: no such weight file")
    assert not out.exists()


def test_stable_diffusion_is_handed_to_the_sd_extra(tmp_path: Path, monkeypatch) -> None:
    calls = {}

    def fake_generate_sd(**kwargs):
        calls.update(kwargs)
        kwargs["out"].write_bytes(b"png")
        return kwargs["out"]

    import msdda.sd.cli

    monkeypatch.setattr(msdda.sd.cli, "generate_sd", fake_generate_sd)
    out = tmp_path / "cat.png"
    args = [
        "--base",
        "base-dir",
        "--expert",
        "aesthetic=a",
        "--expert",
        "reward=b",
        "--prompt",
        "a cat",
    ]
    args += [
        "--weight",
        "aesthetic=0.4",
        "--weight",
        "reward=0.6",
        "--num-samples",
        "2",
        "--out",
        str(out),
    ]
    result = _run(
        [*args, "--steps", "20", "--guidance-scale", "5", "--eta", "0.5", "--kl-coef", "2"]
    )
    assert result.exit_code == 0, result.output
    assert calls == {
        "base": "base-dir",
        "experts": {"aesthetic": "a", "reward": "b"},
        "weights": {"aesthetic": 0.4, "reward": 0.6},
        "prompt": "a cat",
        "out": out,
        "num_samples": 2,
        "seed": 0,
        "steps": 20,
        "guidance_scale": 5.0,
        "eta": 0.5,
        "kl_coef": 2.0,
    }


def test_missing_sd_extra_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "msdda.sd.cli", None)  # import fails as if not installed
    _refused(
        ["--base", "b", "--prompt", "a cat", "--weight", "a=1", "--out", str(tmp_path / "c.png")],
        "the Stable Diffusion extra is not available",
    )


def test_digits_refuses_sd_options(tmp_path: Path) -> None:
    _refused(
        [
            "--prompt",
            "7",
            "--weight",
            "boldness=1",
            "--expert",
            "a=b",
            "--out",
            str(tmp_path / "x.png"),
        ],
        "--expert is for Stable Diffusion",
    )
