"""``msdda app``: the digits and Stable Diffusion apps, served on loopback, driven by gradio_client.

Each app is launched in this process on a free 127.0.0.1 port and closed by the fixture
that started it; every call to it has a bounded wait.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from msdda.app import (  # noqa: E402
    BeyondLoopbackWarning,
    DigitsRequest,
    SDEngine,
    SDRequest,
    build_app,
    free_port,
    is_loopback,
    launch,
)
from msdda.app.ui import Runs, next_seed  # noqa: E402
from msdda.cli import app as cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT_S = 120  # the most any one call to a served app may take


def _serve(page):
    """Launch ``page`` on a free loopback port; returns (client, close)."""
    url = launch(page, "127.0.0.1", free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
    except BaseException:
        page.close()
        raise
    return client


def _call(client, *args):
    job = client.submit(*args, api_name="/generate")
    return job.result(timeout=TIMEOUT_S)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    page = build_app(front_samples=1)
    client = _serve(page)
    yield client
    client.close()
    page.close()
    mp.undo()


def _digits(client, weights=(0.5, 0.5, 0.0), kl=1.0, kind="fixed", n=8, seed=0, baseline="none"):
    """(grid pixels or None, baseline pixels or None, lambdas, message, seed) of one request."""
    grid, other, front, lambdas, info, message, used = _call(
        client, 7, *weights, kl, kind, n, seed, False, baseline
    )
    other = other.get("value") if isinstance(other, dict) else other
    if grid is not None:
        assert front is not None and _pixels(front).shape[2] == 3
        assert "λ_0" in info
    return (
        None if grid is None else _pixels(grid),
        None if other is None else _pixels(other),
        lambdas,
        message,
        used,
    )


def test_a_weight_change_changes_the_images(digits):
    a, _, lam_a, msg, _ = _digits(digits, (0.5, 0.5, 0.0))
    b, _, lam_b, _, _ = _digits(digits, (1.0, 0.0, 0.0))
    assert msg == ""
    assert a.shape == b.shape and a.shape[2] == 3
    assert not np.array_equal(a, b)
    assert lam_a == {"legibility": 0.5, "boldness": 0.5, "symmetry": 0.0, "lambda_0": 0.0}
    assert lam_b["legibility"] == 1.0 and lam_b["lambda_0"] == 0.0


def test_the_same_seed_and_weights_give_the_same_images(digits):
    a, _, _, _, seed_a = _digits(digits, (0.3, 0.2, 0.5), seed=11)
    b, _, _, _, _ = _digits(digits, (0.3, 0.2, 0.5), seed=11)
    c, _, _, _, _ = _digits(digits, (0.3, 0.2, 0.5), seed=12)
    assert seed_a == 11
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_the_kl_coefficient_sets_lambda_0_and_the_reference_joins(digits):
    _, _, lambdas, message, _ = _digits(digits, (0.5, 0.5, 0.0), kl=0.5)
    assert message == ""
    assert lambdas["legibility"] == pytest.approx(1.0)
    assert lambdas["lambda_0"] == pytest.approx(-1.0)


def test_all_weights_zero_is_refused_with_a_message(digits):
    grid, _, lambdas, message, _ = _digits(digits, (0.0, 0.0, 0.0))
    assert grid is None and lambdas == {}
    assert "Refused" in message and "every weight is 0" in message


def test_too_strong_an_extrapolation_is_refused_with_a_message(digits):
    grid, _, lambdas, message, _ = _digits(digits, (0.4, 0.3, 0.3), kl=0.01, kind="learned")
    assert grid is None
    assert "Refused" in message and "precision is not positive" in message
    assert lambdas["lambda_0"] == pytest.approx(-99.0)


def test_a_value_outside_a_slider_is_refused_by_the_server(digits):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="less than minimum"):
        _digits(digits, (0.5, -1.0, 0.0))


def test_the_baseline_runs_on_the_same_noise(digits):
    """Fixed-variance experts have equal variances: MSDDA's step is db's (epsilon mixing),
    so on the same noise the two grids agree to rounding; the base alone differs."""
    ours, db, _, _, _ = _digits(digits, (0.5, 0.2, 0.3), baseline="db")
    _, base, _, _, _ = _digits(digits, (0.5, 0.2, 0.3), baseline="base")
    assert db is not None and db.shape == ours.shape
    assert np.abs(ours.astype(int) - db.astype(int)).max() <= 2
    assert not np.array_equal(ours, base)


def test_randomise_draws_a_new_seed_and_reports_it():
    assert next_seed(5, False) == 5
    drawn = {next_seed(5, True) for _ in range(5)}
    assert len(drawn) > 1 and all(0 <= s < 2**53 for s in drawn)


def test_requests_are_checked():
    with pytest.raises(ValueError, match="one weight per objective"):
        DigitsRequest(7, (0.5, 0.5))
    with pytest.raises(ValueError, match="kl_coef"):
        DigitsRequest(7, (0.5, 0.5, 0.0), kl_coef=0.0)
    with pytest.raises(ValueError, match="baseline"):
        DigitsRequest(7, (0.5, 0.5, 0.0), baseline="rgg")
    with pytest.raises(ValueError, match="multiple of 8"):
        SDRequest("a cube", (1.0,), size=30)


def test_loopback_and_a_warning_beyond_it():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")

    class Page:  # records the call instead of binding anything
        def queue(self, **kw):
            self.queued = kw

        def launch(self, **kw):
            self.kw = kw

        local_url = "http://0.0.0.0:7860/"

    page = Page()
    with pytest.warns(BeyondLoopbackWarning, match="beyond loopback"):
        launch(page, "0.0.0.0", 7860, block=False)
    assert page.kw["server_name"] == "0.0.0.0" and page.kw["share"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", BeyondLoopbackWarning)
        launch(page, "127.0.0.1", 7860, block=False)


def test_the_command_refuses_sd_options_without_a_base():
    result = CliRunner().invoke(cli, ["app", "--expert", "a=b"])
    assert result.exit_code == 2 and "--expert is for Stable Diffusion" in result.output
    result = CliRunner().invoke(cli, ["app", "--base", "somewhere"])
    assert result.exit_code == 2 and "--base needs at least one --expert" in result.output


# --------------------------------------------------------------------------- Stable Diffusion


@pytest.fixture(scope="module")
def sd_disk(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from diffusers import StableDiffusionPipeline

    from msdda.sd.testing import save_random_lora, save_tiny_pipeline

    root = tmp_path_factory.mktemp("sd")
    base = save_tiny_pipeline(root / "base")
    unet = StableDiffusionPipeline.from_pretrained(base).unet
    experts = {
        "dpo": str(save_tiny_pipeline(root / "dpo", unet_seed=1)),
        "style": str(save_random_lora(unet, root / "style.safetensors", seed=3)),
    }
    return str(base), experts


@pytest.fixture(scope="module")
def sd(sd_disk, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-sd")))
    base, experts = sd_disk
    page = build_app(base=base, experts=experts)
    client = _serve(page)
    yield client
    client.close()
    page.close()
    mp.undo()


def _sd(client, weights=(0.5, 0.5), seed=0, baseline="none", steps=2):
    grid, other, lambdas, info, message, used = _call(
        client, "a red cube", "", *weights, 1.0, steps, 7.5, 32, 1.0, 2, seed, False, baseline
    )
    other = other.get("value") if isinstance(other, dict) else other
    return (
        None if grid is None else _pixels(grid),
        None if other is None else _pixels(other),
        lambdas,
        message,
    )


def test_the_sd_app_works_on_tiny_models(sd):
    a, _, lambdas, message = _sd(sd, (0.5, 0.5), seed=3)
    again, _, _, _ = _sd(sd, (0.5, 0.5), seed=3)
    b, rs, _, _ = _sd(sd, (1.0, 0.0), seed=3, baseline="rs")
    assert message == ""
    assert a.shape == (32, 64, 3)  # two 32 x 32 images side by side
    assert np.array_equal(a, again)
    assert not np.array_equal(a, b)
    assert rs is not None and rs.shape == a.shape
    assert lambdas == {"dpo": 0.5, "style": 0.5, "lambda_0": 0.0}
    _, _, _, refused = _sd(sd, (0.0, 0.0))
    assert "every weight is 0" in refused


def test_an_sd_request_stops_at_the_next_step_when_superseded(sd_disk):
    base, experts = sd_disk
    engine = SDEngine.load(base, experts)
    seen = []
    runs = Runs()
    stop = runs.stopper()

    def progress(fraction, text):
        seen.append(fraction)
        runs.bump()  # a newer request arrives during the first step

    out = engine.run(SDRequest("a red cube", (0.5, 0.5), steps=4, size=32), progress, stop)
    assert out.grid is None and "Stopped" in out.message
    assert seen == [0.25]  # one step ran, the next one stopped
    done = engine.run(SDRequest("a red cube", (0.5, 0.5), steps=2, size=32), None, runs.stopper())
    assert done.grid is not None and done.message == ""
