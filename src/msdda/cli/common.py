"""What every command shares: the error boundary, checked options, warnings and progress.

A command turns every expected failure (bad values, bad or missing files, unwritable
outputs) into one short message on stderr and exit code 2 (:func:`fail`,
:func:`user_errors`); an unexpected error keeps its traceback, because it is a bug.

Every numeric and path option is declared with :func:`checked`, which gives it one of
the callbacks below (built on :mod:`msdda.validation` and :func:`msdda.errors.check_output_path`):
the value is checked while the command line is parsed, before anything is loaded,
sampled or written, and refused with a message naming the option. The callback carries
its :class:`Rule`, which ``tests/test_bad_inputs_cli.py`` reads to generate bad inputs
for every option, so an option added with :func:`checked` is covered by that suite, and
a numeric or path option added without it makes the suite fail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..errors import InputFileError, OutputError, check_output_path, describe
from ..validation import MAX_SEED, check_int, check_number, check_seed

__all__ = [
    "MAX_COUNT",
    "MAX_THREADS",
    "Rule",
    "checked",
    "number",
    "integer",
    "seed_value",
    "numbers",
    "integers",
    "seed_list",
    "weight_vectors",
    "nxb_pairs",
    "named_numbers",
    "output_file",
    "output_folder",
    "input_file",
    "input_folder",
    "results_file",
    "check_output_file",
    "check_output_folder",
    "writes_to",
    "reads_from",
    "fail",
    "user_errors",
    "option_errors",
    "show_warnings",
    "progress_bar",
    "parse_floats",
    "parse_ints",
    "parse_named_numbers",
    "parse_seeds",
    "split_weight_vectors",
    "split_code_grid",
    "check_kind",
]

#: The largest count (samples, steps, threads ...) an integer option accepts unless it says
#: less: what fits a signed 64-bit integer, the same bound as seeds.
MAX_COUNT = 2**63 - 1

#: The most torch threads a ``--threads`` option accepts.
MAX_THREADS = 1024


def fail(message: str) -> None:
    """One clear message on stderr and exit code 2, no traceback."""
    text = escape(message)  # a message naming "[sd].steps" is text, not rich markup
    Console(stderr=True).print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's ValueError/TypeError (bad input, bad files, unwritable outputs:
    :class:`msdda.errors.MsddaError` is a ValueError) into :func:`fail`; anything else
    keeps its traceback."""
    try:
        yield
    except (ValueError, TypeError) as err:
        fail(str(err))


@contextlib.contextmanager
def option_errors(name: str) -> Iterator[None]:
    """:func:`user_errors` for checks of one option: the message names ``name``."""
    try:
        yield
    except (ValueError, TypeError) as err:
        message = str(err)
        fail(message if message.startswith(name + " ") else f"{name}: {message}")


