"""The parts of scripts/gpu_check.py (make gpu-check, make gpu-wheels), one idea per module:

* ``packages``: pyproject.toml's bounds, what the machine has, which carried wheels to install and installing them;
* ``download``: ``--download-wheels``, run here with network: fetch the wheels at the lock's pins, slim bitsandbytes;
* ``probe``: what the machine is (python, torch, CUDA, the GPU), asked in a child process;
* ``steps``: what is run on the GPU (name, command, timeout) and how each step's own results are read;
* ``runner``: running one step in its own process group under the budget for the whole run;
* ``report``: gpu-check.json and gpu-check.txt;
* ``cli``: the command line and the check itself, in order.

Only the standard library is imported at module level, and packaging (or pip's own copy of it), so that they run
on the GPU machine's bare python.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml, requirements.lock, tests, benchmarks


def say(line: str) -> None:
    """One progress line on stdout, prefixed ``gpu-check:``."""
    print(f"gpu-check: {line}", flush=True)
