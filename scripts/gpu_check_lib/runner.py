"""Running the steps under one time budget for the whole run: each in its own process group, its output to its
log and to our stdout, the whole group killed at its timeout (its own, or what is left of the budget)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

from . import ROOT, say
from .steps import Step

RESERVE = 10.0  # seconds of the budget kept for writing the report; a step with less than this is not started


class Budget:
    """Seconds for the whole run, counted from its creation, less :data:`RESERVE` for the report."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for work, the reserve kept back (may be negative)."""
        return self.seconds - self.elapsed() - RESERVE

    def cap(self, limit: float) -> float:
        """``limit``, or what is left if less, but at least one second: the timeout of a short preparation."""
        return max(1.0, min(limit, self.left()))


def run_step(cmd: list[str], *, log: Path, timeout: float, env: Optional[Mapping[str, str]] = None) -> dict:
    """Run ``cmd`` in ROOT in its own process group, its output to ``log`` and to our stdout; kill the group at
    ``timeout`` seconds. Returns status ("passed", "failed", "timed out"), exit code, seconds and the log's tail."""
    if timeout <= 0:
        raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=None if env is None else dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def copy():
            for line in proc.stdout:
                sink.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            code, timed_out = _kill_group(proc), True
        reader.join(timeout=5)
    status = "timed out" if timed_out else ("passed" if code == 0 else "failed")
    tail = Path(log).read_text(errors="replace").splitlines()[-20:]
    return {"command": [str(c) for c in cmd], "status": status, "exit_code": code,
            "seconds": round(time.monotonic() - start, 2), "timeout": round(timeout, 1), "log": Path(log).name,
            "tail": tail if status != "passed" else []}


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM the process group, SIGKILL it if it is still there 5 s later; returns the exit code."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def run_steps(steps: list[Step], records: dict[str, dict], out: Path, env: Mapping[str, str],
              budget: Budget) -> None:
    """Run each step in turn while the budget lasts, its record (status, seconds, summary...) into ``records``."""
    for step in steps:
        timeout = min(step.timeout, budget.left())
        if timeout < RESERVE:
            records[step.name]["summary"] = f"not run: the {budget.seconds:.0f} s budget was spent"
            continue
        if step.results is not None:
            step.results.unlink(missing_ok=True)  # an earlier run's results are not this one's
        say(f"{step.name}: {' '.join(step.command[1:])} (timeout {timeout:.0f} s)")
        record = records[step.name] = run_step(step.command, log=out / f"{step.name}.log", timeout=timeout, env=env)
        if step.read is not None and step.results.is_file():
            step.read(record, step.results)
        if record["status"] != "passed" and not record.get("summary"):
            record["summary"] = f"exit {record['exit_code']}: {(record['tail'] or [''])[-1][:160]}"
        say(f"{step.name}: {record['status']} in {record['seconds']:.1f} s: {record.get('summary', '')}")
