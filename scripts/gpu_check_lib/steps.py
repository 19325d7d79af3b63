"""What gpu-check runs on the GPU, in order, and how each step's own results are read into the report.

A step is data: a name (also its log's name, OUT/<name>.log), a command line, its own timeout inside the budget
for the whole run, and optionally the file it leaves in OUT with the function that folds that file into the
step's record. Adding a step is adding an entry to :func:`steps`.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Step:
    """One command run under the budget; ``read(record, results)`` folds its ``results`` file into its record."""

    name: str
    command: list[str]
    timeout: float
    results: Optional[Path] = None
    read: Optional[Callable[[dict, Path], None]] = None


# The chapters executed top to bottom on the GPU, each its own step (pass/fail per chapter), with its timeout.
CHAPTERS = {"00_setup": 60.0, "05_hooks_and_offload": 120.0, "07_flash_attention": 120.0,
            "08_layer_streaming": 240.0}


def steps(out: Path) -> list[Step]:
    """The steps, each writing its results into ``out``: the CUDA tests, the benchmark, then each chapter."""
    benchmark = [sys.executable, "benchmarks/streaming.py", "--device", "cuda", "--small", "--rounds", "1",
                 "--json", str(out / "streaming.json")]
    return [
        pytest_step("pytest", ["-m", "cuda", "tests"], 240.0, out),
        Step("benchmark", benchmark, 180.0, out / "streaming.json", read_benchmark),
        *(chapter_step(name, timeout, out) for name, timeout in CHAPTERS.items()),
    ]


def chapter_step(notebook: str, timeout: float, out: Path) -> Step:
    """``book/<notebook>.ipynb`` run top to bottom under ``pytest --nbval-lax`` (every cell must run; outputs are
    compared only where a cell asks) in a kernel of this python (``--nbval-current-env``): step chapter-NN."""
    return pytest_step(f"chapter-{notebook[:2]}", ["--nbval-lax", "--nbval-current-env",
                                                   f"book/{notebook}.ipynb"], timeout, out)


def pytest_step(name: str, args: list[str], timeout: float, out: Path) -> Step:
    """``python -m pytest ARGS`` with its JUnit XML in OUT/<name>.xml, read by :func:`read_pytest`."""
    xml = out / f"{name}.xml"
    # a test file that cannot import (bitsandbytes not to be had, say) is one error in the report, not the end
    command = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "--continue-on-collection-errors",
               "--junitxml", str(xml), "-o", "junit_family=xunit1"]
    return Step(name, command, timeout, xml, read_pytest)


def parse_junit(path: Path) -> dict:
    """pytest's JUnit XML (xunit1): counts overall and per file, and each test's outcome, seconds and message."""
    tests, counts, files = [], {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()
                raised = [ln[1:].strip() for ln in (child.text or "").splitlines() if ln.startswith("E ")]
                if raised and (not message or message[0] == "collection failure"):
                    message = raised[-1:]  # what a file that could not be collected raised
                message = message[0][:300] if message else ""
                break
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        test_id = f"{file}::{case.get('name')}" if case.get("name") else file
        tests.append({"id": test_id, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
        counts[outcome] = counts.get(outcome, 0) + 1
        per_file = files.setdefault(file, {})
        per_file[outcome] = per_file.get(outcome, 0) + 1
    return {"collected": len(tests), "counts": counts, "files": files, "tests": tests}


def read_pytest(record: dict, xml: Path) -> None:
    """Fold the JUnit XML into ``record`` with a summary of the counts; a run where no test passed fails."""
    record.update(parse_junit(xml))
    counts = record["counts"]
    record["summary"] = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test collected"
    if record["status"] == "passed" and not counts.get("passed"):
        record.update(status="failed", summary=record["summary"] + ": no test passed")


def benchmark_figures(path: Path) -> dict:
    """The benchmark report's key figures: its top-level numbers (and flat tables of numbers, such as the bound's
    terms; not the model's config) and each variant's own figures (or its error)."""
    report = json.loads(Path(path).read_text())
    scalar = lambda v: isinstance(v, (int, float, str, bool)) or v is None  # noqa: E731
    figures = {k: v for k, v in report.items() if k != "config" and (
        scalar(v) or (isinstance(v, dict) and all(map(scalar, v.values()))))}
    variants = {name: ({"error": r["error"]} if "error" in r else {k: v for k, v in r.items() if scalar(v)})
                for name, r in report.get("results", {}).items()}
    return {"figures": figures, "variants": variants}


def read_benchmark(record: dict, path: Path) -> None:
    """Fold the benchmark's figures into ``record``, summarised by the bound and the two ratios."""
    record.update(benchmark_figures(path))
    f = record["figures"]
    parts = [f"{k} {f[k]:.3g}" for k in ("bound", "stream_vs_bound", "accelerate_vs_stream") if k in f]
    record["summary"] = ", ".join(parts) or "no bound computed (a variant failed)"
