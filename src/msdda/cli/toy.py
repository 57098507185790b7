"""``msdda toy``: hidden. ``msdda toy train`` is the old name of ``msdda train``.

"toy" means the 2-D Gaussian mixture now; digits training is ``msdda train``
(:mod:`msdda.cli.train`). The alias stays so that old scripts keep working.
"""

from __future__ import annotations

import typer

from . import app
from .train import train

__all__ = ["toy_app"]

toy_app = typer.Typer(
    help="Old spelling: `msdda toy train` is `msdda train`.", no_args_is_help=True, hidden=True
)
toy_app.command("train", help="Old name of `msdda train` (digits training).")(train)
app.add_typer(toy_app, name="toy", hidden=True)
