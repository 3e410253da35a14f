"""The core's import graph, read from the source (no import runs): no cycle among ``occkd_core`` modules, and no
``occkd_core`` module that imports the grid, Ray or MLflow (STYLE.md: the data flows one way, and the core runs in
a notebook, a test or a Ray worker alike).

Every import counts, wherever it stands: at module level, inside a function (run later, but a dependency all the
same) and under ``if TYPE_CHECKING:`` (a cycle a type checker walks round is still one the reader has to). A
runtime check that the core imports without Ray or MLflow is in tests/test_gpu_check.py; this one also sees the
imports that only run when a function is called. The last test does run an import, in a fresh interpreter: the
grid's driver must start without the core's heaviest libraries.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "occkd_core"
#: Top-level packages the core must never import: the experiment layer above it and its runtime.
FORBIDDEN = ("grid", "ray", "mlflow")


def module_name(path: Path, root: Path) -> str:
    """``occkd_core/data/store.py`` -> ``occkd_core.data.store``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules(root: Path = ROOT, package: str = CORE) -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name."""
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))
            if "__pycache__" not in path.parts}


def imported_modules(path: Path, module: str, modules: set[str]) -> list[tuple[str, int]]:
    """(dotted name, line) of every module ``path`` imports, relative imports resolved against ``module``.
    ``import a.b`` gives ``a.b``; ``from a.b import c`` gives ``a.b.c`` where ``c`` is a module of ``modules``
    and ``a.b`` otherwise. So a package's ``__init__`` that re-exports its submodules is not in a cycle with a
    submodule that imports a sibling (``from occkd_core.data import affectnet``), while one that imports a name
    from its own package's ``__init__`` is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Core module -> {core module it imports: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for name, line in imported_modules(path, module, set(modules)):
            if name in modules and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def describe_cycle(graph: dict[str, dict[str, int]], members: list[str], modules: dict[str, Path]) -> str:
    """The imports that hold a cycle together, one per line with file and line, for the failure message."""
    return "\n".join(f"  {modules[source].relative_to(ROOT)}:{line} imports {target}"
                     for source in members for target, line in sorted(graph[source].items()) if target in members)


def forbidden_imports(modules: dict[str, Path]) -> list[str]:
    """``path:line imports name`` for every import of a :data:`FORBIDDEN` package by a core module."""
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for module, path in modules.items() for name, line in imported_modules(path, module, set(modules))
            if name.split(".")[0] in FORBIDDEN]


def test_no_import_cycle_among_core_modules():
    modules = core_modules()
    assert len(modules) > 20 and "occkd_core.stages" in modules  # the walk found the core (not an empty folder)
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s) in occkd_core; move the shared names down a layer:\n" + "\n".join(
        f"{' <-> '.join(members)}\n{describe_cycle(graph, members, modules)}" for members in cycles)


def test_the_core_imports_neither_the_grid_nor_ray_nor_mlflow():
    found = forbidden_imports(core_modules())
    assert not found, "occkd_core must not import grid, ray or mlflow (STYLE.md):\n" + "\n".join(found)


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return core_modules(root, "pkg")


def test_the_checks_see_cycles_through_type_checking_and_function_imports_and_forbidden_imports(tmp_path: Path):
    modules = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        # a <-> b only through an import under TYPE_CHECKING
        "pkg/a.py": "from pkg.b import B\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n",
        # c <-> d only through a relative import inside a function
        "pkg/c.py": "from . import d\n",
        "pkg/d.py": "def f():\n    from .c import g\n    import ray.tune\n",
        # a package whose __init__ re-exports a submodule that imports a sibling through the package: no cycle
        "pkg/sub/__init__.py": "from pkg.sub.x import X\n",
        "pkg/sub/x.py": "from pkg.sub import y\nfrom ..e import E\n",
        "pkg/sub/y.py": "",
        "pkg/e.py": "",
        # a submodule that takes a name from its own package's __init__, which imports it: a cycle
        "pkg/loop/__init__.py": "from .z import Z\nW = 1\n",
        "pkg/loop/z.py": "from pkg.loop import W\n",
    })
    graph = import_graph(modules)
    assert graph["pkg.d"] == {"pkg.c": 2}
    assert graph["pkg.sub.x"] == {"pkg.sub.y": 1, "pkg.e": 2}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"], ["pkg.loop", "pkg.loop.z"]]
    assert [name for module, path in modules.items() for name, _ in imported_modules(path, module, set(modules))
            if name.split(".")[0] in FORBIDDEN] == ["ray.tune"]


def test_the_grids_driver_starts_without_torchvision_or_scikit_learn():
    """Every grid command (``--help`` and ``--dry-run`` too) starts a driver, and every test of the grid starts
    several: the driver reads the registries and the predictions but never builds a ResNet or scores, so it
    must not pay torchvision's import (~2 s of CPU: its ops import ``torch._dynamo``) nor scikit-learn's and
    SciPy's (~2 s). Measured on this project's 2-core VM: importing the driver took 7.4 s of CPU with them,
    3.1 s without."""
    import subprocess
    import sys

    heavy = ("torchvision", "sklearn", "scipy", "statsmodels", "matplotlib")
    probe = ("import sys, grid.run_all, grid.driver, grid.report, grid.figures, grid.artifacts, grid.graph; "
             f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"the driver imports {done.stdout.strip()}: import them where they are used"
