"""make gpu-check: the CUDA tests and the GPU benchmark on a CUDA machine with no network, as one command.

    python3 scripts/gpu_check.py [--out gpu-report] [--wheels .whl] [--budget 450]     (make gpu-check)
    python3 scripts/gpu_check.py --download-wheels .whl [--bnb-libs cuda13] NAME ...   (make gpu-wheels, here)

It uses the machine's own python as it is (no venv, nothing downloaded) and, in order:

1. probes the machine in a child process (torch, CUDA, the GPU). Without a CUDA device it writes the report with
   "no CUDA device: nothing GPU-verified" and exits 3: it never runs the steps on the CPU and calls that a check;
2. compares what is installed with pyproject.toml's dependencies (and bitsandbytes, pytest, hypothesis from its
   extras); what is missing or older than its bound is installed from the wheels carried in ``--wheels``
   (``pip install --no-index --no-deps --target`` into a temporary folder put first on ``PYTHONPATH``), and only
   when the wheel's own requirements are met there; anything else is skipped with one line saying why;
3. runs ``python3 -m pytest -m cuda tests -p no:cacheprovider`` (with ``--continue-on-collection-errors`` and
   ``--junitxml``) and then
   ``python3 benchmarks/streaming.py --device cuda --small --rounds 1 --json OUT/streaming.json``, each with its
   own timeout inside one budget for the whole run (``--budget``, default 450 s, under 8 minutes);
4. writes OUT/gpu-check.json (machine, versions, wheels, each step's status, duration, per-test outcomes and
   the benchmark's key figures) and OUT/gpu-check.txt (a short table), atomically, next to the steps' logs,
   pytest's JUnit XML and the benchmark's JSON: six files in all.

Exit status: 0 every step passed on a CUDA device; 1 a step failed or timed out (or torch is missing);
3 no CUDA device, nothing GPU-verified; 2 bad command line (argparse).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Optional

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
NO_CUDA = "no CUDA device: nothing GPU-verified"
REPORT_JSON, REPORT_TEXT = "gpu-check.json", "gpu-check.txt"
FROM_EXTRAS = {"book": ("bitsandbytes",), "test": ("pytest", "hypothesis")}  # beyond helpers' dependencies
NEVER_CARRIED = {"torch"}  # the machine's own CUDA build is the point of the check
STEP_TIMEOUTS = {"pytest": 240.0, "benchmark": 180.0}
RESERVE = 10.0  # seconds of the budget kept for writing the report
# pip download's tags for the GPU machine (KINDS.md: CPython 3.12 on x86-64 Linux); pip matches manylinux_2_N exactly
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35))]

PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
else:
    out.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device_count=torch.cuda.device_count(), gpu=p.name, compute_capability=f"{p.major}.{p.minor}",
                   memory_bytes=p.total_memory, multiprocessors=p.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
print("PROBE " + json.dumps(out))
"""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


# --------------------------------------------------------------------------- what is needed, what is carried