@contextlib.contextmanager
def writes_to(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OS error on writing ``path`` (a file or a folder: its contents, a hidden
    temporary sibling, creating its folders) into :class:`msdda.errors.OutputError`; an OS
    error on any other path passes unchanged (a reading error is the reader's to name)."""
    target = Path(path).absolute()
    try:
        yield
    except OSError as err:
        names = [n for n in (err.filename, getattr(err, "filename2", None)) if n is not None]
        for name in names:
            p = Path(os.fsdecode(name)).absolute()
            ours = p == target or p in target.parents or target in p.parents
            staged = any(
                q.parent == target.parent and q.name.startswith(".") for q in (p, *p.parents)
            )
            if ours or staged:
                raise OutputError(path, describe(err)) from err
        raise


@contextlib.contextmanager
def reads_from(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OS error while reading ``path`` into :class:`msdda.errors.InputFileError`
    (the reader's own errors, already naming the file, pass unchanged)."""
    try:
        yield
    except OSError as err:
        raise InputFileError(path, describe(err)) from err


# --------------------------------------------------------------------------- checked options


@dataclass(frozen=True)
class Rule:
    """What a checked option accepts (read by its callback and by the bad-input suite).

    ``kind``: ``number`` (a float), ``int``, ``seed``; ``numbers``, ``ints``, ``seeds``
    (comma-separated text); ``weights`` ('a,b;c,d'), ``grid`` ('NxB,...'), ``pairs``
    (NAME=number, repeated); ``out-file``, ``out-folder``, ``in-file``, ``in-folder``,
    ``results`` (a file read if it exists, then appended to).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    count: int | None = None  # how many numbers a ``numbers`` option takes
    empty: bool = False  # out-folder: must be new or empty

    @property
    def text(self) -> str:
        """The range for the help, e.g. ``x>=1``."""
        if self.kind == "seed" or self.kind == "seeds":
            return f"0<=x<=2**63-1 {'each' if self.kind == 'seeds' else ''}".strip()
        if self.kind not in ("number", "int", "numbers", "ints"):
            return ""
        lo = None if self.low is None else f"{self.low:g}"
        hi = None if self.high is None or self.high == MAX_COUNT else f"{self.high:g}"
        op = "<=" if self.low_inclusive else "<"
        if lo is not None and hi is not None:
            return f"{lo}{op}x<={hi}"
        if lo is not None:
            return f"x{'>=' if self.low_inclusive else '>'}{lo}"
        if hi is not None:
            return f"x<={hi}"
        return "finite" if self.kind in ("number", "numbers") else ""


def _name(param: Any) -> str:
    opts = [o for o in getattr(param, "opts", ()) if o.startswith("-")]
    return max(opts, key=len) if opts else str(param.name).upper()


def _callback(rule: Rule, check: Callable[[Any, str], Any]) -> Callable:
    """A typer callback applying ``check(value, option name)``: a refusal is one line naming
    the option (:func:`fail`), while the command line is parsed; None (not given) passes."""

    def callback(ctx, param, value):
        if value is None:
            return None
        name = _name(param)
        with option_errors(name):
            if isinstance(value, (list, tuple)) and rule.kind in ("number", "int", "seed", "pairs"):
                if rule.kind == "pairs":
                    check(value, name)
                else:
                    for v in value:
                        check(v, name)
            else:
                check(value, name)
        return value

    callback.rule = rule  # type: ignore[attr-defined]
    return callback


def checked(default: Any, *flags: str, check: Callable, help: str, **kwargs: Any) -> Any:
    """``typer.Option(default, *flags, ...)`` with ``check`` (one of the callbacks here) and
    its range appended to ``help``."""
    text = check.rule.text
    return typer.Option(
        default, *flags, callback=check, help=f"{help} ({text})" if text else help, **kwargs
    )


def number(low: float | None = None, high: float | None = None, *, above: bool = False):
    """A finite float in [low, high] (``above``: low excluded)."""
    rule = Rule("number", low, high, low_inclusive=not above)
    return _callback(rule, lambda v, name: _check_number(v, name, rule))


def integer(low: int | None = None, high: int = MAX_COUNT):
    """An int in [low, high] (or each of a repeated option's)."""
    rule = Rule("int", low, high)
    return _callback(rule, lambda v, name: check_int(v, name, low=low, high=high))


#: A seed, or each of a repeated option's: an int in [0, 2**63-1], in every domain.
seed_value = _callback(Rule("seed", 0, MAX_SEED), lambda v, name: check_seed(v, name))


def numbers(low: float | None = None, high: float | None = None, *, count: int | None = None):
    """Comma-separated finite floats in [low, high] (``count`` of them, if given)."""
    rule = Rule("numbers", low, high, count=count)
    return _callback(rule, lambda v, name: _split(v, name, rule))


def integers(low: int | None = None, high: int = MAX_COUNT):
    """Comma-separated ints in [low, high]."""
    rule = Rule("ints", low, high)
    return _callback(rule, lambda v, name: _split(v, name, rule))


#: Comma-separated seeds.
seed_list = _callback(
    Rule("seeds", 0, MAX_SEED), lambda v, name: _split(v, name, Rule("seeds", 0, MAX_SEED))
)


def weight_vectors():
    """Preference weight vectors 'a,b;c,d': finite non-negative numbers."""
    return _callback(Rule("weights", 0.0), lambda v, name: split_weight_vectors(v, name))


def nxb_pairs(high: int = MAX_COUNT):
    """(N, B) pairs 'NxB,NxB': ints >= 1, N <= ``high``."""
    return _callback(Rule("grid", 1, high), lambda v, name: split_code_grid(v, name, high))


def split_weight_vectors(text: str, name: str) -> list[tuple[float, ...]]:
    """'a,b;c,d' as tuples of finite non-negative floats (ValueError naming ``name``)."""
    item = Rule("numbers", 0.0)
    return [tuple(_split(part, name, item)) for part in text.split(";") if part.strip()]


def split_code_grid(text: str, name: str, high: int = MAX_COUNT) -> list[tuple[int, int]]:
    """'2x1,4x5' as (N, B) pairs of ints >= 1, N <= ``high`` (ValueError naming ``name``)."""
    out = []
    for part in text.split(","):
        try:
            n, b = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"{name} must be NxB pairs like '2x1,4x5', got {text!r}") from None
        n = check_int(n, f"{name} N", low=1, high=high)
        out.append((n, check_int(b, f"{name} B", low=1, high=MAX_COUNT)))
    return out


def named_numbers():
    """Repeated NAME=W items: finite non-negative numbers, each name once."""
    return _callback(Rule("pairs", 0.0), lambda v, name: parse_named_numbers(v, name))


def output_file():
    """A file to write: its folder must exist and be writable, the name within limits."""
    return _callback(Rule("out-file"), lambda v, name: check_output_file(v, name))


def output_folder(*, empty: bool = False):
    """A folder to write (``empty``: new or empty); its parent folder must exist."""
    rule = Rule("out-folder", empty=empty)
    return _callback(rule, lambda v, name: check_output_folder(v, name, empty=empty))


def input_file():
    """An existing file to read (its content is checked by the command)."""
    return _callback(Rule("in-file"), _check_input_file)


def input_folder():
    """An existing folder to read (its content is checked by the command)."""
    return _callback(Rule("in-folder"), _check_input_folder)


def results_file():
    """A results file: read if it exists, then appended to, so it must be writable (its
    folders are made if missing)."""
    return _callback(Rule("results"), lambda v, name: check_output_path(v))


def _check_number(value: Any, name: str, rule: Rule) -> float:
    return check_number(value, name, low=rule.low, high=rule.high, low_inclusive=rule.low_inclusive)


def _split(text: str, name: str, rule: Rule) -> list:
    """Comma-separated numbers of ``rule`` (kind numbers/ints/seeds) in ``text``."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name} must not be empty, got {text!r}")
    out: list = []
    for i, item in enumerate(items):
        label = name if len(items) == 1 else f"{name} (item {i + 1})"
        if rule.kind == "numbers":
            try:
                v = float(item)
            except ValueError:
                raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
            out.append(_check_number(v, label, rule))
        else:
            try:
                v = int(item)
            except ValueError:
                raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
            if rule.kind == "seeds":
                out.append(check_seed(v, label))
            else:
                out.append(check_int(v, label, low=rule.low, high=rule.high))
    if rule.count is not None and len(out) != rule.count:
        count = {1: "one", 2: "two", 3: "three"}.get(rule.count, str(rule.count))
        raise ValueError(f"{name} must be {count} numbers (comma-separated), got {text!r}")
    return out


def check_output_file(path: str | os.PathLike, name: str = "--out") -> Path:
    """``path`` as a file to write: writable, not a folder, its folder existing."""
    path = check_output_path(path)
    if not path.absolute().parent.is_dir():
        raise OutputError(path, f"its folder {path.parent} does not exist")
    return path


def check_output_folder(
    path: str | os.PathLike, name: str = "--out", *, empty: bool = False
) -> Path:
    """``path`` as a folder to write: writable, not a file, its parent existing; new or
    empty if ``empty``."""
    path = check_output_path(path, directory=True)
    if not path.absolute().parent.is_dir():
        raise OutputError(path, f"its folder {path.parent} does not exist")
    if empty and path.is_dir() and any(path.iterdir()):
        raise OutputError(path, "it already exists and is not an empty folder")
    return path


def _check_input_file(path: str | os.PathLike, name: str) -> Path:
    path = Path(path)
    try:
        if path.is_dir():
            raise InputFileError(path, "is a folder, not a file")
        if not path.is_file():
            raise InputFileError(path, "does not exist")
    except OSError as err:
        raise InputFileError(path, describe(err)) from err
    return path


def _check_input_folder(path: str | os.PathLike, name: str) -> Path:
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise InputFileError(path, "is not a folder")
        if not path.is_dir():
            raise InputFileError(path, "does not exist")
    except OSError as err:
        raise InputFileError(path, describe(err)) from err
    return path


# --------------------------------------------------------------------------- parsing in bodies


def parse_floats(text: str, option: str, **range_: Any) -> list[float]:
    """``"0.1,0.2"`` as finite floats (``low``, ``high``, ``count``), or :func:`fail` naming
    ``option``."""
    try:
        return _split(text, option, Rule("numbers", **range_))
    except ValueError as err:
        fail(str(err))


def parse_ints(
    text: str, option: str, *, low: int | None = None, high: int = MAX_COUNT
) -> list[int]:
    """``"0,1,2"`` as ints in [low, high], or :func:`fail` naming ``option``."""
    try:
        return _split(text, option, Rule("ints", low, high))
    except ValueError as err:
        fail(str(err))


def parse_seeds(text: str, option: str) -> list[int]:
    """``"0,1"`` as seeds (ints in [0, 2**63-1]), or :func:`fail` naming ``option``."""
    try:
        return _split(text, option, Rule("seeds", 0, MAX_SEED))
    except ValueError as err:
        fail(str(err))


def parse_named_numbers(items: Sequence[str], option: str) -> dict[str, float]:
    """``NAME=W`` items as ``{name: w}``: finite non-negative, each name once (ValueError)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"{option} must look like NAME=VALUE, got {item!r}")
        if name in out:
            raise ValueError(f"{option} {name!r} is given twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{option} {name}={value!r}: the weight must be a number") from None
        try:
            out[name] = check_number(w, f"{option} {name}", low=0.0)
        except ValueError:
            raise ValueError(
                f"{option} {name}={value}: the weight must be a non-negative finite number"
            ) from None
    return out


def check_kind(expert_kind: str) -> str:
    """``--expert-kind``: fixed or learned variance."""
    if expert_kind not in ("fixed", "learned"):
        fail(f"--expert-kind must be 'fixed' or 'learned', got {expert_kind!r}")
    return expert_kind


# --------------------------------------------------------------------------- output


def show_warnings(caught) -> None:
    """Print caught ``warnings`` records, one line each, on stderr."""
    console = Console(stderr=True)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Throughput: items per minute, measured over the recent items."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{60 * speed:.3g}/min", style="progress.data.speed")


def progress_bar(console: Console) -> Progress:
    """The progress bar every command shows: label, bar, done/total, rate, elapsed, ETA."""
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
