"""The import graph of ``fluxfill_engine`` and ``fluxfill_kernels`` has no cycle, and lower layers of the
request path never import higher ones (the layers of ``docs/architecture.md``'s module table).

Every ``import`` counts: at module level, inside functions, under ``if TYPE_CHECKING:``. Relative imports
are resolved; ``from package import name`` counts as importing the submodule ``name`` when there is one.
A package's ``__init__`` is not counted as imported by its submodules (Python runs it, but only the
imports it writes are edges).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {
    "fluxfill_engine": REPO / "fluxfill_engine",
    "fluxfill_kernels": REPO / "kernels" / "fluxfill_kernels",
}

# Bottom to top: a module may import modules of its own layer or of the layers below it, never above.
# Names are dotted paths under fluxfill_engine (a package stands for everything in it), or under
# fluxfill_kernels for the first layer; "" is the package itself (its lazy public names).
LAYERS: list[tuple[str, list[str]]] = [
    ("kernels", ["fluxfill_kernels"]),
    (
        "foundations",
        [
            "errors",
            "limits",
            "config",
            "stats",
            "call",
            "architecture",
            "timing",
            "metrics",
            "devices",
            "lazy",
            "startup",
        ],
    ),
    ("inputs", ["images", "framing", "sampling", "conditioning", "validation", "lora.spec", "request"]),
    (
        "model",
        [
            "layers",
            "attention",
            "blocks",
            "quantization",
            "compilation",
            "parallel",
            "cache",
            "lora",
            "model",
            "runtime",
            "diffusers_path",
            "checkpoints",
        ],
    ),
    ("pipeline stages", ["text", "denoiser", "offload"]),
    ("drop-in pipeline", ["pipeline", "saved_engine"]),
    ("engine", ["engine", "memory_plan"]),
    ("public names", [""]),
    ("testing helpers", ["testing"]),
    ("applications", ["bench", "serve", "cli", "__main__"]),
]
CORE_TOP = "public names"  # the layers up to here are the core; the ones above it are its users


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is a package)}`` of every module under the roots."""
    modules = {}
    for root_name, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [root_name, *path.relative_to(root).with_suffix("").parts]
            package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def _imported(module: str, package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if package else module.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, node.module] if node.module else here)
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
        ]
    found = set()
    for name in names:
        while name not in modules and "." in name:  # `import a.b.c` where c is a name, not a module
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: the modules it imports}`` over both packages."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, (path, package) in modules.items():
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, package, node, set(modules))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target, path)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])) is not None:
            return cycle
    return None


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix that names ``module``; ``-1`` if none does."""
    best, best_length = -1, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            full = name if index == 0 else ".".join(filter(None, ["fluxfill_engine", name]))
            matches = module == full or (name != "" and module.startswith(full + "."))
            if matches and len(full) > best_length:
                best, best_length = index, len(full)
    return best


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    # A function-level import (the engine's describe), a TYPE_CHECKING one (the pipeline's stats types in
    # call.py) and a relative import from a subpackage (lora.files -> lora.spec).
    assert "fluxfill_kernels.native" in graph["fluxfill_engine.engine"]
    assert "fluxfill_engine.stats" in graph["fluxfill_engine.call"]
    assert "fluxfill_engine.lora.spec" in graph["fluxfill_engine.lora.files"]


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found_and_printed():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer(graph):
    unplaced = sorted(module for module in graph if layer_of(module) < 0)
    assert not unplaced, f"modules in no layer of LAYERS (place them): {unplaced}"


def test_lower_layers_never_import_higher_ones(graph):
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_core_imports_none_of_its_users(graph):
    top = [name for name, _ in LAYERS].index(CORE_TOP)
    core = [module for module in graph if 0 <= layer_of(module) <= top]
    users = {"bench", "serve", "cli", "testing"}
    assert users <= {name for _, names in LAYERS[top + 1 :] for name in names}
    reaching = [
        f"{module} imports {target}"
        for module in sorted(core)
        for target in sorted(graph[module])
        if layer_of(target) > top
    ]
    assert not reaching, "the core imports what is built on it:\n" + "\n".join(reaching)
