"""``msdda app``: the local web app with a slider per objective (the ``app`` extra).

No arguments: the digits domain over the shipped weights. ``--base PATH --expert
NAME=PATH ...`` (exactly as ``msdda generate`` takes them): Stable Diffusion. Served on
127.0.0.1 by default; ``--host`` beyond loopback prints a warning.

(This module is not named ``app.py``: a submodule ``msdda.cli.app`` would replace the
typer application ``msdda.cli.app`` that every command registers on.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from ..errors import describe
from . import app
from .common import (
    MAX_THREADS,
    checked,
    fail,
    input_file,
    input_folder,
    integer,
    show_warnings,
    user_errors,
)
from .generate import parse_pairs


def _modules():
    """``msdda.app`` (the ``app`` extra), or one message saying how to install it."""
    import importlib.util

    missing = [m for m in ("gradio", "gradio_client") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"the app extra is not installed ({', '.join(missing)}): pip install 'msdda[app]'")
    import msdda.app as web

    return web


def _build(web, base, expert, weights_dir, front_samples, demo_results, threads):
    """The page, with every input read and checked before the expensive part."""
    if base is None:
        if expert:
            fail("--expert is for Stable Diffusion (with --base); the digits app uses its experts")
        from ..digits.bundle import load_digits_bundle
        from ..digits.sampling import torch_threads

        with user_errors(), torch_threads(threads):
            if demo_results is not None:
                web.digits.read_demo_front(demo_results)  # refuse a bad file now
            bundle = load_digits_bundle(weights_dir)
        with user_errors():
            return web.build_app(
                bundle=bundle,
                front_samples=front_samples,
                demo_results=demo_results,
                threads=threads,
            )
    if not expert:
        fail("--base needs at least one --expert NAME=PATH (as msdda generate takes them)")
    if weights_dir is not None or demo_results is not None:
        fail("--weights-dir and --demo-results are for the digits app, not with --base")
    experts = parse_pairs(expert, "--expert")
    with user_errors():
        return web.build_app(base=base, experts=experts)


@app.command("app")
def app_command(
    base: str = typer.Option(
        None, help="Stable Diffusion base pipeline (folder or cached hub id), as msdda generate."
    ),
    expert: list[str] = typer.Option(
        [], help="Stable Diffusion expert NAME=PATH (repeat), as msdda generate."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (a warning beyond loopback: others could reach it)."
    ),
    port: int = checked(
        None, check=integer(1, 65535), help="Port (default: the first free from 7860)."
    ),
    weights_dir: Path = checked(
        None, check=input_folder(), help="digits: weights folder (default: the shipped weights)."
    ),
    front_samples: int = checked(
        20,
        check=integer(0, 10_000),
        help="digits: images per digit and weight of the demo front drawn behind the live "
        "point (0: none).",
    ),
    demo_results: Path = checked(
        None,
        check=input_file(),
        help="digits: the results.json of an earlier msdda demo, as the front (instead of "
        "computing one).",
    ),
    threads: int = checked(
        1, check=integer(1, MAX_THREADS), help="digits: torch threads (1 is fastest here)."
    ),
) -> None:
    """Serve a local web app: a slider per objective, the fused images, lambda_i and lambda_0."""
    web = _modules()
    with user_errors():
        beyond = not web.is_loopback(host)
    page = _build(web, base, expert, weights_dir, front_samples, demo_results, threads)
    if beyond:
        show_warnings([warnings.WarningMessage(web.beyond_loopback(host), UserWarning, "", 0)])
    with user_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", web.BeyondLoopbackWarning)
        try:
            web.launch(page, host, port, block=True)
        except OSError as err:  # a busy port, an address this machine does not have
            fail(f"cannot serve on {host}:{port}: {describe(err)}")
