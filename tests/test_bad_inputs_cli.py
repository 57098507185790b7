"""Bad inputs for every command, generated from the commands' own option definitions.

The cases are made by walking the typer app (``typer.main.get_command(app)``: every
command, hidden ``toy train`` included) and its parameters. Every numeric and path
parameter is declared with ``msdda.cli.common.checked`` (or given one of its callbacks),
and its callback carries a ``Rule`` (``param.callback.rule``: the kind of value and its
range); :func:`bad_values` turns each rule into bad inputs:

- numbers: NaN, +-infinity, a word, a bool, an overflowing value, a value outside the range;
- integers: a word, a bool, 1.5, a value beyond 2**64, a value below/above the range;
- seeds (every ``--seed``/``--seeds`` of every domain): -1, 2**63, beyond 2**64, 1.5;
- comma-separated numbers, weight vectors, NxB grids, NAME=W pairs: the same inside the text;
- output files and folders: a path under a regular file, a 300-byte name, a folder where a
  file is expected (and a file where a folder is), a non-empty folder where a new one is;
- input files (results): missing, empty, garbage bytes, truncated, pickle-only
  (``torch.save``), a folder, a header followed only by garbage lines;
- input folders (digits weights): missing, a file, empty, a garbage manifest, and a base
  model that is garbage, truncated, empty or a pickle (``torch.save``) under the
  ``.safetensors`` name.

Every case asserts exit code 2, a message of at most a few lines naming the option or
the file, no traceback, and that nothing on disk was created or changed. The expensive
part of every command (sampling, training, the sweep) is replaced by a function that
fails the test if reached, so each refusal is shown to come before it.

How a new option is covered: add it with ``checked(default, check=<callback>, help=...)``
and its cases are generated here with nothing else to do. An int, float or path option
(or one named like a seed) declared without a checking callback fails
:func:`test_every_numeric_and_path_option_is_checked`; a new command fails
:func:`test_every_command_has_a_base_invocation` until it is given one in ``BASE``.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
import typer
from typer.testing import CliRunner

from msdda.cli import app
from msdda.cli.common import MAX_COUNT
from msdda.digits.store import DEFAULT_WEIGHTS_DIR
from msdda.evaluation.results import FORMAT

runner = CliRunner()
MAX_LINES = 6  # typer's own refusals ("abc" for an int) are a 5-6 line box; msdda's are 1


# --- the commands ------------------------------------------------------------------------------


def _walk(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if hasattr(cmd, "commands"):
        return [
            item for name, sub in sorted(cmd.commands.items()) for item in _walk(sub, (*path, name))
        ]
    return [(path, cmd)]


COMMANDS = dict(_walk(typer.main.get_command(app)))

# A valid, cheap invocation of each command: {placeholder} paths are made per case.
# "args" holds positionals first; options are {flag: value}. "for" adds options needed
# for one option's cases (the digits weights folder is read by the digits domain only).
BASE: dict[tuple[str, ...], dict] = {
    ("app",): {"args": [], "options": {}},
    ("check",): {"args": [], "options": {}},
    ("demo",): {"args": [], "options": {"--out": "{new_dir}"}},
    ("generate",): {
        "args": [],
        "options": {"--prompt": "7", "--weight": "boldness=1", "--out": "{new_png}"},
    },
    ("report",): {"args": ["{results}"], "options": {"--out": "{new_dir}"}},
    ("rescore",): {"args": ["{results_with_images}"], "options": {"--judge": "clipscore"}},
    ("sweep",): {
        "args": ["{new_jsonl}"],
        "options": {"--domain": "toy"},
        "for": {"--weights-dir": {"--domain": "digits"}},
    },
    ("train",): {"args": [], "options": {"--out": "{new_dir}", "--no-align": None}},
    ("toy", "train"): {"args": [], "options": {"--out": "{new_dir}", "--no-align": None}},
    ("train-student",): {"args": [], "options": {}},
}


class Reached(Exception):
    """The expensive part of a command ran: a bad input was not refused before it."""


@pytest.fixture
def guarded(monkeypatch):
    """Replace what samples, trains or sweeps with :class:`Reached`."""

    def reached(*args, **kwargs):
        raise Reached("the expensive part ran")

    import msdda.app
    import msdda.cli.check
    import msdda.cli.rescore
    import msdda.digits.demo
    import msdda.digits.pipeline
    import msdda.digits.sampling
    import msdda.digits.student
    import msdda.evaluation

    monkeypatch.setattr(msdda.cli.check, "run_check", reached)
    monkeypatch.setattr(msdda.cli.rescore, "_load_judge", reached)
    monkeypatch.setattr(msdda.app, "build_app", reached)
    monkeypatch.setattr(msdda.digits.demo, "write_demo", reached)
    monkeypatch.setattr(msdda.digits.sampling, "generate", reached)
    monkeypatch.setattr(msdda.digits.pipeline, "train_all", reached)
    monkeypatch.setattr(msdda.evaluation, "run_sweep", reached)
    monkeypatch.setattr(msdda.digits.student, "train_student", reached)
    return monkeypatch


def _display(param) -> str:
    opts = [o for o in getattr(param, "opts", ()) if o.startswith("-")]
    return max(opts, key=len) if opts else param.name.upper()


def _is_option(param) -> bool:
    return any(o.startswith("-") for o in getattr(param, "opts", ()))


def _annotation(param) -> Any:
    ann = param.type_descriptor.annotation
    args = get_args(ann)
    return args[0] if args and getattr(ann, "__origin__", None) is list else ann


def _rule(param):
    callback = getattr(param, "callback", None)
    rule = getattr(callback, "rule", None)
    if rule is None and callback is not None:
        rule = getattr(getattr(callback, "__wrapped__", None), "rule", None)
    return rule


# --- the bad values of each kind of option -----------------------------------------------------


@dataclass
class Case:
    """One bad input: the command, the parameter, the value (or a maker of the file)."""

    command: tuple[str, ...]
    param: str  # the flag, or the argument's name
    label: str  # the class of bad input
    value: str | None = None  # a literal value, or
    make: Any = None  # make(tmp_path) -> the value (a path), creating what it needs
    names: tuple[str, ...] = ()  # what the message must name (default: the option)
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{' '.join(self.command)}-{self.param}-{self.label}"


def _number_values(rule) -> list[tuple[str, str]]:
    out = [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("word", "abc"), ("bool", "true")]
    out.append(("overflow", "1e999"))
    if rule.low is not None:
        below = rule.low if not rule.low_inclusive else rule.low - 1
        out.append(("below-range", f"{below:g}"))
    if rule.high is not None:
        out.append(("above-range", f"{rule.high + 1:g}"))
    return out


def _int_values(rule) -> list[tuple[str, str]]:
    out = [("word", "abc"), ("bool", "true"), ("fraction", "1.5"), ("beyond-2**64", str(2**64 + 1))]
    if rule.low is not None:
        out.append(("below-range", str(int(rule.low) - 1)))
        if rule.low > 0:
            out.append(("negative", "-1"))
    if rule.high is not None and rule.high < MAX_COUNT:
        out.append(("above-range", str(int(rule.high) + 1)))
    return out


def _seed_values() -> list[tuple[str, str]]:
    return [
        ("negative", "-1"),
        ("2**63", str(2**63)),
        ("beyond-2**64", str(2**64 + 1)),
        ("fraction", "1.5"),
        ("word", "abc"),
    ]


def _text_values(rule) -> list[tuple[str, str]]:
    if rule.kind == "numbers":
        out = [("nan", "nan"), ("inf", "1,inf"), ("word", "abc"), ("overflow", "1e999")]
        if rule.low is not None:
            out.append(("below-range", f"{rule.low - 1:g}"))
        if rule.count is not None:
            out.append(("count", ",".join(["1"] * (rule.count + 1))))
        return out
    if rule.kind == "ints":
        out = [("word", "abc"), ("fraction", "1.5"), ("beyond-2**64", str(2**64 + 1))]
        if rule.low is not None:
            out.append(("below-range", str(int(rule.low) - 1)))
        return out
    if rule.kind == "seeds":
        return [("negative", "0,-1"), ("2**63", str(2**63)), ("fraction", "1.5"), ("word", "a")]
    if rule.kind == "weights":
        return [("nan", "nan,1"), ("inf", "inf,0"), ("word", "abc"), ("negative", "-1,2")]
    if rule.kind == "grid":
        out = [("word", "abc"), ("zero-n", "0x1"), ("zero-b", "1x0"), ("fraction", "1.5x2")]
        if rule.high is not None and rule.high < MAX_COUNT:
            out.append(("above-range", f"{int(rule.high) + 1}x1"))
        return out
    if rule.kind == "pairs":
        return [
            ("nan", "boldness=nan"),
            ("inf", "boldness=inf"),
            ("word", "boldness=abc"),
            ("negative", "boldness=-1"),
            ("overflow", "boldness=1e999"),
            ("no-value", "boldness"),
        ]
    raise AssertionError(f"no bad values for rule kind {rule.kind!r}")


def _file_under_a_file(tmp: Path, name: str) -> Path:
    (tmp / "plain-file").write_text("x")
    return tmp / "plain-file" / name


def _output_cases(rule) -> list[tuple[str, Any]]:
    long = "a" * 300
    if rule.kind in ("out-file", "results"):
        suffix = ".jsonl" if rule.kind == "results" else ".png"
        return [
            ("under-a-file", lambda tmp: _file_under_a_file(tmp, f"out{suffix}")),
            ("300-byte-name", lambda tmp: tmp / f"{long}{suffix}"),
            ("a-folder", lambda tmp: _folder(tmp / f"existing{suffix}")),
        ]
    out = [
        ("under-a-file", lambda tmp: _file_under_a_file(tmp, "out")),
        ("300-byte-name", lambda tmp: tmp / long),
        ("a-file", lambda tmp: _write(tmp / "existing-file", b"x")),
    ]
    if rule.empty:
        out.append(
            ("non-empty-folder", lambda tmp: _write(_folder(tmp / "full") / "f", b"x").parent)
        )
    return out


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pickle(path: Path) -> Path:
    torch.save({"weight": torch.zeros(3)}, path)
    return path


# -- input files: results files

HEADER = {
    "kind": "header",
    "format": FORMAT,
    "config": {"domain": "hand", "methods": ["base", "msdda"], "weights": [[0, 1], [1, 0]]},
    "objectives": ["r_a", "r_b"],
    "rewards": ["r_a", "r_b"],
    "prompts": [0],
    "settings": {},
}


def _row(method, weights, a, b) -> dict:
    return {
        "kind": "row",
        "method": method,
        "weights": weights,
        "prompt": 0,
        "seed": 0,
        "images": 2,
        "rewards": {"r_a": a, "r_b": b},
        "rewards_std": {"r_a": 0.0, "r_b": 0.0},
        "per_image": {"r_a": [a, a], "r_b": [b, b]},
        "seconds_per_image": 0.01,
        "nfe_per_image": 10,
    }


def valid_results(path: Path) -> Path:
    rows = [_row("base", None, 1.0, 1.0), _row("msdda", [0, 1], 1, 3), _row("msdda", [1, 0], 3, 1)]
    path.write_text("\n".join(json.dumps(x) for x in [HEADER, *rows]) + "\n")
    return path


def valid_results_with_images(path: Path) -> Path:
    """A valid results file whose rows list PNGs that exist (what ``msdda rescore`` reads)."""
    from PIL import Image

    rows = [_row("base", None, 1.0, 1.0), _row("msdda", [0, 1], 1, 3)]
    for n, row in enumerate(rows):
        row["image_files"] = [f"images/{n}-{j}.png" for j in range(row["images"])]
        for f in row["image_files"]:
            (path.parent / f).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(path.parent / f)
    path.write_text("\n".join(json.dumps(x) for x in [HEADER, *rows]) + "\n")
    return path


def _results_input_cases(kind: str) -> list[tuple[str, Any]]:
    header = json.dumps(HEADER).encode()
    out = [
        ("garbage-bytes", lambda tmp: _write(tmp / "r.jsonl", bytes(range(256)) * 4)),
        ("truncated", lambda tmp: _write(tmp / "r.jsonl", header[: len(header) // 2])),
        ("pickle-only", lambda tmp: _pickle(tmp / "r.jsonl")),
    ]
    if kind == "in-file":  # an existing but empty results file is a new sweep's
        out += [
            ("missing", lambda tmp: tmp / "missing.jsonl"),
            ("empty", lambda tmp: _write(tmp / "r.jsonl", b"")),
            ("a-folder", lambda tmp: _folder(tmp / "r.jsonl")),
            (
                "garbage-lines",
                lambda tmp: _write(tmp / "r.jsonl", header + b"\n" + b"{not json\n\x00\xff\n" * 3),
            ),
        ]
    return out


# -- input folders: digits weights


def _weights_copy(tmp: Path) -> Path:
    folder = _folder(tmp / "weights")
    for f in DEFAULT_WEIGHTS_DIR.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _broken_base(tmp: Path, how: str) -> Path:
    folder = _weights_copy(tmp)
    base = folder / "base.safetensors"
    data = base.read_bytes()
    if how == "garbage":
        base.write_bytes(bytes(range(256)) * 8)
    elif how == "truncated":
        base.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        base.write_bytes(b"")
    else:
        _pickle(base)
    return folder


def _weights_cases() -> list[tuple[str, Any, tuple[str, ...]]]:
    def garbage_manifest(tmp):
        folder = _weights_copy(tmp)
        (folder / "manifest.json").write_bytes(b"\x00not json{")
        return folder

    base = ("base.safetensors",)
    return [
        ("missing", lambda tmp: tmp / "no-weights", ("no-weights",)),
        ("a-file", lambda tmp: _write(tmp / "weights-file", b"x"), ("weights-file",)),
        ("empty-folder", lambda tmp: _folder(tmp / "empty-weights"), ("empty-weights",)),
        ("garbage-manifest", garbage_manifest, ("manifest.json",)),
        *[
            (f"{how}-base", lambda tmp, how=how: _broken_base(tmp, how), base)
            for how in ("garbage", "truncated", "empty", "pickle-only")
        ],
    ]


def bad_values(command: tuple[str, ...], param) -> list[Case]:
    """Every bad input for ``param`` of ``command``, from its rule."""
    rule = _rule(param)
    name = _display(param)
    if rule is None:
        return []
    mk = lambda label, value=None, **kw: Case(command, name, label, value, **kw)  # noqa: E731
    if rule.kind == "number":
        return [mk(label, v) for label, v in _number_values(rule)]
    if rule.kind == "int":
        return [mk(label, v) for label, v in _int_values(rule)]
    if rule.kind == "seed":
        return [mk(label, v) for label, v in _seed_values()]
    if rule.kind in ("numbers", "ints", "seeds", "weights", "grid", "pairs"):
        return [mk(label, v) for label, v in _text_values(rule)]
    if rule.kind in ("out-file", "out-folder"):
        return [mk(label, make=make) for label, make in _output_cases(rule)]
    if rule.kind == "results":  # written to, and read first on a resume
        outputs = [mk(label, make=make) for label, make in _output_cases(rule)]
        inputs = [
            mk(label, make=make, names=("r.jsonl",))
            for label, make in _results_input_cases("results")
        ]
        return outputs + inputs
    if rule.kind == "in-file":
        return [
            mk(label, make=make, names=("missing.jsonl" if label == "missing" else "r.jsonl",))
            for label, make in _results_input_cases("in-file")
        ]
    if rule.kind == "in-folder":
        return [mk(label, make=make, names=names) for label, make, names in _weights_cases()]
    raise AssertionError(f"{name}: no bad inputs for rule kind {rule.kind!r}")


CASES = [
    case for command, cmd in COMMANDS.items() for p in cmd.params for case in bad_values(command, p)
]


# --- running a case ----------------------------------------------------------------------------


def _fill(value: str, tmp: Path) -> str:
    places = {
        "{new_dir}": tmp / "new-out",
        "{new_png}": tmp / "new.png",
        "{new_jsonl}": tmp / "new.jsonl",
        "{results}": tmp / "given" / "results.jsonl",
        "{results_with_images}": tmp / "given" / "with-images.jsonl",
    }
    return str(places.get(value, value))


def _argv(case: Case, tmp: Path, value: str) -> list[str]:
    base = BASE[case.command]
    options = dict(base["options"])
    options.update(base.get("for", {}).get(case.param, {}))
    positionals = [_fill(a, tmp) for a in base["args"]]
    if case.param.startswith("-"):
        options[case.param] = value
    else:
        positionals = [value]
    argv = list(case.command) + positionals
    for flag, v in options.items():
        argv += [flag] if v is None else [flag, _fill(v, tmp)]
    return argv


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def _plain(text: str) -> str:
    """Output without typer's box drawing, on one line."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_clear_refusal_before_any_work(case: Case, tmp_path, guarded) -> None:
    given = _folder(tmp_path / "given")
    valid_results(given / "results.jsonl")
    valid_results_with_images(given / "with-images.jsonl")
    value = case.value if case.make is None else str(case.make(given))
    argv = _argv(case, tmp_path, value)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, argv)
    output = result.output
    assert not isinstance(result.exception, Reached), f"{argv}: not refused before the work"
    assert result.exit_code == 2, f"{argv}\n{output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_LINES, output
    flat = _plain(output)
    for needle in case.names or (case.param,):
        assert needle in flat, f"{argv}: {needle!r} not named in\n{output}"
    assert _snapshot(tmp_path) == before, f"{argv}: something on disk was created or changed"


