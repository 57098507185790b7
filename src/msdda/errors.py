"""The project's error types, and the places where errors from underneath become them.

Every expected failure a user can cause is one of these, with a message that names the
input (argument, option, file) and what is wrong with it; the commands print that
message and exit with code 2. All subclass :class:`MsddaError`, itself a ``ValueError``,
so callers of the Python API can catch them by kind or all at once.
An error that is not one of these (or a ``ValueError``/``TypeError`` from an argument
check) is a bug and keeps its traceback.

Errors raised by the libraries msdda calls (safetensors headers, diffusers and
transformers loading, peft, the operating system) are caught where msdda calls them,
with :func:`reading` and :func:`writing`, and re-raised as :class:`InputFileError` or
:class:`OutputError` naming the path and the cause. :func:`quiet_libraries` silences the
libraries' own logging for such a call, so a handled error is not preceded by pages of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MsddaError",
    "InputFileError",
    "OutputError",
    "reading",
    "writing",
    "quiet_libraries",
    "check_output_path",
    "describe",
]


class MsddaError(ValueError):
    """An expected failure with a message for the user (a ``ValueError``)."""


class InputFileError(MsddaError):
    """A file or folder msdda reads is missing, unreadable, corrupt or of the wrong kind."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # pickled whole (a Ray worker's error reaches the driver as itself)
        return type(self), (self.path, self.problem)


class OutputError(MsddaError):
    """An output location cannot be written."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"cannot write {self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


def describe(err: BaseException) -> str:
    """A library error as one short line: its first line, with the OS reason if any."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


#: Loggers of the libraries underneath, silenced by :func:`quiet_libraries`.
_LIBRARY_LOGGERS = ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the libraries' logging and warnings below ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


#: What a library may raise on a bad file: the kinds :func:`reading` turns into InputFileError.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    EOFError,
)


def _library_read_errors() -> tuple[type[BaseException], ...]:
    kinds = list(_READ_ERRORS)
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file", *, quiet: bool = True) -> Iterator[None]:
    """Turn a library's or the OS's error while reading ``path`` into :class:`InputFileError`.

    ``what`` says what the file should be ("LoRA weights", "text encoder", ...). Errors
    that already are msdda's own pass through unchanged.
    """
    with quiet_libraries() if quiet else contextlib.nullcontext():
        try:
            yield
        except MsddaError:
            raise
        except _library_read_errors() as err:
            if isinstance(err, FileNotFoundError):
                problem = f"no such {what}"
            elif isinstance(err, PermissionError):
                problem = f"the {what} is not readable (permission denied)"
            else:
                problem = f"not readable as {what}: {describe(err)}"
            raise InputFileError(path, problem) from err


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OS error while writing ``path`` into :class:`OutputError`."""
    try:
        yield
    except OSError as err:
        raise OutputError(path, describe(err)) from err


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_output_path(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written; returns it as a Path.

    The nearest existing ancestor must be a writable folder, ``path`` itself must not be
    a folder (a file output) or a file (a folder output), and its name must fit the file
    system's limit. Nothing is created.
    """
    path = Path(path)
    if not path.name:
        raise OutputError(path, "the path has no name")
    limit = _name_max(_existing_ancestor(path.absolute()))
    if any(len(os.fsencode(part)) > limit for part in path.parts):
        raise OutputError(path, f"a name in it is longer than the file system's {limit} bytes")
    try:
        if path.exists():
            if directory and not path.is_dir():
                raise OutputError(path, "it exists and is not a folder")
            if not directory and path.is_dir():
                raise OutputError(path, "it is a folder")
            if not os.access(path, os.W_OK):
                raise OutputError(path, "permission denied")
        ancestor = _existing_ancestor(path.absolute().parent)
    except OSError as err:
        raise OutputError(path, describe(err)) from err
    if not ancestor.is_dir():
        raise OutputError(path, f"{ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(path, f"the folder {ancestor} is not writable")
    return path


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or a folder)."""
    while True:
        try:
            if path.exists() or path.parent == path:
                return path
        except OSError:
            pass
        path = path.parent
