"""Where am I running? The environment report every chapter's numbers come from, and the check every
chapter's first cell makes of the libraries it needs (chapter 00)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import psutil

from .memory import format_size

__all__ = ["in_colab", "in_kaggle", "report", "ran_where", "prepare", "requirements", "RuntimeVersionError", "PACKAGES"]

DIST = "bigger-than-memory"  # the distribution that installs helpers

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "gguf", "helpers")


def in_colab() -> bool:
    """True inside Google Colab. Built in chapter 00."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def in_kaggle() -> bool:
    """True inside a Kaggle notebook. Built in chapter 00."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def _version(name: str) -> str:
    dist = {"helpers": DIST}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(path: str | Path = ".") -> dict[str, str]:
    """Versions, CPU, GPU, RAM and free disk (at ``path``) as a dict of strings. Built in chapter 00."""
    import torch

    info = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "runtime": "Colab" if in_colab() else "Kaggle" if in_kaggle() else "local",
        "cpu cores": str(os.cpu_count()),
        "RAM total": format_size(psutil.virtual_memory().total),
        "RAM available": format_size(psutil.virtual_memory().available),
        "disk free": format_size(shutil.disk_usage(path).free),
    }
    for name in PACKAGES:
        info[name] = _version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{torch.cuda.device_count()} x {props.name}, {format_size(props.total_memory)}"
        info["CUDA"] = str(torch.version.cuda)
    else:
        info["GPU"] = "none (CPU only)"
    return info


def ran_where(info: Optional[dict[str, str]] = None) -> str:
    """One sentence (Markdown) saying what ran a chapter: machine, device and the versions that made its numbers,
    and, plainly, when no GPU ran. ``info`` is a :func:`report` (default: this runtime's). Built in chapter 00."""
    info = report() if info is None else info
    versions = ", ".join(f"{name} {info[name]}" for name in ("torch", "transformers", "accelerate", "bitsandbytes")
                         if info.get(name, "not installed") != "not installed")
    gpu = info.get("GPU", "none (CPU only)")
    device = (f"on {gpu}" if not gpu.startswith("none")
              else "on the CPU: **no GPU ran**, so every GPU figure in this chapter is computed, none measured")
    return (f"**What ran where.** {info['runtime']} {info['platform']} machine, {info['cpu cores']} CPU cores, "
            f"{info['RAM total']} of RAM, computing {device}; Python {info['python']}, {versions}.")


# --------------------------------------------------------------------------- the first cell of every chapter

class RuntimeVersionError(RuntimeError):
    """A library in this runtime is missing or older than the book needs. Built in chapter 00."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of the frames that raised it
        return [f"{type(self).__name__}: {self}"]


def requirements() -> list[str]:
    """The libraries ``helpers`` needs, with their lower bounds, as installed (``pyproject.toml``'s list).
    Built in chapter 00."""
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:  # helpers imported from a checkout that pip never installed
        raise RuntimeVersionError(
            f"helpers was imported from {Path(__file__).parent.parent}, but its package {DIST!r} is not installed, "
            "so its requirements cannot be checked: run `pip install -e .` in that folder (or `make setup`), "
            "then restart the kernel") from None
    found = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(str(req))
    return found


def _problem(line: str) -> Optional[str]:
    """One sentence saying why the requirement ``line`` does not hold in this runtime, or None."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    req = Requirement(line)
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return f"this chapter needs {line}, which this runtime does not have: run `pip install '{line}'` and restart"
    if not req.specifier.contains(Version(installed), prereleases=True):
        return (f"this chapter needs {line}, this runtime has {installed}: run `pip install -U '{line}'` "
                f"and restart the runtime")
    module = sys.modules.get(req.name.replace("-", "_").lower())
    loaded = getattr(module, "__version__", None)
    if loaded is not None and Version(loaded).release != Version(installed).release:  # upgraded after import
        # (release, not the whole version: torch's wheels report "2.6.0+cu124" for the metadata's "2.6.0")
        return (f"{req.name} {loaded} was imported before {installed} was installed: restart the runtime "
                f"and run this cell first")
    return None


def prepare(*needs: str) -> None:
    """The first cell of every chapter: check the libraries, turn the libraries' own progress bars off, and say
    what runs the chapter (:func:`ran_where`, displayed as Markdown in a notebook, printed elsewhere).

    Checks every requirement of ``helpers`` and the chapter's extra ``needs`` (e.g. ``"bitsandbytes>=0.50"``),
    then raises :class:`RuntimeVersionError` with one sentence for the first that does not hold, before any
    work is done. It also switches off the download and "Loading weights" bars of huggingface_hub and
    transformers (``HF_HUB_DISABLE_PROGRESS_BARS``), which would otherwise fill every loading cell;
    the book's own bars stay. accelerate's weight-loading bar has no switch and stays too.
    Built in chapter 00.
    """
    for line in [*requirements(), *needs]:
        problem = _problem(line)
        if problem is not None:
            raise RuntimeVersionError(problem)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub and transformers are imported
    if "huggingface_hub" in sys.modules:  # already imported: switch them off directly
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    line = ran_where()
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # helpers needs no IPython outside a notebook
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(line))
    else:
        print(line)
