"""The floor plan, read from the code's own imports (nothing is imported to check it):

- ground: the shared vocabulary in laggard/ (events, results, settings, Kafka plumbing), importing
  nothing of the project but itself;
- rooms: agents/, collectors/, rules/ (installed as laggard.agents, ...), importing the ground,
  their own room and each other's modules, never a command;
- top: commands/ (the CLI, demo, eval, report, pipeline runs, the local stack) and each room's own
  CLI module, which the `laggard` command composes.

No import runs down-to-up, none closes a circle, and no module imports a room by its folder name
(`agents`, `rules`: generic names that would collide in site-packages)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"laggard": "laggard", "agents": "laggard.agents", "collectors": "laggard.collectors",
           "rules": "laggard.rules", "commands": "laggard.commands"}
ROOM_CLIS = {"laggard.collectors.cli", "laggard.collectors.simulate_cli", "laggard.rules.cli"}
GROUND, ROOM, TOP = 0, 1, 2


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, modules: Iterable[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (function-level imports included)."""
    known, found = set(modules), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("laggard", *FOLDERS)}


def floor(module: str) -> int:
    if module.startswith("laggard.commands") or module in ROOM_CLIS:
        return TOP
    if module.split(".")[1:2] in (["agents"], ["collectors"], ["rules"]):
        return ROOM
    return GROUND


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports that break the floor plan, and import circles, in words."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target.split(".")[0] != "laggard":
                found.append(f"{module} imports {target} by its folder name; import laggard.{target}")
            elif target not in graph:
                found.append(f"{module} imports {target}, which is not a project module")
            elif floor(target) > floor(module):
                found.append(f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)}): up the floors")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_project_keeps_its_floors_and_has_no_import_circles() -> None:
    modules = project_modules()
    graph = {module: imports_of(path, modules) - {module} for module, path in modules.items()}
    assert violations(graph) == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"laggard.events": {"laggard.agents.windows"}, "laggard.agents.windows": set()},
     "laggard.events (floor 0) imports laggard.agents.windows (floor 1): up the floors"),
    ({"laggard.agents.worker": {"laggard.rules.cli"}, "laggard.rules.cli": set()},
     "laggard.agents.worker (floor 1) imports laggard.rules.cli (floor 2): up the floors"),
    ({"laggard.agents.a": {"laggard.agents.b"}, "laggard.agents.b": {"laggard.agents.a"}},
     "import circle: laggard.agents.a -> laggard.agents.b -> laggard.agents.a"),
    ({"laggard.commands.cli": {"agents.worker"}},
     "laggard.commands.cli imports agents.worker by its folder name; import laggard.agents.worker"),
])
def test_the_check_names_what_breaks_the_plan(graph: dict[str, set[str]], expected: str) -> None:
    assert violations(graph) == [expected]


def test_importing_any_module_does_nothing(tmp_path: Path) -> None:
    """No folder made, no file written in the working folder or the state folder: importing every
    module, with the state folder pointed at a path that does not exist, leaves it so."""
    cwd, home, state = tmp_path / "cwd", tmp_path / "home", tmp_path / "state"
    cwd.mkdir()
    home.mkdir()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *sorted(project_modules())], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "LAGGARD_STATE_DIR": str(state), "HOME": str(home)},
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not state.exists() and list(cwd.iterdir()) == []
