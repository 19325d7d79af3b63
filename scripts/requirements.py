#!/usr/bin/env python3
"""Print what pyproject.toml asks for, one requirement a line, for `pip install -r`.

    python scripts/requirements.py            helpers' dependencies and every extra (book, test)
    python scripts/requirements.py --oldest   the same with every lower bound of helpers and of the chapters
                                              installed exactly (name>=X becomes name==X); the tools that run
                                              the tests keep their bounds, and jupyter-book (the book build) is
                                              left out

pyproject.toml is the one list; scripts/lock.sh (make lock) and scripts/test-latest.sh (make test-latest,
make test-oldest) read it through this script. It needs Python 3.11 or later (tomllib).
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("scripts/requirements.py needs Python 3.11 or later (tomllib); set PYTHON=python3.11")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TOOLS = "test"  # the extra that runs the tests and builds the book, not what the chapters need


def lowest(requirement: str) -> str:
    """``"name>=X"`` or ``"name>=X,<Y"`` as ``"name==X"``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9._\[\]-]+)\s*>=\s*([^,\s]+)\s*(,.*)?", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: {requirement!r} has no lower bound (name>=X) to install with --oldest")
    return f"{match[1]}=={match[2]}"


def requirements(oldest: bool = False) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    needs = [*project["dependencies"], *(r for name, reqs in extras.items() if name != TOOLS for r in reqs)]
    tools = extras.get(TOOLS, [])
    if not oldest:
        return needs + tools
    return [lowest(r) for r in needs] + [r for r in tools if not r.startswith("jupyter-book")]


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--oldest"]):
        sys.exit(f"usage: {sys.argv[0]} [--oldest]")
    print("\n".join(requirements(oldest=sys.argv[1:] == ["--oldest"])))