def wanted_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """helpers' dependencies and the few extras the CUDA tests need, as pyproject.toml bounds them."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, names in FROM_EXTRAS.items():
        reqs += [r for r in map(Requirement, project["optional-dependencies"][extra]) if r.name in names]
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
    for wheel in sorted(Path(directory).glob("*.whl")) if Path(directory).is_dir() else []:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        carried.setdefault(canonicalize_name(name), []).append((version, wheel))
    return carried


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's own Requires-Dist that apply here (markers evaluated, no extras)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def plan_wheels(wanted: Iterable[Requirement], installed: Mapping[str, Optional[Version]],
                carried: Mapping[str, list[tuple[Version, Path]]]) -> tuple[list[Path], list[dict]]:
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

    def meets(req: Requirement, version: Optional[Version]) -> bool:
        return version is not None and req.specifier.contains(version, prereleases=True)

    lines: dict[str, dict] = {}
    chosen: dict[str, tuple[Version, Path]] = {}
    queue: list[tuple[Requirement, Optional[str]]] = [(r, None) for r in wanted]
    while queue:
        req, needed_by = queue.pop(0)
        name, have = canonicalize_name(req.name), machine(canonicalize_name(req.name))
        if name in chosen or (needed_by is not None and meets(req, have)):
            continue  # a wheel's requirement the machine meets, or a wheel already chosen (checked below)
        line = lines.setdefault(name, {"name": name, "required": str(req.specifier) or "any",
                                       "found": str(have) if have else None})
        if meets(req, have):
            line.update(action="ok", why="installed here")
            continue
        problem = "not installed here" if have is None else f"{have} here is outside {req.specifier}"
        if needed_by is not None:
            problem += f"; needed by {needed_by}"
        fits = sorted((v, w) for v, w in carried.get(name, []) if req.specifier.contains(v, prereleases=True))
        if name in NEVER_CARRIED:
            line.update(action="skip", why=f"{problem}; {name} is never carried (the machine's own build is tested)")
        elif not fits:
            others = ", ".join(w.name for _, w in carried.get(name, []))
            line.update(action="skip", why=f"{problem}; no carried wheel meets {req.specifier or 'it'}"
                        + (f" (carried: {others})" if others else " (make gpu-wheels)"))
        else:
            chosen[name] = fits[-1]
            line.update(action="install", why=problem, wheel=fits[-1][1].name, version=str(fits[-1][0]))
            queue += [(r, name) for r in wheel_requirements(fits[-1][1])]
    while True:  # drop every wheel whose own requirements stay unmet, until none is left to drop
        unmet = {}
        for name, (_, wheel) in chosen.items():
            for r in wheel_requirements(wheel):
                n = canonicalize_name(r.name)
                v = chosen[n][0] if n in chosen else machine(n)
                if not meets(r, v):
                    unmet.setdefault(name, []).append(f"{r} (found {v or 'none'})")
        if not unmet:
            break
        for name, why in unmet.items():
            del chosen[name]
            line = lines[name]
            line.update(action="skip", why=f"{line['why']}; {line.pop('wheel')} needs {', '.join(why)}")
    return [w for _, w in chosen.values()], list(lines.values())


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


def download_wheels(directory: Path, names: list[str], lock: Path, bnb_libs: list[str],
                    python_version: str = "3.12") -> list[dict]:
    """``pip download`` each of ``names`` at its requirements.lock pin for the GPU machine (CPython
    ``python_version``, manylinux x86-64) into ``directory``, one version per name; bitsandbytes slimmed to
    ``bnb_libs`` (all kept if empty). Returns [{"wheel", "bytes"}]."""
    pins = {}
    for line in Path(lock).read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version
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
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp",
                   *[a for p in PLATFORMS for a in ("--platform", p)], "-d", staging, f"{name}=={pins[name]}"]
            subprocess.run(cmd, check=True)
            (_, wheel), = carried_wheels(Path(staging))[name]
            if name == "bitsandbytes" and bnb_libs:
                saved = slim_wheel(wheel, bnb_libs)
                say(f"{wheel.name}: kept the cpu and {', '.join(bnb_libs)}* libraries, {saved / 2**20:.1f} MiB "
                    "dropped")
            for _, old in carried_wheels(directory).get(name, []):
                old.unlink()  # one version of each: two stop the whole install there
            os.replace(wheel, directory / wheel.name)
        rows.append({"wheel": wheel.name, "bytes": (directory / wheel.name).stat().st_size})
    carried = carried_wheels_rows(directory)
    width = max(len(r["wheel"]) for r in carried)
    for r in carried:
        print(f"  {r['wheel']:<{width}} {r['bytes'] / 2**20:8.2f} MiB")
    print(f"  {'total in ' + str(directory):<{width}} {sum(r['bytes'] for r in carried) / 2**20:8.2f} MiB")
    return rows


def carried_wheels_rows(directory: Path) -> list[dict]:
    return [{"wheel": w.name, "bytes": w.stat().st_size}
            for versions in carried_wheels(directory).values() for _, w in versions]


def install_wheels(wheels: list[Path], site: Path, timeout: float = 120.0) -> Optional[str]:
    """``pip install --no-index --no-deps`` the ``wheels`` into the folder ``site`` (for ``PYTHONPATH``); returns
    pip's error, or None when they are installed."""
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--target", str(site), *map(str, wheels)],
                         capture_output=True, text=True, timeout=timeout)
    return (pip.stderr.strip() or f"pip exited with {pip.returncode}") if pip.returncode else None


# --------------------------------------------------------------------------- steps

