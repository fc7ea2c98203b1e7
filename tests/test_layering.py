"""The tree's layering: who may import whom, no cycles, no oversized modules.

``protocol/`` is the contract both sides import; ``agent/`` and
``controlplane/`` never import each other; the fleet simulator is a
device-side tool (it may import the agent, never the control plane); only
the ``slmfleet`` command package knows all three. The model build is a
tool of the release author's machine: it may import the agent (chat
templating, atomic files), never the control plane. Read from the source with
:mod:`ast`, every import counted, those inside functions included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "agent", "controlplane", "fleetsim", "modelbuild", "slmfleet")
#: package -> the other first-party packages it may import
ALLOWED = {
    "protocol": set(),
    "agent": {"protocol"},
    "controlplane": {"protocol"},
    "fleetsim": {"protocol", "agent"},
    "modelbuild": {"protocol", "agent"},
    "slmfleet": {"agent", "controlplane", "fleetsim", "modelbuild"},
}
MAX_LINES = 500


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """First-party modules ``module`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import submodule`` imports the submodule too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_packages_import_only_what_their_layer_allows() -> None:
    wrong = []
    for module, path in _modules():
        owner = module.split(".")[0]
        for target in _imports(module, path, top_level_only=False):
            other = target.split(".")[0]
            if other != owner and other not in ALLOWED[owner]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    known = dict(_modules())
    graph = {
        module: {t for t in _imports(module, path, top_level_only=True) if t in known}
        for module, path in known.items()
    }
    # A package's __init__ importing its own submodules is how it re-exports;
    # a submodule importing its package back is the cycle to catch.
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", ["agent", "controlplane", "protocol", "modelbuild"])
def test_no_module_over_500_lines(package: str) -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}
