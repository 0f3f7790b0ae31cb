"""The shape of `evals/`: three rooms that import one way, and no import in a circle.

- every module under evals/ imports on its own, in a fresh interpreter (a module that
  only worked because a sibling had been imported first would break `python -m`);
- no import cycle anywhere in the project's packages: every `import` and `from ...
  import` of every .py file, at module level or inside a function (a lazy import in a
  circle is still a circle: evals/neurons.py and evals/neuron_analysis.py once imported
  each other that way), resolved to the project's modules;
- `evals.features` imports neither other room, `evals.probes` never reaches
  `evals.neurons` and `evals.neurons` never reaches `evals.probes`, directly or through
  other modules.
"""

from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("catneuron", "pretrain", "data_pipeline", "evals")


def module_files(packages: tuple[str, ...] = PACKAGES, root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `packages` (a package is its
    `__init__.py`)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` is, or the innermost project package holding it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    stem = node.module or ""
                # `from a.b import c` imports a.b.c when c is a module, else a name of a.b.
                names = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
                names = [n for n in names if n in modules] or [stem]
            else:
                continue
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


EVALS_MODULES = sorted(module_files(("evals",)))


def test_every_evals_module_imports_alone():
    """Each module in a fresh interpreter of its own (two at a time: the imports are most
    of each one's second)."""

    def alone(module: str) -> str | None:
        run = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        return (
            None if run.returncode == 0 else f"import {module} alone fails:\n{run.stderr[-2000:]}"
        )

    assert len(EVALS_MODULES) > 20
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(alone, EVALS_MODULES) if f]
    assert not failures, "\n".join(failures)


def test_no_import_cycle_in_the_project():
    graph = import_graph(module_files())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_lazy_circle(tmp_path):
    """The check itself: a circle made of function-level imports (the old
    evals.neurons <-> evals.neuron_analysis one) is found and named."""
    room = tmp_path / "pkg"
    room.mkdir()
    (room / "__init__.py").write_text("")
    (room / "cli.py").write_text("def run():\n    from pkg.analysis import analyse\n")
    (room / "analysis.py").write_text("def analyse():\n    from .cli import run\n")
    (room / "leaf.py").write_text("import pkg.cli\n")
    graph = import_graph(module_files(("pkg",), tmp_path))
    assert find_cycle(graph) == ["pkg.analysis", "pkg.cli", "pkg.analysis"]
    (room / "analysis.py").write_text("def analyse():\n    pass\n")
    assert find_cycle(import_graph(module_files(("pkg",), tmp_path))) is None


def test_rooms_import_one_way():
    graph = import_graph(module_files())
    rooms = {"evals.features": "features", "evals.probes": "probes", "evals.neurons": "neurons"}

    def room_of(module: str) -> str | None:
        return next((r for prefix, r in rooms.items() if module.startswith(prefix)), None)

    forbidden = {"features": {"probes", "neurons"}, "probes": {"neurons"}, "neurons": {"probes"}}
    wrong = []
    for module in graph:
        room = room_of(module)
        if room is None:
            continue
        for target in sorted(reachable(graph, module)):
            if room_of(target) in forbidden[room]:
                wrong.append(f"{module} reaches {target}")
    assert not wrong, "\n".join(wrong)
    assert not {room_of(m) for m in reachable(graph, "evals.io")} - {None}, (
        "evals.io must stay below the rooms"
    )
