"""The command line, and the check itself in order: probe the machine, install the carried wheels it needs, run
the steps under the budget, write the report whatever happened."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import ROOT, say
from .download import download_wheels
from .packages import carried_wheels, install_wheels, installed_versions, package_rows, plan_wheels, wanted_requirements
from .probe import probe_machine
from .report import REPORT_JSON, REPORT_TEXT, new_report, now, render_text, write_report
from .runner import RESERVE, Budget, run_steps
from .steps import Step, steps

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
# seconds for the whole run: what is left after the tests and the benchmark goes to the chapters, in order; under
# the 600 s a command may run on the GPU machines we check on, so that the report is always written
BUDGET = 570.0
NO_CUDA = "no CUDA device: nothing GPU-verified"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONUNBUFFERED": "1"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line, checked before any work (argparse exits 2 on a bad one)."""
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description="make gpu-check: the CUDA tests and the GPU benchmark on a CUDA machine "
        "with no network; make gpu-wheels: fetch the wheels it lacks", epilog="exit status: 0 passed, 1 a step "
        "failed or timed out, 3 no CUDA device (nothing GPU-verified), 2 bad usage")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-report"),
                   help="the report's folder (default $OUT, else gpu-report)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default .whl)")
    p.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for the whole run (default {BUDGET:.0f})")
    p.add_argument("--download-wheels", type=Path, metavar="DIR", help="here, with network: fetch the wheels")
    p.add_argument("--bnb-libs", default="cuda13", help="with --download-wheels: bitsandbytes libraries to keep "
                   "(comma-separated backend prefixes; empty keeps all)")
    p.add_argument("names", nargs="*", help="with --download-wheels: the packages, pinned by requirements.lock")
    a = p.parse_args(argv)
    if a.download_wheels:
        if not a.names:
            p.error("--download-wheels needs the names of the packages to fetch")
        return a
    if a.names:
        p.error(f"package names {a.names} are only for --download-wheels")
    if not a.budget > 3 * RESERVE:
        p.error(f"--budget {a.budget} must be more than {3 * RESERVE:.0f} seconds")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    return a


def main(argv: Optional[list[str]] = None) -> int:
    """Run gpu-check (or the download) as the command line says; returns the exit status."""
    a = parse_args(argv)
    if a.download_wheels:
        download_wheels(a.download_wheels, a.names, ROOT / "requirements.lock", [k for k in a.bnb_libs.split(",") if k])
        return EXIT_OK
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(a.budget)
    plan = steps(out)
    report = new_report(a.budget, a.wheels, [s.name for s in plan])
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    try:
        status, message, code = check(report, plan, out, site, a.wheels, budget)
    except Exception as e:  # the report is written whatever broke, and says it
        status, message, code = "failed", f"gpu-check itself failed: {type(e).__name__}: {e}", EXIT_FAILED
    finally:
        shutil.rmtree(site, ignore_errors=True)
    report.update(status=status, message=message, exit_code=code, finished=now(), seconds=round(budget.elapsed(), 1))
    write_report(out, report)
    print(render_text(report), end="", flush=True)
    say(f"report in {out / REPORT_JSON} and {out / REPORT_TEXT}; exit {code}")
    return code


def check(report: dict, plan: list[Step], out: Path, site: Path, wheels: Path,
          budget: Budget) -> tuple[str, str, int]:
    """Probe, install what is missing, run ``plan``; fills ``report``, returns (status, message, exit code)."""
    env = dict(os.environ, **OFFLINE)
    machine = report["machine"] = probe_machine(env, timeout=budget.cap(120.0))
    wanted = wanted_requirements()
    if not machine.get("cuda_available"):
        report["packages"] = package_rows(wanted, [])
        if "torch" not in machine:  # torch cannot say whether there is a device: the machine is not as expected
            why = (f"torch is not importable ({machine['torch_error']})" if "torch_error" in machine else
                   f"the probe failed ({machine.get('probe_error')})") + f": {NO_CUDA}"
            say(why)
            return "failed", why, EXIT_FAILED
        say(NO_CUDA)
        return "no-cuda", NO_CUDA, EXIT_NO_CUDA

    install, lines = plan_wheels(wanted, installed_versions([r.name for r in wanted]), carried_wheels(wheels))
    report["wheels"]["lines"] = lines
    for line in lines:
        if line["action"] != "ok":
            say(f"{line['action']} {line['name']}: {line['why']}")
    path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if install:
        error = install_wheels(install, site, timeout=budget.cap(120.0))
        if error:
            say(f"pip could not install the carried wheels, running without them: {error[-300:]}")
            report["wheels"]["pip_error"] = error[-1000:]
        else:
            report["wheels"]["installed"] = [w.name for w in install]
            path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(path)
    report["packages"] = package_rows(wanted, path)

    run_steps(plan, report["steps"], out, env, budget)
    failed = [n for n, s in report["steps"].items() if s["status"] != "passed"]
    if failed:
        return "failed", f"on {machine.get('gpu')}: {', '.join(failed)} did not pass", EXIT_FAILED
    return "ok", f"every step passed on {machine.get('gpu')}: {', '.join(report['steps'])}", EXIT_OK
