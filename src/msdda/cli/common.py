"""What every command shares: the error boundary, warnings, progress and option parsing.

A command turns every expected failure (bad values, bad or missing files, unwritable
outputs) into one short message on stderr and exit code 2 (:func:`fail`,
:func:`user_errors`); an unexpected error keeps its traceback, because it is a bug.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = [
    "fail",
    "user_errors",
    "show_warnings",
    "progress_bar",
    "parse_floats",
    "parse_ints",
    "check_kind",
]


def fail(message: str) -> None:
    """One clear message on stderr and exit code 2, no traceback."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's ValueError/TypeError (bad input, bad files) into :func:`fail`."""
    try:
        yield
    except (ValueError, TypeError) as err:
        fail(str(err))


def show_warnings(caught) -> None:
    """Print caught ``warnings`` records, one line each, on stderr."""
    console = Console(stderr=True)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


def progress_bar(console: Console) -> Progress:
    """The progress bar every command shows: label, bar, done/total, elapsed."""
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def parse_floats(text: str, option: str) -> list[float]:
    """``"0.1,0.2"`` as floats, or :func:`fail` naming ``option``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated numbers, got {text!r}")


def parse_ints(text: str, option: str) -> list[int]:
    """``"0,1,2"`` as ints, or :func:`fail` naming ``option``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated integers, got {text!r}")


def check_kind(expert_kind: str) -> str:
    """``--expert-kind``: fixed or learned variance."""
    if expert_kind not in ("fixed", "learned"):
        fail(f"--expert-kind must be 'fixed' or 'learned', got {expert_kind!r}")
    return expert_kind
