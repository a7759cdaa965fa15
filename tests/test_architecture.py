"""The layer rules of docs/architecture.md, checked on the source tree (AST only, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "recthinker_dagster"
# The orchestration and MLflow layer: the only modules that may import Dagster, MLflow or DVC.
ORCHESTRATION = {"defs", "definitions.py", "cli.py", "serving/pyfunc.py", "serving/registry.py"}
FORBIDDEN_IN_DOMAIN = ("dagster", "mlflow", "dvc")
ASSET_DECORATORS = {"asset", "multi_asset", "asset_check", "multi_asset_check", "sensor", "schedule", "run_failure_sensor"}
MAX_ASSET_BODY_LINES = 40


def _modules(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if ".venv" not in p.parts)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _is_orchestration(path: Path) -> bool:
    relative = path.relative_to(PACKAGE).as_posix()
    return any(relative == entry or relative.startswith(entry + "/") for entry in ORCHESTRATION)


def test_domain_code_never_imports_dagster_mlflow_or_dvc():
    offenders = []
    for path in _modules(PACKAGE):
        if _is_orchestration(path):
            continue
        for line, module in _imported_modules(ast.parse(path.read_text())):
            if module.split(".")[0] in FORBIDDEN_IN_DOMAIN:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_a_private_name_of_another_module():
    offenders = []
    for path in _modules(PACKAGE, REPO_ROOT / "scripts", REPO_ROOT / "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                module_private = any(part.startswith("_") and not part.startswith("__")
                                     for part in (node.module or "").split("."))
                if private or module_private:
                    what = private or "(a private module)"
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} from {node.module} import {what}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} import {a.name}" for a in node.names
                              if any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    assert not offenders, "\n".join(offenders)


def _decorator_name(decorator: ast.expr) -> str:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def test_dagster_definitions_stay_thin():
    too_long = []
    for path in _modules(PACKAGE / "defs"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(_decorator_name(d) in ASSET_DECORATORS
                                                         for d in node.decorator_list):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > MAX_ASSET_BODY_LINES:
                    too_long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("folder", ["scripts"])
def test_scripts_call_stage_functions_instead_of_defs_internals(folder):
    """Scripts are wrappers: they may run Dagster jobs, but never reach into a defs module's helpers."""
    offenders = []
    for path in _modules(REPO_ROOT / folder):
        for line, module in _imported_modules(ast.parse(path.read_text())):
            if module.startswith("recthinker_dagster.defs.") and module not in (
                    "recthinker_dagster.defs.config", "recthinker_dagster.defs.jobs", "recthinker_dagster.defs.keys",
                    "recthinker_dagster.defs.resources"):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)