def run_step(cmd: list[str], *, log: Path, timeout: float, cwd: Path = ROOT,
             env: Optional[Mapping[str, str]] = None) -> dict:
    """Run ``cmd`` in its own process group, its output to ``log`` and to our stdout; kill the group at
    ``timeout`` seconds. Returns status ("passed", "failed", "timed out"), exit code, seconds and the log's tail."""
    if timeout <= 0:
        raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=None if env is None else dict(env), stdout=subprocess.PIPE,
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
            timed_out = True
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
            code = proc.wait()
        reader.join(timeout=5)
    seconds = time.monotonic() - start
    tail = Path(log).read_text(errors="replace").splitlines()[-20:]
    status = "timed out" if timed_out else ("passed" if code == 0 else "failed")
    return {"command": [str(c) for c in cmd], "status": status, "exit_code": code, "seconds": round(seconds, 2),
            "timeout": round(timeout, 1), "log": Path(log).name, "tail": tail if status != "passed" else []}


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


# --------------------------------------------------------------------------- the report

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
    for w in report["wheels"]["lines"]:
        if w["action"] != "ok":
            lines.append(f"wheel {w['action']}: {w['name']}: {w['why']}")
    lines.append(f"{'step':<11}{'status':<11}{'seconds':>8}  summary")
    for name, step in report["steps"].items():
        lines.append(f"{name:<11}{step['status']:<11}{step.get('seconds', 0):>8.1f}  {step.get('summary', '')}")
    for step in report["steps"].values():
        for t in step.get("tests", []):
            if t["outcome"] != "passed":
                lines.append(f"  {t['outcome']}: {t['id']}: {t['message']}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    """OUT/gpu-check.json and OUT/gpu-check.txt, each atomically (helpers.tensorfiles where it imports)."""
    try:
        sys.path.insert(0, str(ROOT))
        from helpers.tensorfiles import atomic_file
    except Exception:  # helpers cannot import on this machine: the same temp + rename, by hand
        atomic_file = None
    for name, text in ((REPORT_JSON, json.dumps(report, indent=1)), (REPORT_TEXT, render_text(report))):
        if atomic_file is not None:
            with atomic_file(out / name) as tmp:
                tmp.write_text(text)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, out / name)


def step_summary(name: str, step: dict, out: Path) -> None:
    """Fold the step's own results (JUnit XML, benchmark JSON) into ``step``."""
    if name == "pytest" and (out / "pytest.xml").is_file():
        step.update(parse_junit(out / "pytest.xml"))
        c = step["counts"]
        step["summary"] = ", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "no test collected"
        if step["status"] == "passed" and not c.get("passed"):
            step.update(status="failed", summary=step["summary"] + ": no CUDA test passed")
    elif name == "benchmark" and (out / "streaming.json").is_file():
        step.update(benchmark_figures(out / "streaming.json"))
        f = step["figures"]
        parts = [f"{k} {f[k]:.3g}" for k in ("bound", "stream_vs_bound", "accelerate_vs_stream") if k in f]
        step["summary"] = ", ".join(parts) or "no bound computed (a variant failed)"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="exit status: 0 passed, 1 a step "
                                "failed or timed out, 3 no CUDA device (nothing GPU-verified), 2 bad usage")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-report"),
                   help="the report's folder (default $OUT, else gpu-report)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default .whl)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--download-wheels", type=Path, metavar="DIR", help="here, with network: fetch the wheels")
    p.add_argument("--bnb-libs", default="cuda13", help="with --download-wheels: bitsandbytes libraries to keep "
                   "(comma-separated backend prefixes; empty keeps all)")
    p.add_argument("names", nargs="*", help="with --download-wheels: the packages, pinned by requirements.lock")
    a = p.parse_args(argv)
    if a.download_wheels:
        if not a.names:
            p.error("--download-wheels needs the names of the packages to fetch")
        download_wheels(a.download_wheels, a.names, ROOT / "requirements.lock",
                        [k for k in a.bnb_libs.split(",") if k])
        return EXIT_OK
    if a.names:
        p.error(f"package names {a.names} are only for --download-wheels")
    if not a.budget > 3 * RESERVE:
        p.error(f"--budget {a.budget} must be more than {3 * RESERVE:.0f} seconds")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report = {"tool": "scripts/gpu_check.py", "started": now(), "budget_seconds": a.budget,
              "python": sys.executable, "machine": {}, "packages": [],
              "wheels": {"dir": str(a.wheels), "carried": carried_wheels_rows(a.wheels), "installed": [],
                         "lines": []},
              "steps": {name: {"status": "not run", "seconds": 0.0} for name in STEP_TIMEOUTS}}
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    try:
        status, message, code = check(report, out, site, a.wheels, a.budget, start)
    except Exception as e:  # the report is written whatever broke, and says it
        status, message, code = "failed", f"gpu-check itself failed: {type(e).__name__}: {e}", EXIT_FAILED
    finally:
        shutil.rmtree(site, ignore_errors=True)
    report.update(status=status, message=message, exit_code=code, finished=now(),
                  seconds=round(time.monotonic() - start, 1))
    write_report(out, report)
    sys.stdout.write(render_text(report))
    say(f"report in {out / REPORT_JSON} and {out / REPORT_TEXT}; exit {code}")
    return code


