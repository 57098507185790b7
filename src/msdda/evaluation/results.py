"""The results file of a sweep: JSON lines, a header first, then one row per result.

Line 1 is the header ``{"kind": "header", "format": ..., "config": ..., ...}``; every
other line is a row ``{"kind": "row", "method", "weights", "prompt", "seed", ...}``,
read and written as a :class:`ResultRow`. Rows are appended one at a time with flush
+ fsync, so a killed sweep loses at most the row it was writing. Reading skips corrupt
lines and repeated rows, counted in one warning naming the first of them; a last line cut
short by a kill is removed before appending. A file that is not a results file at all
(missing, empty, a folder, binary, a pickle, another format) is a :class:`ResultsError`,
an :class:`msdda.errors.InputFileError` naming the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputFileError, check_output_path, reading, writing
from ..io import atomic_write_text

__all__ = [
    "FORMAT",
    "ResultsError",
    "ResultRow",
    "Results",
    "result_key",
    "row_key",
    "read_results",
    "open_results",
    "ResultsWriter",
    "config_differences",
    "check_same_configuration",
    "skipped_message",
    "rewrite_results",
    "with_reward",
]

FORMAT = "msdda-sweep/2"  # 2: settings per method name, tuning rules
ROW_FIELDS = (  # what every row holds; the other fields of ResultRow may be absent
    "method",
    "weights",
    "prompt",
    "seed",
    "rewards",
    "seconds_per_image",
    "nfe_per_image",
)
OPTIONAL_FIELDS = (  # written only when known (None: absent from the JSON object)
    "reward_evals_per_image",
    "drift_from_base",
    "kl_from_base",
    "base_seconds_per_image",
    "peak_memory_bytes",
    "peak_memory_kind",
    "image_files",
)

Key = tuple[str, tuple[float, ...] | None, str, int]


class ResultsError(InputFileError):
    """A results file that cannot be read or appended to: ``ResultsError(path, problem)``.

    An :class:`~msdda.errors.InputFileError` (so a ``ValueError``); its message is
    ``"<path>: <problem>"``.
    """


def result_key(method: str, weights, prompt: Any, seed: int) -> Key:
    """What identifies a row: (method, weights rounded or None, prompt as JSON, seed)."""
    w = None if weights is None else tuple(round(float(x), 9) for x in weights)
    return (method, w, json.dumps(prompt), int(seed))


def row_key(row: Mapping[str, Any]) -> Key:
    """:func:`result_key` of a row in its JSON form (a typed row has :attr:`ResultRow.key`)."""
    return result_key(row["method"], row["weights"], row["prompt"], row["seed"])


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One result: a method at one weight vector (None: weight-free), one prompt, one seed.

    Rewards are means over the row's images; ``per_image`` holds each image's reward in
    (prompt, seed, index) order. Fields are in the order of the JSON object; numbers
    keep the type they were given, so :meth:`to_json` writes back what was read.
    """

    method: str  # sweep method name ("rgg-matched" samples with rgg)
    weights: tuple[float, ...] | None
    prompt: Any  # a JSON value
    seed: int
    images: int = 1  # images averaged in the row
    rewards: Mapping[str, float]  # reward name -> mean over the images
    rewards_std: Mapping[str, float] = field(default_factory=dict)  # -> std over the images
    per_image: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    seconds_per_image: float
    nfe_per_image: float  # denoiser rows per image
    reward_evals_per_image: float | None = None  # reward rows per image
    drift_from_base: float | None = None  # mean RMS image difference from the base's, same noise
    kl_from_base: float | None = None  # mean path KL to the base (nats)
    base_seconds_per_image: float | None = None  # the base's time on the same batch
    peak_memory_bytes: int | None = None  # peak memory of the method's chain (msdda.measure)
    peak_memory_kind: str | None = None  # what that peak is (msdda.measure.MEMORY_KINDS)
    #: the row's images as PNG files, paths relative to the results file's folder, in
    #: per_image order (domains with pictures: Stable Diffusion)
    image_files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, Mapping) or not _finite(self.rewards.values()):
            raise ValueError("rewards must be finite numbers by name")
        if not isinstance(self.per_image, Mapping) or not all(
            isinstance(v, (list, tuple)) and _finite(v) for v in self.per_image.values()
        ):
            raise ValueError("per_image must be lists of finite numbers by name")
        object.__setattr__(self, "per_image", {n: tuple(v) for n, v in self.per_image.items()})
        try:  # weights numbers, seed an int, prompt a JSON value
            result_key(self.method, self.weights, self.prompt, self.seed)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad key fields ({err})") from None
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
        if self.image_files is not None:
            files = self.image_files
            if not isinstance(files, (list, tuple)) or not all(map(_relative_path, files)):
                raise ValueError("image_files must be a list of relative file paths")
            if len(files) != self.images:
                raise ValueError(f"image_files lists {len(files)} files for {self.images} images")
            object.__setattr__(self, "image_files", tuple(files))
        memory = self.peak_memory_bytes
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int) or memory < 0
        ):
            raise ValueError(f"peak_memory_bytes must be an int >= 0, got {memory!r}")

    @property
    def key(self) -> Key:
        return result_key(self.method, self.weights, self.prompt, self.seed)

    def to_json(self) -> dict[str, Any]:
        """The row's JSON object: ``{"kind": "row", "method": ..., ...}``."""
        out: dict[str, Any] = {"kind": "row"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in OPTIONAL_FIELDS:
                continue
            if f.name == "weights" and value is not None:
                value = list(value)
            elif f.name == "per_image":
                value = {n: list(v) for n, v in value.items()}
            elif f.name == "image_files":
                value = list(value)
            elif f.name in ("rewards", "rewards_std"):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, obj: Any) -> ResultRow:
        """A row from its JSON object; ValueError saying what is wrong with it."""
        if not isinstance(obj, dict) or obj.get("kind") != "row":
            raise ValueError("not a result row")
        missing = [f for f in ROW_FIELDS if f not in obj]
        if missing:
            raise ValueError(f"row without {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as err:
            raise ValueError(f"bad fields ({err})") from None


@dataclass(frozen=True)
class Results:
    """A results file as read: its header, its valid rows, and what was skipped."""

    path: Path
    header: dict
    rows: tuple[ResultRow, ...]
    skipped: tuple[tuple[int, str], ...]  # (line number, reason)
    truncated_tail: bool  # the last line was cut short (no newline, not valid JSON)

    @property
    def config(self) -> dict:
        return self.header["config"]

    def keys(self) -> set[Key]:
        return {r.key for r in self.rows}


def skipped_message(path: Path, skipped: Sequence[tuple[int, str]]) -> str:
    """The one warning of a file's skipped lines: their count and the first of them."""
    n = len(skipped)
    line, reason = skipped[0]
    first = f"line {line}: {reason}" if n == 1 else f"first: line {line}: {reason}"
    return f"{path}: {n} bad line{'s' if n != 1 else ''} skipped ({first})"


def _relative_path(value: Any) -> bool:
    """Whether ``value`` is a relative path inside its folder (no ``..``, not absolute)."""
    if not isinstance(value, str) or not value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in value


def _finite(values: Iterable[Any]) -> bool:
    """Whether every value is a finite number."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _read_header(path: Path, first_line: bytes) -> dict:
    try:
        header = json.loads(first_line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ResultsError(path, "not a results file: line 1 is not a results header")
    if header.get("format") != FORMAT:
        raise ResultsError(path, f"format {header.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(header.get("config"), dict):
        raise ResultsError(path, "the header has no config")
    return header


CUT_SHORT = "cut short (an interrupted write)"  # why a last line without newline is skipped


def _parse_row(raw: bytes, seen: set[Key], is_tail: bool) -> ResultRow | str:
    """The row of one line, or why it is skipped."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return CUT_SHORT if is_tail else "not valid JSON"
    try:
        row = ResultRow.from_json(obj)
    except ValueError as err:
        return str(err)
    return f"repeats the row {row.key}" if row.key in seen else row


def read_results(path: str | Path, *, warn: bool = True) -> Results:
    """Read a results file; corrupt lines and repeated rows are skipped with a warning.

    Raises:
        ResultsError: naming the file when it is missing, a folder, unreadable, empty,
            binary (a pickle file is never unpickled), or its first line is not a header.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsError(path, "is a folder, not a results file")
    try:
        with reading(path, "results file"):
            data = path.read_bytes()
    except InputFileError as err:
        raise ResultsError(path, err.problem) from err.__cause__
    if not data.strip():
        raise ResultsError(path, "the results file is empty")
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise ResultsError(
            path, "is a pickle file (torch.save), not a results file: refused, never unpickled"
        )
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    header = _read_header(path, lines[0])
    rows: list[ResultRow] = []
    skipped: list[tuple[int, str]] = []
    seen: set[Key] = set()
    truncated = False
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        is_tail = n == len(lines) and not complete
        got = _parse_row(raw, seen, is_tail)
        if isinstance(got, str):
            truncated |= got == CUT_SHORT
            skipped.append((n, got))
            continue
        seen.add(got.key)
        rows.append(got)
    if warn and skipped:
        warnings.warn(skipped_message(path, skipped), stacklevel=2)
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
                existing.path,
                f"written by another configuration ({field_name} differs in: "
                f"{', '.join(diff)}); refusing to mix results: use another file",
            )


class ResultsWriter:
    """Appends rows durably (flush + fsync per row) under an exclusive lock on the file."""

    def __init__(self, path: Path, done: set[Key]) -> None:
        self.path = path
        self.done = set(done)
        with writing(path):
            self._f = open(path, "a")  # noqa: SIM115  (closed by close())
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise ResultsError(path, "is being written by another sweep") from None

    def append(self, row: ResultRow) -> bool:
        """Write ``row`` unless a row with its key exists; True if written."""
        if row.key in self.done:
            return False
        with writing(self.path):
            self._f.write(json.dumps(row.to_json(), sort_keys=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        self.done.add(row.key)
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
    path = check_output_path(path)
    header = {"kind": "header", "format": FORMAT, **header}
    if not path.exists() or path.stat().st_size == 0:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(header) + "\n")
        return ResultsWriter(path, set()), None
    existing = read_results(path)
    check_same_configuration(existing, header)
    with writing(path):
        _repair_tail(path, keep=not existing.truncated_tail)
    return ResultsWriter(path, existing.keys()), existing


def with_reward(row: ResultRow, name: str, scores: Sequence[float]) -> ResultRow:
    """``row`` with the reward column ``name`` (added or replaced) from its images' scores,
    in ``per_image`` order: their mean, standard deviation and values."""
    values = tuple(round(float(x), 7) for x in scores)
    if len(values) != row.images or not _finite(values):
        raise ValueError(f"{name}: {len(values)} finite scores needed for {row.images} images")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return dataclasses.replace(
        row,
        rewards={**row.rewards, name: mean},
        rewards_std={**row.rewards_std, name: std},
        per_image={**row.per_image, name: values},
    )


def rewrite_results(
    path: str | os.PathLike,
    header: dict,
    rows: Sequence[ResultRow],
    *,
    expected_size: int | None = None,
) -> None:
    """Replace the results file ``path`` by ``header`` and ``rows``, whole or not at all
    (:func:`msdda.io.atomic_write_text`), holding the lock a sweep writing it holds.
    ``expected_size``: the file's size in bytes when ``rows`` were read (taken before
    reading them); a file that has changed since is left as it is.

    Raises:
        ResultsError: a sweep is appending to the file now, or did since it was read.
    """
    path = Path(path)
    if header.get("kind") != "header" or header.get("format") != FORMAT:
        raise ValueError(f"header must be a {FORMAT} results header")
    text = json.dumps(header) + "\n" + "".join(json.dumps(r.to_json()) + "\n" for r in rows)
    with writing(path), open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ResultsError(
                path, "is being written by a sweep now; try again after it"
            ) from None
        if expected_size is not None and os.fstat(f.fileno()).st_size != expected_size:
            raise ResultsError(
                path,
                "changed while it was being rescored (a sweep appended rows): nothing "
                "rewritten; run it again once the sweep has finished",
            )
        atomic_write_text(path, text)
