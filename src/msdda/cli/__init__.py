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


from . import (
    check,  # noqa: E402,F401  (registers its command)
    demo,  # noqa: E402,F401
    generate,  # noqa: E402,F401
    report,  # noqa: E402,F401
    sweep,  # noqa: E402,F401
    toy,  # noqa: E402,F401
)
