"""Where am I running? The environment report every chapter's numbers come from (chapter 00)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

import psutil

from .memory import format_size

__all__ = ["in_colab", "in_kaggle", "report", "PACKAGES"]

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "gguf", "helpers")


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def in_kaggle() -> bool:
    """True inside a Kaggle notebook."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def _version(name: str) -> str:
    dist = {"helpers": "bigger-than-memory"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(path: str | Path = ".") -> dict[str, str]:
    """Versions, CPU, GPU, RAM and free disk (at ``path``) as a dict of strings."""
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
