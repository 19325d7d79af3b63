"""The package's own rules, checked so they stay true (README, "The modules of helpers"): every public function
and class names the chapter that builds it; modules, classes and functions stay small enough to read whole; no
module reaches into another's private names. (The layering rule is checked by lint-imports in make check.)"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import helpers

ROOT = Path(helpers.__file__).parent
SOURCES = sorted(ROOT.rglob("*.py"))
LIMITS = {"module": 500, "class": 250, "function": 80}  # lines


def public_objects():
    for info in pkgutil.walk_packages(helpers.__path__, "helpers."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
                yield f"{info.name}.{name}", obj


def test_every_public_function_and_class_names_its_chapter():
    chapter = re.compile(r"\bchapters? \d\d\b")
    missing = [name for name, obj in public_objects() if not chapter.search(inspect.getdoc(obj) or "")]
    assert not missing, f"docstrings that name no chapter ('Built in chapter NN'): {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_classes_and_functions_stay_small(path):
    source = path.read_text()
    too_big = [f"module: {source.count(chr(10))} lines"] if source.count("\n") > LIMITS["module"] else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            size = node.end_lineno - node.lineno + 1
            if size > LIMITS[kind]:
                too_big.append(f"{kind} {node.name}: {size} lines (at most {LIMITS[kind]})")
    assert not too_big, too_big


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    imported = set()  # names bound to helpers modules in this file
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("helpers")):
            problems += [f"imports {alias.name}" for alias in node.names if alias.name.startswith("_")]
            imported |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                         if alias.name.startswith("helpers")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            problems.append(f"uses {node.value.id}.{node.attr}")
    assert not problems, problems