# --- the generator covers every option, and the base invocations are valid ---------------------

NUMERIC = (int, float)


def test_every_command_has_a_base_invocation() -> None:
    assert set(COMMANDS) == set(BASE), (
        f"add the new command(s) to BASE: {set(COMMANDS) ^ set(BASE)}"
    )


def test_every_numeric_and_path_option_is_checked() -> None:
    unchecked = []
    for command, cmd in COMMANDS.items():
        for p in cmd.params:
            if getattr(p, "is_flag", False) or p.name == "help":
                continue
            ann = _annotation(p)
            looks = ann in NUMERIC or ann in (Path, pathlib.PurePath) or "seed" in p.name
            looks |= p.name.endswith(("_dir", "_file")) or p.name in ("out", "results")
            if looks and _rule(p) is None:
                unchecked.append(f"{' '.join(command)} {_display(p)}")
            if "seed" in p.name:
                assert _rule(p) is not None and _rule(p).kind in ("seed", "seeds"), p.name
    assert not unchecked, f"declare these with msdda.cli.common.checked: {unchecked}"


def test_every_seed_option_takes_the_one_documented_range() -> None:
    seeds = [
        (command, p) for command, cmd in COMMANDS.items() for p in cmd.params if "seed" in p.name
    ]
    assert len(seeds) >= 6  # check, demo, generate (digits and SD), sweep x2, train x2
    for _, p in seeds:
        rule = _rule(p)
        assert (rule.low, rule.high) == (0, 2**63 - 1)


