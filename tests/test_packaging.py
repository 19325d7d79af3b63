"""The lock, the loose bounds and the chapters' first cell agree with each other."""

import json
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "requirements.lock").is_file(), reason="not a checkout of the book")


def _lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in _lines(ROOT / "requirements.lock"):
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _loose() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [Requirement(r) for r in _lines(ROOT / "requirements.txt") + project]


def test_the_lock_satisfies_every_loose_requirement_but_torch():
    pins = _lock()
    assert "torch" not in pins  # the TORCH choice, not the lock
    for req in _loose():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs lock {pins[name]}: run make lock"


def test_pyproject_and_requirements_agree_on_lower_bounds():
    bounds: dict[str, set[str]] = {}
    for req in _loose():
        bounds.setdefault(canonicalize_name(req.name), set()).add(str(req.specifier))
    assert {name: b for name, b in bounds.items() if len(b) > 1} == {}


def test_every_chapter_starts_with_the_install_and_version_check():
    for notebook in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert 'REPO = os.environ.get("BOOK_REPO"' in first, notebook.name
        assert "returncode != 0" in first and "raise RuntimeError" in first, notebook.name  # failed installs stop
        assert "from helpers.environment import prepare\nprepare(" in first, notebook.name
