"""``msdda generate``: MSDDA images for one prompt and one set of preference weights.

Digits (``--domain digits``, the default): ``--prompt`` is a digit 0-9, experts are the
shipped ones. Stable Diffusion (``--base PATH`` with ``--expert NAME=PATH``): handed to
``msdda.sd.cli.generate_sd`` (the ``sd`` extra).
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import (
    MAX_THREADS,
    check_kind,
    check_output_file,
    checked,
    fail,
    input_folder,
    integer,
    named_numbers,
    number,
    option_errors,
    output_file,
    parse_named_numbers,
    seed_value,
    user_errors,
    writes_to,
)

DOMAINS = ("digits",)
DIGIT_SUFFIXES = (".png", ".npy")


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` items into a dict; one clear error for a malformed or repeated one."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            fail(f"{option} must look like NAME=VALUE, got {item!r}")
        if name in out:
            fail(f"{option} {name!r} is given twice")
        out[name] = value
    return out


def check_out(out: Path, suffixes: tuple[str, ...] | None) -> Path:
    """``--out`` as a file that can be written (with one of ``suffixes``), or :func:`fail`."""
    with option_errors("--out"):
        check_output_file(out)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        fail(f"--out {out}: the file must end in {' or '.join(suffixes)}")
    return out


def parse_digit(prompt: str) -> int:
    try:
        digit = int(prompt.strip())
    except ValueError:
        digit = -1
    if not 0 <= digit <= 9 or prompt.strip() not in {str(d) for d in range(10)}:
        fail(f"--prompt must be a digit 0-9 for the digits domain, got {prompt!r}")
    return digit


def _check_builtin(domain: str | None, expert: list[str]) -> None:
    """A built-in domain (digits) is asked for: refuse another name, and SD's --expert."""
    if domain is not None and domain not in DOMAINS:
        fail(f"--domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    if expert:
        fail(
            "--expert is for Stable Diffusion (with --base); the digits domain uses its shipped experts"
        )


def _generate_digits(
    prompt: str,
    weights: dict[str, float],
    num_samples: int,
    seed: int,
    out: Path,
    kl_coef: float | None,
    expert_kind: str,
    weights_dir: Path | None,
    threads: int,
    method: str = "msdda",
) -> None:
    from rich.console import Console

    from ..digits.bundle import load_digits_bundle
    from ..digits.plots import save_grid, save_npy
    from ..digits.sampling import generate, torch_threads

    digit = parse_digit(prompt)
    check_kind(expert_kind)
    check_out(out, DIGIT_SUFFIXES)
    with user_errors(), torch_threads(threads):
        bundle = load_digits_bundle(weights_dir)
        if method == "student":
            from ..digits.student import generate_student

            images = generate_student(bundle, digit, weights, num_samples, seed, expert_kind)
        else:
            images = generate(
                digit, weights, num_samples, seed, kl_coef, expert_kind, bundle=bundle
            )
        with writes_to(out):
            if out.suffix.lower() == ".npy":
                save_npy(images[:, 0].numpy().astype("float32"), out)
            else:
                desc = ", ".join(f"{k} {v:g}" for k, v in weights.items())
                save_grid(images, out, title=f"digit {digit}: {desc} ({expert_kind})")
    Console().print(f"wrote {num_samples} samples of digit {digit} to {out}")


def _generate_sd(
    base: str,
    expert: list[str],
    weights: dict[str, float],
    prompt: str,
    out: Path,
    num_samples: int,
    seed: int,
    *,
    steps: int,
    guidance_scale: float,
    eta: float,
    kl_coef: float | None,
) -> None:
    """Hand a Stable Diffusion request to ``msdda.sd.cli.generate_sd`` (the ``sd`` extra)."""
    experts = parse_pairs(expert, "--expert")
    check_out(out, None)
    try:
        from ..sd.cli import generate_sd
    except ImportError as err:
        fail(
            f"the Stable Diffusion extra is not available ({err}); install it with pip install 'msdda[sd]'"
        )
    with user_errors(), writes_to(out):  # only the call is ours: msdda.sd checks the rest
        written = generate_sd(
            base=base,
            experts=experts,
            weights=weights,
            prompt=prompt,
            out=out,
            num_samples=num_samples,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            kl_coef=kl_coef,
        )
    typer.echo(f"wrote {written}")


@app.command()
def generate(
    prompt: str = typer.Option(..., help="digits: a digit 0-9; Stable Diffusion: the text prompt."),
    weight: list[str] = checked(
        ..., check=named_numbers(), help="Preference weight NAME=W (repeat per expert)."
    ),
    out: Path = checked(
        ...,
        check=output_file(),
        help="Output file: .png grid, or .npy raw samples (N, 8, 8) in [0, 1].",
    ),
    domain: str = typer.Option(
        None, help="Built-in domain: digits (the default when --base is not given)."
    ),
    base: str = typer.Option(
        None,
        help="Base pipeline (folder or cached hub id): SD 1.x/2.x, SDXL, SD3 or FLUX, "
        "detected from its model_index.json.",
    ),
    expert: list[str] = typer.Option([], help="Stable Diffusion expert NAME=PATH (repeat)."),
    num_samples: int = checked(64, check=integer(1), help="Number of images."),
    seed: int = checked(0, check=seed_value, help="Noise seed: same seed, same images."),
    kl_coef: float = checked(
        None,
        check=number(0.0, above=True),
        help="Target beta (default: the experts' common beta); "
        "another value makes lambda_0 != 0 and uses the base as reference.",
    ),
    expert_kind: str = typer.Option("fixed", help="digits: experts' variance, fixed or learned."),
    weights_dir: Path = checked(
        None,
        check=input_folder(),
        help="digits: weights folder (default: the shipped weights).",
    ),
    steps: int = checked(50, check=integer(1), help="Stable Diffusion: DDIM steps."),
    guidance_scale: float = checked(
        7.5, check=number(), help="Stable Diffusion: classifier-free guidance."
    ),
    eta: float = checked(
        1.0,
        check=number(0.0),
        help="Stable Diffusion: DDIM eta; SD3/FLUX: the flow sampler's noise level (Flow-GRPO: "
        "0.7). 0 is deterministic: one model only.",
    ),
    threads: int = checked(
        1,
        check=integer(1, MAX_THREADS),
        help="digits: torch threads (small models: 1 is fastest).",
    ),
    method: str = typer.Option(
        "msdda", help="digits: msdda, or student (the distilled model: one forward per step)."
    ),
) -> None:
    """Generate images with MSDDA for one prompt and one set of preference weights."""
    if domain is not None and base is not None:
        fail(
            "--domain and --base are mutually exclusive: --domain picks a built-in domain, "
            "--base a Stable Diffusion pipeline"
        )
    with user_errors():
        weights = parse_named_numbers(weight, "--weight")
    if method not in ("msdda", "student"):
        fail(f"--method must be msdda or student, got {method!r}")
    if method == "student" and (base is not None or kl_coef is not None):
        fail("--method student is the digits domain's distilled student: no --base, no --kl-coef")
    if base is None:
        _check_builtin(domain, expert)
        _generate_digits(
            prompt, weights, num_samples, seed, out, kl_coef, expert_kind, weights_dir, threads,
            method,
        )  # fmt: skip
        return
    _generate_sd(
        base,
        expert,
        weights,
        prompt,
        out,
        num_samples,
        seed,
        steps=steps,
        guidance_scale=guidance_scale,
        eta=eta,
        kl_coef=kl_coef,
    )
