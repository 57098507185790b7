"""The Gradio pages: :func:`build_app` returns the Blocks of the digits or the SD app.

Responsiveness: sliders trigger a generation when released; every generation event of a
page shares one queue slot (``concurrency_id="generate"``, limit 1) with
``trigger_mode="always_last"``, so requests made while one runs collapse to the newest
instead of queueing without end. In the SD app a newer request, or the Stop button, also
ends the running one at its next step (:class:`Runs`, through ``should_stop``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import MAX_UI_SEED, describe_lambdas

__all__ = ["build_app", "build_digits_app", "build_sd_app", "Runs", "next_seed"]

TITLE = "MSDDA: a slider per objective"

#: Shared by every generation event of a page (with limit 1, trigger_mode="always_last").
GENERATE = dict(trigger_mode="always_last", concurrency_limit=1, concurrency_id="generate")


def _gradio():
    from .server import gradio_offline

    return gradio_offline()


class Runs:
    """A page session's request counter: a request runs while it is the newest.

    (A plain class, not a dataclass: Gradio would try to serialise a dataclass state.)
    """

    def __init__(self) -> None:
        self.current = 0

    def bump(self) -> int:
        """A newer request (or Stop) is here: the running one should stop."""
        self.current += 1
        return self.current

    def stopper(self):
        """``should_stop()`` for the request starting now."""
        mine = self.current
        return lambda: self.current != mine


def next_seed(seed: Any, randomise: bool) -> int:
    """The seed to use: a fresh one (exact in the browser) when ``randomise``, else ``seed``."""
    if randomise:
        return random.SystemRandom().randrange(0, 2**32)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    return seed


def _message(outcome) -> str:
    return f"**{outcome.message}**" if outcome.message else ""


def _baseline_update(gr, picture, baseline: str):
    visible = baseline != "none"
    label = f"baseline: {baseline} (same noise)" if visible else "baseline"
    return gr.update(value=picture, visible=visible, label=label)


def _seed_controls(gr):
    with gr.Row():
        seed = gr.Number(
            0, precision=0, minimum=0, maximum=MAX_UI_SEED, label="Seed", elem_id="msdda-seed"
        )
        randomise = gr.Checkbox(False, label="Randomise the seed at every generation")
    return seed, randomise


def _outputs(gr, first_label: str):
    message = gr.Markdown(elem_id="msdda-message")
    info = gr.Markdown(elem_id="msdda-lambdas-text")
    with gr.Row():
        grid = gr.Image(
            label=first_label, type="numpy", format="png", interactive=False, elem_id="msdda-grid"
        )
        other = gr.Image(
            label="baseline",
            type="numpy",
            format="png",
            interactive=False,
            visible=False,
            elem_id="msdda-baseline",
        )
    lambdas = gr.JSON(label="Fusion exponents λ_i and λ_0", elem_id="msdda-lambdas")
    return message, info, lambdas, grid, other


def build_digits_app(engine) -> Any:
    """The digits page over a :class:`~msdda.app.digits.DigitsEngine`."""
    from .digits import BASELINES, MAX_APP_SAMPLES, OBJECTIVES, DigitsRequest

    gr = _gradio()
    defaults = {"legibility": 0.5, "boldness": 0.5, "symmetry": 0.0}

    def generate(digit, *values):
        *weights, kl_coef, kind, num, seed, randomise, baseline = values
        seed = next_seed(seed, randomise)
        try:
            request = DigitsRequest(
                int(digit), tuple(weights), kl_coef, kind, int(num), seed, baseline
            )
        except (TypeError, ValueError) as err:
            return (
                None,
                _baseline_update(gr, None, "none"),
                None,
                {},
                "",
                f"**Refused: {err}**",
                seed,
            )
        out = engine.run(request)
        return (
            out.grid,
            _baseline_update(gr, out.baseline_grid, baseline),
            out.front,
            out.lambdas,
            describe_lambdas(out.lambdas),
            _message(out),
            seed,
        )

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(
            f"# {TITLE}\nThe shipped digits experts (8x8 images), fused at every step in closed "
            "form. Generation starts when a slider is released."
        )
        with gr.Row():
            with gr.Column(scale=1):
                digit = gr.Dropdown(list(range(10)), value=7, label="Digit")
                sliders = [
                    gr.Slider(0, 1, value=defaults[n], step=0.05, label=f"weight: {n}")
                    for n in OBJECTIVES
                ]
                kl = gr.Slider(
                    0.01,
                    4.0,
                    value=1.0,
                    step=0.01,
                    label="KL coefficient β (alignment strength: below 1 the base joins "
                    "with λ_0 < 0)",
                )
                kind = gr.Radio(["fixed", "learned"], value="fixed", label="Expert variance")
                num = gr.Slider(1, min(64, MAX_APP_SAMPLES), value=16, step=1, label="Samples")
                seed, randomise = _seed_controls(gr)
                baseline = gr.Radio(list(BASELINES), value="none", label="Side by side with")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                message, info, lambdas, grid, other = _outputs(gr, "MSDDA")
                front = gr.Image(
                    label="Pareto front of the demo, and this batch",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="msdda-front",
                )
        gr.on(
            [
                button.click,
                page.load,
                *[s.release for s in sliders],
                kl.release,
                num.release,
                digit.change,
                kind.change,
                baseline.change,
                seed.submit,
            ],
            generate,
            inputs=[digit, *sliders, kl, kind, num, seed, randomise, baseline],
            outputs=[grid, other, front, lambdas, info, message, seed],
            api_name="generate",
            **GENERATE,
        )
    return page


def build_sd_app(engine) -> Any:
    """The Stable Diffusion page over a :class:`~msdda.app.sd.SDEngine`."""
    from .sd import MAX_SD_SAMPLES, SD_BASELINES, SDRequest

    gr = _gradio()
    k = len(engine.names)

    def generate(runs, prompt, negative, *values, progress=gr.Progress()):
        *weights, kl_coef, steps, guidance, size, eta, num, seed, randomise, baseline = values
        seed = next_seed(seed, randomise)
        try:
            request = SDRequest(
                prompt, tuple(weights), negative, kl_coef, int(steps), guidance, int(size),
                eta, int(num), seed, baseline,
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            return None, _baseline_update(gr, None, "none"), {}, "", f"**Refused: {err}**", seed
        out = engine.run(request, lambda f, d: progress(f, desc=d), runs.stopper())
        return (
            out.grid,
            _baseline_update(gr, out.baseline_grid, baseline),
            out.lambdas,
            describe_lambdas(out.lambdas),
            _message(out),
            seed,
        )

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(
            f"# {TITLE}\nStable Diffusion experts {', '.join(engine.names)} fused at every "
            "step in closed form. Generation starts when a slider is released; Stop ends it."
        )
        runs = gr.State(Runs)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox("a lighthouse at dusk", label="Prompt")
                negative = gr.Textbox("", label="Negative prompt")
                sliders = [
                    gr.Slider(0, 1, value=round(1 / k, 3), step=0.01, label=f"weight: {n}")
                    for n in engine.names
                ]
                kl = gr.Slider(0.05, 4.0, value=1.0, step=0.01, label="KL coefficient β")
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                side = engine.default_size
                size = gr.Slider(
                    min(64, side), max(1024, side), value=side, step=8, label="Size (pixels)"
                )
                eta = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="DDIM eta")
                num = gr.Slider(1, MAX_SD_SAMPLES, value=1, step=1, label="Samples")
                seed, randomise = _seed_controls(gr)
                baseline = gr.Radio(list(SD_BASELINES), value="none", label="Side by side with")
                with gr.Row():
                    button = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
            with gr.Column(scale=2):
                message, info, lambdas, grid, other = _outputs(gr, "MSDDA")
        released = [*[s.release for s in sliders], kl.release, steps.release, guidance.release]
        released += [size.release, eta.release, num.release]
        triggers = [button.click, prompt.submit, negative.submit, baseline.change, seed.submit]
        triggers += released
        gr.on(
            triggers, Runs.bump, inputs=[runs], outputs=None, queue=False, api_visibility="private"
        )
        event = gr.on(
            triggers,
            generate,
            inputs=[runs, prompt, negative, *sliders, kl, steps, guidance, size, eta, num]
            + [seed, randomise, baseline],
            outputs=[grid, other, lambdas, info, message, seed],
            api_name="generate",
            **GENERATE,
        )
        stop.click(
            Runs.bump,
            inputs=[runs],
            outputs=None,
            cancels=[event],
            queue=False,
            api_visibility="private",
        )
    return page


def build_app(
    *,
    base: str | Path | None = None,
    experts: Mapping[str, str | Path] | None = None,
    pipeline: Any = None,
    weights_dir: str | Path | None = None,
    bundle: Any = None,
    front_samples: int = 20,
    demo_results: str | Path | None = None,
    threads: int | None = 1,
) -> Any:
    """The app's ``gradio.Blocks``, ready to ``launch()`` or mount in another server.

    With none of ``base``, ``experts`` and ``pipeline``: the digits app over the shipped
    weights (or ``weights_dir``, or a loaded ``bundle``); its demo front is computed with
    ``front_samples`` images per digit and weight (0: none), or read from a ``msdda demo``
    ``results.json`` (``demo_results``). With ``base`` and ``experts`` ({name: path}, as
    ``msdda generate --base --expert`` takes them) or a loaded MSDDA ``pipeline``: the
    Stable Diffusion app.
    """
    if pipeline is not None or base is not None or experts:
        from .sd import SDEngine

        if pipeline is None:
            if base is None or not experts:
                raise ValueError("the Stable Diffusion app needs base and experts {name: path}")
            return build_sd_app(SDEngine.load(base, experts))
        return build_sd_app(SDEngine(pipeline))
    from ..digits.bundle import DigitsBundle, load_digits_bundle
    from .digits import DigitsEngine, read_demo_front

    if bundle is not None and not isinstance(bundle, DigitsBundle):
        raise TypeError(f"bundle must be a DigitsBundle, got {type(bundle).__name__}")
    bundle = bundle if bundle is not None else load_digits_bundle(weights_dir)
    fronts = read_demo_front(demo_results) if demo_results is not None else None
    engine = DigitsEngine(bundle, front_samples=front_samples, fronts=fronts, threads=threads)
    return build_digits_app(engine)
