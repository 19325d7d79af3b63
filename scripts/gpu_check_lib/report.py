"""The report: OUT/gpu-check.json (everything) and OUT/gpu-check.txt (a short table), each written atomically."""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from .packages import carried_rows

REPORT_JSON, REPORT_TEXT = "gpu-check.json", "gpu-check.txt"


def now() -> str:
    """The time in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_report(budget: float, wheels: Path, step_names: list[str]) -> dict:
    """The report before anything ran: every step "not run"; the rest is filled in as the check goes."""
    return {"tool": "scripts/gpu_check.py", "started": now(), "budget_seconds": budget,
            "python": sys.executable, "machine": {}, "packages": [],
            "wheels": {"dir": str(wheels), "carried": carried_rows(wheels), "installed": [], "lines": []},
            "steps": {name: {"status": "not run", "seconds": 0.0} for name in step_names}}


def render_text(report: dict) -> str:
    """The short table: the verdict, the machine, the wheels, one row per step, then what did not pass."""
    m = report["machine"]
    lines = [f"gpu-check {report['finished']}: {report['status'].upper()}: {report['message']}"]
    if m.get("gpu"):
        lines.append(f"machine: {m['gpu']} (compute capability {m['compute_capability']}, "
                     f"{m['memory_bytes'] / 2**30:.1f} GiB, driver {m.get('driver') or '?'}, "
                     f"CUDA {m.get('cuda_runtime')}, bf16 {'yes' if m.get('bf16_supported') else 'no'})")
    else:
        lines.append(f"machine: python {m.get('python')}, torch {m.get('torch', 'not importable')}, "
                     f"CUDA runtime {m.get('cuda_runtime')}, no CUDA device")
    pkgs = [f"{p['name']} {p['version'] or 'missing'}{' (carried)' if p['source'] == 'carried' else ''}"
            for p in report["packages"]]
    lines.append("versions: " + ", ".join(pkgs))
    lines += [f"wheel {w['action']}: {w['name']}: {w['why']}" for w in report["wheels"]["lines"] if w["action"] != "ok"]
    lines.append(f"{'step':<11}{'status':<11}{'seconds':>8}  summary")
    for name, step in report["steps"].items():
        lines.append(f"{name:<11}{step['status']:<11}{step['seconds']:>8.1f}  {step.get('summary', '')}")
    for step in report["steps"].values():
        lines += [f"  {t['outcome']}: {t['id']}: {t['message']}" for t in step.get("tests", [])
                  if t["outcome"] != "passed"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, fsync it and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # our own temporary file, never the finished one


def write_report(out: Path, report: dict) -> None:
    """OUT/gpu-check.json and OUT/gpu-check.txt, each atomically."""
    write_atomic(out / REPORT_JSON, json.dumps(report, indent=1))
    write_atomic(out / REPORT_TEXT, render_text(report))
