"""The house plan (../shared/ARCHITECTURE.md, docs/architecture.md), checked on every library module's source: who
may import whom, who may talk to boto3 or look at a URL's scheme, and how long a function may be."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The library: installed packages whose modules import one another. bench/ and tests/ sit on top of it (they may
# import anything, tools included) and are not checked here.
LIBRARY = ["storage", "shards", "pipeline", "model", "train", "reports", "sampledata", "tools"]
OURS = set(LIBRARY) | {"bench"}
ALLOWED = {
    "storage": {"storage"},
    "model": {"model"},
    "shards": {"shards", "storage"},
    "pipeline": {"pipeline", "shards", "storage"},
    "train": {"train", "model", "shards", "storage"},
    "reports": {"reports", "shards", "storage"},
    "sampledata": {"sampledata", "storage"},
    "tools": set(LIBRARY),
}
# Reports that show a training run (its checkpoints) may read it through train/ (and model/ with it).
RUN_REPORTS = {"reports/verify/run.py": {"train", "model"}}
MAX_FUNCTION_LINES = 80
# Functions exempt from the length rule: argument declarations of a command (one add_argument per option).
LONG_FUNCTION_EXEMPT = {"add_arguments"}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LIBRARY)
def test_imports_follow_the_house_plan(package):
    assert (ROOT / package / "__init__.py").is_file(), f"{package}/ is not a package"
    bad = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | RUN_REPORTS.get(rel, set())
        extra = (_imported_packages(path) & OURS) - allowed
        if extra:
            bad.append(f"{rel} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_tools():
    users = [path.relative_to(ROOT).as_posix() for package in LIBRARY if package != "tools"
             for path in _modules(package) if "tools" in _imported_packages(path)]
    assert not users, users


def test_only_storage_talks_to_boto3_or_asks_for_s3():
    """Callers pass paths; the backend behind a path is storage's business (`storage.local_path` says whether a
    path is a file of this machine, for libraries that need one)."""
    pattern = re.compile(r"\b(import boto3|from boto3|import botocore|from botocore|is_s3|s3_client|split_s3)\b")
    bad = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for package in LIBRARY if package != "storage"
           for path in _modules(package) for n, line in enumerate(path.read_text().splitlines(), 1)
           if pattern.search(line)]
    assert not bad, "\n".join(bad)


def test_no_caller_knows_storage_temp_names():
    """Temp names of atomic writes belong to storage (its clean_interrupted_writes removes leftovers)."""
    bad = [f"{path.relative_to(ROOT)}:{n}" for package in LIBRARY if package != "storage"
           for path in _modules(package) for n, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"startswith\(\"\.\"\).*endswith\(\"\.tmp\"\)", line)]
    assert not bad, bad


def test_no_library_function_is_over_80_lines():
    long = []
    for package in LIBRARY:
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        node.name not in LONG_FUNCTION_EXEMPT:
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)
