"""The ``msdda`` command line. Each command lives in a module of its own."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="msdda",
    help="Exact multi-objective alignment of diffusion models at sampling time (MSDDA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Exact multi-objective alignment of diffusion models at sampling time (MSDDA)."""


# Each command module registers itself on `app` when imported.
from . import (  # noqa: E402,F401
    check,
    demo,
    generate,
    report,
    rescore,
    student,  # noqa: E402,F401
    sweep,
    toy,
    train,
    webapp,
)
