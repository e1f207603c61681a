"""Imports flow one way: api -> engine -> kernels. Checked on the source, so a lazy import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"api": {"kernels"}, "engine": {"api"}, "kernels": {"api", "engine"}}


def _package(module: str) -> str | None:
    """`kawai.engine.gguf` -> "engine"; anything outside kawai -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "kawai" and len(parts) > 1 else None


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kawai import engine` names the package in the alias
            modules += [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "kawai" \
                else [node.module]
    return {p for p in map(_package, modules) if p}


def test_no_bare_top_level_imports():
    """Every import of our code goes through `kawai.`: the bare names would pick up other packages."""
    bare = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _top_level_imports(path) if m in FORBIDDEN)
        for folder in ("api", "engine", "kernels", "tests", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
    }
    assert {k: v for k, v in bare.items() if v} == {}


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
