"""Packages import one way: no module of msdda imports, directly or through others, one above it.

The layers (docs/design.md, "Layers"), bottom first; imports inside functions count:

    0  gaussian, validation, io, errors       the value type and the utilities
    1  fusion, gaussians, sampling, lora      the maths and the one loop
    2  experts, rewards                       what a model and a reward are
    3  testbed, methods, alignment            methods and training on the core
    4  digits, sd                             the domains
    5  evaluation                             sweeps and reports over domains
    6  cli, app                               the commands
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import msdda

PACKAGE = Path(msdda.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "__init__": 7,  # the package's front door re-exports the core
    "gaussian": 0,
    "validation": 0,
    "io": 0,
    "errors": 0,
    "version": 0,
    "measure": 0,
    "fusion": 1,
    "gaussians": 1,
    "sampling": 1,
    "lora": 1,
    "flows": 1,
    "experts": 2,
    "rewards": 2,
    "testbed": 3,
    "flow_testbed": 3,
    "methods": 3,
    "alignment": 3,
    "student": 3,
    "digits": 4,
    "sd": 4,
    "evaluation": 5,
    "cli": 6,
    "app": 6,
}

#: Same-layer packages that must not import each other.
APART = [{"methods", "alignment"}, {"digits", "sd"}]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["msdda", *parts])


def _imports(path: Path) -> set[str]:
    """Every msdda module ``path`` imports, at any depth of its code."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("msdda"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("msdda"):
                continue
            found.add(target)
            for a in node.names:  # `from . import x` may name a module
                candidate = f"{target}.{a.name}"
                if _exists(candidate):
                    found.add(candidate)
    return {m for m in found if _exists(m) and m != name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_init(module: str) -> bool:
    return (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file()


def test_no_import_circle_between_modules():
    """Ignoring a package's own __init__ re-exports, no module reaches itself again."""
    graph = {
        m: {d for d in deps if not (_package_init(d) and m.startswith(d + "."))}
        for m, deps in _graph().items()
    }
    assert _cycles(graph) == []


def test_every_top_level_module_has_a_layer():
    unknown = sorted({_top(m) for m in _graph()} - set(LAYERS))
    assert unknown == [], f"give these a layer in LAYERS and docs/design.md: {unknown}"


def test_imports_go_downward_only():
    upward = [
        f"{m} (layer {LAYERS[_top(m)]}) imports {d} (layer {LAYERS[_top(d)]})"
        for m, deps in sorted(_graph().items())
        for d in sorted(deps)
        if _top(m) != _top(d) and LAYERS[_top(d)] > LAYERS[_top(m)]
    ]
    assert upward == []


@pytest.mark.parametrize("pair", APART, ids=lambda p: " / ".join(sorted(p)))
def test_packages_of_one_layer_stay_apart(pair):
    crossing = [
        f"{m} imports {d}"
        for m, deps in sorted(_graph().items())
        for d in sorted(deps)
        if {_top(m), _top(d)} == pair
    ]
    assert crossing == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walker finds imports inside functions, relative and absolute."""
    src = PACKAGE / "fusion.py"
    deps = _imports(src)
    assert "msdda.gaussian" in deps
    assert all(d.startswith("msdda.") for d in deps)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
