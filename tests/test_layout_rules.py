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
