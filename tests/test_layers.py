"""The import graph of ``src/vlzoo``: no cycles, and every import points down the layer
order of ``docs/architecture.md``. Read from the source (``ast``), so a function-local
import counts like any other; ``if TYPE_CHECKING:`` blocks (annotations only) do not."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import modules of its own layer or of a lower one. The
# first matching prefix names a module's layer (more specific prefixes first).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("vlzoo.utils", "vlzoo.options", "vlzoo.config", "vlzoo.distributed", "vlzoo.weights", "vlzoo.process")),
    ("layers", ("vlzoo.layers",)),
    ("losses", ("vlzoo.losses",)),
    ("data", ("vlzoo.data",)),
    ("backbones", ("vlzoo.backbones",)),
    ("models", ("vlzoo.models",)),
    ("eval", ("vlzoo.eval",)),
    ("run", ("vlzoo.checkpoints", "vlzoo.artefacts", "vlzoo.callbacks", "vlzoo.finetune", "vlzoo.parallel",
             "vlzoo.progress")),
    ("tasks", ("vlzoo.tasks",)),
    ("convert", ("vlzoo.hub.convert", "vlzoo.hub.generation")),
    ("families", ("vlzoo.families",)),
    ("hub", ("vlzoo.hub",)),
    ("api", ("vlzoo.zoo", "vlzoo.inference", "vlzoo.evaluate", "vlzoo.recipes", "vlzoo.compare", "vlzoo.budget", "vlzoo.plots", "vlzoo.capfilt",
             "vlzoo.cli_help", "vlzoo.cli")),
]
ROOT = "vlzoo"  # the package itself: ``__version__`` and the lazy facade of the zoo API

# Modules allowed function-local imports of vlzoo modules, each with its reason.
LAZY_IMPORTS = {
    "vlzoo": "``import vlzoo`` stays light: the zoo API is imported on first use",
    "vlzoo.cli": "each command imports only what it runs, so --help and light commands start fast",
    "vlzoo.inference": "commands registered on the CLI parser import the zoo only when they run",
    "vlzoo.evaluate": "vlzoo eval is registered on the CLI parser: scorers, torch and the zoo load when it runs",
    "vlzoo.families": "the registry imports neither torch nor Lightning (vlzoo list, --help): loading a task "
                      "checkpoint imports the checkpoint reader when it runs",
}


def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "vlzoo").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = module_files()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _targets(node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(a.name) for a in node.names if a.name.split(".")[0] == ROOT]
    if node.module is None or node.module.split(".")[0] != ROOT:
        return []
    return [_resolve(f"{node.module}.{a.name}") if f"{node.module}.{a.name}" in MODULES else _resolve(node.module)
            for a in node.names]


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every vlzoo import of ``name``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            local = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend((target, child.lineno, local) for target in _targets(child) if target != name)
            visit(child, local)

    visit(ast.parse(MODULES[name].read_text()), False)
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(SRC)) if path.is_relative_to(SRC) else str(path)


def layer_of(name: str) -> int:
    if name == ROOT:
        return 0
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS (and to docs/architecture.md)")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_point_down_the_layers():
    upward = []
    for name in MODULES:
        if name == ROOT:  # the facade: its one import is the lazy zoo API (LAZY_IMPORTS)
            continue
        for target, line, _ in imports(name):
            if target == ROOT:
                continue
            if layer_of(target) > layer_of(name):
                upward.append(f"{_shown(MODULES[name])}:{line}: {name} ({LAYERS[layer_of(name)][0]}) "
                              f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = defaultdict(set)
    for name in MODULES:
        for target, _, _ in imports(name):
            if not name.startswith(target + "."):  # a module importing its own package's __init__
                graph[name].add(target)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_local_vlzoo_imports_only_where_documented():
    local = [f"{_shown(MODULES[name])}:{line}: {target}" for name in MODULES if name not in LAZY_IMPORTS
             for target, line, inside in imports(name) if inside]
    assert not local, ("function-local vlzoo imports outside the documented lazy modules (an import circle's "
                       "workaround?):\n" + "\n".join(local))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: a planted upward import and cycle are reported."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None
    planted = tmp_path / "vlzoo" / "layers"
    planted.mkdir(parents=True)
    (planted / "bad.py").write_text("def f():\n    from vlzoo.cli import main\n")
    monkeypatch.setitem(MODULES, "vlzoo.layers.bad", planted / "bad.py")
    assert imports("vlzoo.layers.bad") == [("vlzoo.cli", 2, True)]
    with pytest.raises(AssertionError, match="vlzoo.layers.bad.*imports vlzoo.cli"):
        test_imports_point_down_the_layers()


def test_the_registry_s_lazy_references_point_down():
    from vlzoo import families

    refs = [(family.name, field, ref) for family in families.all_families().values()
            for field in families.LAZY_FIELDS
            for ref in (lambda v: v if isinstance(v, tuple) else (v,))(object.__getattribute__(family, field))
            if isinstance(ref, str)]
    assert len(refs) > 20  # vlzoo's own families are given as references
    upward = [f"{name}.{field}: {ref}" for name, field, ref in refs
              if layer_of(_resolve(ref.partition(":")[0])) > layer_of("vlzoo.families")]
    assert not upward, upward
    for _, _, ref in refs:  # and every one resolves
        assert families.resolve_ref(ref) is not None, ref
