"""Who may import whom (../shared/ARCHITECTURE.md), checked on every module's import statements."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"storage", "pipeline", "shards", "model", "train", "tools"}
ALLOWED = {
    "storage": {"storage"},
    "shards": {"shards", "storage"},
    "model": {"model"},
    "pipeline": {"pipeline", "shards", "storage"},
    "train": {"train", "model", "shards", "storage"},
    "tools": OURS,
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_house_plan(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = _imported_packages(path) - ALLOWED[package]
        if extra:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)