def check(report: dict, out: Path, site: Path, wheels: Path, budget: float, start: float) -> tuple[str, str, int]:
    """Probe, install what is missing, run the steps; fills ``report``, returns (status, message, exit code)."""
    left = lambda: budget - (time.monotonic() - start) - RESERVE  # noqa: E731
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1")
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                           timeout=max(1.0, min(120.0, left())))
    found = [ln for ln in probe.stdout.splitlines() if ln.startswith("PROBE ")]
    machine = json.loads(found[-1][len("PROBE "):]) if found else {
        "probe_error": (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]}
    if machine.get("cuda_available") and not machine.get("driver") and shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        machine["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    machine["platform"] = platform.platform()
    report["machine"] = machine
    wanted = wanted_requirements()
    if not machine.get("cuda_available"):
        report["packages"] = package_rows(wanted, [])
        if "torch" not in machine:
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
        error = install_wheels(install, site, timeout=max(1.0, min(120.0, left())))
        if error:
            say(f"pip could not install the carried wheels, running without them: {error[-300:]}")
            report["wheels"]["pip_error"] = error[-1000:]
        else:
            report["wheels"]["installed"] = [w.name for w in install]
            path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(path)
    report["packages"] = package_rows(wanted, path)

    # a test file that cannot import (bitsandbytes not to be had, say) is one error in the report, not the end
    commands = {"pytest": [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "--junitxml", str(out / "pytest.xml"),
                           "-o", "junit_family=xunit1"],
                "benchmark": [sys.executable, "benchmarks/streaming.py", "--device", "cuda", "--small",
                              "--rounds", "1", "--json", str(out / "streaming.json")]}
    for name, cmd in commands.items():
        timeout = min(STEP_TIMEOUTS[name], left())
        if timeout < RESERVE:
            report["steps"][name]["summary"] = f"not run: the {budget:.0f} s budget was spent"
            continue
        say(f"{name}: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
        report["steps"][name] = step = run_step(cmd, log=out / f"{name}.log", timeout=timeout, env=env)
        step_summary(name, step, out)
        if step["status"] != "passed" and not step.get("summary"):
            step["summary"] = f"exit {step['exit_code']}: {(step['tail'] or [''])[-1][:160]}"
        say(f"{name}: {step['status']} in {step['seconds']:.1f} s: {step.get('summary', '')}")
    failed = [n for n, s in report["steps"].items() if s["status"] != "passed"]
    if failed:
        return "failed", f"on {machine.get('gpu')}: {', '.join(failed)} did not pass", EXIT_FAILED
    return "ok", f"CUDA tests and benchmark passed on {machine.get('gpu')}", EXIT_OK


def package_rows(wanted: list[Requirement], extra_path: list[str]) -> list[dict]:
    """Each wanted package's version as the steps see it, and whether it came from a carried wheel."""
    names = [r.name for r in wanted]
    machine = installed_versions(names)
    seen = installed_versions(names, path=[*extra_path, *sys.path])
    return [{"name": canonicalize_name(r.name), "required": str(r.specifier) or "any",
             "version": str(seen[canonicalize_name(r.name)]) if seen[canonicalize_name(r.name)] else None,
             "source": "carried" if seen[canonicalize_name(r.name)] != machine[canonicalize_name(r.name)]
             else ("machine" if machine[canonicalize_name(r.name)] else "missing")} for r in wanted]


if __name__ == "__main__":
    sys.exit(main())