@pytest.mark.parametrize("command", sorted(BASE), ids=" ".join)
def test_the_base_invocations_are_valid(command, tmp_path, guarded) -> None:
    """Each case changes one value of a valid invocation: reach the expensive part, or
    (report, which has none) succeed."""
    given = _folder(tmp_path / "given")
    valid_results(given / "results.jsonl")
    valid_results_with_images(given / "with-images.jsonl")
    base = BASE[command]
    argv = list(command) + [_fill(a, tmp_path) for a in base["args"]]
    for flag, v in base["options"].items():
        argv += [flag] if v is None else [flag, _fill(v, tmp_path)]
    result = runner.invoke(app, argv)
    if command == ("report",):
        assert result.exit_code == 0, result.output
        assert (tmp_path / "new-out" / "report.md").is_file()
    else:
        assert isinstance(result.exception, Reached), (argv, result.output, result.exception)


def test_the_suite_is_large_and_covers_every_class() -> None:
    labels = {c.label for c in CASES}
    assert len(CASES) >= 60
    for label in (
        "nan", "inf", "-inf", "word", "bool", "overflow", "beyond-2**64", "negative",
        "under-a-file", "300-byte-name", "a-folder", "a-file", "missing", "empty",
        "garbage-bytes", "truncated", "pickle-only", "garbage-lines", "garbage-base",
    ):  # fmt: skip
        assert label in labels, label
    assert {c.command for c in CASES} == set(BASE)


def test_an_os_error_on_writing_is_one_line(tmp_path, monkeypatch) -> None:
    """An OS error while writing (a disk full, say) after the checks: one line, no file."""
    import msdda.digits.plots

    def disk_full(*args, **kwargs):
        err = OSError(28, "No space left on device")
        err.filename = str(tmp_path / ".msdda-abcd.png")
        raise err

    monkeypatch.setattr(msdda.digits.plots, "save_grid", disk_full)
    out = tmp_path / "x.png"
    result = runner.invoke(
        app, ["generate", "--prompt", "7", "--weight", "boldness=1", "--num-samples", "2",
              "--out", str(out)]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"cannot write {out}: No space left on device" in _plain(result.output)
    assert "Traceback" not in result.output and not out.exists()


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch) -> None:
    import msdda.cli.check

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(msdda.cli.check, "run_check", bug)
    result = runner.invoke(app, ["check"])
    assert isinstance(result.exception, ZeroDivisionError)
    assert result.exit_code == 1
