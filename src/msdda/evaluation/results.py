"""The results file of a sweep: JSON lines, a header first, then one row per result.

Line 1 is the header ``{"kind": "header", "format": ..., "config": ..., ...}``; every
other line is a row ``{"kind": "row", "method", "weights", "prompt", "seed", ...}``.
Rows are appended one at a time with flush + fsync, so a killed sweep loses at most
the row it was writing. Reading skips, with a warning naming the line, a corrupt line
or a repeated row; a last line cut short by a kill is removed before appending.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "ResultsError",
    "Results",
    "row_key",
    "read_results",
    "open_results",
    "ResultsWriter",
    "config_differences",
    "check_same_configuration",
]

FORMAT = "msdda-sweep/2"  # 2: settings per method name, tuning rules
ROW_FIELDS = (
    "method",
    "weights",
    "prompt",
    "seed",
    "rewards",
    "seconds_per_image",
    "nfe_per_image",
)


class ResultsError(ValueError):
    """A results file that cannot be read or appended to (names the file and the reason)."""


def row_key(row: dict) -> tuple:
    """What identifies a row: (method, weights or None, prompt, seed)."""
    w = row["weights"]
    weights = None if w is None else tuple(round(float(x), 9) for x in w)
    return (row["method"], weights, json.dumps(row["prompt"]), int(row["seed"]))


def _check_row(row: Any) -> str | None:
    if not isinstance(row, dict) or row.get("kind") != "row":
        return "not a result row"
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        return f"row without {missing}"
    if not isinstance(row["rewards"], dict) or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in row["rewards"].values()
    ):
        return "rewards must be finite numbers by name"
    try:
        row_key(row)
    except (TypeError, ValueError, KeyError) as err:
        return f"bad key fields ({err})"
    return None


@dataclass(frozen=True)
class Results:
    """A results file as read: its header, its valid rows, and what was skipped."""

    path: Path
    header: dict
    rows: tuple[dict, ...]
    skipped: tuple[tuple[int, str], ...]  # (line number, reason)
    truncated_tail: bool  # the last line was cut short (no newline, not valid JSON)

    @property
    def config(self) -> dict:
        return self.header["config"]

    def keys(self) -> set[tuple]:
        return {row_key(r) for r in self.rows}


def _warn(path: Path, line: int, reason: str) -> None:
    warnings.warn(f"{path}: line {line} skipped: {reason}", stacklevel=3)


def read_results(path: str | Path, *, warn: bool = True) -> Results:
    """Read a results file; corrupt lines and repeated rows are skipped with a warning.

    Raises:
        ResultsError: the file is missing, empty, or its first line is not a header.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"results file {path} does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise ResultsError(f"results file {path} is empty")
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ResultsError(f"{path}: line 1 is not a results header")
    if header.get("format") != FORMAT:
        raise ResultsError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(header.get("config"), dict):
        raise ResultsError(f"{path}: the header has no config")
    rows, skipped, seen = [], [], set()
    truncated = False
    body = lines[1:]
    for n, raw in enumerate(body, start=2):
        if not raw.strip():
            continue
        is_tail = n == len(lines) and not complete
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            reason = "cut short (an interrupted write)" if is_tail else "not valid JSON"
            truncated |= is_tail
            skipped.append((n, reason))
            continue
        problem = _check_row(row)
        if problem is None and row_key(row) in seen:
            problem = f"repeats the row {row_key(row)}"
        if problem is not None:
            skipped.append((n, problem))
            continue
        seen.add(row_key(row))
        rows.append(row)
    if warn:
        for n, reason in skipped:
            _warn(path, n, reason)
    return Results(path, header, tuple(rows), tuple(skipped), truncated)


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k, out)
    elif a != b:
        out.append(prefix)


def config_differences(a: dict, b: dict) -> list[str]:
    """Dotted names of the fields in which two (JSON-normalised) configurations differ."""
    out: list[str] = []
    _diff(json.loads(json.dumps(a)), json.loads(json.dumps(b)), "", out)
    return out


def check_same_configuration(existing: Results, header: dict) -> None:
    """Refuse (:class:`ResultsError`) a file whose header's config or identity differ."""
    for field_name in ("config", "identity"):
        diff = config_differences(existing.header.get(field_name, {}), header.get(field_name, {}))
        if diff:
            raise ResultsError(
                f"{existing.path} was written by another configuration ({field_name} differs "
                f"in: {', '.join(diff)}); refusing to mix results: use another file"
            )


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ResultsWriter:
    """Appends rows durably (flush + fsync per row) under an exclusive lock on the file."""

    def __init__(self, path: Path, done: set[tuple]) -> None:
        self.path = path
        self.done = set(done)
        self._f = open(path, "a")  # noqa: SIM115  (closed by close())
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise ResultsError(f"{path} is being written by another sweep") from None

    def append(self, row: dict) -> bool:
        """Write ``row`` unless a row with its key exists; True if written."""
        row = {"kind": "row", **row}
        problem = _check_row(row)
        if problem:
            raise ValueError(f"refusing to write a bad row: {problem}")
        key = row_key(row)
        if key in self.done:
            return False
        self._f.write(json.dumps(row, sort_keys=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(key)
        return True

    def close(self) -> None:
        if not self._f.closed:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _repair_tail(path: Path, keep: bool) -> None:
    """End the file on a newline: finish a complete last row (``keep``) or cut a partial one."""
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        if keep:
            f.write(b"\n")
        else:
            f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def open_results(path: str | Path, header: dict) -> tuple[ResultsWriter, Results | None]:
    """Open ``path`` for a sweep described by ``header`` (``config`` and ``identity`` compared).

    A new file gets the header (written atomically). An existing file must have been
    written by the same configuration, else :class:`ResultsError` lists what differs;
    a last line cut short by a kill is removed. Returns the writer (knowing the rows
    already there) and the results read (None for a new file).
    """
    path = Path(path)
    header = {"kind": "header", "format": FORMAT, **header}
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(header) + "\n")
        return ResultsWriter(path, set()), None
    existing = read_results(path)
    check_same_configuration(existing, header)
    _repair_tail(path, keep=not existing.truncated_tail)
    return ResultsWriter(path, existing.keys()), existing
