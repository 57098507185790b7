"""Files written whole or not at all: the one home of atomic writes.

Every output msdda writes goes through a temporary sibling that is renamed over the
target when complete, so a killed run never leaves a half-written file. Temporary
names are short (``.msdda-<random>.tmp``), so they never push a legal output name past
the file system's limit, and published files get ordinary permissions (0666 less the
umask), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "publish_file",
    "ordinary_mode",
]

_PREFIX = ".msdda-"


def ordinary_mode(directory: bool = False) -> int:
    """0666 (files) or 0777 (folders) less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give ``tmp`` ordinary permissions and rename it to ``path`` (same folder)."""
    os.chmod(tmp, ordinary_mode())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; published to ``path`` on success.

    ``suffix`` (default ``path``'s) lets writers that choose a format by extension
    (matplotlib, PIL, numpy) see the right one. On an exception the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=_PREFIX, suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_path(path, suffix=".tmp") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; it replaces ``path`` on success.

    An existing ``path`` is moved aside first and removed after the swap, so at every
    moment either the old or the new folder is in place. On an exception the temporary
    folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, ordinary_mode(directory=True))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_PREFIX + "old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
