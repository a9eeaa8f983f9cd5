"""The layers hold: imports run one way, and no module imports itself back through others.

    protos  <-  common  <-  client            (the site)
                        <-  server            (the coordinator; by stage: model <- measure, llm <- release)
                        <-  deploy            (composes both: CLI, local consortium, transports, benchmarks)

Every import counts, also one inside a function (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "common", "client", "server", "deploy")
# package -> the packages it may import (besides itself)
ALLOWED = {
    "protos": set(),
    "common": {"protos"},
    "client": {"common", "protos"},
    "server": {"common", "protos"},
    "deploy": {"common", "protos", "client", "server"},
}
# server's stages, in the data flow's order: each may import those before it (and itself)
SERVER_STAGES = ("model", "measure", "llm", "release")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                out[module_name(path)] = path
    return out


def imports_of(name: str, source: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """Project modules that module `name` imports (relative and absolute `ppsehr.` imports, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("ppsehr."):
                module = node.module[len("ppsehr."):]
            else:
                continue
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("ppsehr."):] for a in node.names if a.name.startswith("ppsehr.")]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
                break
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "server" and len(parts) > 2 and parts[1] in SERVER_STAGES else None


def test_the_graph_sees_every_package_and_deferred_imports(graph):
    assert {_layer(m) for m in graph} == set(PACKAGES)
    # deploy.cli imports the site guard inside a function: the graph must see it
    assert "client.guard" in graph["deploy.cli"]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    order = {s: i for i, s in enumerate(SERVER_STAGES)}
    wrong = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
             if _layer(t) != _layer(m) and _layer(t) not in ALLOWED[_layer(m)]]
    wrong += [f"{m} -> {t} (a server stage imports a later one)" for m, ts in graph.items() for t in ts
              if _stage(m) and _stage(t) and order[_stage(t)] > order[_stage(m)]]
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_imports_run_one_way(graph):
    wrong = layer_violations(graph)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(found)


@pytest.mark.parametrize("importer, source", [
    ("common.cli", "from ..server import pipeline\n"),                       # common -> server
    ("common.localdeploy", "from ..server.federation import submit\n"),      # common -> server
    ("server.benchmark", "def f():\n    from ..client.guard import SiteGuard\n"),  # server -> client, deferred
    ("server.measure.transport", "from ...client.relay import relay_plan\n"),  # server -> client
    ("server.model.graphical", "from ..release.report import build_report\n"),  # a stage imports a later one
])
def test_a_wrong_edge_is_reported(graph, importer, source):
    modules = project_modules()
    edges = imports_of(importer, source, False, modules)
    assert edges and layer_violations(graph | {importer: edges})


def test_a_cycle_is_reported(graph):
    """pipeline -> llm stage -> benchmark -> pipeline, the cycle this layering removed, is caught."""
    looped = graph | {"server.llm.stage": graph["server.llm.stage"] | {"deploy.bench.llm"},
                      "deploy.bench.llm": graph["deploy.bench.llm"] | {"server.pipeline"}}
    assert any("server.pipeline" in c for c in cycles(looped))
