"""The package layout the design fixes: dependency direction, no stray packages, small files."""

from __future__ import annotations

import ast
from pathlib import Path

import cluster
import deploy
import model_shards

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model_shards": {"ray", "fastapi", "pydantic", "starlette", "uvicorn", "cluster", "deploy"},
    "cluster": {"deploy", "fastapi", "starlette", "uvicorn"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dependency_direction() -> None:
    for package, forbidden in FORBIDDEN.items():
        for path in (REPO / package).rglob("*.py"):
            bad = _imports(path) & forbidden
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_packages_are_ours_not_pypi_namesakes() -> None:
    for module in (model_shards, cluster, deploy):
        assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


def test_no_file_over_600_lines() -> None:
    for path in REPO.glob("*/**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        assert len(path.read_text().splitlines()) <= 600, path.relative_to(REPO)


def _project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at module level or inside functions alike."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            if name.split(".")[0] in PACKAGES and _module_path(name) is not None:
                names.add(name)
    return names


PACKAGES = ("model_shards", "cluster", "deploy")


def _module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            graph[module] = {m for m in _project_imports(path) if m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"cluster.engine.engine", "deploy.server.api", "model_shards.model"} <= set(graph)  # the walk found the modules
    assert "deploy.server.routes.chat" in graph["deploy.server.api"]  # and their imports, function-level ones included
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# Within cluster/, Ray is the control plane of the actors: only the modules that make or measure
# actors import it, so that the engine, the scheduler and the local executor run without it.
RAY_IN_CLUSTER = ("cluster/actors/", "cluster/bench/hop.py")


def test_ray_is_imported_only_where_actors_are_made() -> None:
    for path in (REPO / "cluster").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if "ray" in _imports(path):  # at module level or inside functions
            assert rel.startswith(RAY_IN_CLUSTER), f"{rel} imports ray"


def test_the_engine_and_the_cli_import_without_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, cluster.launch, cluster.engine.engine, cluster.engine.executor, deploy.cli.commands; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_cluster_top_level_stays_small() -> None:
    """cluster/ names its parts in folders (engine, actors, dataplane, balancing, bench); its top level
    keeps only what they all share (configuration, options, telemetry, launch)."""
    top = sorted(p.name for p in (REPO / "cluster").glob("*.py"))
    assert len(top) <= 8, top
    assert {p.name for p in (REPO / "cluster").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == \
        {"engine", "actors", "dataplane", "balancing", "bench"}
