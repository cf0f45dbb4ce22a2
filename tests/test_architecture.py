"""The house rules that code review alone would let slip, checked on the source with `ast`:

- imports run one way, models -> parallel/data/generation -> train/checkpoint -> infer -> cli (no module
  imports from a higher layer), with no circle between modules or between packages;
- no project import inside a function (they hide circles); third-party imports may be deferred;
- no function longer than 80 lines.
"""

from __future__ import annotations

import ast
import os

import pytest

import vlmtune

SRC = os.path.dirname(vlmtune.__file__)
MAX_FUNCTION_LINES = 80

# Layer of each top-level part of the package; a module may import only from its own layer or below.
LAYERS = {
    "errors": 0, "options": 0, "constants": 0, "testing": 0,
    "models": 1,
    "parallel": 2, "data": 2, "generation": 2,
    "train": 3, "checkpoint": 3,
    "infer": 4,
    "demo": 5, "cli": 5, "": 5,  # "" is the package's own __init__ (the public re-exports)
}  # fmt: skip


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(SRC))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


MODULES = modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Project modules a `from ... import ...` names (submodules count as modules themselves)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("vlmtune"):
        return []
    out = [target] if target in MODULES else []
    out += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return out


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, name)] of project imports inside functions)."""
    path = MODULES[module]
    tree = ast.parse(open(path).read(), path)
    top, nested = set(), []
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = _resolve(module, is_package, node)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("vlmtune")]
        else:
            continue
        if node.col_offset == 0:
            top.update(names)
        elif names:
            nested.append((node.lineno, names[0]))
    return top, nested


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return LAYERS[part]


def package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


GRAPH = {m: imports(m)[0] - {m} for m in MODULES}


def test_every_part_of_the_package_has_a_layer():
    assert {package(m) for m in MODULES} <= set(LAYERS)


def test_no_import_from_a_higher_layer():
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_project_import_inside_a_function():
    nested = [f"{MODULES[m]}:{line}: {name}" for m in MODULES for line, name in imports(m)[1]]
    assert not nested, "\n".join(nested)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_circle_between_modules():
    # A package's __init__ re-exports its own modules: that is not a circle of dependencies.
    graph = {m: {t for t in ts if not (m == t.rsplit(".", 1)[0] and m in ts)} for m, ts in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        graph.setdefault(package(m), set()).update(package(t) for t in targets if package(t) != package(m))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_checks_find_what_they_look_for():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "vlmtune.train.trainer" in MODULES and "vlmtune.checkpoint.dcp" in GRAPH["vlmtune.train.trainer"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    tree = ast.parse(open(MODULES[module]).read())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{MODULES[module]}: " + ", ".join(long)
